"""The upper-stats cache: monotonic copy-up totals, the final measure at unpublish, and
walks that race with an unpublish. The summaries are injected (pure logic); the records
are real SQLite."""

import threading
import time

from csi.image.manifest import Image
from csi.inspect import Summary
from csi.store.state import Layer, Publication, State
from csi.upper_stats import Totals, UpperStats

DIGEST = "sha256:" + "a" * 64


class Backend:
    """Just the question the cache asks, answered by `summarize(upper, lowers, stop)` on
    an overlay-shaped store (what each upper holds now)."""

    def __init__(self, summarize):
        self._summarize = summarize

    def summarize(self, key, chain, *, stop=None):
        return self._summarize(f"/up/{key}", [f"/layers/{lid}" for lid in reversed(chain)],
                               stop=stop)


def pub(i: int, readonly=False) -> Publication:
    return Publication(f"/t{i}", f"v{i}", f"k{i}", "img", DIGEST, readonly, "", 1, 0)


def publish(state: State, *pubs: Publication) -> None:
    with state.transaction() as tx:
        if tx.layer("l1") is None:
            tx.record_layer(Layer("l1", "sha256:" + "1" * 64, 4096, 0, 0))
            tx.record_image(Image("img", DIGEST, "sha256:" + "c" * 64, ()), ("l1",), 0)
        for p in pubs:
            tx.record_publication(p, ("l1",), 0)


def forget(state: State, p: Publication) -> None:
    with state.transaction() as tx:
        tx.forget_publication(p.target, 0)


class Uppers:
    """What each upper holds now, as summarize would say it."""

    def __init__(self):
        self.now: dict[str, Summary] = {}
        self.walked: list[tuple[str, tuple[str, ...]]] = []

    def __call__(self, upper, lowers, stop=None):
        self.walked.append((upper, tuple(lowers)))
        return self.now.get(upper.rsplit("/", 1)[1], Summary())


def test_copy_up_totals_only_grow_and_survive_unpublish(tmp_path):
    state = State(str(tmp_path / "state.db"))
    a, b = pub(0), pub(1)
    publish(state, a, b)
    uppers = Uppers()
    stats = UpperStats(state, Backend(uppers))
    uppers.now["k0"] = Summary(copied_up=3, metacopy=1, copied_up_bytes=8192, upper_bytes=9000)
    uppers.now["k1"] = Summary(copied_up=1, copied_up_bytes=4096, upper_bytes=5000)
    stats.refresh()
    assert ("/up/k0", ("/layers/l1",)) in uppers.walked
    assert stats.totals() == Totals(5, 12288, 0)
    uppers.now["k0"] = Summary(copied_up=1, copied_up_bytes=4096, upper_bytes=4500)  # rm'd
    stats.refresh()
    assert stats.summary("k0").copied_up == 1
    assert stats.totals() == Totals(5, 12288, 0), "a counter never goes down"
    uppers.now["k1"] = Summary(copied_up=2, copied_up_bytes=6000, upper_bytes=7000)
    final = stats.retire(b)  # measured once more at unpublish
    assert final.upper_bytes == 7000
    forget(state, b)
    assert stats.totals() == Totals(6, 14192, 7000)
    assert stats.summary("k1") == Summary(), "its series are gone"
    stats.refresh()
    assert stats.totals() == Totals(6, 14192, 7000)
    state.close()


def test_a_lazy_detach_counts_the_last_summary_without_walking(tmp_path):
    state = State(str(tmp_path / "state.db"))
    a = pub(0)
    publish(state, a)
    uppers = Uppers()
    stats = UpperStats(state, Backend(uppers))
    uppers.now["k0"] = Summary(created=2, upper_bytes=4096)
    stats.refresh()
    uppers.now["k0"] = Summary(created=9, upper_bytes=1 << 20)  # written since: not seen
    walked = len(uppers.walked)
    stats.retire(a, measure=False)
    assert len(uppers.walked) == walked
    assert stats.totals().discarded_bytes == 4096
    state.close()


def test_read_only_publications_are_never_walked(tmp_path):
    state = State(str(tmp_path / "state.db"))
    ro = pub(0, readonly=True)
    publish(state, ro)
    uppers = Uppers()
    stats = UpperStats(state, Backend(uppers))
    stats.refresh()
    stats.retire(ro)
    assert uppers.walked == []
    assert stats.totals() == Totals()
    state.close()


