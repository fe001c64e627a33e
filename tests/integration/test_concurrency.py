"""Many publishes racing for one image: each layer is unpacked exactly once, and GC never
takes a layer from under a publish that is about to use it."""

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from csi.image.build import LayerBuilder, write_image
from csi.mount.mountinfo import MountTable
from tests.conftest import (
    ROOT_REASON,
    StrataProcess,
    base_layer,
    free_port,
    scrape,
    unmount_all_under,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)


@pytest.fixture
def fresh_image(tmp_path) -> str:
    """An image no store has seen: three layers with content unique to this test."""
    layout = str(tmp_path / "layout")
    extra = LayerBuilder().file("unique", os.urandom(64).hex())
    top = LayerBuilder().tree(os.path.dirname(os.__file__) + "/email", "usr/lib/email")
    write_image(layout, "fresh", [base_layer(), extra, top])
    return f"oci:{layout}:fresh"


@pytest.fixture
def plugin(tmp_path):
    procs = []

    def start(*args):
        procs.append(StrataProcess(str(tmp_path / "p"), metrics_port=free_port(),
                                   extra_args=args))
        os.makedirs(procs[-1].base, exist_ok=True)
        return procs[-1].start()

    yield start
    for p in procs:
        p.stop(signal.SIGKILL)
    unmount_all_under(str(tmp_path))


def test_32_concurrent_cold_publishes_unpack_each_layer_once(plugin, fresh_image, tmp_path):
    p = plugin()
    (tmp_path / "pods").mkdir()
    n = 32
    targets = [tmp_path / "pods" / f"pod{i}" for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda i: p.csi.publish(f"race-{i}", targets[i], fresh_image), range(n)))
    m = scrape(p.metrics_port)
    assert m["strata_layer_unpacks_total"] == 3, "one unpack per layer, whatever the race"
    assert m["strata_publications"] == n
    assert len(os.listdir(os.path.join(p.root, "layers"))) == 3
    assert all((t / "unique").exists() for t in targets)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda i: p.csi.unpublish(f"race-{i}", targets[i]), range(n)))
    assert not MountTable().under(str(tmp_path / "pods"))
    assert os.listdir(os.path.join(p.root, "volumes")) == []


def test_publishes_racing_an_immediate_gc_never_lose_a_layer(plugin, fresh_image, tmp_path):
    # Every unpublish drops the last reference and collects at once, while other threads
    # are between "layer present" and "reference recorded": the lease must protect them.
    p = plugin("--gc-policy", "immediate", "--gc-min-age", "0")
    (tmp_path / "pods").mkdir()

    def cycle(i):
        for j in range(6):
            t = tmp_path / "pods" / f"c{i}-{j}"
            p.csi.publish(f"cyc-{i}-{j}", t, fresh_image)
            assert (t / "unique").exists()
            p.csi.unpublish(f"cyc-{i}-{j}", t)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(cycle, range(8)))
    m = scrape(p.metrics_port)
    assert m['strata_rpc_duration_seconds_count{code="OK",method="NodePublishVolume"}'] == 48
    assert m["strata_layers"] == 0
    assert not MountTable().under(str(tmp_path / "pods"))
    assert os.listdir(os.path.join(p.root, "tmp")) == []


def test_a_second_process_unpacking_the_same_layer_leaves_the_recorded_one_alone(
        fresh_image, tmp_path):
    """`strata pull` runs its own LayerStore on the server's root: single-flight is per
    process, so both may unpack one layer. The loser must drop its copy, not replace the
    directory the winner recorded (which a pod's overlay may already use)."""
    import threading

    from csi.image import reference
    from csi.image.layout import OciLayout
    from csi.paths import StorePaths
    from csi.store.layers import LayerStore
    from csi.store.state import State

    paths = StorePaths(str(tmp_path / "store")).make()
    root = paths.root
    states = [State(paths.state_db) for _ in range(2)]
    server, cli = (LayerStore(paths, s) for s in states)
    source = OciLayout(reference.parse(fresh_image))
    image = source.resolve()
    opened, go = threading.Event(), threading.Event()

    class Gated:  # the CLI's download starts before the server's and ends after it
        def open_blob(self, desc):
            opened.set()
            assert go.wait(30)
            return source.open_blob(desc)

    errors = []
    thread = threading.Thread(target=lambda: errors.extend(
        _catch(lambda: cli.ensure(Gated(), image.layers))))
    thread.start()
    try:
        assert opened.wait(30)
        with server.acquire(source, image.layers) as lease:
            ids = lease.layer_ids
            before = {lid: os.stat(paths.layer_fs(lid)).st_ino for lid in ids}
            go.set()
            thread.join(60)
            assert not errors, errors
            assert {lid: os.stat(paths.layer_fs(lid)).st_ino for lid in ids} == before
            assert os.path.isfile(os.path.join(paths.layer_fs(ids[1]), "unique"))
        assert os.listdir(os.path.join(root, "tmp")) == []
        assert server.unpacked == 3 and cli.unpacked == 0
    finally:
        go.set()
        thread.join(60)
        for s in states:
            s.close()


def _catch(fn) -> list[BaseException]:
    try:
        fn()
    except BaseException as e:  # reported by the test's assertion
        return [e]
    return []
