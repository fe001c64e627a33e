"""Layer blob decompression as streams: gzip (ISA-L's igzip where it installed, zlib
otherwise), zstd and plain tar. Nothing is buffered whole: memory stays flat whatever the
layer size.

The compression is read from the blob's first bytes, as containerd's DecompressStream does;
the media type only names what the blob should be. Some build tools label uncompressed
layers `tar.gzip`, and the DiffID check after decompression is what vouches for the
content either way."""

import gzip
import hashlib
import logging
import queue
import threading
import zlib
from typing import BinaryIO

from csi.digest import ReadStream, VerifyingReader
from csi.errors import DataLoss, InvalidArgument

try:  # ISA-L inflates 1.6-2x faster than zlib (PERFORMANCE.md); optional, as it is native
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - depends on the platform's wheels
    _zlib = zlib

try:
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None

GZIP_IMPL = "isal" if _zlib is not zlib else "zlib"
GZIP_MAGIC = b"\x1f\x8b\x08"  # with "deflate", the only method gzip defines
ZSTD_MAGIC = 0xFD2FB528
ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)  # frames a zstd stream may start with

# The inflate thread reads the blob IN_CHUNK bytes at a time and hands the tar on in pieces
# of at most OUT_CHUNK, at most QUEUED of them waiting: memory stays at a few MiB whatever
# the compression ratio. Big pieces matter: each one costs the thread a few GIL hand-backs,
# each of which may wait a switch interval (5 ms) for the busy unpacking thread.
IN_CHUNK = 1 << 20
OUT_CHUNK = 4 << 20
QUEUED = 2

log = logging.getLogger(__name__)


class _Prefixed(ReadStream):
    """A stream with its first bytes, already read to sniff them, put back in front."""

    def __init__(self, raw: BinaryIO, head: bytes):
        self._raw, self._head = raw, head

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._raw.read(n)
        if n is None or n < 0:
            data, self._head = self._head + self._raw.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        return data if len(data) == n else data + self._raw.read(n - len(data))

    def close(self) -> None:
        pass  # the blob belongs to the caller, who drains and closes it


def _tar_header(block: bytes) -> bool:
    """Whether `block` is a tar header: its checksum field matches (POSIX: the sum of the
    header's bytes with the field itself counted as spaces)."""
    if len(block) < 512:
        return False
    field = block[148:156].split(b"\0", 1)[0].strip()
    try:
        stored = int(field, 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 0x20 + sum(block[156:512])


def sniff(head: bytes, declared: str) -> str:
    """What the blob is, from its first 512 bytes (containerd's matchers, plus a tar
    header check so that a plain tar whose first name starts with gzip's magic stays a
    tar). What none of them recognises is left to the declared type's decoder."""
    if _tar_header(head):
        return "none"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if len(head) >= 4:
        magic = int.from_bytes(head[:4], "little")
        if magic == ZSTD_MAGIC or magic in ZSTD_SKIPPABLE:
            return "zstd"
    return declared


def open_layer(blob: BinaryIO, compression: str, diff_id: str, what: str):
    """The layer's tar from its blob, verified against its DiffID: reading to the end (or
    `drain()`) raises DataLoss when it does not match. A gzip layer is inflated and hashed
    on a thread of its own; close the stream to stop it."""
    stream = decompress(blob, compression)
    if isinstance(stream, Inflating):
        stream.expect(diff_id, what)
        return stream
    return VerifyingReader(stream, diff_id, None, what)


def decompress(blob: BinaryIO, compression: str) -> BinaryIO:
    if compression not in ("gzip", "zstd", "none"):
        raise InvalidArgument(f"layer compression {compression!r} is not supported")
    head = b""
    while len(head) < 512 and (more := blob.read(512 - len(head))):
        head += more
    actual = sniff(head, compression)
    if actual != compression:
        log.info("a layer declared %s is %s; unpacking it as what it is", compression,
                 actual)
    blob, compression = _Prefixed(blob, head), actual
    if compression == "gzip":
        return Inflating(blob, None, "")
    if compression == "zstd":
        if zstandard is None:
            raise InvalidArgument("zstd layers need the 'zstandard' package")
        return zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True,
                                                          closefd=False)
    if compression == "none":
        return blob
    raise InvalidArgument(f"layer compression {compression!r} is not supported")


