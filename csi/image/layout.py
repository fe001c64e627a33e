"""A local OCI image layout (image-spec `image-layout.md`) as an image source.

`resolve()` reads index.json, picks the manifest by its `org.opencontainers.image.ref.name`
annotation (or digest), narrows an index to the node's platform, and reads the config's
DiffIDs; every JSON blob is digest-checked. `open_blob()` streams a layer blob through a
VerifyingReader, so corrupt bytes surface as DataLoss before anything is recorded.
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
        desc = self._pick(self._index())
        # Follow nested indexes (an index entry may itself be a multi-platform index).
        for _ in range(4):
            if desc.media_type not in mf.INDEX_TYPES:
                break
            data = self._read_json_blob(desc, "index")
            desc = mf.select_platform(mf.parse_index(data, f"{self.ref} index"), str(self.ref))
        data = self._read_json_blob(desc, "manifest")
        config_desc, layers = mf.parse_manifest(data, f"{self.ref} manifest {desc.digest}")
        config = self._read_json_blob(config_desc, "config")
        diff_ids = mf.parse_config_diff_ids(config, f"{self.ref} config")
        if len(diff_ids) != len(layers):
            raise InvalidArgument(f"{self.ref}: the manifest has {len(layers)} layers but the "
                                  f"config lists {len(diff_ids)} diff_ids")
        return mf.Image(
            name=str(self.ref),
            manifest_digest=desc.digest,
            config_digest=config_desc.digest,
            layers=tuple(
                mf.LayerDesc(digest=d.digest, media_type=d.media_type, size=d.size, diff_id=diff)
                for d, diff in zip(layers, diff_ids, strict=True)),
        )

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
