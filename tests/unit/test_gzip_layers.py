"""Gzip layers in the layer store (csi/store/layers.py, csi/store/compression.py, whose
inflate runs on a thread of its own): every gzip member read, garbage and truncation refused
as InvalidArgument, a DiffID mismatch DataLoss, nothing left behind and no thread left
running whatever happened to the unpack; and the source told of each recorded layer."""

import dataclasses
import gzip
import io
import os
import tarfile
import threading

import pytest

from csi.digest import VerifyingReader
from csi.errors import DataLoss, InvalidArgument
from csi.paths import StorePaths
from csi.store.layers import LayerStore, layer_id
from csi.store.state import State
from tests.unit.test_layers_durable import _sha, _tar

FILES = {"etc/big": os.urandom(3 << 20) + bytes(9 << 20), "etc/small": b"hello\n"}
TAR = _tar(FILES)


@dataclasses.dataclass(frozen=True)
class Blob:
    digest: str
    diff_id: str
    media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip"
    compression: str = "gzip"


class Source:
    """Blobs from memory, verified as the registry client verifies them."""

    def __init__(self, data: bytes, fail_after: int | None = None):
        self.data, self.fail_after = data, fail_after

    def open_blob(self, layer):
        raw = io.BytesIO(self.data) if self.fail_after is None else Failing(
            self.data, self.fail_after)
        return VerifyingReader(raw, layer.digest, len(self.data), layer.digest)


class Failing(io.BytesIO):
    """A download that breaks after `limit` bytes."""

    def __init__(self, data: bytes, limit: int):
        super().__init__(data)
        self.limit = limit

    def read(self, n=-1):
        if self.tell() >= self.limit:
            raise ConnectionResetError("the registry went away")
        return super().read(n)


@pytest.fixture
def store(tmp_path):
    paths = StorePaths(str(tmp_path / "store")).make()
    state = State(paths.state_db)
    try:
        yield paths, state, LayerStore(paths, state, sync=lambda fd: None)
    finally:
        state.close()


@pytest.fixture
def no_thread_left():
    before = set(threading.enumerate())
    yield
    assert set(threading.enumerate()) - before == set()


def _nothing_left(paths, state, diff_id: str) -> None:
    assert os.listdir(paths.tmp) == []
    assert os.listdir(paths.layers) == []
    with state.read() as tx:
        assert tx.layer_by_diff_id(diff_id) is None


def test_a_layer_of_several_gzip_members_unpacks_whole(store, no_thread_left):
    paths, state, layers = store
    half = len(TAR) // 2  # split inside a file's data, as `cat a.gz b.gz` may
    blob = gzip.compress(TAR[:half]) + bytes(5) + gzip.compress(TAR[half:]) + bytes(3)
    desc = Blob(_sha(blob), _sha(TAR))
    (lid,) = layers.ensure(Source(blob), [desc])
    assert lid == layer_id(desc.diff_id)
    for name, data in FILES.items():
        with open(os.path.join(paths.layer(lid), "fs", name), "rb") as f:
            assert f.read() == data


