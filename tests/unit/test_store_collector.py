"""The scrape-time store collector: per-publication series from the upper-stats cache
(never a walk in the scrape), sharing by image and layer, the GC marks."""

import os

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from csi.backend.overlay import OverlayBackend
from csi.image.manifest import Image
from csi.metrics import StoreCollector, exposition
from csi.paths import StorePaths
from csi.store.gc import Policy
from csi.store.state import ImageRecord, Layer, Publication, State
from csi.upper_stats import UpperStats

DIGEST = "sha256:" + "a" * 64


def record(state: State, layer_ids: tuple[str, ...], digest: str, pubs: int,
           sizes: dict[str, int] | None = None, **fields) -> None:
    """Layers, an image of them and `pubs` publications of it, through the domain ops."""
    with state.transaction() as tx:
        for lid in dict.fromkeys(layer_ids):
            tx.record_layer(Layer(lid, "sha256:" + lid[-1] * 64,
                                  (sizes or {}).get(lid, 4096), 0, 0))
        tx.record_image(Image("img", digest, "sha256:" + "c" * 64, ()), layer_ids, 0)
        for i in range(pubs):
            tx.record_publication(Publication(f"/t{i}", f"v{i}", f"k{i}", "img", digest,
                                              False, "", 1, 0, **fields), layer_ids, 0)


def values(registry) -> dict[str, float]:
    return {f"{s.name}{_labels(s.labels)}": s.value
            for fam in text_string_to_metric_families(exposition(registry).decode())
            for s in fam.samples if not s.name.endswith("_created")}


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def info(volume_id: str, readonly: str) -> str:
    return "strata_volume_info" + _labels(dict(
        ephemeral="true", image="img", pod_name="p", pod_namespace="ns",
        readonly=readonly, volume_id=volume_id))


def store(tmp_path):
    root = str(tmp_path)
    os.makedirs(tmp_path / "layers/l1/fs/etc")
    (tmp_path / "layers/l1/fs/etc/motd").write_text("lower\n")
    (tmp_path / "layers/l1/fs/etc/gone").write_text("lower\n")
    paths = StorePaths(root)
    state = State(str(tmp_path / "state.db"))
    return paths, state, OverlayBackend(paths)


def test_per_publication_series_come_from_the_cache_not_from_a_walk(tmp_path):
    paths, state, backend = store(tmp_path)
    record(state, ("l1",), DIGEST, pubs=1, pod_namespace="ns", pod_name="p")
    upper = tmp_path / "volumes/k0/upper"
    os.makedirs(upper / "etc")
    (upper / "etc/motd").write_text("copied up\n")
    os.mknod(upper / "etc/gone", 0o020000, 0)  # a whiteout
    uppers = UpperStats(state, backend)
    registry = CollectorRegistry()
    registry.register(StoreCollector(state, backend, paths, uppers))
    pod = 'pod_name="p",pod_namespace="ns",volume_id="v0"'
    m = values(registry)
    assert m[f'strata_volume_upper_bytes{{{pod}}}'] == 0, "zeros until the first walk"
    assert m[info("v0", "false")] == 1
    uppers.refresh()
    m = values(registry)
    assert m[f'strata_volume_files{{change="copied_up",{pod}}}'] == 1
    assert m[f'strata_volume_files{{change="deleted",{pod}}}'] == 1
    assert m[f'strata_volume_files{{change="created",{pod}}}'] == 0
    assert m[f'strata_volume_upper_inodes{{{pod}}}'] == 3  # etc, motd, the whiteout
    assert m["strata_copy_up_files_total"] == 1
    (upper / "new").write_text("x")
    m = values(registry)
    assert m[f'strata_volume_files{{change="created",{pod}}}'] == 0, "no walk in a scrape"
    uppers.refresh()
    assert values(registry)[f'strata_volume_files{{change="created",{pod}}}'] == 1
    assert not any(k.startswith("strata_volume_size_limit_bytes") for k in m)
    state.close()


