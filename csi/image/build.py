"""Writes OCI image layouts from layer recipes: the demo image, test images, benchmarks.

A `LayerBuilder` collects tar entries (files, dirs, symlinks, hardlinks, OCI whiteouts,
opaque markers, trees copied from the host); `write_image()` turns a list of them (base
first) into blobs, a config with DiffIDs, a manifest and index.json, exactly as an image
built by a registry client would look on disk.
"""

import dataclasses
import gzip
import io
import json
import os
import tarfile

from csi.digest import sha256_digest
from csi.image import manifest as mf
from csi.image.layout import REF_NAME

EPOCH = 1_700_000_000  # fixed mtimes keep test images reproducible


@dataclasses.dataclass
class LayerBuilder:
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = dataclasses.field(default_factory=list)

    def _info(self, name: str, type_: bytes, mode: int, uid: int, gid: int,
              mtime: float | None) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid = type_, mode, uid, gid
        ti.mtime = EPOCH if mtime is None else mtime
        return ti

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0,
            mtime: float | None = None) -> "LayerBuilder":
        self.entries.append((self._info(name, tarfile.DIRTYPE, mode, uid, gid, mtime), None))
        return self

    def file(self, name: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0,
             mtime: float | None = None, xattrs: dict[str, str] | None = None) -> "LayerBuilder":
        data = data.encode() if isinstance(data, str) else data
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid, mtime)
        ti.size = len(data)
        if xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self.entries.append((ti, data))
        return self

    def symlink(self, name: str, target: str, uid: int = 0, gid: int = 0) -> "LayerBuilder":
        ti = self._info(name, tarfile.SYMTYPE, 0o777, uid, gid, None)
        ti.linkname = target
        self.entries.append((ti, None))
        return self

    def hardlink(self, name: str, target: str) -> "LayerBuilder":
        ti = self._info(name, tarfile.LNKTYPE, 0o644, 0, 0, None)
        ti.linkname = target
        self.entries.append((ti, None))
        return self

    def whiteout(self, path: str) -> "LayerBuilder":
        """Delete `path` from the layers below (OCI `.wh.NAME`)."""
        parent, base = os.path.split(path.rstrip("/"))
        return self.file(os.path.join(parent, ".wh." + base), b"")

    def opaque(self, dirname: str) -> "LayerBuilder":
        """Hide everything below `dirname` in lower layers (OCI `.wh..wh..opq`)."""
        return self.file(os.path.join(dirname.rstrip("/"), ".wh..wh..opq"), b"")

    def tree(self, src: str, prefix: str) -> "LayerBuilder":
        """Copy a host directory tree (regular files, dirs, symlinks) under `prefix`."""
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel = os.path.relpath(dirpath, src)
            base = prefix if rel == "." else os.path.join(prefix, rel)
            self.dir(base, mode=0o755)
            for fn in sorted(filenames):
                p = os.path.join(dirpath, fn)
                if os.path.islink(p):
                    self.symlink(os.path.join(base, fn), os.readlink(p))
                elif os.path.isfile(p) and os.access(p, os.R_OK):
                    with open(p, "rb") as f:
                        self.file(os.path.join(base, fn), f.read(),
                                  mode=os.stat(p).st_mode & 0o7777)
        return self

    def tar_bytes(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for ti, data in self.entries:
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def _write_blob(layout: str, data: bytes) -> tuple[str, int]:
    digest = sha256_digest(data)
    path = os.path.join(layout, "blobs", "sha256", digest[7:])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return digest, len(data)


def write_image(layout: str, tag: str, layers: list[LayerBuilder],
                compression: str = "gzip") -> str:
    """Add an image to the OCI layout at `layout` (created if needed); returns the
    manifest digest. `compression` is "gzip", "zstd" or "none"."""
    os.makedirs(layout, exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layer_descs, diff_ids = [], []
    for layer in layers:
        tar = layer.tar_bytes()
        diff_ids.append(sha256_digest(tar))
        if compression == "gzip":
            blob, mt = gzip.compress(tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        elif compression == "zstd":
            import zstandard

            blob = zstandard.ZstdCompressor().compress(tar)
            mt = "application/vnd.oci.image.layer.v1.tar+zstd"
        elif compression == "none":
            blob, mt = tar, "application/vnd.oci.image.layer.v1.tar"
        else:
            raise ValueError(f"unknown compression {compression!r}")
        digest, size = _write_blob(layout, blob)
        layer_descs.append({"mediaType": mt, "digest": digest, "size": size})
    config = {
        "architecture": mf.node_platform()[1], "os": "linux",
        "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "strata image builder"} for _ in layers],
    }
    cdigest, csize = _write_blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2, "mediaType": mf.OCI_MANIFEST,
        "config": {"mediaType": mf.OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": layer_descs,
    }
    mdigest, msize = _write_blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index_path = os.path.join(layout, "index.json")
    index = {"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get(REF_NAME) != tag]
    index["manifests"].append({"mediaType": mf.OCI_MANIFEST, "digest": mdigest, "size": msize,
                               "annotations": {REF_NAME: tag}})
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    return mdigest
