"""Layer garbage collection: a pure mark, a pure plan, then an I/O sweep.

Policies (kubelet's image GC has the same shape):
- `immediate`: every unreferenced layer older than `min_age` goes at once.
- `lru`: unreferenced layers stay as a warm cache until the store passes `high_percent` of
  its capacity (the filesystem under --root, or --gc-max-bytes); then the least recently
  used go, oldest first, until usage is back under `low_percent`. `min_age` protects layers
  just unpacked or just released.
The sweep re-checks every candidate's references inside the transaction that deletes it,
so a publish that took a reference after the plan was made always wins. Nothing is removed
while a release that cannot say which layers it reads is pending (csi/releases.py).
"""

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterable

from csi.store.state import Layer
from csi.units import human_bytes

log = logging.getLogger(__name__)

POLICIES = ("immediate", "lru")


@dataclasses.dataclass(frozen=True)
class Policy:
    mode: str = "lru"
    high_percent: float = 85.0
    low_percent: float = 80.0
    max_bytes: int = 0  # 0: the filesystem under --root is the capacity
    min_age: float = 0.0  # seconds since last use

    @property
    def reads_the_disk(self) -> bool:
        """Whether what it removes depends on the filesystem's usage (statvfs): lru without
        --gc-max-bytes. Deleted files still on their way off the disk count there."""
        return self.mode == "lru" and not self.max_bytes

    def validate(self) -> "Policy":
        if self.mode not in POLICIES:
            raise ValueError(f"gc policy must be one of {', '.join(POLICIES)}, got {self.mode!r}")
        if not 0 <= self.low_percent <= self.high_percent <= 100:
            raise ValueError("need 0 <= --gc-low-percent <= --gc-high-percent <= 100")
        if self.max_bytes < 0 or self.min_age < 0:
            raise ValueError("--gc-max-bytes and --gc-min-age must not be negative")
        return self


@dataclasses.dataclass(frozen=True)
class Usage:
    """What the plan measures against: bytes used and the capacity they count toward."""

    used: int
    capacity: int


def mark(layers: Iterable[Layer], refcounts: dict[str, int]) -> list[Layer]:
    """The unreferenced layers."""
    return [layer for layer in layers if refcounts.get(layer.id, 0) == 0]


def plan(policy: Policy, unreferenced: list[Layer], usage: Usage, now: float) -> list[Layer]:
    """Which unreferenced layers to remove, in removal order."""
    eligible = sorted((x for x in unreferenced if now - x.last_used >= policy.min_age),
                      key=lambda x: (x.last_used, x.id))
    if policy.mode == "immediate":
        return eligible
    if usage.capacity <= 0 or usage.used * 100 < policy.high_percent * usage.capacity:
        return []
    to_free = usage.used - policy.low_percent * usage.capacity / 100
    chosen, freed = [], 0
    for layer in eligible:
        if freed >= to_free:
            break
        chosen.append(layer)
        freed += layer.size
    return chosen


def measure(policy: Policy, root: str, layers: Iterable[Layer]) -> Usage:
    if policy.max_bytes:
        return Usage(used=sum(x.size for x in layers), capacity=policy.max_bytes)
    fs = os.statvfs(root)
    return Usage(used=(fs.f_blocks - fs.f_bfree) * fs.f_frsize, capacity=fs.f_blocks * fs.f_frsize)


@dataclasses.dataclass(frozen=True)
class Result:
    removed: tuple[str, ...]
    freed_bytes: int


class Collector:
    """Runs mark → plan → sweep against a LayerStore."""

    def __init__(self, layers, policy: Policy, clock=time.time, on_collect=None,
                 on_error=None, settling=None):
        """`on_collect(result)` hears of every run that ends, `on_error(exc)` of every one
        that raises (metrics). `settling()` says whether deleted files are still on their
        way off the disk (the server's trash): watermarks measured on the filesystem are
        not read meanwhile (they would count what is about to be freed and take layers
        for nothing); the caller collects again once it has settled."""
        self._layers = layers
        self.policy = policy
        self._clock = clock
        self._on_collect = on_collect or (lambda result: None)
        self._on_error = on_error or (lambda exc: None)
        self._settling = settling or (lambda: False)
        self._mu = threading.Lock()
        self._seen = layers.unpacked

    def collect_if_grown(self) -> Result | None:
        """Collect if this process unpacked layers since the last look: an LRU policy may
        need to make room. Racing callers see the growth once."""
        with self._mu:
            unpacked, seen = self._layers.unpacked, self._seen
            if unpacked == seen:
                return None
            self._seen = unpacked
        try:
            return self.collect()
        except BaseException:
            with self._mu:  # not collected after all: the next call tries again
                self._seen = min(self._seen, seen)
            raise

    def collect(self, policy: Policy | None = None) -> Result:
        try:
            result = self._collect(policy or self.policy)
        except BaseException as e:
            self._on_error(e)
            raise
        self._on_collect(result)
        return result

    def _collect(self, policy: Policy) -> Result:
        with self._layers.state.read() as tx:
            all_layers = tx.layers()
            refs = tx.referenced()
            blind = tx.blind_releases()
        if blind:
            # The sweep's transaction would refuse each layer anyway (forget_layer).
            log.warning("gc (%s) paused: %d detached overlay(s) found at start-up (%s) "
                        "may read any layer, and which ones is not recorded; nothing is "
                        "removed until the kernel lets them go", policy.mode, len(blind),
                        ", ".join(r.key for r in blind))
            return Result((), 0)
        if policy.reads_the_disk and self._settling():
            log.debug("gc (lru) waits: deleted files are still leaving the disk")
            return Result((), 0)
        candidates = plan(policy, mark(all_layers, refs),
                          measure(policy, self._layers.paths.root, all_layers), self._clock())
        removed, freed = [], 0
        for layer in candidates:
            if self._layers.remove_if_unreferenced(layer.id):
                removed.append(layer.id)
                freed += layer.size
        result = Result(tuple(removed), freed)
        if removed:
            log.info("gc (%s): removed %d layers, freed %s", policy.mode, len(removed),
                     human_bytes(freed), extra={"layers": len(removed), "bytes": freed})
        return result
