"""The blob cache: compressed blobs by sha256 digest in `blobs/sha256/HEX`.

`open()` hands out a blob's bytes as a stream while it is still being downloaded: the
download runs on a thread of its own into `tmp/blob-HEX.partial`, hashing each byte as it
writes it (the one sha256 of the blob), and readers follow the file as it grows, waiting
for the bytes that have not arrived yet. The file is the buffer between the network and
the unpacker, so a download may run ahead of a slow unpack without holding anything in
memory. A reader's last read (EOF) returns only once the download has ended and its size
and digest matched; the partial file is then renamed into place. Anything else ends every
reader's stream with the download's error.

An interrupted download keeps its partial file, so the next attempt resumes with an HTTP
Range request (hashing the bytes already there first) instead of starting again; bad bytes
are never kept, nor a partial file on a full disk. Racing readers of one blob share a
single download (single-flight), and the partial file's flock orders downloads of one
blob by different processes (`strata pull` beside the server). A blob already in place is
read through a VerifyingReader, as it may have rotted since it was verified.
Layer blobs are a cache: once a layer is unpacked its blob may be pruned.
"""

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import BinaryIO, Protocol

from csi.digest import CHUNK, ReadStream, VerifyingReader, hex_of
from csi.errors import DataLoss, ResourceExhausted, is_no_space, no_space
from csi.locks import SingleFlight

log = logging.getLogger(__name__)

# fetch(offset, out) appends the blob from byte `offset` to `out` (a file opened for append
# holding the first `offset` bytes); when the server ignores the Range request, or answers
# with a Content-Range that does not start at `offset`, it must `out.seek(0)`,
# `out.truncate()` and write the whole blob.
Fetch = Callable[[int, BinaryIO], None]


class BlobStore:
    def __init__(self, root: str, on_fetch=None, on_bytes=None):
        """`on_fetch(size)`: a blob was downloaded and verified. `on_bytes(digest, n)`: `n`
        more bytes of the blob `digest` arrived (a pull's progress), on the download's
        thread."""
        self.dir = os.path.join(root, "blobs", "sha256")
        self.tmp_dir = os.path.join(root, "tmp")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        self._mu = threading.Lock()
        self._downloads: dict[str, _Download] = {}
        self._flights = SingleFlight()  # get()'s callers, sharing one open()
        self._on_fetch = on_fetch or (lambda nbytes: None)
        self._on_bytes = on_bytes or (lambda digest, nbytes: None)

    def path(self, digest: str) -> str:
        return os.path.join(self.dir, hex_of(digest))

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = os.stat(self.path(digest))
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def open(self, digest: str, size: int, fetch: Fetch, what: str) -> BinaryIO:
        """The blob's bytes as they arrive, verified: a download started now (or joined,
        if one is running), else the blob in place read through a VerifyingReader. Read it
        to EOF (`drain()`) before trusting what was read; closing it before then gives up
        the download (and its partial file) once no other reader follows it."""
        with self._mu:  # then a download's cond, never the other way round
            download = self._downloads.get(digest)
            if download is not None and download.follow():
                return _Follower(self, download)
            if self.has(digest, size):
                return self._cached(digest, size, what)
            download = _Download(self, digest, size, fetch, what)
            self._downloads[digest] = download
            download.follow()
            try:
                threading.Thread(target=download.run, name=f"download blob {digest}",
                                 daemon=True).start()
            except BaseException as e:
                # No thread (a pids limit): nobody would ever end this download, and
                # every later reader of the blob would wait on it for ever.
                del self._downloads[digest]
                download.abandon(e)
                raise
        return _Follower(self, download)

    def get(self, digest: str, size: int, fetch: Fetch, what: str) -> str:
        """The path of the verified blob, downloading it (once) if it is not here."""
        if self.has(digest, size):
            return self.path(digest)

        def download() -> str:
            with self.open(digest, size, fetch, what) as blob:
                blob.drain()
            return self.path(digest)

        return self._flights.do(digest, download)

    def remove(self, digest: str, inode: int | None = None) -> None:
        """Remove a blob; with `inode`, only if the blob there is still that file."""
        path = self.path(digest)
        try:
            if inode is None or os.stat(path).st_ino == inode:
                os.unlink(path)
        except FileNotFoundError:
            pass

    def _cached(self, digest: str, size: int, what: str, path: str | None = None,
                fd: int | None = None) -> VerifyingReader:
        """A blob in place (verified when it was stored), hashed again as it is read."""
        # A descriptor of its own (not a dup, which would share the file offset).
        f = open(f"/proc/self/fd/{fd}" if fd is not None else path or self.path(digest), "rb")

        def evict():
            # Verified when it was stored, so it rotted since (a crash before the data
            # reached the disk): drop it, and the next attempt downloads it again. Only
            # the file we read: another process may have just put a good one in its place.
            log.warning("%s: cached blob is corrupt; removing it", what)
            self.remove(digest, inode=os.fstat(f.fileno()).st_ino)

        return VerifyingReader(f, digest, size, what, on_mismatch=evict)

    def _done(self, download: "_Download") -> None:
        with self._mu:
            if self._downloads.get(download.digest) is download:
                del self._downloads[download.digest]