def _inflate(blob: BinaryIO):
    """The inflated bytes of a gzip stream, in pieces of at most OUT_CHUNK: every member
    (a layer may be several gzip members, as `cat a.gz b.gz`), zero bytes between or after
    them skipped, anything else after one an error (both as Python's gzip module does)."""
    d = None  # the current member's inflater; None between members
    data = b""
    while True:
        if not data:
            data = blob.read(IN_CHUNK)
            if not data:
                break
        if d is None:
            data = data.lstrip(b"\0")
            if not data:
                continue
            d = _zlib.decompressobj(31)
        try:
            out = d.decompress(data, OUT_CHUNK)
        except _zlib.error as e:  # named as Python's gzip module names it
            raise gzip.BadGzipFile(f"garbled gzip data: {e}") from e
        data = d.unconsumed_tail
        if out:
            yield out
        if d.eof:  # the rest of the input is the next member's (or padding, or garbage)
            data, d = d.unused_data, None
    if d is not None:  # the blob ended inside a member: what inflate still holds back
        try:
            out = d.flush()
        except _zlib.error as e:
            raise gzip.BadGzipFile(f"garbled gzip data: {e}") from e
        if out:
            yield out
        if not d.eof:
            raise EOFError("Compressed file ended before the end-of-stream marker was "
                           "reached")


class _End:
    def __init__(self, digest: str):
        self.digest = digest


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Inflating(ReadStream):
    """A gzip blob inflated on a thread of its own, which also hashes the tar (zlib, ISA-L
    and hashlib release the GIL on big buffers): the unpacking thread only parses and
    writes. The thread stops at the end, on an error, or when the stream is closed."""

    def __init__(self, blob: BinaryIO, diff_id: str | None, what: str):
        self._blob = blob
        self._diff_id, self._what = diff_id, what
        self._queue: queue.Queue = queue.Queue(QUEUED)
        self._stop = False
        self._piece = b""
        self._pos = 0
        self._ended = False
        self._error: BaseException | None = None
        self.verified = False
        self._thread = threading.Thread(target=self._decompress, daemon=True)
        self._thread.start()

    def expect(self, diff_id: str, what: str) -> None:
        """Check the tar against `diff_id` at its end (before anything was read)."""
        self._diff_id, self._what = diff_id, what

    # -- the inflate thread ---------------------------------------------------------------

    def _decompress(self) -> None:
        h = hashlib.sha256()
        try:
            for piece in _inflate(self._blob):
                h.update(piece)
                if not self._put(piece):
                    return
            self._put(_End("sha256:" + h.hexdigest()))
        except BaseException as e:  # handed to the reader, which raises it
            self._put(_Failed(e))

    def _put(self, item) -> bool:
        if self._stop:
            return False
        self._queue.put(item)  # close() empties the queue once _stop is set
        return not self._stop

    # -- the reader -----------------------------------------------------------------------

    def _next(self) -> bool:
        """The next piece in _piece; False at the end (raises what the thread raised, and
        DataLoss when the tar does not match its DiffID)."""
        if self._error is not None:
            raise self._error
        if self._ended:
            return False
        item = self._queue.get()
        if isinstance(item, bytes):
            self._piece, self._pos = item, 0
            return True
        self._ended = True
        if isinstance(item, _Failed):
            self._error = item.error
            raise item.error
        if self._diff_id is not None and item.digest != self._diff_id:
            self._error = DataLoss(f"{self._what}: digest mismatch: expected "
                                   f"{self._diff_id}, got {item.digest}")
            raise self._error
        self.verified = True
        return False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self._piece[self._pos:]]
            self._piece, self._pos = b"", 0
            while self._next():
                parts.append(self._piece)
            self._piece = b""
            return b"".join(parts)
        while self._pos >= len(self._piece):
            if n == 0 or not self._next():
                return b""
        piece, pos = self._piece, self._pos
        if pos == 0 and len(piece) <= n:  # the whole piece: no copy
            self._pos = len(piece)
            return piece
        self._pos = pos + n
        return piece[pos:pos + n]

    def drain(self) -> None:
        """Read to the end (a tar may stop before it) and verify."""
        self._piece, self._pos = b"", 0
        while self._next():
            self._piece = b""

    def close(self) -> None:
        """Stop the thread and wait for it (it may be waiting on the blob's next bytes)."""
        self._stop = True
        while self._thread.is_alive():
            try:  # unblock its put; it sees _stop after
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> "Inflating":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
