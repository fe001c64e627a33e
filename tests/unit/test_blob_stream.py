"""A blob read while it downloads (BlobStore.open): the reader gets bytes before the download
ends, EOF only once the digest matched, the download's error otherwise; the blob is hashed
once, by the download; a reader that gives up stops the download and leaves nothing."""

import hashlib
import http.client
import os
import threading

import pytest

from csi.errors import DataLoss
from csi.store.blobs import BlobStore

DATA = os.urandom(300_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
HALF = len(DATA) // 2
WAIT = 30  # seconds a step may take before the test fails instead of hanging


def cut(offset, out):
    """A download cut half-way."""
    out.write(DATA[:HALF])
    raise http.client.IncompleteRead(b"", len(DATA) - HALF)


def partials(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path / "tmp"))


def test_the_reader_gets_the_first_bytes_before_the_download_ends(tmp_path):
    store = BlobStore(str(tmp_path))
    taken = threading.Event()

    def fetch(offset, out):
        out.write(DATA[:HALF])
        # The rest only once the reader has had the first half: it would never come if
        # reading waited for the whole blob.
        assert taken.wait(WAIT), "the reader never got the first bytes"
        out.write(DATA[HALF:])

    with store.open(DIGEST, len(DATA), fetch, "blob") as blob:
        got = b""
        while len(got) < HALF:
            got += blob.read(HALF - len(got))
        taken.set()
        while chunk := blob.read(1 << 16):
            got += chunk
    assert got == DATA
    assert store.has(DIGEST, len(DATA)) and partials(tmp_path) == []


def test_wrong_bytes_end_the_stream_with_data_loss_and_nothing_is_kept(tmp_path):
    store = BlobStore(str(tmp_path))
    bad = bytearray(DATA)
    bad[-1] ^= 1  # only the last byte: the reader has taken everything else
    with store.open(DIGEST, len(DATA), lambda o, out: out.write(bytes(bad)), "blob") as blob:
        with pytest.raises(DataLoss, match="digest mismatch"):
            blob.drain()
    assert not store.has(DIGEST) and partials(tmp_path) == []


def test_a_cut_download_keeps_its_partial_and_the_next_one_resumes_hashing_it(tmp_path):
    store = BlobStore(str(tmp_path))

    with store.open(DIGEST, len(DATA), cut, "blob") as blob:
        with pytest.raises(http.client.IncompleteRead):
            blob.drain()
    assert partials(tmp_path) == [f"blob-{DIGEST[7:]}.partial"], "kept for a resume"
    offsets = []

    def resume(offset, out):
        offsets.append(offset)
        out.write(DATA[offset:])

    with store.open(DIGEST, len(DATA), resume, "blob") as blob:
        got = blob.read(-1)
    assert offsets == [HALF] and got == DATA, "the whole blob, the kept half read back"
    assert store.has(DIGEST, len(DATA)) and partials(tmp_path) == []


def test_a_restart_from_zero_must_send_the_same_bytes_readers_took(tmp_path):
    """A server that ignores Range sends the blob again from byte 0: bytes already on disk
    (which a reader may have taken) are compared, never replaced."""
    store = BlobStore(str(tmp_path))

    def restart(other: bytes):
        def fetch(offset, out):
            out.write(DATA[:HALF])
            out.seek(0)
            out.truncate()
            out.write(other)
        return fetch

    with store.open(DIGEST, len(DATA), restart(DATA), "blob") as blob:
        assert blob.read(-1) == DATA
    store.remove(DIGEST)
    changed = bytearray(DATA)
    changed[10] ^= 1
    with store.open(DIGEST, len(DATA), restart(bytes(changed)), "blob") as blob:
        with pytest.raises(DataLoss, match="other bytes"):
            blob.drain()
    assert not store.has(DIGEST) and partials(tmp_path) == []


