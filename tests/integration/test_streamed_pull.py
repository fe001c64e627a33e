"""Cold pulls streamed from a real registry (Debian's docker-registry on 127.0.0.1) into the
unpacker, and an image's layers unpacked in parallel (issue 13 part 2).

The blob is hashed once, as it downloads, while the unpacker reads the same bytes; a layer
is committed only once both its blob digest and its DiffID verified, so whatever goes wrong
at the end of a stream (a corrupt byte, a wrong DiffID, a hostile tar, a cut connection)
leaves no layer directory, no record and no partial blob of bad bytes behind. Layers unpack
concurrently, at most --max-parallel-unpacks at once in the whole store: the overlap is
shown by a blob source that holds one layer's unpack until another one has started (no
timing), and the bound by the most unpacks seen between a first read and an EOF."""

import gzip
import hashlib
import json
import os
import threading

import grpc
import pytest

from csi import compose
from csi.config import Config
from csi.errors import DataLoss
from csi.image import reference
from csi.image.build import LayerBuilder, write_image
from csi.image.manifest import LayerDesc
from csi.image.registry import RegistryClient
from csi.image.transport import Options
from csi.paths import StorePaths
from csi.store.blobs import BlobStore
from csi.store.layers import LayerStore
from csi.store.state import State
from tests.conftest import ROOT_REASON, app_layer, base_layer, needs_tools, strata_servers
from tests.data import hostile
from tests.faultproxy import FaultProxy
from tests.registry import Registry, push, registry_get

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
    needs_tools("docker-registry", "skopeo"),
]
WAIT = 60  # seconds a gate waits before the test fails instead of hanging
NOISE = 2 << 20  # incompressible bytes in each image's own layer: a stream of some length


def three_layers(name: str) -> list[LayerBuilder]:
    return [base_layer(), app_layer(),
            LayerBuilder().file(f"data/{name}.bin", os.urandom(NOISE))
                          .file(f"data/{name}.txt", f"{name}\n")]


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """`team/three:1` and `team/other:1` (three layers each, the top one unique), and two
    one-layer images whose layer must be refused: `team/baddiff:1` (its config names
    another DiffID) and `team/hostile:1` (a tar that escapes its root)."""
    root = tmp_path_factory.mktemp("streamed")
    layout = str(root / "layout")
    write_image(layout, "three", three_layers("three"))
    write_image(layout, "other", three_layers("other"))
    tar = LayerBuilder().file("etc/motd", "a layer whose DiffID is a lie\n").tar_bytes()
    hostile.write_layout(str(root / "baddiff"), "baddiff", [
        (gzip.compress(tar, mtime=0), hostile.GZIP_MT,
         "sha256:" + hashlib.sha256(tar + b"x").hexdigest())])
    case = next(c for c in hostile.build_corpus().values()
                if c.expect == hostile.REFUSED and c.base is None)
    hostile.write_layout(str(root / "hostile"), "hostile",
                         [(case.blob_bytes(), case.media_type, case.diff_id)])
    with Registry() as r:
        push(layout, "three", r, "team/three", "1")
        push(layout, "other", r, "team/other", "1")
        push(str(root / "baddiff"), "baddiff", r, "team/baddiff", "1")
        push(str(root / "hostile"), "hostile", r, "team/hostile", "1")
        r.hostile_case = case.name
        yield r


def layers_of(r, repo: str) -> list[dict]:
    status, _, body = registry_get(r, f"/v2/{repo}/manifests/1")
    assert status == 200
    return json.loads(body)["layers"]


def store_holds_nothing_unrecorded(root: str) -> None:
    """tmp/ empty (no unpack dir, no partial blob), and layers/ exactly the recorded ones."""
    assert os.listdir(os.path.join(root, "tmp")) == []
    state = State(os.path.join(root, "state.db"))
    try:
        with state.read() as tx:
            recorded = {x.id for x in tx.layers()}
    finally:
        state.close()
    assert set(os.listdir(os.path.join(root, "layers"))) == recorded


# -- through `strata serve`, as the kubelet asks ---------------------------------------------
@pytest.fixture
def plugin(tmp_path):
    with strata_servers(tmp_path) as start:
        yield start


