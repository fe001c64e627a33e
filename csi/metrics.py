"""Prometheus metrics: names and help texts live only here; the registry is injected.

Store gauges are computed at scrape time from state.db (StoreCollector), so they can never
drift from the truth; RPC latency is recorded by the server's interceptor.
"""

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from csi.backend import Backend
from csi.inspect import CopyUp, copy_up
from csi.paths import StorePaths
from csi.store.pagecache import Meter
from csi.store.report import sharing
from csi.store.state import State

log = logging.getLogger(__name__)

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
               30, 60, 120)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rpc_seconds = Histogram(
            "strata_rpc_duration_seconds", "CSI RPC latency by method and status code.",
            ["method", "code"], buckets=RPC_BUCKETS, registry=self.registry)
        self.unpacks = Counter(
            "strata_layer_unpacks_total", "Layers unpacked into the shared store.",
            registry=self.registry)
        self.unpack_seconds = Histogram(
            "strata_layer_unpack_seconds", "Time to fetch, verify and unpack one layer.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry)
        self.unpack_bytes = Counter(
            "strata_layer_unpack_bytes_total", "Uncompressed file bytes written by unpacks.",
            registry=self.registry)

        self.gc_removed = Counter(
            "strata_gc_removed_layers_total", "Unreferenced layers removed by GC.",
            registry=self.registry)
        self.gc_freed = Counter(
            "strata_gc_freed_bytes_total", "Bytes freed by GC.", registry=self.registry)

        self.lazy_unmounts = Counter(
            "strata_lazy_unmounts_total", "Unpublishes whose mount stayed busy (a process "
            "in the pod held it) and was detached lazily; its writable layer is deleted once "
            "the kernel lets the overlay go (strata_pending_releases).",
            registry=self.registry)

        self.pulls = Counter(
            "strata_pulls", "Image pulls by result: pulled (from a registry), present (on the "
            "node already), or the gRPC code of the failure.", ["result"],
            registry=self.registry)
        self.pull_seconds = Histogram(
            "strata_pull_seconds", "Time to pull an image and unpack its missing layers.",
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry)
        self.blob_bytes = Counter(
            "strata_blob_fetched_bytes", "Compressed bytes downloaded from registries.",
            registry=self.registry)
        self.blob_fetches = Counter(
            "strata_blob_fetches", "Blobs downloaded (and verified) from registries.",
            registry=self.registry)

    def on_pull(self, result: str, seconds: float | None) -> None:
        """`seconds` is None for answers from the node's records alone (no pull ran)."""
        self.pulls.labels(result).inc()
        if seconds is not None:
            self.pull_seconds.observe(seconds)

    def on_blob(self, size: int) -> None:
        self.blob_fetches.inc()

    def on_collect(self, result) -> None:
        self.gc_removed.inc(len(result.removed))
        self.gc_freed.inc(result.freed_bytes)

    def on_unpack(self, layer, seconds: float, nbytes: int) -> None:
        self.unpacks.inc()
        self.unpack_seconds.observe(seconds)
        self.unpack_bytes.inc(nbytes)

    def install_store(self, state: State, backend: Backend, paths: StorePaths) -> None:
        self.registry.register(StoreCollector(state, backend, paths))


class PageCacheSampler:
    """Resident page-cache bytes per layer, measured by a background thread at most every
    `ttl` seconds: a scrape reads the last sample and never walks a layer itself (a big
    layer has tens of thousands of files)."""

    def __init__(self, paths: StorePaths, ttl: float = 30.0, meter: Meter | None = None,
                 clock=time.monotonic):
        self._paths, self._ttl, self._clock = paths, ttl, clock
        self._meter = meter or Meter()
        self._mu = threading.Lock()
        self._sample: dict[str, int] = {}
        self._taken = float("-inf")
        self._running = False

    def get(self, layer_ids: set[str]) -> dict[str, int]:
        with self._mu:
            stale = self._clock() - self._taken > self._ttl or \
                not layer_ids <= self._sample.keys()
            if stale and not self._running:
                self._running = True
                threading.Thread(target=self._refresh, args=(set(layer_ids),),
                                 name="page-cache", daemon=True).start()
            return {lid: self._sample.get(lid, 0) for lid in layer_ids}

    def refresh(self, layer_ids: set[str]) -> dict[str, int]:
        """Measure now (the thread's work; tests call it directly)."""
        sample = {lid: self._meter.tree(self._paths.layer_fs(lid))
                  for lid in layer_ids}
        with self._mu:
            self._sample, self._taken = sample, self._clock()
        return sample

    def _refresh(self, layer_ids: set[str]) -> None:
        try:
            self.refresh(layer_ids)
        except Exception:
            log.exception("measuring the layers' page cache failed")
        finally:
            with self._mu:
                self._running = False


def pods_per_layer(images, pubs) -> dict[str, int]:
    """How many publications read each layer (a layer twice in one image counts once)."""
    layer_ids = {i.manifest_digest: i.layer_ids for i in images}
    count: dict[str, int] = {}
    for p in pubs:
        for lid in set(layer_ids.get(p.manifest_digest, ())):
            count[lid] = count.get(lid, 0) + 1
    return count


class StoreCollector:
    """Layers, references, physical bytes, the bytes that sharing saves, and the copy-up the
    pods cause, at scrape time. Walking an upper layer costs time in proportion to what the
    pod wrote, so each publication's walk is reused for `copy_up_ttl` seconds."""

    def __init__(self, state: State, backend: Backend, paths: StorePaths, clock=time.monotonic,
                 copy_up_ttl: float = 15.0):
        self._state = state
        self._backend = backend
        self._clock = clock
        self._ttl = copy_up_ttl
        self._copy_up: dict[str, tuple[float, CopyUp]] = {}
        self.page_cache = PageCacheSampler(paths)

    def _copy_up_of(self, pubs, images) -> CopyUp:
        layer_ids = {i.manifest_digest: i.layer_ids for i in images}
        now, total, live = self._clock(), CopyUp(), set()
        for p in pubs:
            live.add(p.key)
            cached = self._copy_up.get(p.key)
            if cached is None or now - cached[0] > self._ttl:
                dirs = self._backend.dirs(p.key)
                lowers = self._backend.lowers(layer_ids.get(p.manifest_digest, ()))
                cached = (now, copy_up(dirs.upper, lowers) if dirs else CopyUp())
                self._copy_up[p.key] = cached
            total += cached[1]
        for key in set(self._copy_up) - live:
            del self._copy_up[key]
        return total

    def describe(self):
        return []  # computed at scrape time; no fixed description to pre-register

    def collect(self):
        with self._state.read() as tx:
            layers = tx.layers()
            refs = tx.refcounts()
            images = tx.images()
            pubs = tx.publications()
            stages = tx.stages()
            releases = tx.releases()
        share = sharing(layers, images, pubs)
        yield GaugeMetricFamily("strata_layers", "Layers in the shared store.",
                                value=len(layers))
        yield GaugeMetricFamily("strata_layer_references",
                                "References held on layers by publications and stages.",
                                value=sum(refs.values()))
        yield GaugeMetricFamily("strata_store_physical_bytes",
                                "Bytes the shared layers occupy on disk.",
                                value=share.physical_bytes)
        yield GaugeMetricFamily("strata_store_logical_bytes",
                                "Bytes a private copy of its image per publication would take.",
                                value=share.logical_bytes)
        yield GaugeMetricFamily("strata_sharing_saved_bytes",
                                "Disk bytes saved by sharing layers instead of copying them.",
                                value=share.saved_bytes)
        yield GaugeMetricFamily("strata_publications", "Volumes mounted at target paths.",
                                value=len(pubs))
        cu = self._copy_up_of(pubs, images)
        files = GaugeMetricFamily(
            "strata_copy_up_files", "Files in the pods' writable layers: lower files "
            "copied up on first write, files created, lower entries deleted (whiteouts).",
            labels=["kind"])
        files.add_metric(["copied"], cu.copied_files)
        files.add_metric(["created"], cu.created_files)
        files.add_metric(["deleted"], cu.deleted)
        yield files
        data = GaugeMetricFamily(
            "strata_copy_up_bytes", "Bytes in the pods' writable layers: copied up from "
            "the shared layers, or created.", labels=["kind"])
        data.add_metric(["copied"], cu.copied_bytes)
        data.add_metric(["created"], cu.created_bytes)
        yield data
        pods = pods_per_layer(images, pubs)
        resident = self.page_cache.get(set(pods))
        yield GaugeMetricFamily(
            "strata_layer_page_cache_bytes", "Bytes of the layers that publications use "
            "in the page cache: cached once, read by every pod that shares the layer "
            "(sampled at most every 30 s).", value=sum(resident.values()))
        yield GaugeMetricFamily(
            "strata_page_cache_saved_bytes", "Page cache that sharing saves: what a "
            "private copy of each layer per pod would cache again, (pods-1) times its "
            "resident bytes.", value=sum(resident[lid] * (pods[lid] - 1) for lid in pods))
        yield GaugeMetricFamily("strata_stages", "Volumes staged on this node.",
                                value=len(stages))
        yield GaugeMetricFamily(
            "strata_pending_releases", "Writable layers of lazily detached overlays that a "
            "process still holds, kept until the kernel lets them go.", value=len(releases))