def test_a_reader_that_gives_up_stops_the_download_and_leaves_nothing(tmp_path):
    """The unpack failed (a full disk, a bad DiffID): nobody reads the rest, so the download
    stops at its next write and its partial file goes; a new open starts afresh."""
    store = BlobStore(str(tmp_path))
    more, stopped = threading.Event(), threading.Event()

    def fetch(offset, out):
        out.write(DATA[:HALF])
        assert more.wait(WAIT)
        try:
            out.write(DATA[HALF:])
        finally:
            stopped.set()

    blob = store.open(DIGEST, len(DATA), fetch, "blob")
    assert blob.read(10) == DATA[:10]
    blob.close()
    more.set()
    assert stopped.wait(WAIT)
    with store.open(DIGEST, len(DATA), lambda o, out: out.write(DATA[o:]), "blob") as again:
        assert again.read(-1) == DATA  # waited for the stopped download's flock
    assert partials(tmp_path) == []


def test_racing_readers_share_one_download_and_all_get_every_byte(tmp_path):
    store = BlobStore(str(tmp_path))
    calls, go = [], threading.Event()

    def fetch(offset, out):
        calls.append(offset)
        assert go.wait(WAIT)
        for i in range(0, len(DATA), 4096):
            out.write(DATA[i:i + 4096])

    readers = [store.open(DIGEST, len(DATA), fetch, "blob") for _ in range(4)]
    got = [b""] * len(readers)

    def read(i):
        with readers[i] as blob:
            got[i] = blob.read(-1)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(readers))]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(WAIT)
    assert calls == [0] and got == [DATA] * len(readers)


def test_a_blob_in_place_is_read_through_a_verifying_reader_and_evicted_if_rotten(tmp_path):
    store = BlobStore(str(tmp_path))
    store.get(DIGEST, len(DATA), lambda o, out: out.write(DATA[o:]), "blob")
    with open(store.path(DIGEST), "r+b") as f:
        f.seek(5)
        f.write(b"X")

    def never(offset, out):
        raise AssertionError("a blob in place is not downloaded")

    with store.open(DIGEST, len(DATA), never, "blob") as blob:
        with pytest.raises(DataLoss, match="digest mismatch"):
            blob.drain()
    assert not store.has(DIGEST), "the rotten copy is gone: the retry downloads it"


def test_a_download_whose_thread_cannot_start_is_not_left_for_others_to_join(tmp_path,
                                                                            monkeypatch):
    """No thread (a pids limit): the open fails, and the next one starts a download of
    its own instead of waiting for ever on one that never ran."""
    store = BlobStore(str(tmp_path))
    real = threading.Thread.start

    def refused(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    with pytest.raises(RuntimeError, match="new thread"):
        store.open(DIGEST, len(DATA), lambda o, out: out.write(DATA[o:]), "blob")
    monkeypatch.setattr(threading.Thread, "start", real)
    got = []

    def read():
        with store.open(DIGEST, len(DATA), lambda o, out: out.write(DATA[o:]), "blob") as b:
            got.append(b.read(-1))

    t = threading.Thread(target=read)
    t.start()
    t.join(WAIT)
    assert not t.is_alive(), "the second open joined the download that never ran"
    assert got == [DATA]


def test_progress_counts_resumed_bytes_and_a_failing_display_fails_nothing(tmp_path):
    """A resumed download reports the bytes it already had (its row reaches the blob's
    size); a progress callback that raises (a display on a closed pipe) is not taken for
    a store error."""
    seen = []

    def on_bytes(digest, n):
        seen.append(n)
        raise BrokenPipeError("the display went away")

    store = BlobStore(str(tmp_path), on_bytes=on_bytes)

    with store.open(DIGEST, len(DATA), cut, "blob") as blob:
        with pytest.raises(http.client.IncompleteRead):
            blob.drain()
        assert blob.downloading is False, "the download ended (cut)"
    seen.clear()
    with store.open(DIGEST, len(DATA), lambda o, out: out.write(DATA[o:]), "blob") as blob:
        assert blob.read(-1) == DATA
    assert sum(seen) == len(DATA) and seen[0] == HALF, seen
    assert store.has(DIGEST, len(DATA))
