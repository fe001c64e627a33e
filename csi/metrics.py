"""Prometheus metrics: names and help texts live only here; the registry is injected.

Store gauges are computed at scrape time from state.db (StoreCollector, one WAL read
transaction: a scrape never waits on a publish), so they can never drift from the truth.
Per-publication figures come from the upper-stats cache (csi/upper_stats.py), refreshed in
the background: a scrape never walks an upper dir. RPC latency is recorded by the server's
interceptor, pulls and unpacks by the callbacks below. docs/metrics.md lists every metric.
"""

import http.server
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections import Counter as Tally

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from csi.backend import Backend
from csi.inspect import Summary
from csi.mount.reflink import Reflink
from csi.paths import StorePaths
from csi.store import gc as store_gc
from csi.store.pagecache import Meter
from csi.store.report import sharing
from csi.store.state import State
from csi.upper_stats import UpperStats

log = logging.getLogger(__name__)

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
               30, 60, 120)
TOP_LAYERS = 10
# What exposition() writes, whichever prometheus_client is installed (newer ones call a
# later format "latest").
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
POD = ["volume_id", "pod_namespace", "pod_name"]  # every per-publication family's labels
CHANGES = ("created", "copied_up", "metacopy", "deleted", "renamed")


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
            "strata_pulls_total", "Image pulls by result: pulled (from a registry), present "
            "(on the node already), or the gRPC code of the failure.", ["result"],
            registry=self.registry)
        self.pull_seconds = Histogram(
            "strata_pull_seconds", "Time to pull an image and unpack its missing layers.",
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry)
        self.blob_bytes = Counter(
            "strata_blob_fetched_bytes_total", "Compressed bytes downloaded from registries.",
            registry=self.registry)
        self.blob_fetches = Counter(
            "strata_blob_fetches_total", "Blobs downloaded (and verified) from registries.",
            registry=self.registry)
        self.cache_hits = Counter(
            "strata_store_cache_hits_total", "Layers of the images publishes and stages "
            "asked for that were in the store already.", registry=self.registry)
        self.cache_misses = Counter(
            "strata_store_cache_misses_total", "Layers of the images publishes and stages "
            "asked for that had to be pulled (or waited for, pulled by another).",
            registry=self.registry)
        self.gc_runs = Counter(
            "strata_gc_runs_total", "Garbage collections by result: ok, or error (logged).",
            ["result"], registry=self.registry)
        for result in ("ok", "error"):
            self.gc_runs.labels(result)

    def on_layers(self, present: int, pulled: int) -> None:
        """One publish or stage's image: `present` layers were in the store, `pulled` not."""
        self.cache_hits.inc(present)
        self.cache_misses.inc(pulled)

    def on_pull(self, result: str, seconds: float | None) -> None:
        """`seconds` is None for answers from the node's records alone (no pull ran)."""
        self.pulls.labels(result).inc()
        if seconds is not None:
            self.pull_seconds.observe(seconds)

    def on_blob(self, size: int) -> None:
        self.blob_fetches.inc()

    def on_collect(self, result) -> None:
        self.gc_runs.labels("ok").inc()
        self.gc_removed.inc(len(result.removed))
        self.gc_freed.inc(result.freed_bytes)

    def on_gc_error(self, exc: BaseException) -> None:
        self.gc_runs.labels("error").inc()

    def on_unpack(self, layer, seconds: float, nbytes: int) -> None:
        self.unpacks.inc()
        self.unpack_seconds.observe(seconds)
        self.unpack_bytes.inc(nbytes)

    def install_store(self, state: State, backend: Backend, paths: StorePaths,
                      upper_stats: UpperStats | None = None,
                      policy: store_gc.Policy | None = None,
                      top_layers: int = TOP_LAYERS, reflink: Reflink | None = None) -> None:
        self.registry.register(StoreCollector(state, backend, paths, upper_stats, policy,
                                              top_layers))
        if reflink is not None:
            self.registry.register(_Families([reflink_family(reflink)]))


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


