"""OCI and Docker schema-2 manifests, indexes and image configs: media types and parsing.

Parsing turns JSON into small frozen records and refuses what strata cannot mount with a
message naming the image. `resolve()` is how every image source (a registry, a local OCI
layout) turns a manifest or index into an Image for the node's OS/architecture.
"""

import dataclasses
import json
import logging
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
MAX_INDEX_DEPTH = 4  # indexes within indexes; deeper is refused, not followed

log = logging.getLogger(__name__)


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
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # nested past json.loads
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


def resolve(name: str, what: str, root: tuple[str, str, bytes], fetch_manifest,
            fetch_config) -> Image:
    """The Image that `root` (digest, media type, body of a manifest or index) is for the
    node. An index is narrowed entry by entry, best first (platform_candidates), through
    nested indexes, until one leads to a manifest for the node; an entry that names no
    platform counts only when its config says it is for the node (containerd's
    images.Manifest does the same). `fetch_manifest(descriptor)` gives (digest, media type,
    body) and `fetch_config(descriptor)` bytes, both verified against the descriptor."""
    def narrow(digest: str, media: str, body: bytes, depth: int,
               check: bool) -> Image | None:
        doc = json_object(body, f"{what} manifest {digest}")
        if media in INDEX_TYPES or "manifests" in doc:
            if depth >= MAX_INDEX_DEPTH:
                raise InvalidArgument(f"{what}: indexes nested more than {MAX_INDEX_DEPTH} "
                                      "deep")
            for entry in platform_candidates(parse_index(body, f"{what} index {digest}")):
                image = narrow(*fetch_manifest(entry), depth + 1,
                               check=entry.platform == ("", "", ""))
                if image is not None:
                    return image
            return None
        config_desc, layers = parse_manifest(body, f"{what} manifest {digest}")
        config = fetch_config(config_desc)
        if check:
            plat = config_platform(config, f"{what} config")
            if not runs_on(plat):
                log.info("%s: index entry %s names no platform and its config says %s; "
                         "skipped", what, digest, "/".join(p for p in plat if p) or "none")
                return None
        diff_ids = parse_config_diff_ids(config, f"{what} config")
        if len(diff_ids) != len(layers):
            raise InvalidArgument(f"{what}: the manifest has {len(layers)} layers but the "
                                  f"config lists {len(diff_ids)} diff_ids")
        return Image(
            name=name, manifest_digest=digest, config_digest=config_desc.digest,
            layers=tuple(LayerDesc(d.digest, d.media_type, d.size, diff)
                         for d, diff in zip(layers, diff_ids, strict=True)))

    image = narrow(*root, depth=0, check=False)
    if image is None:
        raise no_platform(what)
    return image