def test_a_cut_mid_stream_resumes_and_the_layer_is_right(plugin, reg, tmp_path):
    top = layers_of(reg, "team/three")[-1]["digest"]
    with FaultProxy(reg.host) as proxy:
        proxy.cut_after(1 << 20, times=1, path=top)
        p = plugin("--insecure-registry", proxy.host)
        p.csi.publish("v", tmp_path / "t", f"{proxy.host}/team/three:1")
        try:
            assert (tmp_path / "t/data/three.bin").stat().st_size == NOISE
            assert (tmp_path / "t/data/three.txt").read_text() == "three\n"
            assert (tmp_path / "t/etc/motd").read_text() == "app motd\n"
        finally:
            p.csi.unpublish("v", tmp_path / "t")
        gets = [(e.fault, e.headers.get("Range")) for e in proxy.requests_to(top)]
        assert gets[0] == ("cut", None) and gets[1][1] == f"bytes={1 << 20}-", gets
    store_holds_nothing_unrecorded(p.root)


def test_a_blob_corrupt_at_its_end_leaves_no_layer_record_or_partial(plugin, reg, tmp_path):
    """One byte flipped near the end of the stream: the unpacker has taken (nearly) all of
    the layer by the time the digest says no."""
    top = layers_of(reg, "team/three")[-1]
    with FaultProxy(reg.host) as proxy:
        proxy.corrupt(times=None, path=top["digest"], offset=top["size"] - 16)
        p = plugin("--insecure-registry", proxy.host, "--registry-retries", "0")
        with pytest.raises(grpc.RpcError) as e:
            p.csi.publish("v", tmp_path / "t", f"{proxy.host}/team/three:1")
        assert e.value.code() == grpc.StatusCode.DATA_LOSS, e.value.details()
        store_holds_nothing_unrecorded(p.root)
        assert top["digest"][7:] not in os.listdir(os.path.join(p.root, "blobs", "sha256"))
        assert not (tmp_path / "t").exists()
        proxy.clear()
        p.csi.publish("v", tmp_path / "t", f"{proxy.host}/team/three:1")  # the retry
        assert (tmp_path / "t/data/three.txt").read_text() == "three\n"
        p.csi.unpublish("v", tmp_path / "t")


def test_a_wrong_diff_id_leaves_no_layer_record_or_partial(plugin, reg, tmp_path):
    p = plugin("--insecure-registry", reg.host)
    with pytest.raises(grpc.RpcError) as e:
        p.csi.publish("v", tmp_path / "t", f"{reg.host}/team/baddiff:1")
    assert e.value.code() == grpc.StatusCode.DATA_LOSS, e.value.details()
    assert "DiffID" in e.value.details()
    assert os.listdir(os.path.join(p.root, "layers")) == []
    store_holds_nothing_unrecorded(p.root)


def test_a_hostile_layer_streamed_is_refused_and_leaves_nothing(plugin, reg, tmp_path):
    p = plugin("--insecure-registry", reg.host)
    with pytest.raises(grpc.RpcError) as e:
        p.csi.publish("v", tmp_path / "t", f"{reg.host}/team/hostile:1")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (reg.hostile_case,
                                                                e.value.details())
    assert os.listdir(os.path.join(p.root, "layers")) == []
    store_holds_nothing_unrecorded(p.root)
    assert not (tmp_path / "t").exists()


# -- the layer store in this process, its blob source watched --------------------------------
class Probe:
    """A blob source around a registry's that watches each layer's unpack: it begins at
    the unpack's first read of the blob and ends at its EOF. `hold(ready)`: the first
    unpack to begin waits (at most WAIT) until `ready(probe)` says so."""

    def __init__(self, source, hold=None):
        self.source, self._hold = source, hold
        self.cond = threading.Condition()
        self.opened = 0
        self.active = self.peak = 0
        self.begun: list[str] = []
        self.held: bool | None = None  # None: nobody was held; else whether ready came

    def open_blob(self, layer, source=None):
        blob = (source or self.source).open_blob(layer)
        with self.cond:
            self.opened += 1
            self.cond.notify_all()
        return _Watched(self, layer, blob)

    def begin(self, layer) -> None:
        with self.cond:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.begun.append(layer.digest)
            self.cond.notify_all()
            first = len(self.begun) == 1
        if first and self._hold is not None:
            with self.cond:
                self.held = self.cond.wait_for(lambda: self._hold(self), WAIT)

    def end(self) -> None:
        with self.cond:
            self.active -= 1


