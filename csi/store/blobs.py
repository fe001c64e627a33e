"""The blob cache: compressed blobs by sha256 digest in `blobs/sha256/HEX`.

A download goes to `tmp/blob-HEX.partial` and is renamed into place only once its size and
digest match. An interrupted download keeps its partial file, so the next attempt resumes
with an HTTP Range request instead of starting again; racing requests for one blob share a
single download (single-flight), whatever the number of pods and kubelet retries.
Layer blobs are a cache: once a layer is unpacked its blob may be pruned.
"""

import fcntl
import logging
import os
from collections.abc import Callable
from typing import BinaryIO

from csi.digest import hex_of, sha256_file
from csi.errors import DataLoss, ResourceExhausted, is_no_space, no_space
from csi.locks import SingleFlight

log = logging.getLogger(__name__)

# fetch(offset, out) appends the blob from byte `offset` to `out` (a file opened for append
# holding the first `offset` bytes); when the server ignores the Range request, or answers
# with a Content-Range that does not start at `offset`, it must truncate `out` and write the
# whole blob.
Fetch = Callable[[int, BinaryIO], None]


class BlobStore:
    def __init__(self, root: str, on_fetch=None):
        self.dir = os.path.join(root, "blobs", "sha256")
        self.tmp_dir = os.path.join(root, "tmp")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        self._flights = SingleFlight()
        self._on_fetch = on_fetch or (lambda nbytes: None)

    def path(self, digest: str) -> str:
        return os.path.join(self.dir, hex_of(digest))

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = os.stat(self.path(digest))
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def get(self, digest: str, size: int, fetch: Fetch, what: str) -> str:
        """The path of the verified blob, downloading it (once) if it is not here."""
        if self.has(digest, size):
            return self.path(digest)
        return self._flights.do(digest, lambda: self._download(digest, size, fetch, what))

    def remove(self, digest: str, inode: int | None = None) -> None:
        """Remove a blob; with `inode`, only if the blob there is still that file."""
        path = self.path(digest)
        try:
            if inode is None or os.stat(path).st_ino == inode:
                os.unlink(path)
        except FileNotFoundError:
            pass

    def _download(self, digest: str, size: int, fetch: Fetch, what: str) -> str:
        final = self.path(digest)
        if self.has(digest, size):
            return final
        partial = os.path.join(self.tmp_dir, f"blob-{hex_of(digest)}.partial")
        # Everything from the first byte to the rename or the discard happens under the
        # partial file's flock, so a process waiting on it finds either the blob in place,
        # or a fresh file to fetch into, never bytes someone else is judging.
        with _locked_append(partial) as out:
            try:
                if self.has(digest, size):  # the holder we waited for stored it
                    if out.tell() == 0:
                        _unlink(partial)
                    return final
                have = out.seek(0, os.SEEK_END)
                if have > size:
                    out.truncate(0)
                    have = 0
                if have < size:
                    fetch(have, out)
                out.flush()
                written = out.tell()
                if written != size:
                    raise DataLoss(f"{what}: got {written} bytes, the descriptor says {size}")
                got = sha256_file(partial)
                if got != digest:
                    raise DataLoss(f"{what}: digest mismatch: expected {digest}, got {got}; "
                                   "the downloaded bytes were discarded")
                os.rename(partial, final)
            except (DataLoss, ResourceExhausted):
                _unlink(partial)  # bad bytes are never kept, nor a partial filling a disk
                raise
            except OSError as e:
                if is_no_space(e):
                    _unlink(partial)
                    raise no_space(f"downloading {what}") from e
                raise  # a cut connection: the partial file stays for the next resume
        self._on_fetch(size)
        return final


def _locked_append(path: str) -> BinaryIO:
    """`path` opened for append under an exclusive flock: another process (`strata pull`
    beside the server) may be fetching the same blob. If the holder we waited for deleted
    the file (bad bytes), our descriptor is an orphan: open the path again."""
    while True:
        out = open(path, "ab")
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
