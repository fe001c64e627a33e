"""The layer store: each layer unpacked once per node into `layers/ID/fs`, shared by DiffID.

`acquire()` makes every layer of an image present: a layer already recorded is reused
whatever image or position it came from; a missing one is unpacked into `tmp/` as its blob
streams in, its blob digest and DiffID verified, then renamed into place and recorded. The
missing layers of an image are fetched and unpacked concurrently, at most `max_unpacks`
unpacks at once in this process (--max-parallel-unpacks), each layer committed on its
own once complete. Racing requests for the same layer share one unpack (single-flight). A
layer is recorded only once it is complete and synced to disk (durable.py), so neither a
failure nor a power cut leaves a row naming files that are not there. The store knows
layers, not images: callers hand it layer descriptors and a source of their blobs.

Layer IDs are the first 16 hex digits of the DiffID: short, so that long `lowerdir=` lists
still fit in the one page the kernel accepts for mount options, and stable across restarts.
"""

import contextlib
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import BinaryIO, Protocol

from csi.digest import VerifyingReader, hex_of
from csi.errors import (
    Aborted,
    DataLoss,
    Internal,
    InvalidArgument,
    StrataError,
    is_no_space,
    no_space,
)
from csi.locks import FileLock, SingleFlight
from csi.paths import StorePaths
from csi.store import durable, unpack
from csi.store.compression import decompress
from csi.store.state import Layer, State, Tx
from csi.tree import remove_tree, usage
from csi.units import human_bytes

log = logging.getLogger(__name__)


class LayerBlob(Protocol):
    """What the store needs to know of a layer to unpack it (an image's layer descriptor
    has these): its blob, what the blob unpacks to, and how it is compressed."""

    digest: str
    diff_id: str
    media_type: str

    @property
    def compression(self) -> str: ...


class BlobSource(Protocol):
    def open_blob(self, layer: LayerBlob) -> BinaryIO:
        """The blob's bytes, verified against its digest by the time they are read to the
        end (`drain()` reads to the end and checks): a VerifyingReader, or a download's
        stream (blobs.py). Called by several threads at once, one per layer.

        A source may also have `committed(layer)`: called once the layer unpacked from its
        blob is recorded, so that the compressed copy can go at once (pulls.py)."""


# Layers a pull downloads ahead of its unpacks: their blobs stream to disk while the
# unpack slots are busy, so that an unpack rarely waits for the network.
AHEAD = 2


def layer_id(diff_id: str) -> str:
    return hex_of(diff_id)[:16]


class Lease:
    """Layers held by a lease (references GC respects) for as long as a caller needs them:
    from making them present until the caller's own record references them. The caller
    hands the lease over in the transaction that writes that record (`hand_over`), so the
    layers are never unreferenced in between and no transaction of its own ends it; a
    lease not handed over ends when its `acquire` block does. `on_end` adds what must be
    written wherever the lease ends (the image record, pulls.py)."""

    def __init__(self, token: str, layer_ids: list[str]):
        self.token = token
        self.layer_ids = layer_ids
        self._on_end: list = []
        self._ended = False

    def on_end(self, fn) -> None:
        """`fn(tx)`, in the transaction that ends the lease, before it ends."""
        self._on_end.append(fn)

    def hand_over(self, tx: Tx) -> None:
        """End the lease in `tx`, the caller's transaction that references the layers on
        its own (a publication, a stage); it has ended once `tx` commits."""
        self._end(tx)
        tx.after_commit(self._done)

    def _end(self, tx: Tx) -> None:
        for fn in self._on_end:
            fn(tx)
        tx.end_lease(self.token)

    def _done(self) -> None:
        self._ended = True


