"""csi/store/tarstream.py against Python's tarfile (what the unpacker used before), on a
generated corpus of archives: every member must come out with the same fields, pax headers
and data. Then the malformed archives tarfile quietly cut short, which this reader refuses.
"""

import io
import random
import tarfile

import pytest

from csi.errors import InvalidArgument
from csi.store.tarstream import BLOCK, TarFormatError, TarReader, mtime_ns

FORMATS = {"gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT}


class Trickle(io.RawIOBase):
    """A stream that returns at most `most` bytes per read (as a pipe or inflater may)."""

    def __init__(self, data: bytes, most: int, seed: int = 0):
        self._data, self._pos, self._most = data, 0, most
        self._rng = random.Random(seed)

    def read(self, n: int = -1) -> bytes:
        take = self._rng.randint(1, self._most)
        if n >= 0:
            take = min(take, n)
        out = self._data[self._pos:self._pos + take]
        self._pos += len(out)
        return out


def _info(name: str, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mtime = fields.pop("mtime", 1_700_000_000)
    for key, value in fields.items():
        setattr(ti, key, value)
    return ti


def build(fmt: int, members: list, pax_headers=None) -> bytes:
    """members: (TarInfo, data or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_headers or {},
                      encoding="utf-8", errors="surrogateescape") as tf:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def _members(fmt_name: str) -> list:
    long = "d" * 60 + "/" + "e" * 60 + "/" + "f" * 90
    out = [
        (_info("dir", tarfile.DIRTYPE, mode=0o755), None),
        (_info("dir/empty"), b""),
        (_info("dir/one-block", mode=0o644), b"x" * BLOCK),
        (_info("dir/two-blocks"), bytes(range(256)) * 4),
        (_info("dir/odd", uid=1000, gid=1000), b"abc" * 1000),
        (_info("dir/big", mode=0o4755), random.Random(1).randbytes(3 * (1 << 20) + 17)),
        (_info("dir/link", tarfile.SYMTYPE, linkname="../dir/odd"), None),
        (_info("dir/hard", tarfile.LNKTYPE, linkname="dir/odd"), None),
        (_info("dir/fifo", tarfile.FIFOTYPE, mode=0o600), None),
        (_info("dir/chr", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        (_info("dir/blk", tarfile.BLKTYPE, devmajor=8, devminor=1), None),
        (_info("dir/.wh.gone", mode=0o600), b""),
        (_info("dir/.wh..wh..opq"), b""),
        (_info("dir/wh0", tarfile.CHRTYPE, devmajor=0, devminor=0), None),
        (_info("dir/café-ünïcode", mode=0o640), b"u"),
        (_info("dir/cont", tarfile.CONTTYPE), b"contiguous"),
        (_info("./dot/../relative"), b"r"),
        (_info("/absolute"), b"a"),
    ]
    if fmt_name != "ustar":
        out += [
            (_info(long + "/file"), b"long name"),
            (_info("dir/longlink", tarfile.SYMTYPE, linkname="t" * 150), None),
            (_info("dir/longhard", tarfile.LNKTYPE, linkname=long + "/file"), None),
            (_info(long + "/subdir", tarfile.DIRTYPE), None),
            (_info("dir/raw-\udce9\udcff"), b"not utf-8"),
            (_info("dir/bigids", uid=1 << 30, gid=(1 << 24) + 5), b"ids"),
        ]
    else:
        out += [(_info("p" * 80 + "/" + "q" * 80), b"ustar prefix")]
    if fmt_name == "pax":
        out += [
            (_info("dir/xattrs", pax_headers={"SCHILY.xattr.user.a": "1",
                                              "SCHILY.xattr.security.capability": "\udcfe\x01x",
                                              "SCHILY.xattr.trusted.overlay.opaque": "y"}),
             b"x"),
            (_info("dir/frac", mtime=1_700_000_000.123456789), b"f"),
            (_info("dir/pax-only", pax_headers={"comment": "hello", "atime": "1.5"}), b""),
        ]
    return out


CORPUS: dict[str, bytes] = {}
for _fmt_name, _fmt in FORMATS.items():
    CORPUS[_fmt_name] = build(_fmt, _members(_fmt_name))
CORPUS["pax-global"] = build(tarfile.PAX_FORMAT, _members("pax"),
                             pax_headers={"uid": "42", "mtime": "12.5",
                                          "SCHILY.xattr.user.g": "global"})


def _patch(data: bytes, offset: int, field: slice, value: bytes, signed=False) -> bytes:
    """Overwrite a header field, then fix the header's checksum."""
    raw = bytearray(data)
    raw[offset + field.start:offset + field.start + len(value)] = value
    raw[offset + 148:offset + 156] = b" " * 8
    header = bytes(raw[offset:offset + BLOCK])
    total = sum(b - 256 if signed and b > 127 else b for b in header)
    raw[offset + 148:offset + 156] = b"%06o\0 " % (total & 0o777777)
    return bytes(raw)


def _single(name: str, data: bytes, fmt=tarfile.GNU_FORMAT, **fields) -> bytes:
    return build(fmt, [(_info(name, **fields), data)])


def _crafted() -> dict[str, bytes]:
    out = {}
    one = _single("base256", b"hello")
    out["base256-size"] = _patch(one, 0, slice(124, 136), b"\x80" + (5).to_bytes(11, "big"))
    out["base256-uid"] = _patch(one, 0, slice(108, 116), b"\x80" + (123456).to_bytes(7, "big"))
    out["signed-checksum"] = _patch(_single("x", b"s"), 0, slice(0, 4), b"\xe9\xff\xfe\xfd",
                                    signed=True)
    out["v7-dir"] = _patch(_single("v7dir/", b"", type=tarfile.AREGTYPE), 0, slice(156, 157),
                           b"\0")
    out["unknown-type"] = _patch(_single("vol", b"label data"), 0, slice(156, 157), b"V")
    out["octal-spaces"] = _patch(one, 0, slice(100, 108), b" 644  \0 ")
    out["hdr-only-with-size"] = (
        _patch(_single("sym", b"", type=tarfile.SYMTYPE, linkname="x")[:BLOCK], 0,
               slice(124, 136), b"00000001000\0")
        + _single("after", b"next")[:BLOCK * 2] + bytes(BLOCK * 2))
    # pax 'x' with a size that overrides the header's
    pax = build(tarfile.PAX_FORMAT, [(_info("sized", pax_headers={"size": "3"}), b"abc")])
    out["pax-size"] = pax
    full = CORPUS["gnu"]
    out["no-zero-blocks"] = full.rstrip(b"\0")
    out["no-zero-blocks"] += bytes(-len(out["no-zero-blocks"]) % BLOCK)
    out["one-zero-block"] = out["no-zero-blocks"] + bytes(BLOCK)
    out["trailing-garbage"] = full + b"garbage after the end" * 100
    out["starts-with-zero-block"] = bytes(BLOCK) + full
    out["longname-then-pax"] = (
        build(tarfile.GNU_FORMAT, [(_info("n" * 120), b"L")])[:-BLOCK * 2]
        + build(tarfile.PAX_FORMAT, [(_info("ignored", pax_headers={"path": "paxname"}),
                                      b"P")]))
    return out


CRAFTED = _crafted()


def _tarfile_members(data: bytes) -> list:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|", errorlevel=2) as tf:
        for m in tf:
            body = tf.extractfile(m).read() if m.isreg() else None
            dev = (m.devmajor, m.devminor) if m.type in (tarfile.CHRTYPE, tarfile.BLKTYPE) \
                else (0, 0)
            out.append((m.name, m.type, m.mode, m.uid, m.gid, m.size, m.mtime, m.linkname,
                        dev, dict(m.pax_headers), body))
    return out


def _our_members(stream, read_data=True) -> list:
    out = []
    reader = TarReader(stream)
    for e in reader:
        body = reader.read_all() if read_data and e.isreg() else None
        out.append((e.name, e.type, e.mode, e.uid, e.gid, e.size, e.mtime, e.linkname,
                    (e.devmajor, e.devminor), dict(e.pax or {}), body))
    return out


ALL = {**CORPUS, **CRAFTED}


@pytest.mark.parametrize("name", sorted(ALL))
def test_same_members_as_tarfile(name):
    data = ALL[name]
    want = _tarfile_members(data)
    # An archive that starts with a zero block is empty for tarfile, and for us.
    assert want or name == "starts-with-zero-block", "the corpus archive must have members"
    assert _our_members(io.BytesIO(data)) == want


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_same_members_from_a_trickling_stream(name):
    data = CORPUS[name]
    assert _our_members(Trickle(data, 700, seed=len(data))) == _tarfile_members(data)


def test_unread_data_is_skipped():
    data = CORPUS["pax"]
    names = [m[0] for m in _tarfile_members(data)]
    assert [e.name for e in TarReader(Trickle(data, 5000))] == names


def test_data_comes_as_slices_of_large_reads():
    data = CORPUS["gnu"]
    reads = []

    class Recording(io.BytesIO):
        def read(self, n=-1):
            reads.append(n)
            return super().read(n)

    reader = TarReader(Recording(data))
    for _entry in reader:
        for chunk in reader.chunks():
            assert isinstance(chunk, memoryview)
    assert min(reads) >= 1 << 20


def test_mtime_ns_exact_from_pax():
    data = build(tarfile.PAX_FORMAT, [(_info("f", pax_headers={"mtime": "1700000000.123456789"}),
                                       b"")])
    (e,) = list(TarReader(io.BytesIO(data)))
    assert mtime_ns(e) == 1_700_000_000_123_456_789
    data = build(tarfile.PAX_FORMAT, [(_info("f", pax_headers={"mtime": "-5.5"}), b"")])
    (e,) = list(TarReader(io.BytesIO(data)))
    assert mtime_ns(e) == 0


# -- refused --------------------------------------------------------------------------------

def _two() -> bytes:
    return build(tarfile.GNU_FORMAT, [(_info("a"), b"A" * 600), (_info("b"), b"B" * 10)])


def _pax_raw(records: bytes, then: bytes) -> bytes:
    """A pax 'x' header carrying `records` verbatim, followed by the archive `then`."""
    header = _single("PaxHeader", b"", type=b"x")[:BLOCK]
    header = _patch(header, 0, slice(124, 136), b"%011o\0" % len(records))
    return header + records + bytes(-len(records) % BLOCK) + then


def _longname_only(n: int) -> bytes:
    """A GNU long-name header of an `n`-character name and its data, without the member
    it names."""
    return _single("L" * n, b"")[:BLOCK + (n + 1 + BLOCK - 1) // BLOCK * BLOCK]


MALFORMED = {
    "empty": (b"", "empty file"),
    "short-first-header": (b"x" * 100, "truncated header"),
    "bad-checksum-first": (_patch(_two(), 0, slice(0, 1), b"z")[:148] + b"0000000\0"
                           + _two()[156:], "bad header checksum"),
    "bad-checksum-second": (_two()[:1536] + b"Z" + _two()[1537:], "bad header checksum"),
    "bad-octal": (_patch(_two(), 1536, slice(100, 108), b"zz\x01zz!\0"), "invalid mode"),
    "truncated-data": (_two()[:1000], "unexpected end of data"),
    "truncated-header": (_two()[:1536 + 100], "truncated header"),
    "absurd-size": (_patch(_two(), 0, slice(124, 136), b"77777777777\0"),
                    "unexpected end of data"),
    "absurd-base256-size": (_patch(_two(), 0, slice(124, 136), b"\x80" + b"\xff" * 11),
                            "unexpected end of data"),
    "negative-octal-size": (_patch(_two(), 0, slice(124, 136), b"-1\0"), "negative size"),
    "negative-base256-size": (_patch(_two(), 0, slice(124, 136), b"\xff" * 12),
                              "negative size"),
    "negative-pax-size": (_pax_raw(b"12 size=-10\n", _two()), "negative size"),
    "pax-length-too-long": (_pax_raw(b"99 path=x\n", _two()), "does not end on its newline"),
    "pax-length-too-short": (_pax_raw(b"8 path=xyz\n", _two()), "does not end on its newline"),
    "pax-length-not-a-number": (_pax_raw(b"x path=y\n", _two()), "bad pax record length"),
    "pax-zero-length": (_pax_raw(b"0 path=y\n", _two()), "does not end on its newline"),
    "pax-no-keyword": (_pax_raw(b"7 =abc\n", _two()), "without a keyword"),
    "huge-longname": (_patch(_single("L", b"", type=b"L"), 0, slice(124, 136),
                             b"%011o\0" % (64 << 20)), "extended headers of"),
    "longname-then-eof": (_single("L", b"name", type=b"L")[:BLOCK * 2], "ends after an ext"),
    "longname-then-zero": (_single("L", b"name", type=b"L")[:BLOCK * 2] + bytes(BLOCK * 2),
                           "end-of-archive block after"),
    "sparse-old-gnu": (_patch(_two(), 0, slice(156, 157), b"S"), "GNU sparse"),
    "sparse-pax": (_pax_raw(b"22 GNU.sparse.major=1\n22 GNU.sparse.minor=0\n", _two()),
                   "GNU sparse"),
    "global-size": (build(tarfile.PAX_FORMAT, [(_info("a"), b"a")],
                          pax_headers={"size": "5"}), "global pax header sets size"),
    # Each long name alone is under the limit; stacked before one member they are not.
    "stacked-longnames": (_longname_only(3 << 20) * 3 + _two(), "extended headers of"),
    "global-records": (build(tarfile.PAX_FORMAT, [(_info("a"), b"a")],
                             pax_headers={f"k{i}": "v" for i in range(100)}),
                       "global pax headers of more than"),
    "global-bytes": (build(tarfile.PAX_FORMAT, [(_info("a"), b"a")],
                           pax_headers={"comment": "x" * (100 << 10)}),
                     "global pax headers of more than"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_is_refused(name):
    data, message = MALFORMED[name]
    with pytest.raises(TarFormatError, match=message) as info:
        _our_members(Trickle(data, 4096))
    assert isinstance(info.value, InvalidArgument)


def test_absurd_size_reads_in_bounded_chunks():
    """A declared size of 8 GiB over a short stream: skipped chunk by chunk, then refused."""
    data, _ = MALFORMED["absurd-size"]
    sizes = []

    class Recording(io.BytesIO):
        def read(self, n=-1):
            sizes.append(n)
            return super().read(n)

    reader = TarReader(Recording(data))
    with pytest.raises(TarFormatError):
        for _ in reader:
            pass
    assert max(sizes) <= 1 << 20


def test_checksum_matches_tarfile_on_random_headers():
    from csi.store.tarstream import _check_sum

    rng = random.Random(7)
    for i in range(300):
        header = bytearray(rng.randbytes(BLOCK) if i % 3 else bytes([255]) * BLOCK)
        unsigned, signed = tarfile.calc_chksums(bytes(header))
        header[148:156] = b"%07o\0" % (unsigned if i % 2 else signed)
        _check_sum(bytes(header), 0)  # the stored sum does not count itself
        header[148:156] = b"%07o\0" % (unsigned + 1)
        if unsigned + 1 != signed:
            with pytest.raises(TarFormatError, match="bad header checksum"):
                _check_sum(bytes(header), 0)