@pytest.mark.parametrize("damage", [
    lambda gz: gz + b"garbage after the last member",
    lambda gz: gz[:len(gz) // 2],  # truncated, though its blob digest matches
    lambda gz: gz[:-8] + bytes(8),  # the member's CRC and size wrong
])
def test_a_garbled_gzip_is_invalid_argument_and_leaves_nothing(store, no_thread_left, damage):
    paths, state, layers = store
    blob = damage(gzip.compress(TAR))
    desc = Blob(_sha(blob), _sha(TAR))
    with pytest.raises(InvalidArgument, match="cannot be read"):
        layers.ensure(Source(blob), [desc])
    _nothing_left(paths, state, desc.diff_id)


@pytest.mark.parametrize("blob, digest_of, match", [
    # a tar with more zeros after its end: its DiffID is not the one declared
    pytest.param(gzip.compress(TAR + bytes(1024)), _sha, "digest mismatch", id="diff_id"),
    # the blob is not the one its digest names
    pytest.param(gzip.compress(TAR), lambda blob: _sha(blob + b"x"), None, id="blob"),
])
def test_a_digest_mismatch_is_data_loss_and_leaves_nothing(store, no_thread_left, blob,
                                                           digest_of, match):
    paths, state, layers = store
    desc = Blob(digest_of(blob), _sha(TAR))
    with pytest.raises(DataLoss, match=match):
        layers.ensure(Source(blob), [desc])
    _nothing_left(paths, state, desc.diff_id)


def test_a_download_that_breaks_stops_the_inflate_thread(store, no_thread_left):
    paths, state, layers = store
    blob = gzip.compress(TAR)
    desc = Blob(_sha(blob), _sha(TAR))
    with pytest.raises(ConnectionResetError):
        layers.ensure(Source(blob, fail_after=len(blob) // 2), [desc])
    _nothing_left(paths, state, desc.diff_id)


class Committing(Source):
    """A source that is told when each layer from its blobs is recorded (pulls.py drops
    the compressed blob then); it checks that the record is there at that moment."""

    def __init__(self, data: bytes, state: State):
        super().__init__(data)
        self.state, self.calls = state, []

    def committed(self, layer):
        with self.state.read() as tx:
            self.calls.append((layer.digest, tx.layer_by_diff_id(layer.diff_id) is not None))


def test_the_source_hears_of_each_layer_once_it_is_recorded(store):
    paths, state, layers = store
    blob = gzip.compress(TAR)
    desc = Blob(_sha(blob), _sha(TAR))
    source = Committing(blob, state)
    layers.ensure(source, [desc])
    assert source.calls == [(desc.digest, True)]
    layers.ensure(source, [desc])  # present: no blob read, nothing to hear
    assert source.calls == [(desc.digest, True)]


def test_a_failed_layer_is_not_committed(store):
    paths, state, layers = store
    blob = gzip.compress(TAR)
    desc = Blob(_sha(blob), _sha(b"another tar"))
    source = Committing(blob, state)
    with pytest.raises(DataLoss):
        layers.ensure(source, [desc])
    assert source.calls == []


def test_the_recorded_size_is_what_usage_reports(store, no_thread_left):
    """The usage walk runs while the layer is synced: the size recorded is still exactly
    usage() of the layer's files (hard links once, directories and symlinks counted)."""
    from csi.tree import usage

    paths, state, layers = store
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (("etc/link", tarfile.LNKTYPE), ("etc/sym", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "etc/big" if kind == tarfile.LNKTYPE else "big"
            tf.addfile(info)
    tar = buf.getvalue()
    blob = gzip.compress(tar)
    desc = Blob(_sha(blob), _sha(tar))
    (lid,) = layers.ensure(Source(blob), [desc])
    with state.read() as tx:
        recorded = tx.layer_by_diff_id(desc.diff_id).size
    assert recorded == usage(paths.layer_fs(lid))[0] > 12 << 20


def test_a_pull_drops_each_blob_once_its_layer_is_recorded_through_its_progress(store):
    """pulls.py: a registry pull (without --keep-blobs) removes a layer's blob when the
    store reports the layer recorded, through the progress watcher too."""
    from csi.pulls import Progress, _Dropping, _Watched

    paths, state, layers = store
    blob = gzip.compress(TAR)
    desc = Blob(_sha(blob), _sha(TAR))
    removed: list[str] = []
    layers.ensure(_Watched(_Dropping(Source(blob), removed.append), Progress()), [desc])
    assert removed == [desc.digest]
    bad = Blob(_sha(blob), _sha(b"another tar"))
    with pytest.raises(DataLoss):
        layers.ensure(_Watched(_Dropping(Source(blob), removed.append), Progress()), [bad])
    assert removed == [desc.digest]  # a failed layer's blob is not the drop's business
