"""The scrape-time store collector: copy-up figures and their walk cache."""

import os

from prometheus_client import CollectorRegistry, generate_latest

from csi.backend.overlay import OverlayBackend
from csi.image.manifest import Image
from csi.metrics import StoreCollector
from csi.paths import StorePaths
from csi.store.state import ImageRecord, Layer, Publication, State


def record(state: State, layer_ids: tuple[str, ...], digest: str, pubs: int) -> None:
    """Layers, an image of them and `pubs` publications of it, through the domain ops."""
    with state.transaction() as tx:
        for lid in dict.fromkeys(layer_ids):
            tx.record_layer(Layer(lid, "sha256:" + lid[-1] * 64, 4096, 0, 0))
        tx.record_image(Image("img", digest, "sha256:" + "c" * 64, ()), layer_ids, 0)
        for i in range(pubs):
            tx.record_publication(Publication(f"/t{i}", f"v{i}", f"k{i}", "img", digest,
                                              False, "", 1, 0), layer_ids, 0)


def values(registry) -> dict[str, float]:
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_copy_up_walks_are_reused_for_the_ttl(tmp_path):
    root = str(tmp_path)
    os.makedirs(tmp_path / "layers/l1/fs/etc")
    (tmp_path / "layers/l1/fs/etc/motd").write_text("lower\n")
    upper = tmp_path / "volumes/k0/upper"
    os.makedirs(upper / "etc")
    (upper / "etc/motd").write_text("copied up\n")
    state = State(str(tmp_path / "state.db"))
    record(state, ("l1",), "sha256:" + "a" * 64, pubs=1)
    now = [100.0]
    registry = CollectorRegistry()
    paths = StorePaths(root)
    registry.register(StoreCollector(state, OverlayBackend(paths), paths,
                                     clock=lambda: now[0], copy_up_ttl=10))
    m = values(registry)
    assert m['strata_copy_up_files{kind="copied"}'] == 1
    assert m['strata_copy_up_files{kind="created"}'] == 0
    (upper / "new").write_text("x")
    now[0] += 5
    assert values(registry)['strata_copy_up_files{kind="created"}'] == 0, "cached walk"
    now[0] += 6
    assert values(registry)['strata_copy_up_files{kind="created"}'] == 1, "walked again"
    state.close()


def test_page_cache_saved_counts_each_extra_pod_once_per_layer(tmp_path):
    from csi.metrics import pods_per_layer

    D = ["sha256:" + c * 64 for c in "abc"]
    images = [ImageRecord(Image("app", D[0], D[2], ()), ("base", "app", "base"), 0),
              ImageRecord(Image("other", D[1], D[2], ()), ("base",), 0)]  # base twice above
    pubs = [Publication(f"/t{i}", f"v{i}", f"k{i}", "img", digest, False, "", 1, 0)
            for i, digest in enumerate([D[0], D[0], D[1]])]
    assert pods_per_layer(images, pubs) == {"base": 3, "app": 2}


def test_page_cache_is_sampled_in_the_background_and_scrapes_read_the_sample(tmp_path):
    import time

    root = str(tmp_path)
    for lid, size in (("l1", 3 * 4096), ("l2", 5 * 4096)):
        os.makedirs(tmp_path / f"layers/{lid}/fs")
        (tmp_path / f"layers/{lid}/fs/f").write_bytes(os.urandom(size))  # written: resident
    state = State(str(tmp_path / "state.db"))
    record(state, ("l1", "l2"), "sha256:" + "a" * 64, pubs=3)
    registry = CollectorRegistry()
    paths = StorePaths(root)
    collector = StoreCollector(state, OverlayBackend(paths), paths)
    registry.register(collector)
    first = values(registry)  # starts the sampler; this scrape does not wait for it
    assert first["strata_page_cache_saved_bytes"] in (0, 2 * 8 * 4096)
    deadline = time.monotonic() + 10
    while values(registry)["strata_layer_page_cache_bytes"] == 0:
        assert time.monotonic() < deadline, "the background sample never arrived"
        time.sleep(0.02)
    m = values(registry)
    assert m["strata_layer_page_cache_bytes"] == 8 * 4096
    assert m["strata_page_cache_saved_bytes"] == 2 * 8 * 4096  # three pods, one cached copy
    state.close()
