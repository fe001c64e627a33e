"""The scrape-time store collector: copy-up figures and their walk cache."""

import os

from prometheus_client import CollectorRegistry, generate_latest

from csi.metrics import StoreCollector
from csi.store.state import ImageRecord, Layer, Publication, State


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
    upper = tmp_path / "volumes/k1/upper"
    os.makedirs(upper / "etc")
    (upper / "etc/motd").write_text("copied up\n")
    state = State(str(tmp_path / "state.db"))
    with state.transaction() as tx:
        tx.put_layer(Layer("l1", "sha256:" + "1" * 64, 4096, 0, 0))
        tx.put_image(ImageRecord("sha256:" + "a" * 64, "img", "sha256:" + "c" * 64, ("l1",), 0))
        tx.put_publication(Publication("/t", "v", "k1", "img", "sha256:" + "a" * 64, False, "",
                                       1, 0))
    now = [100.0]
    registry = CollectorRegistry()
    registry.register(StoreCollector(state, root, clock=lambda: now[0], copy_up_ttl=10))
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
    images = [ImageRecord(D[0], "app", D[2], ("base", "app", "base"), 0),  # base twice
              ImageRecord(D[1], "other", D[2], ("base",), 0)]
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
    digest = "sha256:" + "a" * 64
    with state.transaction() as tx:
        for lid in ("l1", "l2"):
            tx.put_layer(Layer(lid, "sha256:" + lid[-1] * 64, 4096, 0, 0))
        tx.put_image(ImageRecord(digest, "img", "sha256:" + "c" * 64, ("l1", "l2"), 0))
        for i in range(3):
            tx.put_publication(Publication(f"/t{i}", f"v{i}", f"k{i}", "img", digest, False,
                                           "", 1, 0))
    registry = CollectorRegistry()
    collector = StoreCollector(state, root)
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
