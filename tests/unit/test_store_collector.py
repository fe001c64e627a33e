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
