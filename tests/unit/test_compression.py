"""csi/store/compression.py: the blob's first bytes, not its media type, say how to read it
(containerd's DecompressStream does the same)."""

import gzip
import io
import os

import pytest
import zstandard

from csi.errors import InvalidArgument
from csi.store.compression import decompress

TAR = os.urandom(1 << 20)  # stands for the tar stream: any bytes do here
ENCODED = {"gzip": gzip.compress(TAR), "zstd": zstandard.ZstdCompressor().compress(TAR),
           "none": TAR}


@pytest.mark.parametrize("declared", ["gzip", "zstd", "none"])
@pytest.mark.parametrize("actual", ["gzip", "zstd", "none"])
def test_every_label_reads_every_encoding(declared, actual):
    stream = decompress(io.BytesIO(ENCODED[actual]), declared)
    out = b"".join(iter(lambda: stream.read(65536), b""))
    stream.close()
    assert out == TAR


def test_short_reads_and_tiny_blobs():
    class Trickle(io.RawIOBase):  # one byte per read, as a slow socket may give
        def __init__(self, data):
            self.data = data

        def readable(self):
            return True

        def read(self, n=-1):
            chunk, self.data = self.data[:1], self.data[1:]
            return chunk

    assert decompress(Trickle(gzip.compress(b"abc")), "none").read() == b"abc"
    assert decompress(io.BytesIO(b"ab"), "gzip").read() == b"ab"
    assert decompress(io.BytesIO(b""), "gzip").read() == b""


def test_an_unknown_label_is_still_refused():
    with pytest.raises(InvalidArgument, match="not supported"):
        decompress(io.BytesIO(TAR), "bzip2")