class _Cancelled(Exception):
    """Every reader of a download went away before its end (the unpack failed)."""


class _Download:
    """One blob being downloaded by its own thread into its partial file, hashed as it is
    written. Readers follow `available`, the bytes on disk that will never change; `fd`
    reads them (open as long as the download runs or a reader follows it)."""

    def __init__(self, store: BlobStore, digest: str, size: int, fetch: Fetch, what: str):
        self.store, self.digest, self.size, self.what = store, digest, size, what
        self._fetch = fetch
        self.cond = threading.Condition()
        self.fd: int | None = None
        self.available = 0
        self.done = False
        self.error: BaseException | None = None
        # False when another process stored the blob while we waited for its flock: the
        # readers then read that file, and hash it themselves.
        self.hashed = True
        self._users = 1  # the thread, and each reader
        self._cancelled = False

    # -- readers ------------------------------------------------------------------------
    def follow(self) -> bool:
        """One more reader; False when the download is being given up (start another)."""
        with self.cond:
            if self._cancelled:
                return False
            self._users += 1
            return True

    def leave(self) -> None:
        with self.cond:
            self._users -= 1
            cancel = not self.done and self._users == 1
            if cancel:
                # Only the thread is left: nobody will read what it fetches. It stops at
                # its next write.
                self._cancelled = True
            self._close_if_unused()
        if cancel:
            self.store._done(self)  # a new open() starts afresh (outside cond: lock order)

    def abandon(self, error: BaseException) -> None:
        """Its thread could not start: ended with `error` for whoever follows it."""
        with self.cond:
            self.error, self.done, self._cancelled = error, True, True
            self._users = 0
            self.cond.notify_all()

    def _close_if_unused(self) -> None:
        if self._users == 0 and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- the download's thread ----------------------------------------------------------
    def run(self) -> None:
        try:
            self._download()
        except BaseException as e:
            with self.cond:
                self.error = e
        finally:
            self.store._done(self)
            with self.cond:
                self.done = True
                self._users -= 1
                self._close_if_unused()
                self.cond.notify_all()

    def _download(self) -> None:
        store, digest, size, what = self.store, self.digest, self.size, self.what
        final = store.path(digest)
        partial = os.path.join(store.tmp_dir, f"blob-{hex_of(digest)}.partial")
        # Everything from the first byte to the rename or the discard happens under the
        # partial file's flock, so a process waiting on it finds either the blob in place,
        # or a fresh file to fetch into, never bytes someone else is judging.
        with _locked_append(partial) as out:
            try:
                if store.has(digest, size):  # the holder we waited for stored it
                    if out.tell() == 0:
                        _unlink(partial)
                    self._publish(os.open(final, os.O_RDONLY | os.O_CLOEXEC), size,
                                  hashed=False)
                    return
                have = out.seek(0, os.SEEK_END)
                if have > size:
                    out.truncate(0)
                    have = 0
                hash_ = _hash_of(partial, have)
                self._publish(os.open(partial, os.O_RDONLY | os.O_CLOEXEC), have)
                sink = _Sink(self, out, hash_, have)
                if have < size:
                    self._fetch(have, sink)
                if sink.written != size:
                    raise DataLoss(f"{what}: got {sink.written} bytes, the descriptor says "
                                   f"{size}")
                got = "sha256:" + sink.hash.hexdigest()
                if got != digest:
                    raise DataLoss(f"{what}: digest mismatch: expected {digest}, got {got}; "
                                   "the downloaded bytes were discarded")
                os.rename(partial, final)
            except (DataLoss, ResourceExhausted, _Cancelled):
                # Bad bytes are never kept, nor a partial filling a disk, nor one nobody
                # wanted any more (its unpack failed: a retry downloads afresh).
                _unlink(partial)
                raise
            except OSError as e:
                if is_no_space(e):
                    _unlink(partial)
                    raise no_space(f"downloading {what}") from e
                raise  # a cut connection: the partial file stays for the next resume
        store._on_fetch(size)

    def _publish(self, fd: int, available: int, hashed: bool = True) -> None:
        with self.cond:
            self.fd, self.available, self.hashed = fd, available, hashed
            self.cond.notify_all()
        if available:  # resumed, or another process's whole blob: progress counts them
            self._progress(available)

    def _progress(self, nbytes: int) -> None:
        try:
            self.store._on_bytes(self.digest, nbytes)
        except Exception:  # a display that fails (a closed pipe) is not a store error
            log.debug("%s: progress callback failed", self.what, exc_info=True)

    def wrote(self, end: int, nbytes: int) -> None:
        """Bytes up to `end` are on disk; `nbytes` of them are new."""
        with self.cond:
            if self._cancelled:
                raise _Cancelled(self.what)
            if end > self.available:
                self.available = end
                self.cond.notify_all()
        if nbytes:
            self._progress(nbytes)