def test_a_walk_under_way_when_its_publication_goes_does_not_bring_it_back(tmp_path):
    state = State(str(tmp_path / "state.db"))
    a = pub(0)
    publish(state, a)
    entered, leave = threading.Event(), threading.Event()

    def slow(upper, lowers, stop=None):
        entered.set()
        leave.wait(10)
        return Summary(copied_up=5, copied_up_bytes=5, upper_bytes=5)

    stats = UpperStats(state, Backend(slow))
    t = threading.Thread(target=stats.refresh)
    t.start()
    assert entered.wait(10)
    stats.retire(a, measure=False)  # nothing cached yet: zeros
    forget(state, a)
    leave.set()
    t.join()
    assert stats.summary("k0") == Summary()
    assert stats.totals() == Totals(0, 0, 0)
    state.close()


def test_a_publication_forgotten_without_a_retire_keeps_its_copy_up_in_the_totals(tmp_path):
    state = State(str(tmp_path / "state.db"))
    a = pub(0)
    publish(state, a)
    uppers = Uppers()
    stats = UpperStats(state, Backend(uppers))
    uppers.now["k0"] = Summary(copied_up=2, copied_up_bytes=100)
    stats.refresh()
    forget(state, a)
    stats.refresh()
    assert stats.summary("k0") == Summary()
    assert stats.totals() == Totals(2, 100, 0)
    state.close()


def test_the_thread_walks_a_new_publication_at_once_and_stops(tmp_path):
    state = State(str(tmp_path / "state.db"))
    publish(state, pub(0))
    uppers = Uppers()
    uppers.now["k0"] = uppers.now["k1"] = Summary(created=1)
    stats = UpperStats(state, Backend(uppers), interval=3600)
    stats.start()
    try:
        for _ in range(1000):
            if stats.passes:
                break
            threading.Event().wait(0.01)
        assert stats.passes == 1
        publish(state, pub(1))
        stats.published("k1")
        done = threading.Event()
        for _ in range(1000):  # the urgent walk, long before the hour's next pass
            if stats.summary("k1").created == 1:
                done.set()
                break
            threading.Event().wait(0.01)
        assert done.is_set()
    finally:
        stats.stop()
    state.close()


def test_a_pass_between_a_lazy_detach_and_its_retire_keeps_the_discarded_bytes(tmp_path):
    """releases.detach() turns the record into a release before the volume manager calls
    retire(): a pass in between prunes the key (its copy-up to the totals); the retire
    that follows still counts its upper as discarded, and its copy-up once."""
    state = State(str(tmp_path / "state.db"))
    a = pub(0)
    publish(state, a)
    uppers = Uppers()
    uppers.now["k0"] = Summary(copied_up=2, copied_up_bytes=100, upper_bytes=5000)
    stats = UpperStats(state, Backend(uppers))
    stats.refresh()
    with state.transaction() as tx:
        tx.release_publication(a.target, "0:1", 0)
    stats.refresh()
    stats.retire(a, measure=False)
    assert stats.totals() == Totals(2, 100, 5000)
    state.close()


def test_stop_ends_a_walk_under_way_through_its_stop_predicate(tmp_path):
    """A walk asks its stop predicate as it goes: stop() does not wait for a big upper."""
    from csi.inspect import Stopped

    state = State(str(tmp_path / "state.db"))
    publish(state, pub(0))
    entered, outcome = threading.Event(), []

    def long_walk(upper, lowers, stop=None):
        entered.set()
        while not stop():  # what inspect.summarize does every 256 entries
            time.sleep(0.01)
        outcome.append("stopped")
        raise Stopped()

    stats = UpperStats(state, Backend(long_walk))
    stats.start()
    assert entered.wait(10)
    stats.stop()
    assert outcome == ["stopped"] and stats.summary("k0") == Summary()
    state.close()


def test_logical_copy_up_bytes_are_a_high_water_total_beside_the_allocated_ones(tmp_path):
    """A reflink store: 50 MB copied up (logical), 4 KiB allocated. Both totals keep the
    most each publication was seen with, through a retire and a prune alike."""
    state = State(str(tmp_path / "state.db"))
    a, b = pub(0), pub(1)
    publish(state, a, b)
    uppers = Uppers()
    stats = UpperStats(state, Backend(uppers))
    uppers.now["k0"] = Summary(copied_up=1, copied_up_bytes=4096,
                               copied_up_logical_bytes=50 << 20)
    uppers.now["k1"] = Summary(copied_up=1, copied_up_bytes=8192, copied_up_logical_bytes=9000)
    stats.refresh()
    assert stats.totals() == Totals(2, 12288, 0, (50 << 20) + 9000)
    uppers.now["k0"] = Summary()  # the pod deleted it
    stats.refresh()
    assert stats.totals().copied_up_logical_bytes == (50 << 20) + 9000
    stats.retire(a)
    forget(state, a)
    forget(state, b)  # b goes without a retire
    stats.refresh()
    assert stats.totals() == Totals(2, 12288, 0, (50 << 20) + 9000)
    state.close()