class LayerStore:
    def __init__(self, paths: StorePaths, state: State, clock=time.time, on_unpack=None,
                 sync=durable.syncfs, max_unpacks: int | None = None):
        """`sync(fd)` makes the filesystem of the open directory `fd` durable (syncfs; a
        benchmark passes a no-op to measure what it costs). `max_unpacks`: how many layers
        this process unpacks at once, whatever the number of pulls
        (--max-parallel-unpacks; default: the CPUs it may run on)."""
        self.paths = paths
        self.max_unpacks = max(1, max_unpacks or len(os.sched_getaffinity(0)) or 1)
        # Held from an unpack's first read of its blob to its syncfs, but not while it waits
        # for the network (_Slot). A blob's download starts before (the partial file is
        # the buffer).
        self._slots = threading.BoundedSemaphore(self.max_unpacks)
        self._sync = sync
        os.makedirs(paths.layers, mode=0o700, exist_ok=True)
        os.makedirs(paths.tmp, mode=0o700, exist_ok=True)
        self.state = state
        self._clock = clock
        self._flights = SingleFlight()
        # Orders layer-dir renames between unpack and GC, across processes too.
        self._dirs = FileLock(paths.layers_lock)
        self._mu = threading.Lock()
        self._unpacked = 0
        self._on_unpack = on_unpack or (lambda layer, seconds, nbytes: None)

    @property
    def unpacked(self) -> int:
        """Layers this process unpacked so far (GC looks again when this grows)."""
        with self._mu:
            return self._unpacked

    @contextlib.contextmanager
    def acquire(self, source: BlobSource, blobs: Sequence[LayerBlob]) -> Iterator[Lease]:
        """Make every layer present and hold a lease (a reference) on each until the block
        ends or the caller hands it over, so that GC cannot take a layer between this call
        and the caller recording its own references. Yields the Lease; its layer IDs are in
        the order of `blobs`."""
        token = secrets.token_hex(8)
        lease = None
        try:
            lease = Lease(token, self._ensure_all(source, blobs, token))
            yield lease
        except BaseException:
            self._end_lease(token, lease, failing=True)
            raise
        self._end_lease(token, lease, failing=False)

    def _end_lease(self, token: str, lease: Lease | None, failing: bool) -> None:
        """End a lease not handed over (`lease` None: what _ensure_all leased before it
        failed), with what it writes at its end. When that write fails the lease still
        ends; its error is raised, unless the block already `failing` raises its own
        (the caller's error is the one to report; this one is logged)."""
        if lease is not None and lease._ended:
            return
        try:
            with self.state.transaction() as tx:
                if lease is None:
                    tx.end_lease(token)
                else:
                    lease._end(tx)
        except Exception:
            if lease is None:
                raise
            with self.state.transaction() as tx:
                tx.end_lease(token)
            if not failing:
                raise
            log.exception("ending the lease on layers %s", ", ".join(lease.layer_ids))

    def ensure(self, source: BlobSource, blobs: Sequence[LayerBlob]) -> list[str]:
        """Make every layer present, holding nothing once done. Returns layer IDs."""
        with self.acquire(source, blobs) as lease:
            return lease.layer_ids

    def _ensure_all(self, source: BlobSource, blobs: Sequence[LayerBlob],
                    token: str) -> list[str]:
        """Layer IDs of `blobs`, in order, each leased: the present ones at once, the
        missing ones fetched and unpacked concurrently, base first. Each worker's unpack
        takes one of the store's slots; the workers beyond those download ahead (up to
        AHEAD layers per pull). A layer that fails stops the ones not started yet; the
        others are let finish (what they commit is complete and verified, a cache for the
        retry); the first failure in `blobs` order is raised once all have stopped."""
        ids: list[str | None] = [None] * len(blobs)
        with self.state.transaction() as tx:
            for i, desc in enumerate(blobs):
                layer = tx.layer_by_diff_id(desc.diff_id)
                if layer is not None:
                    tx.lease(token, layer.id)
                    ids[i] = layer.id
        todo = [i for i, lid in enumerate(ids) if lid is None]
        if len(todo) <= 1:
            for i in todo:
                ids[i] = self._ensure_leased(source, blobs[i], token)
            return ids  # type: ignore[return-value]
        mu = threading.Lock()
        queue = iter(todo)  # base first: it gets the first slot
        errors: dict[int, BaseException] = {}

        def work() -> None:
            while True:
                with mu:
                    i = next(queue, None) if not errors else None
                if i is None:
                    return
                try:
                    ids[i] = self._ensure_leased(source, blobs[i], token)
                except BaseException as e:  # raised by the caller below
                    with mu:
                        errors[i] = e

        workers = [threading.Thread(target=work, name=f"unpack {n}", daemon=True)
                   for n in range(min(len(todo), self.max_unpacks + AHEAD))]
        started = []
        try:
            for t in workers:
                t.start()
                started.append(t)
        except BaseException as e:
            # No more threads (a pids limit): the running workers take no new layer and
            # are waited for, so none leases into a token `acquire` has already ended.
            with mu:
                errors[-1] = e
            raise
        finally:
            for t in started:
                t.join()
        if errors:
            first = min(errors)
            for i in sorted(errors)[1:]:
                log.warning("layer %s also failed: %s", blobs[i].digest, errors[i])
            raise errors[first]
        return ids  # type: ignore[return-value]

    def _ensure_leased(self, source: BlobSource, desc: LayerBlob, token: str) -> str:
        for _ in range(3):
            with self.state.transaction() as tx:
                layer = tx.layer_by_diff_id(desc.diff_id)
                if layer is not None:
                    tx.lease(token, layer.id)
                    return layer.id
            self._flights.do(desc.diff_id, lambda: self._unpack(source, desc),
                             share_errors=False)
        # Only an immediate GC with no minimum age can take a fresh layer this often.
        raise Aborted(f"layer {desc.diff_id} was collected three times while being acquired")

    def remove_if_unreferenced(self, lid: str) -> bool:
        """Forget and delete a layer, re-checking inside the transaction that nothing holds
        it. The record goes first, then the files (a crash leaves an orphan dir, which
        start-up removes, never a record without files)."""
        with self._dirs:
            with self.state.transaction() as tx:
                if not tx.forget_layer(lid):
                    return False
            self._discard(self.paths.layer(lid))
        return True

    def remove_unrecorded(self, recorded: set[str]) -> None:
        """Start-up, alone on the store: a layer directory no record names is a leftover of
        a crash between rename and record (unverified as far as we know): delete it."""
        for lid in os.listdir(self.paths.layers):
            if lid not in recorded:
                log.warning("removing unrecorded layer directory %s", lid)
                try:
                    self._discard(self.paths.layer(lid))
                except OSError as e:  # logged: it must not stop the start
                    log.error("cannot remove layer directory %s: %s", lid, e)

    def _discard(self, path: str) -> None:
        """Move a directory out of layers/ atomically, then delete it at leisure."""
        trash = os.path.join(self.paths.tmp, "discard-" + secrets.token_hex(6))
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        remove_tree(trash, ignore_errors=True)

    def _unpack(self, source: BlobSource, desc: LayerBlob) -> Layer:
        with self.state.transaction() as tx:
            layer = tx.layer_by_diff_id(desc.diff_id)  # a flight that just finished
        if layer is not None:
            return layer
        lid = layer_id(desc.diff_id)
        started = time.monotonic()
        # The blob first (a download starts, running ahead while we wait for a slot).
        with source.open_blob(desc) as blob, _Slot(self._slots) as slot:
            if hasattr(blob, "idle"):
                blob.idle = slot  # given up while the unpack waits for the network
            work, size, stats = self._unpack_blob(blob, desc, lid)
        now = self._clock()
        final = self.paths.layer(lid)
        renamed = False
        with self._dirs:
            try:
                with self.state.transaction() as tx:
                    clash = tx.layer(lid)
                    if clash is not None and clash.diff_id != desc.diff_id:
                        raise Internal(f"layer id {lid} collides: {clash.diff_id} vs "
                                       f"{desc.diff_id}")
                    if clash is not None:
                        # Another process (`strata pull` beside the server: single-flight
                        # is per process) recorded it first; its directory may already be
                        # under a pod's overlay, so ours is the one to go (below, once
                        # both locks are released: deleting a layer takes a while).
                        layer = clash
                    else:
                        # Unrecorded, so a leftover of a crash between rename and record.
                        self._discard(final)
                        os.rename(work, final)
                        renamed = True
                        layer = Layer(lid, desc.diff_id, size, now, now)
                        tx.record_layer(layer)
            except BaseException:  # the transaction rolled back: nothing may stay
                remove_tree(work, ignore_errors=True)
                if renamed:
                    self._discard(final)
                raise
        committed(source, desc)
        if not renamed:
            remove_tree(work, ignore_errors=True)
            log.info("layer %s was unpacked meanwhile by another process", lid)
            return layer
        with self._mu:
            self._unpacked += 1
        seconds = time.monotonic() - started
        # From the blob's first byte (a download, when it came from a registry) to recorded.
        log.info("unpacked layer %s (%d entries, %s) in %.2fs", lid, stats.entries,
                 human_bytes(size), seconds,
                 extra={"layer": lid, "digest": desc.digest, "bytes": size,
                        "entries": stats.entries, "seconds": round(seconds, 3)})
        self._on_unpack(layer, seconds, stats.bytes)
        return layer

    def _unpack_blob(self, blob, desc: LayerBlob, lid: str):
        """Unpack the blob into a new directory in tmp/, both digests verified, synced:
        (that directory, its size, unpack stats). Nothing stays behind on failure."""
        work = tempfile.mkdtemp(prefix=f"unpack-{lid}-", dir=self.paths.tmp)
        watch = None
        try:
            # Opened before the first byte is written: syncfs reports the writeback errors
            # seen since its descriptor was opened.
            watch = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fs = os.path.join(work, "fs")
            os.mkdir(fs, 0o755)
            stream = None
            try:
                stream = decompress(blob, desc.compression)
                tar = VerifyingReader(stream, desc.diff_id, None,
                                      f"layer {desc.digest} (DiffID {desc.diff_id})")
                stats = unpack.apply(tar, fs)
                tar.drain()
            except DataLoss:
                raise
            except Exception as e:
                if is_no_space(e):
                    raise
                if stream is not None and stream is not blob:
                    _close_quietly(stream)  # its reader thread must stop reading first
                    stream = None
                # A garbled stream is most often a corrupt blob: DataLoss names it.
                blob.drain()
                if isinstance(e, StrataError):
                    raise
                raise InvalidArgument(f"layer {desc.digest} ({desc.media_type}) cannot "
                                      f"be read: {type(e).__name__}: {e}") from e
            finally:
                if stream is not None and stream is not blob:
                    _close_quietly(stream)  # stops a decompressor's reader thread
            # The blob's end: for a download, the wait for its last bytes and its digest.
            blob.drain()
            # Durable before it is visible or recorded: see durable.py for what this
            # protects (a power cut must not leave a record of files that never reached
            # the disk) and why the rename below needs no sync of its own. The usage walk
            # runs meanwhile (syncfs waits on the disk, the walk on lstat: ~50 ms saved
            # on the nginx base layer); both are done before the rename.
            size = self._usage_while_syncing(fs, watch)
        except OSError as e:
            remove_tree(work, ignore_errors=True)
            if is_no_space(e):
                raise no_space(f"unpacking layer {desc.digest}") from e
            raise
        except BaseException:
            remove_tree(work, ignore_errors=True)
            raise
        finally:
            if watch is not None:
                os.close(watch)
        return work, size, stats

    def _usage_while_syncing(self, fs: str, watch: int) -> int:
        """usage(fs) in bytes, with `self._sync(watch)` run on a second thread meanwhile;
        raises what either raised (the sync's error first), once both have ended."""
        failed: list[BaseException] = []

        def sync() -> None:
            try:
                self._sync(watch)
            except BaseException as e:  # raised below, in the unpacking thread
                failed.append(e)

        syncing = threading.Thread(target=sync, name="syncfs", daemon=True)
        syncing.start()
        try:
            size, _ = usage(fs)
        finally:
            syncing.join()
            if failed:
                raise failed[0]
        return size


