"""The layer store: each layer unpacked once per node into `layers/ID/fs`, shared by DiffID.

`ensure()` makes every layer of an image present: a layer already recorded is reused
whatever image or position it came from; a missing one is unpacked into `tmp/`, its blob
digest and DiffID verified, then renamed into place and recorded. Racing requests for the
same layer share one unpack (single-flight). A layer is recorded only once it is complete,
so a failure leaves no row and no directory behind.

Layer IDs are the first 16 hex digits of the DiffID: short, so that long `lowerdir=` lists
still fit in the one page the kernel accepts for mount options, and stable across restarts.
"""

import errno
import logging
import os
import shutil
import tempfile
import time
from typing import Protocol

from csi.errors import DataLoss, Internal, InvalidArgument, ResourceExhausted, StrataError
from csi.image.manifest import Image, LayerDesc
from csi.image.verify import VerifyingReader
from csi.locks import SingleFlight
from csi.store import unpack
from csi.store.compression import decompress
from csi.store.state import ImageRecord, Layer, State
from csi.store.usage import usage

log = logging.getLogger(__name__)


class BlobSource(Protocol):
    def open_blob(self, layer: LayerDesc) -> VerifyingReader: ...


def layer_id(diff_id: str) -> str:
    return diff_id.partition(":")[2][:16]


class LayerStore:
    def __init__(self, root: str, state: State, clock=time.time, on_unpack=None):
        self.root = root
        self.layers_dir = os.path.join(root, "layers")
        self.tmp_dir = os.path.join(root, "tmp")
        os.makedirs(self.layers_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        self._state = state
        self._clock = clock
        self._flights = SingleFlight()
        self._on_unpack = on_unpack or (lambda layer, seconds, nbytes: None)

    def path(self, lid: str) -> str:
        return os.path.join(self.layers_dir, lid, "fs")

    def ensure(self, source: BlobSource, image: Image) -> list[str]:
        """Make every layer of `image` present; record the image. Returns layer IDs, base
        first."""
        ids = [self.ensure_layer(source, desc).id for desc in image.layers]
        with self._state.transaction() as tx:
            tx.put_image(ImageRecord(image.manifest_digest, image.name, image.config_digest,
                                     tuple(ids), self._clock()))
        return ids

    def ensure_layer(self, source: BlobSource, desc: LayerDesc) -> Layer:
        with self._state.transaction() as tx:
            layer = tx.layer_by_diff_id(desc.diff_id)
        if layer is not None:
            return layer
        return self._flights.do(desc.diff_id, lambda: self._unpack(source, desc))

    def _unpack(self, source: BlobSource, desc: LayerDesc) -> Layer:
        with self._state.transaction() as tx:
            layer = tx.layer_by_diff_id(desc.diff_id)  # a flight that just finished
        if layer is not None:
            return layer
        lid = layer_id(desc.diff_id)
        started = time.monotonic()
        work = tempfile.mkdtemp(prefix=f"unpack-{lid}-", dir=self.tmp_dir)
        try:
            fs = os.path.join(work, "fs")
            os.mkdir(fs, 0o755)
            with source.open_blob(desc) as blob:
                try:
                    tar = VerifyingReader(decompress(blob, desc.compression), desc.diff_id,
                                          None, f"layer {desc.digest} (DiffID {desc.diff_id})")
                    stats = unpack.apply(tar, fs)
                    tar.drain()
                except DataLoss:
                    raise
                except Exception as e:
                    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    # A garbled stream is most often a corrupt blob: DataLoss names it.
                    blob.drain()
                    if isinstance(e, StrataError):
                        raise
                    raise InvalidArgument(f"layer {desc.digest} ({desc.media_type}) cannot "
                                          f"be read: {type(e).__name__}: {e}") from e
                blob.drain()
            size, _ = usage(fs)
            final = os.path.join(self.layers_dir, lid)
            if os.path.lexists(final):
                # Unrecorded, so a leftover of a crash between rename and record.
                shutil.rmtree(final)
            os.rename(work, final)
        except OSError as e:
            shutil.rmtree(work, ignore_errors=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"no space left unpacking layer {desc.digest}") from e
            raise
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        now = self._clock()
        try:
            with self._state.transaction() as tx:
                clash = tx.layer(lid)
                if clash is not None and clash.diff_id != desc.diff_id:
                    raise Internal(f"layer id {lid} collides: {clash.diff_id} vs {desc.diff_id}")
                layer = Layer(lid, desc.diff_id, size, now, now)
                tx.put_layer(layer)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        seconds = time.monotonic() - started
        log.info("unpacked layer %s (%d entries, %d bytes) in %.2fs", lid, stats.entries,
                 size, seconds)
        self._on_unpack(layer, seconds, stats.bytes)
        return layer
