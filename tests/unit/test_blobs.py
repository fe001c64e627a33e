"""The blob cache: verify, resume, discard bad bytes, one download per blob."""

import hashlib
import http.client
import threading
import time

import pytest

from csi.errors import DataLoss
from csi.store.blobs import BlobStore

DATA = bytes(range(256)) * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def test_download_verifies_and_stores(tmp_path):
    store = BlobStore(str(tmp_path))
    calls = []

    def fetch(offset, out):
        calls.append(offset)
        out.write(DATA[offset:])

    path = store.get(DIGEST, len(DATA), fetch, "blob")
    with open(path, "rb") as f:
        assert f.read() == DATA
    assert store.get(DIGEST, len(DATA), fetch, "blob") == path  # cached: no fetch
    assert calls == [0]


def test_a_cut_download_resumes_from_the_partial_file(tmp_path):
    store = BlobStore(str(tmp_path))

    def cut(offset, out):
        out.write(DATA[offset:1000])
        raise http.client.IncompleteRead(b"", len(DATA) - 1000)

    with pytest.raises(http.client.IncompleteRead):
        store.get(DIGEST, len(DATA), cut, "blob")
    offsets = []

    def resume(offset, out):
        offsets.append(offset)
        out.write(DATA[offset:])

    store.get(DIGEST, len(DATA), resume, "blob")
    assert offsets == [1000]


def test_wrong_bytes_are_data_loss_and_discarded(tmp_path):
    store = BlobStore(str(tmp_path))
    bad = bytearray(DATA)
    bad[500] ^= 1
    with pytest.raises(DataLoss, match="digest mismatch"):
        store.get(DIGEST, len(DATA), lambda o, out: out.write(bytes(bad[o:])), "blob")
    assert not store.has(DIGEST)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    store = BlobStore(str(tmp_path))
    with pytest.raises(OSError):
        store.get(DIGEST, len(DATA), lambda o, out: (out.write(DATA[:10]),
                                                     (_ for _ in ()).throw(OSError("reset"))),
                  "blob")

    def whole(offset, out):  # a 200 instead of 206: start over
        out.seek(0)
        out.truncate()
        out.write(DATA)

    store.get(DIGEST, len(DATA), whole, "blob")
    assert store.has(DIGEST, len(DATA))


def test_racing_gets_download_once(tmp_path):
    store = BlobStore(str(tmp_path))
    gate = threading.Event()
    calls = []

    def slow(offset, out):
        calls.append(offset)
        gate.wait(5)
        out.write(DATA)

    threads = [threading.Thread(target=store.get, args=(DIGEST, len(DATA), slow, "b"))
               for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert calls == [0]


def test_a_second_process_waiting_on_a_download_that_failed_starts_afresh(tmp_path):
    """Two stores on one root stand for `strata serve` and `strata pull`: single-flight
    does not join them, the partial file's flock orders them. When the first download is
    bad bytes, its partial file is deleted; the waiter must not go on with the orphaned
    descriptor it opened before (and then fail to find the file to hash)."""
    first, second = BlobStore(str(tmp_path)), BlobStore(str(tmp_path))
    started, release = threading.Event(), threading.Event()
    errors = []

    def bad(offset, out):
        started.set()
        assert release.wait(10)
        out.write(b"x" * len(DATA))

    def run_first():
        try:
            first.get(DIGEST, len(DATA), bad, "blob")
        except DataLoss as e:
            errors.append(e)

    t = threading.Thread(target=run_first)
    t.start()
    assert started.wait(10)
    got = []
    waiter = threading.Thread(target=lambda: got.append(
        second.get(DIGEST, len(DATA), lambda o, out: out.write(DATA[o:]), "blob")))
    waiter.start()
    deadline = time.monotonic() + 10
    while not _someone_waits_on_a_flock():
        assert time.monotonic() < deadline, "the second fetch never waited"
        time.sleep(0.01)
    release.set()
    t.join(10)
    waiter.join(10)
    assert len(errors) == 1 and got, "the second download went through"
    with open(got[0], "rb") as f:
        assert f.read() == DATA


def _someone_waits_on_a_flock() -> bool:
    with open("/proc/locks") as f:
        return "-> FLOCK" in f.read()


def test_evicting_a_blob_spares_a_good_copy_put_in_its_place(tmp_path):
    """The reader found its blob corrupt, but another process has meanwhile stored a good
    one at the same path: only the file that was read may go."""
    import os

    store = BlobStore(str(tmp_path))
    path = store.get(DIGEST, len(DATA), lambda o, out: out.write(DATA[o:]), "blob")
    with open(path, "rb") as reading:  # held open, as the reader does: no inode reuse
        rotten = os.fstat(reading.fileno()).st_ino
        os.unlink(path)
        store.get(DIGEST, len(DATA), lambda o, out: out.write(DATA[o:]), "blob")  # again
        store.remove(DIGEST, inode=rotten)
    assert store.has(DIGEST, len(DATA))
    store.remove(DIGEST, inode=os.stat(path).st_ino)
    assert not store.has(DIGEST)