class _Watched:
    def __init__(self, probe: Probe, layer, blob):
        self._probe, self._layer, self._blob = probe, layer, blob
        self._state = "new"

    def read(self, n: int = -1) -> bytes:
        if self._state == "new":
            self._state = "reading"
            self._probe.begin(self._layer)
        data = self._blob.read(n)
        if not data and n != 0 and self._state == "reading":
            self._state = "ended"
            self._probe.end()
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        if self._state == "reading":
            self._state = "ended"
            self._probe.end()
        self._blob.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture
def store(tmp_path):
    """`make(max_unpacks)`: a layer store and a blob store on one fresh root."""
    states = []

    def make(max_unpacks: int):
        paths = StorePaths(str(tmp_path / "store")).make()
        states.append(State(paths.state_db))
        return LayerStore(paths, states[-1], max_unpacks=max_unpacks), BlobStore(paths.root)

    yield make
    for s in states:
        s.close()


def resolve(host: str, repo: str, blobs: BlobStore):
    client = RegistryClient(Options(insecure=frozenset({host}), retries=1))
    return client.resolve(reference.parse(f"{host}/{repo}:1"), lambda h, r: None, blobs)


def check_image(layers: LayerStore, ids: list[str], name: str) -> None:
    top = layers.paths.layer_fs(ids[-1])
    assert os.path.getsize(os.path.join(top, "data", f"{name}.bin")) == NOISE
    with open(os.path.join(layers.paths.layer_fs(ids[1]), "etc", "motd")) as f:
        assert f.read() == "app motd\n"


def test_layers_of_an_image_unpack_at_the_same_time(store, reg):
    """The first layer to start unpacking waits until a second one has started: with two
    slots, both run at once (with one, it would never come)."""
    layers, blobs = store(2)
    image, source = resolve(reg.host, "team/three", blobs)
    probe = Probe(source, hold=lambda pr: len(pr.begun) >= 2)
    ids = layers.ensure(probe, image.layers)
    assert probe.held is True, "a second layer's unpack started while the first one's ran"
    assert probe.peak == 2 and len(probe.begun) == 3
    assert len(set(ids)) == 3 and layers.unpacked == 3
    check_image(layers, ids, "three")
    store_holds_nothing_unrecorded(layers.paths.root)


def test_one_slot_never_unpacks_two_layers_at_once_even_across_pulls(store, reg):
    """--max-parallel-unpacks 1, two images pulled at once: every blob is opened (their
    downloads start; the shared base and app layers once, by whichever pull leads their
    unpack) while the first unpack holds the one slot, yet no second unpack starts before
    the first one ends."""
    layers, blobs = store(1)
    pulls = [resolve(reg.host, repo, blobs) for repo in ("team/three", "team/other")]
    probe = Probe(None, hold=lambda pr: pr.opened == 4)

    class Routed:  # one probe over both images' sources
        def __init__(self, src):
            self.src = src

        def open_blob(self, layer):
            return probe.open_blob(layer, self.src)

    results, errors = {}, []

    def pull(name, image, src):
        try:
            results[name] = layers.ensure(Routed(src), image.layers)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=pull, args=(name, image, src))
               for name, (image, src) in zip(("three", "other"), pulls, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 3)
    assert not errors, errors
    assert probe.held is True, "the other blobs were all opened meanwhile"
    assert probe.peak == 1, "never two unpacks at once"
    assert len(probe.begun) == 4, "the shared base and app layers are unpacked once"
    for name, ids in results.items():
        check_image(layers, ids, name)
    store_holds_nothing_unrecorded(layers.paths.root)


def test_racing_acquires_of_one_image_download_and_unpack_each_layer_once(store, reg):
    layers, blobs = store(2)
    with FaultProxy(reg.host) as proxy:
        image, source = resolve(proxy.host, "team/three", blobs)
        go = threading.Barrier(8)
        results, errors = [], []

        def pull():
            try:
                go.wait(WAIT)
                results.append(layers.ensure(source, image.layers))
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=pull) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 3)
        assert not errors, errors
        per_blob = [n for path, n in proxy.counts.items() if "/blobs/" in path]
        assert sorted(per_blob) == [1] * 4, proxy.counts  # config + three layers
    assert layers.unpacked == 3 and all(r == results[0] for r in results)
    check_image(layers, results[0], "three")


