"""GC mark and plan are pure: table-tested here; the sweep is tested against a real store."""

import os

import pytest

from csi.paths import StorePaths
from csi.store.gc import Collector, Policy, Usage, mark, plan
from csi.store.layers import LayerStore
from csi.store.state import Layer, State

NOW = 10_000.0


def L(lid, size, last_used):  # noqa: N802 - table shorthand
    return Layer(lid, "sha256:" + lid.ljust(64, "0"), size, 0.0, last_used)


LAYERS = [L("a", 100, NOW - 500), L("b", 200, NOW - 100), L("c", 300, NOW - 1000),
          L("d", 50, NOW - 10)]


def test_mark_returns_only_unreferenced():
    assert [x.id for x in mark(LAYERS, {"a": 1, "c": 2, "d": 0})] == ["b", "d"]


@pytest.mark.parametrize("policy,usage,expected", [
    # immediate: everything unreferenced, oldest use first, min_age respected
    (Policy("immediate", min_age=0), Usage(0, 0), ["c", "a", "b", "d"]),
    (Policy("immediate", min_age=200), Usage(0, 0), ["c", "a"]),
    # lru below the high-water mark: keep the warm cache
    (Policy("lru", 85, 80), Usage(used=849, capacity=1000), []),
    # at the mark: free down to low (850 - 800 = 50 bytes) → the least recently used only
    (Policy("lru", 85, 80), Usage(used=850, capacity=1000), ["c"]),
    # far above: free 950 - 100 = 850 bytes → c (300) + a (100) + b (200) + d (50) = 650 < 850
    (Policy("lru", 90, 10), Usage(used=950, capacity=1000), ["c", "a", "b", "d"]),
    # just enough: 900 - 500 = 400 → c (300) then a (100)
    (Policy("lru", 90, 50), Usage(used=900, capacity=1000), ["c", "a"]),
    # min_age shields recently used layers even above the mark
    (Policy("lru", 50, 0, min_age=400), Usage(used=1000, capacity=1000), ["c", "a"]),
    # no capacity known: never evict by marks
    (Policy("lru", 85, 80), Usage(used=10, capacity=0), []),
])
def test_plan(policy, usage, expected):
    assert [x.id for x in plan(policy, LAYERS, usage, NOW)] == expected


def test_plan_ties_break_by_id_for_a_stable_order():
    same = [L("z", 1, NOW - 5), L("y", 1, NOW - 5)]
    assert [x.id for x in plan(Policy("immediate"), same, Usage(0, 0), NOW)] == ["y", "z"]


@pytest.mark.parametrize("kwargs", [
    {"mode": "sometimes"}, {"high_percent": 50, "low_percent": 60},
    {"high_percent": 101}, {"max_bytes": -1}, {"min_age": -5},
])
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        Policy(**kwargs).validate()


def test_collect_if_grown_collects_once_per_growth_and_again_after_a_failure(tmp_path):
    paths = StorePaths(str(tmp_path)).make()
    state = State(paths.state_db)
    try:
        layers = LayerStore(paths, state)
        gc = Collector(layers, Policy(mode="immediate"))
        assert gc.collect_if_grown() is None, "nothing unpacked yet"
        layers._unpacked += 1  # as an unpack does, under its lock
        assert gc.collect_if_grown() is not None
        assert gc.collect_if_grown() is None, "that growth was seen"
        layers._unpacked += 1
        real, calls = gc.collect, []

        def failing():
            calls.append(1)
            raise OSError("disk trouble")

        gc.collect = failing
        with pytest.raises(OSError):
            gc.collect_if_grown()
        gc.collect = real
        assert gc.collect_if_grown() is not None, "a failed collection is tried again"
        assert calls == [1]
    finally:
        state.close()


def test_every_run_is_reported_as_it_ends_collected_or_failed(tmp_path):
    paths = StorePaths(str(tmp_path)).make()
    state = State(paths.state_db)
    ended, failed = [], []
    try:
        gc = Collector(LayerStore(paths, state), Policy(mode="immediate"),
                       on_collect=ended.append, on_error=failed.append)
        gc.collect()
        assert len(ended) == 1 and failed == []
        state.close()  # the run's read of state.db fails
        with pytest.raises(Exception) as e:
            gc.collect()
        assert failed == [e.value] and len(ended) == 1
    finally:
        state.close()


def _two_layers(paths, state) -> LayerStore:
    """Layers a and b (10 bytes each, unreferenced, last used long ago), on disk too."""
    with state.transaction() as tx:
        for lid in ("a", "b"):
            tx.record_layer(L(lid, 10, 0.0))
            os.makedirs(paths.layer_fs(lid))
    return LayerStore(paths, state)


def test_collect_removes_nothing_while_a_blind_release_is_pending(tmp_path, caplog):
    """A release found at start-up cannot say which layers its overlay reads: every layer
    stays until it goes, and the log says why."""
    from csi.store.state import Release

    paths = StorePaths(str(tmp_path)).make()
    state = State(paths.state_db)
    try:
        layers = _two_layers(paths, state)
        with state.transaction() as tx:
            tx.record_release(Release("k-found", since=1.0))
        gc = Collector(layers, Policy(mode="immediate"))
        assert gc.collect().removed == ()
        assert "paused" in caplog.text and "k-found" in caplog.text
        assert sorted(os.listdir(paths.layers)) == ["a", "b"]
        with state.transaction() as tx:
            tx.forget_release("k-found", 2.0)
        assert sorted(gc.collect().removed) == ["a", "b"]
    finally:
        state.close()


def test_watermarks_measured_on_the_disk_wait_while_deletions_settle(tmp_path):
    """While the server's trash still holds deleted files, the filesystem's usage counts
    them: an lru policy measured on the disk waits instead of taking layers for nothing;
    one measured by --gc-max-bytes (the layers' own sizes) does not wait."""
    paths = StorePaths(str(tmp_path)).make()
    state = State(paths.state_db)
    settling = [True]
    try:
        layers = _two_layers(paths, state)
        on_disk = Policy(mode="lru", high_percent=0.0, low_percent=0.0)  # always over
        gc = Collector(layers, on_disk, settling=lambda: settling[0])
        assert gc.collect().removed == ()
        assert sorted(os.listdir(paths.layers)) == ["a", "b"]
        by_size = Policy(mode="lru", high_percent=90.0, low_percent=60.0, max_bytes=20)
        assert gc.collect(by_size).removed == ("a",)
        settling[0] = False
        assert gc.collect().removed == ("b",)
    finally:
        state.close()
