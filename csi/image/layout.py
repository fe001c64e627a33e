"""A local OCI image layout (image-spec `image-layout.md`) as an image source.

`resolve()` reads index.json, picks the manifest by its `org.opencontainers.image.ref.name`
annotation (or digest), and hands it to manifest.resolve, which narrows an index to the
node's platform exactly as for a registry image; every JSON blob is digest-checked.
`open_blob()` streams a layer blob through a VerifyingReader, so corrupt bytes surface as
DataLoss before anything is recorded.

What a root descriptor resolves to is remembered (`_Resolved`): index.json is read at
every resolve, so a tag that moves is seen at once, but the manifest and config blobs
it leads to are content-addressed and were verified when first read, so a warm publish
of a layout image does not read and hash them again.
"""

import collections
import json
import os
import threading

from csi.digest import VerifyingReader, sha256_digest
from csi.errors import InvalidArgument, NotFound
from csi.image import manifest as mf
from csi.image.reference import LayoutReference

REF_NAME = "org.opencontainers.image.ref.name"


class _Resolved:
    """Images resolved from layouts, by (reference, root descriptor, node platform): the
    answer depends on nothing else (every blob below the root is named by digest and was
    verified when read), so it never goes stale. Only successes are kept, the `size` most
    recently used; thread-safe (RPC threads resolve concurrently). A manifest or config
    blob corrupted or deleted after it was first read is not noticed again until the
    entry leaves (as for a registry image already on the node); layer blobs are verified
    whenever they are read."""

    def __init__(self, size: int = 64):
        self._size = size
        self._mu = threading.Lock()
        self._images: collections.OrderedDict[tuple, mf.Image] = collections.OrderedDict()

    def get(self, key: tuple) -> mf.Image | None:
        with self._mu:
            image = self._images.get(key)
            if image is not None:
                self._images.move_to_end(key)
            return image

    def put(self, key: tuple, image: mf.Image) -> None:
        with self._mu:
            self._images[key] = image
            self._images.move_to_end(key)
            while len(self._images) > self._size:
                self._images.popitem(last=False)


_resolved = _Resolved()


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

        desc = self._pick(self._index())
        key = (str(self.ref), desc.digest, desc.size, desc.media_type, mf.node_platform())
        image = _resolved.get(key)
        if image is None:
            image = mf.resolve(str(self.ref), str(self.ref), fetch_manifest(desc),
                               fetch_manifest, lambda d: self._read_json_blob(d, "config"))
            _resolved.put(key, image)
        return image

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