def test_a_layer_that_fails_fails_the_acquire_once_all_workers_stopped(store, reg):
    """The bad DiffID fails its layer; what the acquire raises is that layer's error, and
    nothing is left in tmp/ when it returns (no worker still writing there)."""
    layers, blobs = store(2)
    image, source = resolve(reg.host, "team/baddiff", blobs)
    three, three_source = resolve(reg.host, "team/three", blobs)

    class Both:
        def open_blob(self, layer):
            return (source if layer in image.layers else three_source).open_blob(layer)

    with pytest.raises(DataLoss, match="DiffID"):
        layers.ensure(Both(), [*three.layers, *image.layers])
    store_holds_nothing_unrecorded(layers.paths.root)


def test_the_setting_reaches_the_layer_store(tmp_path):
    config = Config(root=str(tmp_path / "store"), max_parallel_unpacks=3)
    os.makedirs(config.root)
    State(os.path.join(config.root, "state.db")).close()
    parts = compose.tool(config)
    try:
        assert parts.layers.max_unpacks == 3
    finally:
        parts.close()


def plain_layer(name: str):
    """An uncompressed layer (digest = DiffID) and its tar."""
    tar = LayerBuilder().file(f"{name}.txt", f"{name}\n" * 50_000).tar_bytes()
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    return LayerDesc(digest, "application/vnd.oci.image.layer.v1.tar", len(tar), digest), tar


def test_a_stalled_download_holds_no_unpack_slot(store, tmp_path):
    """--max-parallel-unpacks 1: a layer whose download stalls half-way, its unpack begun,
    gives its slot up while it waits for bytes, so another pull's layer unpacks meanwhile
    (it used to wait for the stalled registry)."""
    layers, blobs = store(1)
    (slow, slow_tar), (fast, fast_tar) = plain_layer("slow"), plain_layer("fast")
    half, go = threading.Event(), threading.Event()

    def fetch_slow(offset, out):
        out.write(slow_tar[:len(slow_tar) // 2])
        half.set()
        assert go.wait(WAIT), "the test never let the slow download go on"
        out.write(slow_tar[len(slow_tar) // 2:])

    fetches = {slow.digest: fetch_slow,
               fast.digest: lambda offset, out: out.write(fast_tar[offset:])}

    class Source:
        def open_blob(self, layer):
            return blobs.open(layer.digest, layer.size, fetches[layer.digest], "blob")

    results, errors = {}, []

    def pull(desc):
        try:
            results[desc.digest] = layers.ensure(Source(), [desc])
        except BaseException as e:  # reported below
            errors.append(e)

    slow_pull = threading.Thread(target=pull, args=(slow,))
    slow_pull.start()
    try:
        assert half.wait(WAIT)
        tmp = layers.paths.tmp
        deadline = threading.Event()
        for _ in range(WAIT * 100):  # its unpack has begun: it took the one slot
            if any(n.startswith("unpack-") for n in os.listdir(tmp)):
                break
            deadline.wait(0.01)
        else:
            pytest.fail("the slow layer's unpack never began")
        fast_pull = threading.Thread(target=pull, args=(fast,))
        fast_pull.start()
        fast_pull.join(WAIT)
        assert not fast_pull.is_alive(), "the other layer waited for the stalled download"
        assert fast.digest in results and not errors, errors
    finally:
        go.set()
        slow_pull.join(WAIT)
    assert not errors, errors
    with open(os.path.join(layers.paths.layer_fs(results[slow.digest][0]), "slow.txt")) as f:
        assert f.read() == "slow\n" * 50_000
    store_holds_nothing_unrecorded(layers.paths.root)


def test_a_worker_that_cannot_start_leaves_no_lease_and_no_worker(store, monkeypatch):
    """No thread for the second worker (a pids limit): the acquire fails, but only once
    the started worker is done, so that nothing leases a layer into the ended token."""
    layers, blobs = store(1)
    descs, tars = zip(*(plain_layer(n) for n in ("one", "two", "three")), strict=True)
    by_digest = dict(zip((d.digest for d in descs), tars, strict=True))

    class Source:
        def open_blob(self, layer):
            tar = by_digest[layer.digest]
            return blobs.open(layer.digest, layer.size,
                              lambda offset, out: out.write(tar[offset:]), "blob")

    real = threading.Thread.start

    def start(self):
        if self.name == "unpack 1":
            raise RuntimeError("can't start new thread")
        real(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="new thread"):
        layers.ensure(Source(), list(descs))
    monkeypatch.setattr(threading.Thread, "start", real)
    assert not [t for t in threading.enumerate() if t.name.startswith("unpack ")]
    with layers.state.read() as tx:
        assert not [h for _, h in tx.holders() if h.startswith("lease:")]
    store_holds_nothing_unrecorded(layers.paths.root)
