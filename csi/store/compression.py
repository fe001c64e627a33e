"""Layer blob decompression as streams: gzip (ISA-L's igzip where it installed, zlib
otherwise), zstd and plain tar. Nothing is buffered whole: memory stays flat whatever the
layer size."""

import gzip
from typing import BinaryIO

from csi.errors import InvalidArgument

try:  # ISA-L inflates 1.6-2x faster than zlib (PERFORMANCE.md); optional, as it is native
    from isal import igzip as _gzip
    from isal import igzip_threaded
except ImportError:  # pragma: no cover - depends on the platform's wheels
    _gzip = gzip
    igzip_threaded = None

try:
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None

GZIP_IMPL = "isal" if _gzip is not gzip else "zlib"


def decompress(blob: BinaryIO, compression: str) -> BinaryIO:
    if compression == "gzip":
        if igzip_threaded is not None:
            # Inflate (and hash the blob) on a second thread while this one creates files:
            # unpack is CPU-bound, and ISA-L releases the GIL.
            return igzip_threaded.open(blob, "rb", threads=1)
        return _gzip.GzipFile(fileobj=blob, mode="rb")
    if compression == "zstd":
        if zstandard is None:
            raise InvalidArgument("zstd layers need the 'zstandard' package")
        return zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True,
                                                          closefd=False)
    if compression == "none":
        return blob
    raise InvalidArgument(f"layer compression {compression!r} is not supported")