def reflink_family(reflink: Reflink) -> GaugeMetricFamily:
    """The start-up probe's answer: probed once, so a fixed family."""
    family = GaugeMetricFamily(
        "strata_store_reflink", "1 if the store's filesystem clones extents (XFS with "
        "reflink=1, btrfs): overlay's copy-up then shares a lower file's blocks instead of "
        "copying the whole file; 0 if it copies. Probed at start-up.", labels=["filesystem"])
    family.add_metric([reflink.filesystem], int(reflink.clones))
    return family


def pods_per_layer(images, pubs) -> dict[str, int]:
    """How many publications read each layer (a layer twice in one image counts once)."""
    layer_ids = {i.manifest_digest: i.layer_ids for i in images}
    count: dict[str, int] = {}
    for p in pubs:
        for lid in set(layer_ids.get(p.manifest_digest, ())):
            count[lid] = count.get(lid, 0) + 1
    return count


class StoreCollector:
    """Everything computed at scrape time: the store's layers and what sharing them saves,
    the GC marks, and each publication's writable layer (from the upper-stats cache: no
    walk here). One read transaction of state.db per scrape."""

    def __init__(self, state: State, backend: Backend, paths: StorePaths,
                 upper_stats: UpperStats | None = None, policy: store_gc.Policy | None = None,
                 top_layers: int = TOP_LAYERS):
        self._state = state
        self._backend = backend
        self._paths = paths
        self._uppers = upper_stats or UpperStats(state, backend)  # no thread: zeros
        self._policy = policy or store_gc.Policy()
        self._top = max(0, top_layers)
        self.page_cache = PageCacheSampler(paths)
        self._rendered: tuple[object, Rendered | None] = (None, None)

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
        yield from self._layers(layers, refs)
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
        per_image = GaugeMetricFamily("strata_image_publications",
                                      "Publications of each image (by the name asked for).",
                                      labels=["image"])
        for image, n in sorted(Tally(p.image for p in pubs).items()):
            per_image.add_metric([image], n)
        yield per_image
        yield from self._publications(pubs)
        yield from self._gc_marks(layers)
        pods = pods_per_layer(images, pubs)
        # Page cache belongs to an inode: overlay's publications read the layers' own
        # files, so one cached copy serves every pod; a btrfs snapshot's files are inodes
        # of their own subvolume (extents shared on disk, not in memory), so pods never
        # read layers/ID/fs and nothing is saved: 0, not a saving that does not exist.
        shared = self._backend.shares_page_cache
        resident = self.page_cache.get(set(pods)) if shared else {}
        yield GaugeMetricFamily(
            "strata_layer_page_cache_bytes", "Bytes of the layers that publications use "
            "in the page cache: cached once, read by every pod that shares the layer "
            "(sampled at most every 30 s; 0 where publications do not read the layers' "
            "own files: btrfs).", value=sum(resident.values()))
        yield GaugeMetricFamily(
            "strata_page_cache_saved_bytes", "Page cache that sharing saves: what a "
            "private copy of each layer per pod would cache again, (pods-1) times its "
            "resident bytes; 0 where publications do not share the layers' page cache "
            "(btrfs).", value=sum(resident.get(lid, 0) * (pods[lid] - 1) for lid in pods))
        info = GaugeMetricFamily(
            "strata_backend_info", "1, labelled with the storage backend, what its layers "
            "are shared by (layer: DiffID; chain: ChainID) and whether the publications of "
            "one image share page cache.", labels=["backend", "shared_by", "shares_page_cache"])
        info.add_metric([self._backend.name, self._backend.shared_by, _bool(shared)], 1)
        yield info
        yield GaugeMetricFamily("strata_stages", "Volumes staged on this node.",
                                value=len(stages))
        yield GaugeMetricFamily(
            "strata_pending_releases", "Writable layers of lazily detached overlays that a "
            "process still holds, kept until the kernel lets them go.", value=len(releases))
        yield GaugeMetricFamily(
            "strata_trash_entries", "Writable layers of unpublished volumes in the store's "
            "trash/, still to be deleted in the background (one that stays could not be: "
            "the log says why).", value=_entries(self._paths.trash))

    def _layers(self, layers, refs):
        """References and bytes of the largest layers, one series each, and the rest
        summed as layer="other": bounded, and sum() is still the store's total."""
        refs_f = GaugeMetricFamily(
            "strata_layer_references", "References held on layers by publications, stages "
            "and pulls under way: the largest layers by name, the rest as layer=\"other\".",
            labels=["layer"])
        bytes_f = GaugeMetricFamily(
            "strata_layer_bytes", "Bytes of the largest layers by name, the rest summed as "
            "layer=\"other\".", labels=["layer"])
        ranked = sorted(layers, key=lambda x: (-x.size, x.id))
        for layer in ranked[:self._top]:
            refs_f.add_metric([layer.id], refs.get(layer.id, 0))
            bytes_f.add_metric([layer.id], layer.size)
        rest = ranked[self._top:]
        refs_f.add_metric(["other"], sum(refs.get(x.id, 0) for x in rest))
        bytes_f.add_metric(["other"], sum(x.size for x in rest))
        yield refs_f
        yield bytes_f

    def _gc_marks(self, layers):
        try:
            usage = store_gc.measure(self._policy, self._paths.root, layers)
        except OSError as e:
            log.warning("cannot measure the store for the GC marks: %s", e)
            return
        p = self._policy
        for name, help_text, value in (
                ("strata_store_used_bytes", "Bytes used, as GC measures them: the layers' "
                 "sizes with --gc-max-bytes, else the whole filesystem under --root.",
                 usage.used),
                ("strata_store_capacity_bytes", "Capacity GC measures against: "
                 "--gc-max-bytes, else the filesystem under --root.", usage.capacity),
                ("strata_gc_high_mark_bytes", "Used bytes above which the lru policy "
                 "collects (--gc-high-percent of the capacity).",
                 usage.capacity * p.high_percent / 100),
                ("strata_gc_low_mark_bytes", "Used bytes the lru policy collects down to "
                 "(--gc-low-percent of the capacity).", usage.capacity * p.low_percent / 100)):
            # Only the lru policy has marks: under `immediate` an alert on them would blame
            # GC for a filesystem that something else fills.
            if "_mark_" not in name or p.mode == "lru":
                yield GaugeMetricFamily(name, help_text, value=value)

    def _publications(self, pubs):
        """Each publication's writable layer by pod, from the cache, as exposition text
        rendered again only when a publication or a figure changed (200 publications are
        about 2,000 samples: prometheus_client would format each on every scrape). Two
        publications with the same labels (one volume twice in a pod) are summed:
        Prometheus refuses a duplicate series."""
        key = (self._uppers.version, tuple(
            (p.key, p.volume_id, p.pod_namespace, p.pod_name, p.image, p.readonly,
             p.staging_path == "", p.size_limit) for p in pubs))
        if key != self._rendered[0]:
            self._rendered = (key, Rendered(render_publications(
                pubs, self._uppers.summaries())))
        yield self._rendered[1]
        totals = self._uppers.totals()
        yield CounterMetricFamily(
            "strata_copy_up_files_total", "Lower files copied up into writable layers, with "
            "data or metadata only (the most each publication was seen with; kept after "
            "unpublish).", value=totals.copied_up_files)
        yield CounterMetricFamily(
            "strata_copy_up_bytes_total", "Bytes allocated by lower files copied up with "
            "their data, less the extents they share with their lower files (reflink) (the "
            "most each publication was seen with; kept after unpublish).",
            value=totals.copied_up_bytes)
        yield CounterMetricFamily(
            "strata_copy_up_logical_bytes_total", "Size of the lower files copied up with "
            "their data: what copying them whole allocates (the most each publication was "
            "seen with; kept after unpublish).", value=totals.copied_up_logical_bytes)
        yield CounterMetricFamily(
            "strata_ephemeral_discarded_bytes_total", "Bytes of writable layers deleted at "
            "unpublish: what the pods wrote, gone for ever.", value=totals.discarded_bytes)


