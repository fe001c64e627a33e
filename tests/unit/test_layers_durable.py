"""Durable before recorded (csi/store/durable.py): a layer's files are synced before the
rename that makes them visible and the commit that records them, and a failed sync leaves
neither. A kill -9 cannot show a power cut, so the order is checked from inside the sync: the
injected sync function looks at what exists at the moment it runs."""

import dataclasses
import errno
import hashlib
import io
import os
import tarfile

import pytest

from csi.digest import VerifyingReader
from csi.paths import StorePaths
from csi.store import durable
from csi.store.layers import LayerStore, layer_id
from csi.store.state import State

CONTENT = b"hello from a layer\n" * 100


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            info.uid, info.gid = os.getuid(), os.getgid()  # lchown works as any user
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class Blob:
    digest: str
    diff_id: str
    media_type: str = "application/vnd.oci.image.layer.v1.tar"
    compression: str = "none"


class Source:
    """Blobs from memory, verified as the registry client verifies them."""

    def __init__(self, *blobs: bytes):
        self.blobs = {_sha(b): b for b in blobs}

    def open_blob(self, layer):
        return VerifyingReader(io.BytesIO(self.blobs[layer.digest]), layer.digest,
                               len(self.blobs[layer.digest]), layer.digest)


@pytest.fixture
def store(tmp_path):
    paths = StorePaths(str(tmp_path / "store")).make()
    state = State(paths.state_db)
    try:
        yield paths, state
    finally:
        state.close()


def _recorded(state: State, diff_id: str) -> bool:
    with state.read() as tx:
        return tx.layer_by_diff_id(diff_id) is not None


def test_a_layer_is_synced_complete_before_it_is_renamed_or_recorded(store):
    paths, state = store
    data = _tar({"etc/hello": CONTENT, "bin/tool": b"#!/bin/sh\n"})
    blob = Blob(_sha(data), _sha(data))
    lid = layer_id(blob.diff_id)
    events = []

    def sync(fd: int) -> None:
        where = os.readlink(f"/proc/self/fd/{fd}")
        with open(os.path.join(where, "fs", "etc", "hello"), "rb") as f:
            complete = f.read() == CONTENT
        events.append(("sync", os.path.dirname(where) == paths.tmp, complete,
                       os.path.exists(paths.layer(lid)), _recorded(state, blob.diff_id)))

    layers = LayerStore(paths, state, sync=sync)
    assert layers.ensure(Source(data), [blob]) == [lid]
    events.append(("after", os.path.isfile(os.path.join(paths.layer_fs(lid), "etc", "hello")),
                   _recorded(state, blob.diff_id)))
    assert events == [
        # in tmp/, every byte written, not yet renamed into layers/, not yet recorded
        ("sync", True, True, False, False),
        ("after", True, True),
    ]


def test_one_sync_per_unpacked_layer_and_none_for_a_recorded_one(store):
    paths, state = store
    a, b = _tar({"a": b"a"}), _tar({"b": b"b"})
    blobs = [Blob(_sha(a), _sha(a)), Blob(_sha(b), _sha(b))]
    calls = []
    layers = LayerStore(paths, state, sync=calls.append)
    layers.ensure(Source(a, b), blobs)
    assert len(calls) == 2
    layers.ensure(Source(a, b), blobs)  # both recorded: nothing unpacked, nothing synced
    assert len(calls) == 2


def test_a_failed_sync_records_nothing_and_leaves_nothing(store):
    paths, state = store
    data = _tar({"f": CONTENT})
    blob = Blob(_sha(data), _sha(data))

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "writeback failed")

    with pytest.raises(OSError, match="writeback failed"):
        LayerStore(paths, state, sync=failing).ensure(Source(data), [blob])
    assert not _recorded(state, blob.diff_id)
    assert os.listdir(paths.layers) == []
    assert os.listdir(paths.tmp) == []


def test_syncfs_is_the_real_call(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        durable.syncfs(fd)  # returns: the filesystem took it
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        durable.syncfs(fd)  # closed
    assert e.value.errno == errno.EBADF
