"""csi/store/compression.py: the blob's first bytes, not its media type, say how to read it
(containerd's DecompressStream does the same)."""

import gzip
import io
import os
import tarfile

import pytest
import zstandard

from csi.errors import InvalidArgument
from csi.store.compression import decompress


def tar_of(*files: tuple[str, bytes], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_all(stream) -> bytes:
    return b"".join(iter(lambda: stream.read(65536), b""))


TAR = tar_of(("data/big", os.urandom(1 << 20)))
ENCODED = {"gzip": gzip.compress(TAR), "zstd": zstandard.ZstdCompressor().compress(TAR),
           "none": TAR}


@pytest.mark.parametrize("declared", ["gzip", "zstd", "none"])
@pytest.mark.parametrize("actual", ["gzip", "zstd", "none"])
def test_every_label_reads_every_encoding(declared, actual):
    stream = decompress(io.BytesIO(ENCODED[actual]), declared)
    assert read_all(stream) == TAR
    stream.close()


def test_short_reads_and_tiny_blobs():
    class Trickle(io.RawIOBase):  # one byte per read, as a slow socket may give
        def __init__(self, data):
            self.data, self.pos = data, 0

        def readable(self):
            return True

        def read(self, n=-1):  # one byte at a time over the sniffed head, then at will
            size = 1 if self.pos < 1024 else (n if n and n > 0 else len(self.data))
            chunk = self.data[self.pos:self.pos + size]
            self.pos += len(chunk)
            return chunk

    assert decompress(Trickle(gzip.compress(b"abc")), "none").read() == b"abc"
    assert read_all(decompress(Trickle(TAR), "gzip")) == TAR
    assert decompress(io.BytesIO(b"ab"), "none").read() == b"ab"
    assert decompress(io.BytesIO(b""), "none").read() == b""


def test_a_tar_whose_first_name_starts_with_gzip_magic_is_still_a_tar():
    tar = tar_of(("\x1f\udc8b\x08name", b"x"), fmt=tarfile.GNU_FORMAT)  # raw bytes
    assert tar.startswith(b"\x1f\x8b\x08")
    for declared in ("none", "gzip"):
        assert decompress(io.BytesIO(tar), declared).read() == tar


def test_a_zstd_stream_that_starts_with_a_skippable_frame():
    skippable = (0x184D2A5A).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    blob = skippable + ENCODED["zstd"]
    for declared in ("zstd", "gzip", "none"):
        assert read_all(decompress(io.BytesIO(blob), declared)) == TAR


def test_what_no_matcher_knows_is_left_to_the_declared_decoder():
    with pytest.raises(gzip.BadGzipFile):  # e.g. a truncated or garbled blob
        decompress(io.BytesIO(b"garbage" * 100), "gzip").read()
    assert decompress(io.BytesIO(b"garbage"), "none").read() == b"garbage"


def test_an_unknown_label_is_still_refused():
    with pytest.raises(InvalidArgument, match="not supported"):
        decompress(io.BytesIO(TAR), "bzip2")