def committed(source: BlobSource, desc: LayerBlob) -> None:
    """Tell the source a layer from its blob is recorded, if it has `committed` (a cleanup:
    it cannot fail the layer). A source that wraps another passes it on through this."""
    hook = getattr(source, "committed", None)
    if hook is None:
        return
    try:
        hook(desc)
    except Exception as e:  # the layer is recorded; what is left is the caller's to tidy
        log.warning("after recording layer %s: %s", desc.diff_id, e)


class _Slot:
    """One of the store's unpack slots, held by one unpack, given up by its blob's reader
    while it waits for bytes (blobs.Idle) and taken back before it returns any: a slow or
    stalled download holds no slot that an unpack with bytes could use. The reader may
    run on the decompressor's thread; once the unpack leaves, a late `acquire` takes
    nothing."""

    def __init__(self, slots: threading.Semaphore):
        self._slots = slots
        self._mu = threading.Lock()
        self._held = self._closed = False

    def acquire(self) -> None:
        with self._mu:
            if self._closed:
                return
        self._slots.acquire()
        with self._mu:
            if self._closed:
                self._slots.release()
            else:
                self._held = True

    def release(self) -> None:
        with self._mu:
            if self._held:
                self._held = False
                self._slots.release()

    def __enter__(self) -> "_Slot":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        with self._mu:
            self._closed = True  # from now on an acquire takes nothing
        self.release()


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # closing after a failure may re-raise it; the first error counts
        pass