VOLUME_FAMILIES = (
    ("strata_volume_upper_bytes", "Bytes allocated in the publication's writable layer "
     "(everything it wrote, copied up or deleted)."),
    ("strata_volume_upper_inodes", "Inodes in the publication's writable layer "
     "(directories and whiteouts included)."),
    ("strata_volume_files", "Entries of the publication's writable layer by change: "
     "created, copied_up (with data), metacopy (metadata only), deleted (lower entries "
     "hidden), renamed (directories)."),
    ("strata_volume_copied_up_bytes", "Bytes allocated by lower files copied up with their "
     "data, less the extents they share with their lower files (a reflink copy-up)."),
    ("strata_volume_copied_up_logical_bytes", "Size (st_size) of the lower files copied up "
     "with their data: what copying them whole allocates."),
    ("strata_volume_size_limit_bytes", "The sizeLimit of the publication's writable layer "
     "(only publications that have one)."),
    ("strata_volume_info", "1 per publication: its image, whether it is read-only and "
     "whether it is an inline ephemeral volume."),
)


class Rendered:
    """Families already in the text exposition format (`exposition` writes them as
    they are)."""

    def __init__(self, text: bytes):
        self.text = text


def render_publications(pubs, summaries: dict[str, Summary]) -> bytes:
    """The per-publication families in the text format (0.0.4), one sample per pod (label
    set) and family; read-only publications and those not walked yet count zeros."""
    by_pod: dict[tuple[str, str, str], Summary] = {}
    limits: dict[tuple[str, str, str], int] = {}
    info: Tally = Tally()
    for p in pubs:
        labels = (p.volume_id, p.pod_namespace, p.pod_name)
        s = Summary() if p.readonly else summaries.get(p.key, Summary())
        # (Summary.__add__ goes through dataclasses.astuple: only when needed)
        by_pod[labels] = by_pod[labels] + s if labels in by_pod else s
        if p.size_limit:
            limits[labels] = limits.get(labels, 0) + p.size_limit
        info[labels + (p.image, _bool(p.readonly), _bool(not p.staging_path))] += 1
    pods = {labels: _label_text(POD, labels) for labels in by_pod}
    samples: dict[str, list[str]] = {name: [] for name, _ in VOLUME_FAMILIES}
    for labels, s in by_pod.items():
        at = pods[labels]
        samples["strata_volume_upper_bytes"].append(f"{{{at}}} {s.upper_bytes}")
        samples["strata_volume_upper_inodes"].append(f"{{{at}}} {s.upper_inodes}")
        samples["strata_volume_files"].extend(
            f'{{{at},change="{change}"}} {getattr(s, change)}' for change in CHANGES)
        samples["strata_volume_copied_up_bytes"].append(f"{{{at}}} {s.copied_up_bytes}")
        samples["strata_volume_copied_up_logical_bytes"].append(
            f"{{{at}}} {s.copied_up_logical_bytes}")
    for labels, n in limits.items():
        samples["strata_volume_size_limit_bytes"].append(f"{{{pods[labels]}}} {n}")
    for labels, n in info.items():
        samples["strata_volume_info"].append(
            f"{{{_label_text(POD + ['image', 'readonly', 'ephemeral'], labels)}}} {n}")
    lines = []
    for name, help_text in VOLUME_FAMILIES:
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(name + sample for sample in samples[name])
    return ("\n".join(lines) + "\n").encode()


