"""The operator docs, checked against the code they describe, so that neither can drift:

- docs/configuration.md's settings table has one row per setting declared in csi/config.py
  (flag, environment variable, config-file key, default, commands), plus `--config`, which
  names the file itself;
- its volume-attribute table names exactly the `volume_context` / StorageClass keys that
  the request checks (csi/validate.py) read, found by running them on recording mappings
  (the keys are not declared in one place);
- docs/troubleshooting.md has a section for every gRPC status code strata answers with.
"""

import dataclasses
import pathlib
import re
import types

import pytest

from csi import errors, validate
from csi.config import EVERY, Config, env_name, flag
from csi.proto import csi_pb2

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
CONFIGURATION = DOCS / "configuration.md"
TROUBLESHOOTING = DOCS / "troubleshooting.md"

# `--config` is read before the settings it holds, so it is no field of Config; its shape
# is fixed by the interface the CLI shares with the deploy manifests.
CONFIG_FILE_ROW = {"env": "STRATA_CONFIG", "key": "", "default": "/etc/strata/config.yaml"}


def table(path: pathlib.Path, heading: str) -> list[dict[str, str]]:
    """The first Markdown table in the section under `heading`, as one dict per row keyed
    by the header's cells."""
    lines = path.read_text().splitlines()
    assert heading in lines, f"{path.name}: no section {heading!r}"
    start = lines.index(heading) + 1
    body = []
    for line in lines[start:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            body.append(line)
        elif body:
            break
    assert len(body) > 2, f"{path.name}: no table under {heading!r}"
    header = cells(body[0])
    assert set(body[1]) <= set("|-: "), f"{path.name}: {body[1]!r} is not a separator row"
    rows = []
    for line in body[2:]:
        row = cells(line)
        assert len(row) == len(header), f"{path.name}: {len(row)} cells in {line!r}"
        rows.append(dict(zip(header, row, strict=True)))
    return rows


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def code(cell: str) -> str:
    """The cell's first `code span`; "" when it has none (a default of "none")."""
    m = re.search(r"`([^`]*)`", cell)
    return m.group(1) if m else ""


def default(cell: str) -> str:
    """A default cell: `value`, or "none" (with a reason after it) for an empty one."""
    return "" if cell.startswith("none") else code(cell)


def commands(cell: str) -> set[str]:
    return set(EVERY) if cell == "all" else {c.strip() for c in cell.split(",")}


def rendered(value) -> str:
    """A default as the table writes it: numbers without a needless `.0`, switches as
    true/false, and nothing for an empty value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def settings_rows() -> dict[str, dict[str, str]]:
    rows = table(CONFIGURATION, "## Settings")
    flags = [code(r["flag"]) for r in rows]
    duplicates = sorted({f for f in flags if flags.count(f) > 1})
    assert not duplicates, f"docs/configuration.md: settings listed twice: {duplicates}"
    return dict(zip(flags, rows, strict=True))


FIELDS = dataclasses.fields(Config)


def test_every_setting_has_a_row_and_every_row_a_setting():
    documented = set(settings_rows())
    declared = {flag(f) for f in FIELDS} | {"--config"}
    assert not declared - documented, (
        f"settings without a row in docs/configuration.md: {sorted(declared - documented)}")
    assert not documented - declared, (
        f"rows in docs/configuration.md for no setting: {sorted(documented - declared)}")


@pytest.mark.parametrize("field", FIELDS, ids=flag)
def test_a_settings_row_says_what_its_declaration_says(field):
    row = settings_rows().get(flag(field))
    if row is None:
        pytest.fail(f"{flag(field)} has no row in docs/configuration.md")
    assert code(row["environment"]) == env_name(field)
    assert code(row["file key"]) == flag(field).removeprefix("--")
    assert default(row["default"]) == rendered(field.default), (
        f"{flag(field)}: the docs say {row['default']!r}, csi/config.py {field.default!r}")
    assert commands(row["commands"]) == set(field.metadata["commands"])


def test_the_config_file_row():
    row = settings_rows()["--config"]
    assert code(row["environment"]) == CONFIG_FILE_ROW["env"]
    assert code(row["file key"]) == CONFIG_FILE_ROW["key"]
    assert default(row["default"]) == CONFIG_FILE_ROW["default"]


class Recording(dict):
    """A volume_context that remembers which keys were looked up."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


class Request(types.SimpleNamespace):
    def HasField(self, name):  # noqa: N802 - protobuf's name
        return False


def context(**extra) -> Recording:
    return Recording({"image": "registry.example:5000/team/app:1.0", "pullPolicy": "Always",
                      "sizeLimit": "64Mi", "csi.storage.k8s.io/pod.name": "web-0",
                      "csi.storage.k8s.io/pod.namespace": "team",
                      "csi.storage.k8s.io/pod.uid": "0b4e",
                      "csi.storage.k8s.io/serviceAccount.name": "default", **extra})


def capability() -> csi_pb2.VolumeCapability:
    mode = csi_pb2.VolumeCapability.AccessMode.Mode.SINGLE_NODE_WRITER
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def attributes_read() -> set[str]:
    """Every key the request checks look up, over the four requests that carry attributes:
    an ephemeral publish, a stage, the publish of a staged volume, and CreateVolume."""
    read = set()
    ephemeral = context(**{validate.EPHEMERAL_KEY: "true"})
    validate.publish(Request(volume_id="v", target_path="/pods/a/mount",
                             volume_capability=capability(), staging_target_path="",
                             readonly=False, secrets={}, volume_context=ephemeral))
    staged, stage = context(), context()
    validate.stage(Request(volume_id="v", staging_target_path="/staging/v",
                           volume_capability=capability(), secrets={}, volume_context=stage))
    validate.publish(Request(volume_id="v", target_path="/pods/b/mount",
                             volume_capability=capability(), staging_target_path="/staging/v",
                             readonly=False, secrets={}, volume_context=staged))
    parameters = context()
    validate.create(Request(name="pvc-1", volume_capabilities=[capability()],
                            capacity_range=types.SimpleNamespace(required_bytes=0,
                                                                 limit_bytes=0),
                            parameters=parameters))
    for mapping in (ephemeral, staged, stage, parameters):
        read |= mapping.read
    return read


def test_the_attribute_table_names_exactly_the_attributes_strata_reads():
    rows = table(CONFIGURATION, "## Volume attributes and StorageClass parameters")
    documented = [code(r["attribute"]) for r in rows]
    assert len(documented) == len(set(documented)), "an attribute is listed twice"
    read = attributes_read()
    assert not read - set(documented), (
        f"attributes without a row in docs/configuration.md: {sorted(read - set(documented))}")
    assert not set(documented) - read, (
        f"rows for attributes strata never reads: {sorted(set(documented) - read)}")
    assert set(validate.ATTRIBUTES) == read, "validate.ATTRIBUTES is not what validate reads"


def test_the_kubelets_attributes_are_marked_as_the_kubelets():
    for row in table(CONFIGURATION, "## Volume attributes and StorageClass parameters"):
        name = code(row["attribute"])
        assert (row["set in"] == "kubelet") == name.startswith("csi.storage.k8s.io/"), name


def status_codes() -> set[str]:
    """Every code a StrataError carries, and UNIMPLEMENTED, which the interceptor answers
    for a method strata does not implement."""
    found, todo = set(), [errors.StrataError]
    while todo:
        cls = todo.pop()
        found.add(cls.code.name)
        todo += cls.__subclasses__()
    return found | {"UNIMPLEMENTED"}


def test_troubleshooting_has_a_section_for_every_status_code():
    headings = {m.group(1) for m in re.finditer(r"^### `([A-Z_]+)`", TROUBLESHOOTING.read_text(),
                                                re.MULTILINE)}
    missing = status_codes() - headings
    assert not missing, f"docs/troubleshooting.md has no '### `CODE`' section for {missing}"
