"""Content digests: sha256 of bytes, files and streams. Nothing is trusted until its digest
matched: blobs, configs, manifests and unpacked layers (DiffIDs) are all verified here.

A digest is written `sha256:HEX` (OCI image-spec `descriptor.md`); only sha256 is accepted.
"""

import hashlib
from typing import BinaryIO

from csi.errors import DataLoss

CHUNK = 1 << 20


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + sha256_hex(data)


def sha256_file(path: str) -> str:
    """The digest of a file's contents, read in chunks (a blob may be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def hex_of(digest: str) -> str:
    """`sha256:HEX` → `HEX`: the name blobs are stored under."""
    return digest.partition(":")[2]


class ReadStream:
    """The file-object surface io.BufferedReader, gzip and tarfile need, around `read`."""

    def read(self, n: int = -1) -> bytes:
        raise NotImplementedError

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


class VerifyingReader(ReadStream):
    """Wraps a binary stream; hashes every byte read and, at EOF, raises DataLoss when the
    content does not match `digest` (and `size`, when known). Reading past the expected
    size fails at once, so a hostile source cannot make us hash forever."""

    def __init__(self, raw: BinaryIO, digest: str, size: int | None, what: str,
                 on_mismatch=None):
        self._raw = raw
        self._digest = digest
        self._size = size
        self._what = what
        self._on_mismatch = on_mismatch or (lambda: None)  # e.g. evict a corrupt cache entry
        self._hash = hashlib.sha256()
        self.bytes_read = 0
        self.verified = False

    def read(self, n: int = -1) -> bytes:
        chunk = self._raw.read(n)
        if chunk:
            self._hash.update(chunk)
            self.bytes_read += len(chunk)
            if self._size is not None and self.bytes_read > self._size:
                self._on_mismatch()
                raise DataLoss(f"{self._what}: more than the {self._size} bytes its descriptor "
                               "declares")
        elif n != 0:
            self._check()
        return chunk

    def drain(self) -> None:
        """Read to EOF (formats such as tar may stop before the end) and verify."""
        while self.read(CHUNK):
            pass

    def _check(self) -> None:
        if self.verified:
            return
        got = "sha256:" + self._hash.hexdigest()
        if self._size is not None and self.bytes_read != self._size:
            self._on_mismatch()
            raise DataLoss(f"{self._what}: size {self.bytes_read} does not match the "
                           f"declared {self._size}")
        if got != self._digest:
            self._on_mismatch()
            raise DataLoss(f"{self._what}: digest mismatch: expected {self._digest}, got {got}")
        self.verified = True

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> "VerifyingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