class _Sink:
    """What a fetch writes the blob to: appends to the partial file, hashing every byte.
    After `seek(0)` + `truncate()` (a server that ignored Range) the blob is written again
    from its first byte: bytes already on disk are compared, never overwritten, since
    readers may have taken them already."""

    def __init__(self, download: _Download, out: BinaryIO, hash_, have: int):
        self._download, self._fd = download, out.fileno()
        self.hash = hash_
        self.written = have  # the position of the next byte the fetch writes
        self._end = have  # bytes in the file

    def tell(self) -> int:
        return self.written

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            offset += self._end
        if offset != 0 and offset != self._end:
            raise ValueError("a blob download restarts from byte 0 or goes on at its end")
        if offset == 0:
            self.written = 0
        return offset

    def truncate(self, size: int | None = None) -> None:
        if (self.written if size is None else size) != 0:
            raise ValueError("a blob download is only truncated to start over")
        self.written = 0
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data)
        n = len(view)
        same = max(0, min(n, self._end - self.written))
        if same and os.pread(self._download.fd, same, self.written) != view[:same]:
            raise DataLoss(f"{self._download.what}: the registry sent other bytes for the "
                           "same range when the download started over; discarded")
        rest = view[same:]
        while rest:
            rest = rest[os.write(self._fd, rest):]
        self.hash.update(view)
        self.written += n
        grown = max(0, self.written - self._end)
        self._end = max(self._end, self.written)
        self._download.wrote(self._end, grown)
        return n

    def flush(self) -> None:
        pass


class Idle(Protocol):
    """What a reader gives up while it waits for bytes (layers.py's unpack slot)."""

    def release(self) -> None: ...

    def acquire(self) -> None: ...


class _Follower(ReadStream):
    """A reader of a blob being downloaded: returns bytes as they reach the partial file
    and EOF once the download has verified them all; raises the download's error as soon
    as it has one."""

    def __init__(self, store: BlobStore, download: _Download):
        self._store, self._download = store, download
        self._pos = 0
        self._closed = False
        self._own: VerifyingReader | None = None  # another process's blob: hashed here
        # Released while this reader waits for bytes, taken again before it returns any
        # (layers.py: an unpack slot, so that a slow download holds none).
        self.idle: Idle | None = None

    @property
    def downloading(self) -> bool:
        """For a pull's progress: the blob's bytes are still arriving."""
        d = self._download
        return not d.done and d.error is None

    def read(self, n: int = -1) -> bytes:
        if self._own is not None:
            return self._own.read(n)
        if n is None or n < 0:
            chunks = []
            while chunk := self.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        if n == 0:
            return b""
        d = self._download

        def starved() -> bool:
            return d.error is None and not d.done and (d.fd is None or
                                                       self._pos >= d.available)

        while True:
            with d.cond:
                if self.idle is None:
                    while starved():
                        d.cond.wait()
                if not starved():
                    if d.error is not None:
                        raise d.error
                    if not d.hashed:
                        self._own = self._store._cached(d.digest, d.size, d.what, fd=d.fd)
                        return self._own.read(n)
                    fd, end = d.fd, d.available
                    break
            # Waiting for the network (or another process's flock): the slot goes to
            # someone with bytes to work on, and is taken back outside `cond` (another
            # reader of this download may hold a slot and want `cond`).
            self.idle.release()
            try:
                with d.cond:
                    while starved():
                        d.cond.wait()
            finally:
                self.idle.acquire()
        if self._pos >= end:  # done and verified
            return b""
        data = os.pread(fd, min(n, end - self._pos), self._pos)
        self._pos += len(data)
        return data

    def drain(self) -> None:
        """Read to EOF (formats such as tar may stop before the end) and verify."""
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._own is not None:
            self._own.close()
        self._download.leave()

    def __enter__(self) -> "_Follower":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _hash_of(path: str, nbytes: int):
    """sha256 of the first `nbytes` of a partial file: what a resumed download already has."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while nbytes and (chunk := f.read(min(CHUNK, nbytes))):
            h.update(chunk)
            nbytes -= len(chunk)
    return h


def _locked_append(path: str) -> BinaryIO:
    """`path` opened for append (unbuffered: readers follow the file as it grows) under an
    exclusive flock: another process (`strata pull` beside the server) may be fetching the
    same blob. If the holder we waited for deleted the file (bad bytes), our descriptor is
    an orphan: open the path again."""
    while True:
        out = open(path, "ab", buffering=0)
        try:
            fcntl.flock(out, fcntl.LOCK_EX)
            if os.fstat(out.fileno()).st_ino == os.stat(path).st_ino:
                return out
        except FileNotFoundError:
            pass
        except BaseException:
            out.close()
            raise
        out.close()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
