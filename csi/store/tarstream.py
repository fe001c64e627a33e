"""Tar stream reader: headers parsed from a large buffer, member data handed out as slices.

Replaces Python's `tarfile` on the unpack path, whose stream mode reads 10 KiB at a time,
builds a reader object per member and decodes every header field in Python. This reader
pulls the stream in chunks of at least 1 MiB, parses each 512-byte header in place, and
lets the caller take a member's data as memoryview slices of the chunk it sits in.

It reads what `tarfile` reads, with `tarfile`'s results (tests/unit/test_tarstream.py
checks both on the same archives): ustar/POSIX and GNU headers, numeric fields in octal or
base-256, the unsigned checksum (or the signed one some old tars wrote), the ustar prefix,
GNU long names and link names ('L', 'K'), pax per-entry ('x', 'X') and global ('g')
headers (path, linkpath, size, uid, gid, mtime and the rest kept in `pax` as text decoded
as UTF-8 with surrogateescape), header-only types that carry no data whatever their size,
and the end of the archive at the first zero block or at a clean end of stream.

Where `tarfile` quietly stops at a malformed header after the first one, this reader
refuses the archive instead (InvalidArgument): a bad checksum, a non-numeric field, a
header or data cut short, a negative size, one member's long names and pax headers above
_MAX_META together, global pax headers above their caps, a pax
record whose length does not land on its newline, a global pax `size`. GNU sparse members
(type 'S', pax GNU.sparse.*) are refused too: OCI layer writers never produce them.
Memory stays bounded by the chunk size and _MAX_META (the extended headers of one member,
together), and time per member by the global pax headers' caps, whatever the sizes declared.
"""

import decimal
from collections.abc import Iterator

from csi.errors import InvalidArgument

BLOCK = 512
CHUNK = 1 << 20
_MAX_META = 8 << 20  # the long names and pax headers of one member, all together
# Global pax headers apply to every later member, so each member pays for them: git archive
# writes one `comment` record; anything near these is an attack on time or memory.
_MAX_GLOBAL_BYTES = 64 << 10
_MAX_GLOBAL_RECORDS = 64
_ZERO_BLOCK = bytes(BLOCK)

# Types as tarfile names them (one byte, as in the header).
REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE = b"0", b"\0", b"1", b"2"
CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, CONTTYPE = b"3", b"4", b"5", b"6", b"7"
_LONGNAME, _LONGLINK, _SPARSE = b"L", b"K", b"S"
_PAX_ENTRY, _PAX_GLOBAL, _PAX_SOLARIS = b"x", b"g", b"X"
REGULAR_TYPES = frozenset((REGTYPE, AREGTYPE, CONTTYPE))
# Types whose data tarfile does not skip (it reads the next header right after them).
_HEADER_ONLY = frozenset((LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE))
_PAX_NUMBERS = {"size": int, "uid": int, "gid": int, "mtime": float}
_PAX_STRINGS = ("linkpath", "uname", "gname")


class TarFormatError(InvalidArgument):
    """The stream is not a well-formed tar archive."""


class Entry:
    """One member, with `tarfile.TarInfo`'s field names and values."""

    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname",
                 "devmajor", "devminor", "pax")

    def isreg(self) -> bool:
        return self.type in REGULAR_TYPES

    def isdir(self) -> bool:
        return self.type == DIRTYPE

    def __repr__(self) -> str:
        return f"Entry({self.name!r}, type={self.type!r}, size={self.size})"


def _nts(field: bytes) -> str:
    p = field.find(b"\0")
    if p != -1:
        field = field[:p]
    return field.decode("utf-8", "surrogateescape")