def _label_text(names, values) -> str:
    return ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True))


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


class _Families:
    def __init__(self, families):
        self._families = families

    def collect(self):
        return self._families


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the text format, as prometheus_client's generate_latest writes it,
    with `Rendered` families written as they are."""
    out, plain = [], []
    for family in registry.collect():
        if isinstance(family, Rendered):
            out.append(generate_latest(_Families(plain)))
            out.append(family.text)
            plain = []
        else:
            plain.append(family)
    out.append(generate_latest(_Families(plain)))
    return b"".join(out)


def _entries(directory: str) -> int:
    try:
        return len(os.listdir(directory))
    except FileNotFoundError:
        return 0


def _bool(b: bool) -> str:
    return "true" if b else "false"


def start_http(host: str, port: int, registry: CollectorRegistry):
    """Serve `exposition(registry)` at /metrics on HOST:PORT, each scrape in its own
    thread; returns (server, thread), stopped by server.shutdown() and server_close()."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if urllib.parse.urlsplit(self.path).path not in ("/metrics", "/"):
                self.send_error(404, "strata serves /metrics")
                return
            try:
                body = exposition(registry)
            except Exception:  # logged as every error is (--log-format), answered as one
                log.exception("rendering /metrics failed")
                self.send_error(500, "rendering the metrics failed; see the server's log")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # a scrape every few seconds is not news
            pass

    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (http.server.ThreadingHTTPServer,),
                        {"address_family": family, "daemon_threads": True})
    server = server_class((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread

