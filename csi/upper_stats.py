"""Upper stats: the last `inspect.summarize` of every live publication's upper layer, kept
by one background thread, so that a scrape reads numbers and never walks an upper dir.

The thread learns the live publications from state.db (a WAL read transaction: it never
waits on a publish) at each pass, so it starts right after a restart with what the store
holds. It walks them one by one and, after each walk, pauses as long as the walk took: a
pass uses at most half of one core however much the pods wrote. A pass starts every
`interval` seconds (or as soon as the last one ended, if it took longer); a publication
just published is walked at once, ahead of the pass. So a figure is at most `interval`
plus one pass old (a pass lasts about twice the time of walking every upper).

The volume manager tells it two things (small hooks, no lock shared with it):
- `published(key)`: walk this one soon;
- `retire(pub, measure)`: the publication's mount is gone (or lazily detached); its upper is
  measured once more (`measure`, while it is still on disk) or its last summary is used (a
  detached view that a pod may still be writing), and its upper bytes are added to what
  unpublish discarded.

Copy-up totals must only grow (they are Prometheus counters), while an upper only ever
reports what it holds now (a pod may delete a file it copied up): each live publication
contributes the highest copy-up it was seen with, and a retired one's contribution moves
to a running total. Counters start from zero at each start of the server, like any.
"""

import dataclasses
import logging
import threading
import time
from collections import deque

from csi.backend import Backend
from csi.inspect import Stopped, Summary
from csi.store.state import Publication, State

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 15.0
MIN_INTERVAL = 0.1  # an idle pass with nothing to walk still must not spin


@dataclasses.dataclass(frozen=True)
class Totals:
    """The node-wide counters: files and bytes copied up (allocated, and their logical
    size), upper bytes discarded."""

    copied_up_files: int = 0
    copied_up_bytes: int = 0
    discarded_bytes: int = 0
    copied_up_logical_bytes: int = 0


class UpperStats:
    def __init__(self, state: State, backend: Backend, interval: float = DEFAULT_INTERVAL,
                 clock=time.monotonic):
        self._state = state
        self._backend = backend
        self._interval = max(interval, MIN_INTERVAL)
        self._clock = clock
        self._cv = threading.Condition()  # guards everything below; never held in a walk
        self._summaries: dict[str, Summary] = {}
        # key -> highest (files, allocated bytes, logical bytes) copied up
        self._high: dict[str, tuple[int, int, int]] = {}
        self._retired_files = self._retired_bytes = self._discarded = self._retired_logical = 0
        # Retired keys, so that a walk that was under way when its publication went does
        # not bring it back (keys are never reused); dropped once state.db forgets them.
        self._gone: set[str] = set()
        # Summaries a pass dropped because state.db no longer named them, for a retire that
        # comes after (a lazy detach forgets the record before it tells us); kept two passes.
        self._pruned: dict[str, tuple[int, Summary]] = {}
        self._urgent: deque[str] = deque()
        self._passes = 0
        self._version = 0  # bumped whenever a figure a scrape reads changes
        self._in_pass = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._walking = threading.Lock()  # one pass at a time (a test's beside the thread's)

    # -- what a scrape reads ------------------------------------------------------------
    def summary(self, key: str) -> Summary:
        """The last summary of `key`'s upper (zeros before its first walk, and for a
        read-only publication)."""
        with self._cv:
            return self._summaries.get(key, Summary())

    def summaries(self) -> dict[str, Summary]:
        with self._cv:
            return dict(self._summaries)

    def totals(self) -> Totals:
        with self._cv:
            return Totals(self._retired_files + sum(h[0] for h in self._high.values()),
                          self._retired_bytes + sum(h[1] for h in self._high.values()),
                          self._discarded,
                          self._retired_logical + sum(h[2] for h in self._high.values()))

    @property
    def version(self) -> int:
        """Changes whenever a summary or a total does: a scrape that saw this version
        before may reuse what it rendered then."""
        with self._cv:
            return self._version

    @property
    def passes(self) -> int:
        """Passes over every live publication completed so far."""
        with self._cv:
            return self._passes

    # -- hooks of the volume manager ----------------------------------------------------
    def published(self, key: str) -> None:
        """A publication was recorded: walk it ahead of the next pass."""
        with self._cv:
            self._urgent.append(key)
            self._cv.notify_all()

    def retire(self, pub: Publication, measure: bool = True) -> Summary:
        """`pub` leaves the node: its last summary (walked now if `measure`: call it after
        the unmount and before the upper is deleted) ends its series' life; its copy-up
        stays in the totals and its upper bytes count as discarded. Returns that summary.
        Never raises: an unpublish must not fail over a figure."""
        final = None
        if measure and not pub.readonly:
            try:
                final = self._walk(pub)
            except Exception:
                log.exception("measuring the upper layer of volume %s (%s) at unpublish "
                              "failed; counting its last summary", pub.volume_id, pub.key)
        with self._cv:
            if pub.key in self._gone:
                return final or Summary()
            if pub.key in self._pruned:  # its copy-up went to the totals with the prune
                final = final or self._pruned.pop(pub.key)[1]
                self._discarded += final.upper_bytes
                self._gone.add(pub.key)
                self._version += 1
                return final
            if final is None:
                final = self._summaries.get(pub.key, Summary())
            files, nbytes, logical = self._high.pop(pub.key, (0, 0, 0))
            self._retired_files += max(files, final.copied_up + final.metacopy)
            self._retired_bytes += max(nbytes, final.copied_up_bytes)
            self._retired_logical += max(logical, final.copied_up_logical_bytes)
            self._discarded += final.upper_bytes
            self._summaries.pop(pub.key, None)
            self._gone.add(pub.key)
            self._version += 1
        return final

    # -- walking ------------------------------------------------------------------------
    def _walk(self, pub: Publication, layer_ids: tuple[str, ...] | None = None,
              stop=None) -> Summary:
        if pub.readonly:
            return Summary()
        if layer_ids is None:
            with self._state.read() as tx:
                image = tx.image(pub.manifest_digest)
            layer_ids = image.layer_ids if image is not None else ()
        summary = self._backend.summarize(pub.key, layer_ids, stop=stop)
        return Summary() if summary is None else summary  # nothing readable: no changes

    def _store(self, key: str, s: Summary) -> None:
        with self._cv:
            if key in self._gone:
                return  # retired while we walked
            if self._summaries.get(key) != s:
                self._version += 1
            self._summaries[key] = s
            files, nbytes, logical = self._high.get(key, (0, 0, 0))
            self._high[key] = (max(files, s.copied_up + s.metacopy),
                               max(nbytes, s.copied_up_bytes),
                               max(logical, s.copied_up_logical_bytes))

    def _read(self) -> tuple[dict[str, Publication], dict[str, tuple[str, ...]]]:
        with self._state.read() as tx:
            pubs = {p.key: p for p in tx.publications()}
            layers = {i.manifest_digest: i.layer_ids for i in tx.images()}
        return pubs, layers

    def _prune(self, pubs: dict[str, Publication]) -> None:
        """Forget what the freshest reading of state.db (`pubs`, read before any walk of
        this pass) no longer names: no walk can bring those keys back."""
        with self._cv:
            self._gone &= pubs.keys()
            # Gone without a retire (the volume manager never saw it go): its copy-up
            # stays in the totals all the same.
            self._pruned = {k: v for k, v in self._pruned.items()
                            if v[0] >= self._passes - 1}
            for key in set(self._summaries) - pubs.keys():
                self._version += 1
                self._pruned[key] = (self._passes, self._summaries.pop(key))
                files, nbytes, logical = self._high.pop(key, (0, 0, 0))
                self._retired_files += files
                self._retired_bytes += nbytes
                self._retired_logical += logical

    def _walk_one(self, pub: Publication, layers: dict) -> float:
        """Walk `pub` and store its summary; returns the seconds it took."""
        started = self._clock()
        try:
            # A stopping server does not wait for a big upper's walk to end.
            s = self._walk(pub, layers.get(pub.manifest_digest, ()),
                           stop=lambda: self._stopped)
        except Stopped:
            return self._clock() - started
        except Exception:
            log.exception("summarizing the upper layer of volume %s (%s) failed",
                          pub.volume_id, pub.key)
            return self._clock() - started
        self._store(pub.key, s)
        return self._clock() - started

    def refresh(self, pause: bool = False) -> None:
        """One pass: walk every live writable publication (the thread's work; tests and
        tools may call it directly). With `pause`, rest as long as each walk took."""
        with self._walking:
            self._refresh(pause)

    def _refresh(self, pause: bool) -> None:
        with self._cv:
            self._in_pass = True
        try:
            self._pass(pause)
        finally:
            with self._cv:
                self._in_pass = False
                self._cv.notify_all()

    def _pass(self, pause: bool) -> None:
        pubs, layers = self._read()
        self._prune(pubs)
        for pub in pubs.values():
            if self._stopped:
                return
            self._urgent_walks(pubs, layers)
            if pub.readonly:
                continue
            took = self._walk_one(pub, layers)
            if pause:
                with self._cv:
                    self._cv.wait_for(lambda: self._stopped, timeout=took)
        self._urgent_walks(pubs, layers)
        with self._cv:
            self._passes += 1
            self._cv.notify_all()

    def _urgent_walks(self, pubs: dict[str, Publication], layers: dict) -> None:
        while True:
            with self._cv:
                if not self._urgent or self._stopped:
                    return
                key = self._urgent.popleft()
            pub = pubs.get(key)
            if pub is None:  # published after this pass read state.db
                pubs, layers = self._read()
                pub = pubs.get(key)
            if pub is not None and not pub.readonly:
                self._walk_one(pub, layers)

    # -- the thread ---------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._thread is not None or self._stopped:
                return
            self._thread = threading.Thread(target=self._run, name="upper-stats", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        due = 0.0  # the first pass starts at once: what state.db holds after a restart
        while True:
            with self._cv:
                while not self._stopped and not self._urgent and time.monotonic() < due:
                    self._cv.wait(due - time.monotonic())
                if self._stopped:
                    return
                full = time.monotonic() >= due
            try:
                if full:
                    due = time.monotonic() + self._interval
                    self.refresh(pause=True)
                else:
                    with self._walking:
                        self._urgent_walks(*self._read())
            except Exception:
                log.exception("refreshing the upper stats failed; trying again next pass")
                with self._cv:
                    self._urgent.clear()  # walked with the next pass instead

    def wait_pass(self, timeout: float | None = None) -> bool:
        """Wait until a pass that starts after this call has completed."""
        with self._cv:
            # the one under way may have read state.db before this call
            target = self._passes + (2 if self._in_pass else 1)
            return self._cv.wait_for(lambda: self._passes >= target or self._stopped,
                                     timeout)

    def stop(self) -> None:
        """Stop the thread (before the state closes)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)
