"""OCI and Docker schema-2 manifests, indexes and image configs: media types and parsing.

Parsing turns JSON into small frozen records and refuses what strata cannot mount with a
message naming the image. Platform selection from an index picks the node's OS/architecture.
"""

import dataclasses
import json
import platform

from csi.errors import InvalidArgument
from csi.image.reference import is_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = {OCI_INDEX, DOCKER_LIST}
MANIFEST_TYPES = {OCI_MANIFEST, DOCKER_MANIFEST}

# Layer media type → compression. Docker's "rootfs.diff.tar.gzip" is gzip.
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

MAX_MANIFEST_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: tuple[str, str, str] = ("", "", "")  # os, architecture, variant

    def annotation(self, key: str) -> str:
        return dict(self.annotations).get(key, "")


@dataclasses.dataclass(frozen=True)
class LayerDesc:
    """A layer of an image: the blob (`digest`, compressed) and what it unpacks to (`diff_id`)."""

    digest: str
    media_type: str
    size: int
    diff_id: str

    @property
    def compression(self) -> str:
        return LAYER_TYPES[self.media_type]


@dataclasses.dataclass(frozen=True)
class Image:
    """A resolved image: its manifest digest and its layers, bottom (base) first."""

    name: str
    manifest_digest: str
    config_digest: str
    layers: tuple[LayerDesc, ...]
    index_digest: str = ""  # the index the reference named, when it named one


def json_object(data: str | bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return doc


def descriptor(d: object, what: str) -> Descriptor:
    if not isinstance(d, dict):
        raise InvalidArgument(f"{what}: descriptor is not an object")
    digest, size, mt = d.get("digest"), d.get("size"), d.get("mediaType", "")
    if not isinstance(digest, str) or not is_digest(digest):
        raise InvalidArgument(f"{what}: unsupported or malformed digest {digest!r}")
    if not isinstance(size, int) or size < 0:
        raise InvalidArgument(f"{what}: descriptor {digest} has an invalid size {size!r}")
    ann = d.get("annotations") or {}
    plat = d.get("platform") or {}
    if not isinstance(ann, dict) or not isinstance(plat, dict):
        raise InvalidArgument(f"{what}: descriptor {digest} has malformed annotations or "
                              "platform")
    return Descriptor(
        media_type=str(mt), digest=digest, size=size,
        annotations=tuple(sorted((str(k), str(v)) for k, v in ann.items())),
        platform=(str(plat.get("os", "")), str(plat.get("architecture", "")),
                  str(plat.get("variant", ""))),
    )


def parse_index(data: bytes, what: str) -> list[Descriptor]:
    doc = json_object(data, what)
    if doc.get("schemaVersion") != 2:
        raise InvalidArgument(f"{what}: schemaVersion {doc.get('schemaVersion')!r} is not 2")
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise InvalidArgument(f"{what}: 'manifests' is missing")
    return [descriptor(m, what) for m in manifests]


def parse_manifest(data: bytes, what: str) -> tuple[Descriptor, list[Descriptor]]:
    """Return (config descriptor, layer descriptors bottom first)."""
    doc = json_object(data, what)
    if doc.get("schemaVersion") != 2:
        raise InvalidArgument(f"{what}: schema {doc.get('schemaVersion')!r} manifests are not "
                              "supported (only OCI and Docker schema 2)")
    mt = doc.get("mediaType", OCI_MANIFEST)
    if mt in INDEX_TYPES or "manifests" in doc:
        raise InvalidArgument(f"{what} is an index, not a manifest")
    if mt not in MANIFEST_TYPES:
        raise InvalidArgument(f"{what}: unsupported manifest media type {mt!r}")
    config = descriptor(doc.get("config"), what)
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise InvalidArgument(f"{what}: the manifest lists no layers")
    descs = [descriptor(layer, what) for layer in layers]
    for d in descs:
        if d.media_type not in LAYER_TYPES:
            raise InvalidArgument(f"{what}: layer {d.digest} has unsupported media type "
                                  f"{d.media_type!r}")
    return config, descs


def parse_config_diff_ids(data: bytes, what: str) -> list[str]:
    doc = json_object(data, what)
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or rootfs.get("type") != "layers":
        raise InvalidArgument(f"{what}: the image config has no rootfs.diff_ids")
    for d in diff_ids:
        if not isinstance(d, str) or not is_digest(d):
            raise InvalidArgument(f"{what}: malformed diff_id {d!r}")
    return diff_ids


def node_platform() -> tuple[str, str, str]:
    """The node's platform in OCI terms (GOOS/GOARCH names)."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
    variant = {"aarch64": "v8", "arm64": "v8", "armv7l": "v7"}.get(machine, "")
    return "linux", arch.get(machine, machine), variant


def platform_candidates(entries: list[Descriptor],
                        want: tuple[str, str, str] | None = None) -> list[Descriptor]:
    """The index entries the node may run, best first, as containerd ranks them: its
    OS/architecture with the node's variant (or none), then with another variant, then
    entries that name no platform at all (whose config says what they are for)."""
    os_, arch, variant = want or node_platform()
    same = [e for e in entries if e.platform[0] == os_ and e.platform[1] == arch]
    exact = [e for e in same if e.platform[2] in ("", variant)]
    unlabelled = [e for e in entries if e.platform == ("", "", "")]
    return exact + [e for e in same if e not in exact] + unlabelled


def config_platform(data: bytes, what: str) -> tuple[str, str, str]:
    """The platform an image config says it is for."""
    doc = json_object(data, what)
    return (str(doc.get("os", "")), str(doc.get("architecture", "")),
            str(doc.get("variant", "")))


def runs_on(plat: tuple[str, str, str], want: tuple[str, str, str] | None = None) -> bool:
    """Whether an image for `plat` (from its config) runs on the node: same OS and
    architecture; the variant is not a reason to refuse, as in platform_candidates."""
    return tuple(plat[:2]) == tuple((want or node_platform())[:2])


def no_platform(what: str, want: tuple[str, str, str] | None = None) -> InvalidArgument:
    os_, arch, variant = want or node_platform()
    return InvalidArgument(f"{what} has no manifest for platform {os_}/{arch}"
                           f"{'/' + variant if variant else ''}")


def select_platform(entries: list[Descriptor], what: str,
                    want: tuple[str, str, str] | None = None) -> Descriptor:
    candidates = platform_candidates(entries, want)
    if not candidates:
        raise no_platform(what, want)
    return candidates[0]
