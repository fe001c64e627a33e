"""csi-sanity (kubernetes-csi/csi-test, CSI spec v1.12.0) against `strata serve`."""

import os
import pathlib
import signal
import subprocess
import xml.etree.ElementTree as ET

import pytest

from csi.mount.loop import LoopControl
from tests.conftest import ROOT_REASON, StrataProcess, unmount_all_under

REPO = pathlib.Path(__file__).resolve().parents[2]
BINARY = os.environ.get("CSI_SANITY", str(REPO.parent / "shared" / "bin" / "csi-sanity"))
# With CONTROLLER_SERVICE + CREATE_DELETE_VOLUME and node STAGE_UNSTAGE_VOLUME,
# GET_VOLUME_STATS, SINGLE_NODE_MULTI_WRITER (+ VOLUME_CONDITION) the suite runs 38 specs;
# fewer means a capability or service went missing.
EXPECTED_SPECS = 38


def tally(junit: str) -> dict[str, int]:
    counts = {"total": 0, "passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(junit).getroot().iter("testcase"):
        counts["total"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        elif case.find("skipped") is not None or case.get("status") in ("skipped", "pending"):
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


@pytest.fixture(params=["registry", "layout", "layout-limited"])
def image_source(request, images, tmp_path_factory):
    """(image reference, extra `strata serve` flags, more volume parameters): an image in a
    real registry (the kubelet's case), the same image as a local OCI layout, and that
    again with a `sizeLimit`, so that every publication of the suite is a limited one (a
    filesystem image on a loop device, made and removed per publication)."""
    if request.param == "layout":
        yield images.app, (), ""
        return
    if request.param == "layout-limited":
        yield images.app, (), "sizeLimit: 16Mi\n"
        return
    import shutil

    from tests.registry import Registry, push

    if shutil.which("docker-registry") is None and not os.environ.get("CI"):
        pytest.skip("docker-registry is not installed (.ci/run installs it)")
    layout, tag = images.app[len("oci:"):].rsplit(":", 1)
    with Registry() as reg:
        push(layout, tag, reg, "strata/app", "1")
        yield f"{reg.host}/strata/app:1", ("--insecure-registry", reg.host), ""


@pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)
def test_csi_sanity(tmp_path, image_source):
    image, flags, more = image_source
    plugin = StrataProcess(str(tmp_path), extra_args=flags)
    log = run_sanity(plugin, tmp_path, f"image: {image}\n{more}")
    if more:  # the suite's publications were limited ones (loop.py logs each attach)
        assert "fs.img to /dev/loop" in log, log[-4000:]
    assert os.listdir(os.path.join(plugin.root, "volumes")) == []
    store = os.path.realpath(plugin.root) + os.sep
    assert not [d for d in LoopControl().attached() if d.backing_file.startswith(store)]
    assert not (tmp_path / "mount").exists() and not (tmp_path / "staging").exists()


def run_sanity(plugin: StrataProcess, tmp_path, parameters: str) -> str:
    """csi-sanity against `plugin` (started here; stopped with SIGTERM and everything
    under `tmp_path` unmounted, even when the run failed) with these test volume
    parameters, and what every backend's run must show: every spec that ran passed, at
    least EXPECTED_SPECS of them, a clean stop, no traceback, no mount left. Returns the
    plugin's log."""
    if not os.path.exists(BINARY):
        if os.environ.get("CI"):
            pytest.fail(f"csi-sanity not found at {BINARY}")
        pytest.skip(f"csi-sanity not found at {BINARY} (set CSI_SANITY)")
    params = tmp_path / "params.yaml"
    params.write_text(parameters)
    junit = tmp_path / "sanity.xml"
    # Clean-up only in `finally`: an assertion there would replace the run's own failure
    # and skip the unmount. What the clean-up found is checked after it.
    try:
        plugin.start()
        run = subprocess.run(
            [BINARY, f"--csi.endpoint=unix://{plugin.node_sock}",
             f"--csi.controllerendpoint=unix://{plugin.ctrl_sock}",
             f"--csi.mountdir={tmp_path}/mount", f"--csi.stagingdir={tmp_path}/staging",
             f"--csi.testvolumeparameters={params}", f"-ginkgo.junit-report={junit}",
             "-ginkgo.no-color"],
            capture_output=True, text=True, timeout=600)
    finally:
        try:
            stopped = plugin.stop(signal.SIGTERM)
        finally:
            left = unmount_all_under(str(tmp_path))
    log = plugin.read_log()
    output = f"{run.stdout[-6000:]}{run.stderr[-2000:]}\n--- plugin log ---\n{log[-4000:]}"
    assert junit.exists(), f"csi-sanity wrote no report (exit {run.returncode}):\n{output}"
    counts = tally(str(junit))
    print(f"csi-sanity: {counts}")
    ran = counts["total"] - counts["skipped"]
    assert run.returncode == 0 and counts["failed"] == 0, f"csi-sanity failed {counts}:\n{output}"
    assert counts["passed"] == ran, counts
    assert counts["passed"] >= EXPECTED_SPECS, (
        f"only {counts['passed']} specs ran and passed; expected {EXPECTED_SPECS}")
    assert stopped == 0, f"strata serve exited {stopped} on SIGTERM:\n{log[-4000:]}"
    assert "Traceback" not in log, log[-4000:]
    assert not left, f"csi-sanity run left mounts: {left}"
    return log