def test_same_labels_are_summed_and_read_only_publications_report_zeros(tmp_path):
    paths, state, backend = store(tmp_path)
    with state.transaction() as tx:
        tx.record_layer(Layer("l1", "sha256:" + "1" * 64, 4096, 0, 0))
        tx.record_image(Image("img", DIGEST, "sha256:" + "c" * 64, ()), ("l1",), 0)
        for i, ro in enumerate((False, False, True)):  # one volume in one pod, three times
            tx.record_publication(Publication(f"/t{i}", "v", f"k{i}", "img", DIGEST, ro, "",
                                              1, 0, pod_namespace="ns", pod_name="p",
                                              size_limit=0 if ro else 1 << 20), ("l1",), 0)
    for i in range(3):
        os.makedirs(tmp_path / f"volumes/k{i}/upper")
        (tmp_path / f"volumes/k{i}/upper/new").write_text("x")
    uppers = UpperStats(state, backend)
    uppers.refresh()
    registry = CollectorRegistry()
    registry.register(StoreCollector(state, backend, paths, uppers))
    m = values(registry)
    pod = 'pod_name="p",pod_namespace="ns",volume_id="v"'
    assert m[f'strata_volume_files{{change="created",{pod}}}'] == 2, "k2 is read-only"
    assert m[f'strata_volume_size_limit_bytes{{{pod}}}'] == 2 << 20
    assert m[info("v", "false")] == 2
    assert m[info("v", "true")] == 1
    assert m['strata_image_publications{image="img"}'] == 3
    state.close()


def test_largest_layers_by_name_and_the_rest_as_other(tmp_path):
    paths, state, backend = store(tmp_path)
    sizes = {"big": 9000, "mid": 5000, "small": 100, "tiny": 10}
    record(state, tuple(sizes), DIGEST, pubs=2, sizes=sizes)
    registry = CollectorRegistry()
    registry.register(StoreCollector(state, backend, paths, top_layers=2,
                                     policy=Policy(max_bytes=100_000, high_percent=90,
                                                   low_percent=50)))
    m = values(registry)
    assert m['strata_layer_bytes{layer="big"}'] == 9000
    assert m['strata_layer_bytes{layer="mid"}'] == 5000
    assert m['strata_layer_bytes{layer="other"}'] == 110
    assert m['strata_layer_references{layer="big"}'] == 2
    assert m['strata_layer_references{layer="other"}'] == 4
    assert not any('layer="small"' in k for k in m)
    assert m["strata_store_used_bytes"] == sum(sizes.values())  # --gc-max-bytes: the layers
    assert m["strata_store_capacity_bytes"] == 100_000
    assert m["strata_gc_high_mark_bytes"] == 90_000
    assert m["strata_gc_low_mark_bytes"] == 50_000
    state.close()


def test_gc_marks_only_where_the_lru_policy_has_them(tmp_path):
    paths, state, backend = store(tmp_path)
    registry = CollectorRegistry()
    registry.register(StoreCollector(state, backend, paths,
                                     policy=Policy(mode="immediate", max_bytes=100_000)))
    m = values(registry)
    assert m["strata_store_capacity_bytes"] == 100_000
    assert "strata_gc_high_mark_bytes" not in m and "strata_gc_low_mark_bytes" not in m
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
    record(state, ("l1", "l2"), DIGEST, pubs=3)
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


def test_rendered_publications_escape_labels_and_are_reused_until_a_figure_changes(tmp_path):
    paths, state, backend = store(tmp_path)
    odd = 'v"1\\x\nz'  # a CSI volume ID is any string: quotes, backslashes, newlines
    with state.transaction() as tx:
        tx.record_layer(Layer("l1", "sha256:" + "1" * 64, 4096, 0, 0))
        tx.record_image(Image("img", DIGEST, "sha256:" + "c" * 64, ()), ("l1",), 0)
        tx.record_publication(Publication("/t0", odd, "k0", "img", DIGEST, False, "", 1, 0,
                                          pod_namespace="ns", pod_name="p"), ("l1",), 0)
    os.makedirs(tmp_path / "volumes/k0/upper")
    (tmp_path / "volumes/k0/upper/new").write_text("x")
    uppers = UpperStats(state, backend)
    collector = StoreCollector(state, backend, paths, uppers)
    registry = CollectorRegistry()
    registry.register(collector)
    pod = f'pod_name="p",pod_namespace="ns",volume_id="{odd}"'
    first = values(registry)  # parsed back by prometheus_client's own parser
    assert first[f'strata_volume_files{{change="created",{pod}}}'] == 0
    rendered = collector._rendered[1]
    values(registry)
    assert collector._rendered[1] is rendered, "nothing changed: the text is reused"
    uppers.refresh()
    assert values(registry)[f'strata_volume_files{{change="created",{pod}}}'] == 1
    assert collector._rendered[1] is not rendered
