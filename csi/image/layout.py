"""A local OCI image layout (image-spec `image-layout.md`) as an image source.

`resolve()` reads index.json, picks the manifest by its `org.opencontainers.image.ref.name`
annotation (or digest), and hands it to manifest.resolve, which narrows an index to the
node's platform exactly as for a registry image; every JSON blob is digest-checked.
`open_blob()` streams a layer blob through a VerifyingReader, so corrupt bytes surface as
DataLoss before anything is recorded.
"""

import json
import os

from csi.digest import VerifyingReader, sha256_digest
from csi.errors import InvalidArgument, NotFound
from csi.image import manifest as mf
from csi.image.reference import LayoutReference

REF_NAME = "org.opencontainers.image.ref.name"


class OciLayout:
    def __init__(self, ref: LayoutReference):
        self.ref = ref
        self.path = ref.path

    def _blob_path(self, digest: str) -> str:
        algo, _, hex_ = digest.partition(":")
        return os.path.join(self.path, "blobs", algo, hex_)

    def _read_json_blob(self, desc: mf.Descriptor, what: str) -> bytes:
        if desc.size > mf.MAX_MANIFEST_BYTES:
            raise InvalidArgument(f"{what} {desc.digest} is too large ({desc.size} bytes)")
        try:
            with open(self._blob_path(desc.digest), "rb") as f:
                data = f.read(mf.MAX_MANIFEST_BYTES + 1)
        except OSError as e:
            raise _os_error(f"{self.ref}: blob {desc.digest} ({what})", e) from None
        if sha256_digest(data) != desc.digest or len(data) != desc.size:
            raise InvalidArgument(f"{self.ref}: {what} {desc.digest} does not match its digest")
        return data

    def _index(self) -> list[mf.Descriptor]:
        try:
            with open(os.path.join(self.path, "oci-layout")) as f:
                version = json.load(f).get("imageLayoutVersion")
        except FileNotFoundError:
            raise NotFound(f"{self.ref}: no OCI image layout at {self.path}") from None
        except OSError as e:
            raise _os_error(f"{self.ref}: {self.path}/oci-layout", e) from None
        except (ValueError, AttributeError):
            raise InvalidArgument(f"{self.ref}: {self.path}/oci-layout is malformed") from None
        if version != "1.0.0":
            raise InvalidArgument(f"{self.ref}: unsupported imageLayoutVersion {version!r}")
        try:
            with open(os.path.join(self.path, "index.json"), "rb") as f:
                data = f.read(mf.MAX_MANIFEST_BYTES + 1)
        except OSError as e:
            raise _os_error(f"{self.ref}: {self.path}/index.json", e) from None
        return mf.parse_index(data, f"{self.ref} index.json")

    def _pick(self, entries: list[mf.Descriptor]) -> mf.Descriptor:
        tag = self.ref.tag
        if not tag:
            if len(entries) != 1:
                raise InvalidArgument(f"{self.ref}: the layout holds {len(entries)} images; "
                                      "name one with :TAG")
            return entries[0]
        found = [e for e in entries if e.digest == tag or e.annotation(REF_NAME) == tag]
        if not found:
            raise NotFound(f"{self.ref}: tag {tag!r} not found in {self.path}/index.json")
        return found[0]

    def resolve(self) -> mf.Image:
        def fetch_manifest(desc: mf.Descriptor) -> tuple[str, str, bytes]:
            kind = "index" if desc.media_type in mf.INDEX_TYPES else "manifest"
            return desc.digest, desc.media_type, self._read_json_blob(desc, kind)

        root = fetch_manifest(self._pick(self._index()))
        return mf.resolve(str(self.ref), str(self.ref), root, fetch_manifest,
                          lambda desc: self._read_json_blob(desc, "config"))

    def open_blob(self, layer: mf.LayerDesc) -> VerifyingReader:
        try:
            raw = open(self._blob_path(layer.digest), "rb")
        except OSError as e:
            raise _os_error(f"{self.ref}: layer blob {layer.digest}", e) from None
        return VerifyingReader(raw, layer.digest, layer.size, f"{self.ref} layer {layer.digest}")


def _os_error(what: str, e: OSError) -> InvalidArgument | NotFound:
    """Missing → NOT_FOUND; there but unusable (a file where a dir should be, no access) →
    INVALID_ARGUMENT; either way with the reason."""
    if isinstance(e, FileNotFoundError):
        return NotFound(f"{what} is missing")
    return InvalidArgument(f"{what}: {e.strerror or e}")