def _nti(field: bytes, what: str, offset: int) -> int:
    """A numeric header field: octal text, or base-256 (GNU) when the high bit is set."""
    first = field[0]
    if first == 0o200 or first == 0o377:
        n = int.from_bytes(field[1:], "big")
        if first == 0o377:
            n -= 256 ** (len(field) - 1)
        return n
    try:
        return int(field.rstrip(b"\0 "), 8)  # the usual "0000644\0"
    except ValueError:
        pass
    # tarfile's reading: up to the first NUL, stripped of whitespace; empty is 0.
    p = field.find(b"\0")
    if p != -1:
        field = field[:p]
    try:
        return int(field.decode("ascii").strip() or "0", 8)
    except ValueError:
        raise TarFormatError(f"malformed layer tar: invalid {what} field {bytes(field)!r} in "
                             f"the header at offset {offset}") from None


# One byte of every four: summing the four shifted, masked copies of the header as one big
# integer puts each byte in a 32-bit lane, and the lanes add up modulo 2**32 - 1 (the total,
# at most 512 * 255, is below it). Several times faster than sum() over the 512 bytes.
_LANES = int.from_bytes(b"\xff\0\0\0" * (BLOCK // 4), "little")


def _check_sum(header: bytes, offset: int) -> None:
    # The checksum field counts as eight spaces (8 * 32 = 256).
    want = _nti(header[148:156], "checksum", offset)
    x = int.from_bytes(header, "little")
    total = ((x & _LANES) + ((x >> 8) & _LANES) + ((x >> 16) & _LANES)
             + ((x >> 24) & _LANES)) % 0xFFFFFFFF
    field = header[148:156]
    if want == total - sum(field) + 256:
        return
    view = memoryview(header)
    signed = sum(view.cast("b")) - sum(view[148:156].cast("b")) + 256
    if want != signed:
        raise TarFormatError(f"malformed layer tar: bad header checksum at offset {offset}")


def _pax_decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def mtime_ns(entry: Entry) -> int:
    """The entry's mtime in nanoseconds, exact for a pax decimal value, never negative."""
    m = entry.mtime
    if isinstance(m, int):
        return m * 1_000_000_000 if m > 0 else 0
    text = entry.pax.get("mtime") if entry.pax else None
    try:
        exact = decimal.Decimal(text) if text is not None else decimal.Decimal(m)
        if float(exact) != m:
            exact = decimal.Decimal(m)  # the value came from an inner pax header
        if not exact.is_finite() or exact <= 0:
            return 0
        return int(exact.scaleb(9).to_integral_value(rounding=decimal.ROUND_FLOOR))
    except (decimal.InvalidOperation, ValueError, OverflowError):
        return 0


class TarReader:
    """Iterate a tar stream's members: `for entry in reader: ...`; inside the loop,
    `reader.chunks()` yields the current member's data (optional: data left unread is
    skipped before the next header). `stream` needs only `.read(n)`."""

    def __init__(self, stream, chunk: int = CHUNK):
        self._read = stream.read
        self._chunk = max(chunk, BLOCK)
        self._buf: bytes = b""
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._left = 0  # data bytes of the current member not handed out yet
        self._pad = 0  # padding after them
        self._globals: dict[str, str] = {}
        self._started = False

    # -- buffer ---------------------------------------------------------------------------

    def _offset(self) -> int:
        return self._base + self._pos

    def _fill(self, need: int) -> bool:
        """At least `need` bytes buffered after _pos, unless the stream ends first."""
        avail = len(self._buf) - self._pos
        if avail >= need:
            return True
        parts = [self._buf[self._pos:]] if avail else []
        self._base += self._pos
        while avail < need:
            chunk = self._read(max(self._chunk, need - avail))
            if not chunk:
                break
            parts.append(chunk)
            avail += len(chunk)
        self._buf = b"".join(parts) if len(parts) != 1 else parts[0]
        self._pos = 0
        return avail >= need

    def _take(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise TarFormatError(f"malformed layer tar: unexpected end of data in {what} at "
                                 f"offset {self._offset()}")
        start = self._pos
        self._pos = start + n
        return self._buf[start:start + n]

    def _skip(self, n: int, what: str) -> None:
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill(1):
                    raise TarFormatError(f"malformed layer tar: unexpected end of data in "
                                         f"{what} at offset {self._offset()}")
                avail = len(self._buf)
            step = avail if avail < n else n
            self._pos += step
            n -= step

    # -- data -----------------------------------------------------------------------------

    def chunks(self) -> Iterator[memoryview]:
        """The current member's data not read yet, as slices of the read buffer (valid until
        the next call into the reader)."""
        while self._left:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill(1):
                    raise TarFormatError(f"malformed layer tar: unexpected end of data in a "
                                         f"member's contents at offset {self._offset()}")
                avail = len(self._buf)
            n = avail if avail < self._left else self._left
            start = self._pos
            self._pos = start + n
            self._left -= n
            yield memoryview(self._buf)[start:start + n]

    def read_all(self) -> bytes:
        """The current member's remaining data as one bytes object (tests, small members)."""
        return b"".join(bytes(c) for c in self.chunks())

    # -- headers --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Entry]:
        while (entry := self.next()) is not None:
            yield entry

    def next(self) -> Entry | None:
        if self._left or self._pad:
            self._skip(self._left + self._pad, "a member's contents")
            self._left = self._pad = 0
        layers: list = []  # long names and pax headers before the member, outermost first
        meta = 0  # their bytes: bounded together, not each
        while True:
            offset = self._offset()
            if not self._fill(BLOCK):
                if len(self._buf) - self._pos == 0 and (self._started or layers):
                    if layers:
                        raise TarFormatError("malformed layer tar: the archive ends after an "
                                             f"extended header, at offset {offset}")
                    return None  # ends without its zero blocks: tarfile accepts that too
                if not self._started and len(self._buf) == 0:
                    raise TarFormatError("not a tar archive: empty file")
                raise TarFormatError(f"malformed layer tar: truncated header at offset {offset}")
            start = self._pos
            header = self._buf[start:start + BLOCK]
            self._pos = start + BLOCK
            if header == _ZERO_BLOCK:
                if layers:
                    raise TarFormatError("malformed layer tar: end-of-archive block after an "
                                         f"extended header, at offset {offset}")
                if not self._started:
                    # tarfile: an archive that starts with a zero block is empty, not an error.
                    self._started = True
                return None
            _check_sum(header, offset)
            self._started = True
            kind = header[156:157]
            size = _nti(header[124:136], "size", offset)
            if size < 0:
                raise TarFormatError(f"malformed layer tar: negative size {size} in the "
                                     f"header at offset {offset}")
            if kind in (_LONGNAME, _LONGLINK, _PAX_ENTRY, _PAX_GLOBAL, _PAX_SOLARIS):
                meta += size
                if meta > _MAX_META:
                    raise TarFormatError(f"malformed layer tar: extended headers of {meta} "
                                         f"bytes for one member, at offset {offset} (limit "
                                         f"{_MAX_META})")
                data = self._take(size, "an extended header")
                self._skip(-size % BLOCK, "an extended header")
                if kind == _LONGNAME or kind == _LONGLINK:
                    layers.append((kind, _nts(data)))
                elif kind == _PAX_GLOBAL:
                    records = self._pax_records(data, offset)
                    if "size" in records:
                        raise TarFormatError("malformed layer tar: a global pax header sets "
                                             f"size, at offset {offset}")
                    self._globals.update(records)
                    if (len(self._globals) > _MAX_GLOBAL_RECORDS or
                            sum(len(k) + len(v) for k, v in self._globals.items())
                            > _MAX_GLOBAL_BYTES):
                        raise TarFormatError(
                            f"malformed layer tar: global pax headers of more than "
                            f"{_MAX_GLOBAL_RECORDS} records or {_MAX_GLOBAL_BYTES} bytes, at "
                            f"offset {offset}")
                else:
                    merged = dict(self._globals)
                    merged.update(self._pax_records(data, offset))
                    layers.append((_PAX_ENTRY, merged))
                continue
            if kind == _SPARSE:
                raise TarFormatError(f"unsupported layer tar: GNU sparse member at offset "
                                     f"{offset}")
            return self._member(header, kind, size, layers, offset)

    def _member(self, header: bytes, kind: bytes, size: int, layers: list,
                offset: int) -> Entry:
        e = Entry()
        name = _nts(header[0:100])
        if kind == AREGTYPE and name.endswith("/"):
            kind = DIRTYPE  # old V7 tar: a directory is a regular file named with a slash
        e.type = kind
        if kind == DIRTYPE:
            name = name.rstrip("/")
        if header[345] and kind not in (_LONGNAME, _LONGLINK, _SPARSE):
            prefix = _nts(header[345:500])
            if prefix:
                name = prefix + "/" + name
        e.name = name
        e.mode = _nti(header[100:108], "mode", offset)
        e.uid = _nti(header[108:116], "uid", offset)
        e.gid = _nti(header[116:124], "gid", offset)
        e.size = size
        e.mtime = _nti(header[136:148], "mtime", offset)
        e.linkname = _nts(header[157:257]) if header[157] else ""
        if kind == CHRTYPE or kind == BLKTYPE:
            e.devmajor = _nti(header[329:337], "devmajor", offset)
            e.devminor = _nti(header[337:345], "devminor", offset)
        else:
            e.devmajor = e.devminor = 0
        e.pax = None
        if self._globals:
            self._apply_pax(e, self._globals)
        # Innermost first: the header read first wins, as in tarfile.
        for layer_kind, value in reversed(layers):
            if layer_kind == _LONGNAME:
                e.name = value.removesuffix("/") if e.type == DIRTYPE else value
            elif layer_kind == _LONGLINK:
                e.linkname = value
            else:
                self._apply_pax(e, value)
        if e.pax and any(k.startswith("GNU.sparse.") for k in e.pax):
            raise TarFormatError(f"unsupported layer tar: GNU sparse member {e.name!r} at "
                                 f"offset {offset}")
        if e.size < 0:
            raise TarFormatError(f"malformed layer tar: negative size {e.size} for "
                                 f"{e.name!r}")
        if e.type in _HEADER_ONLY:
            self._left = self._pad = 0
        else:
            self._left = e.size
            self._pad = -e.size % BLOCK
        return e

    @staticmethod
    def _apply_pax(e: Entry, pax: dict[str, str]) -> None:
        for key, value in pax.items():
            if key == "path":
                e.name = value.rstrip("/")
            elif key in _PAX_NUMBERS:
                try:
                    setattr(e, key, _PAX_NUMBERS[key](value))
                except ValueError:
                    setattr(e, key, 0)
            elif key == "linkpath":
                e.linkname = value
        e.pax = dict(pax)

    @staticmethod
    def _pax_records(data: bytes, offset: int) -> dict[str, str]:
        """Parse "LENGTH KEY=VALUE\\n" records; every length must land on its newline."""
        out: dict[str, str] = {}
        pos, end = 0, len(data)
        while pos < end:
            if data[pos] == 0 and not data[pos:].strip(b"\0"):
                break  # NUL padding after the last record
            space = data.find(b" ", pos, min(end, pos + 21))
            digits = data[pos:space] if space != -1 else b""
            if not digits.isdigit():
                raise TarFormatError(f"malformed layer tar: bad pax record length at offset "
                                     f"{offset}")
            length = int(digits)
            stop = pos + length
            if length == 0 or stop > end or data[stop - 1] != 0x0A:
                raise TarFormatError(f"malformed layer tar: pax record of length {length} "
                                     f"does not end on its newline, at offset {offset}")
            record = data[space + 1:stop - 1]
            eq = record.find(b"=")
            if eq <= 0:
                raise TarFormatError(f"malformed layer tar: pax record without a keyword at "
                                     f"offset {offset}")
            key = _pax_decode(record[:eq])
            out[key] = _pax_decode(record[eq + 1:])
            pos = stop
        return out
