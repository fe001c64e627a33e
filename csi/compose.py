"""The composition root: the one place where a strata process's parts are built and wired.

- `node()` is what `strata serve` runs: the store's serving role (one server per store),
  the store with start-up repairs (reconcile), the kernel's features probed once, the
  backend, pulls, GC, the volume manager and the provisioner, and the store's metrics.
  `upgrade_blocked()` is what a server waits on before it: a schema upgrade it may not do
  yet.
- `tool()` is what `strata pull` and `strata gc` run beside a server: the same store, pull
  and GC parts, sharing the store (no repairs: the server may be mid-publish).
- `reader()` is what `strata ls`, `df` and `diff` use: records and the backend's answers,
  read-only, taking no lock that could make a server wait.
Every part takes what it needs through its constructor, so tests build any subset.
"""

import dataclasses
import logging
import os
import time

from csi.backend import Backend
from csi.backend.bound import Bound, Bounds
from csi.backend.btrfs import BtrfsBackend, chain_ids
from csi.backend.loopfs import LoopBound
from csi.backend.overlay import OverlayBackend
from csi.backend.quota import ProjectQuotas
from csi.backend.quotabound import QuotaBound
from csi.config import Config
from csi.errors import FailedPrecondition
from csi.image.auth import Keyring
from csi.image.registry import RegistryClient
from csi.image.resolver import Resolver
from csi.locks import ServeLock, StoreServed, StoreUsers
from csi.metrics import Metrics
from csi.mount import btrfs, reflink
from csi.mount import features as kernel
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.provision import Provisioner
from csi.pulls import Puller
from csi.reconcile import reconcile
from csi.releases import Releases
from csi.store.blobs import BlobStore
from csi.store.gc import Collector
from csi.store.layers import LayerStore
from csi.store.state import SCHEMA_VERSION, SchemaMismatch, State, schema_version
from csi.trash import Trash
from csi.tree import remove_tree
from csi.upper_stats import UpperStats
from csi.volumes import VolumeManager

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Parts:
    paths: StorePaths
    state: State
    backend: Backend
    users: StoreUsers | None = None
    layers: LayerStore | None = None
    puller: Puller | None = None
    gc: Collector | None = None
    mounter: Mounter | None = None
    volumes: VolumeManager | None = None
    provisioner: Provisioner | None = None
    metrics: Metrics | None = None
    serving: ServeLock | None = None
    releases: Releases | None = None
    upper_stats: UpperStats | None = None  # its thread starts with the server (server.py)
    trash: Trash | None = None

    def close(self) -> None:
        if self.upper_stats is not None:
            self.upper_stats.stop()  # it reads the state
        if self.releases is not None:
            self.releases.stop()  # it writes to the state
        if self.trash is not None:
            self.trash.stop()  # what it has not deleted by then, the next start does
        self.state.close()
        if self.users is not None:
            self.users.close()
        if self.serving is not None:
            self.serving.close()  # last: another server may start on the store now


def build_puller(config: Config, state: State, layers: LayerStore,
                 metrics: Metrics | None = None, on_bytes=None, clock=time.time) -> Puller:
    """The pull path shared by the server and `strata pull`. `on_bytes(n, blob)`: `n` more
    bytes of the layer blob `blob` arrived (layers download concurrently; `strata pull`
    shows each one's)."""
    client = RegistryClient(config.registry,
                            on_bytes=metrics.blob_bytes.inc if metrics is not None else None)
    keyring = Keyring.from_file(config.registry_config) if config.registry_config else None
    blobs = BlobStore(config.root, on_fetch=metrics.on_blob if metrics else None,
                      on_bytes=(lambda digest, n: on_bytes(n, digest)) if on_bytes else None)
    return Puller(state, layers, blobs, client, keyring, tag_ttl=config.tag_ttl, clock=clock,
                  on_pull=metrics.on_pull if metrics else None,
                  on_layers=metrics.on_layers if metrics else None,
                  layout_roots=config.oci_layout_roots)


def _probe(scratch: str) -> kernel.Features:
    """The kernel's overlay features; if the probe itself fails (a kernel or sandbox that
    refuses it), start anyway with none assumed: Probe and unpublish keep working, and each
    publish fails with the kernel's own reason."""
    try:
        features = kernel.probe(scratch)
    except OSError as e:
        log.error("probing the kernel's overlayfs failed (%s); assuming no optional "
                  "features", e)
        return kernel.Features()
    log.info("kernel features: %s", features)
    return features


def backend_file(paths: StorePaths) -> str:
    """Where serve records the backend it runs (the tools build the same one)."""
    return os.path.join(paths.root, "backend")


def recorded_backend(paths: StorePaths) -> str:
    try:
        with open(backend_file(paths)) as f:
            return f.read().strip() or "overlay"
    except FileNotFoundError:
        return "overlay"  # a store from before the setting


def stored_backend(paths: StorePaths) -> Backend:
    """The backend the store's server runs, for the tools (they read and remove only)."""
    return BtrfsBackend(paths) if recorded_backend(paths) == "btrfs" else OverlayBackend(paths)


def make_backend(name: str, paths: StorePaths, features, mounter: Mounter,
                 config: Config, state: State | None = None,
                 trash: Trash | None = None) -> Backend:
    """Serve's backend (`--backend`), checked against the store and recorded in it. A store
    whose publications another backend made is refused: their state is of its shape. The
    state database counts as well as `volumes/`: a btrfs read-only view has no key on disk
    (it binds a chain), and a stage or a release of the old backend's views is as live."""
    was = recorded_backend(paths)
    if was != name and (os.listdir(paths.volumes) or _recorded_views(state)):
        raise FailedPrecondition(
            f"--backend {name}, but the store at {paths.root} (--root) holds publications "
            f"of the {was} backend; start with --backend {was} until they are unpublished")
    if was == "btrfs" and name != "btrfs":
        drop_chains(BtrfsBackend(paths).chains)
    if name == "btrfs":
        if not btrfs.is_btrfs(paths.root):
            raise FailedPrecondition(f"--backend btrfs, but the store root {paths.root} "
                                     "(--root) is not on a btrfs filesystem")
        backend: Backend = BtrfsBackend(paths, features, LoopBound(paths, mounter),
                                        recorded_chains(state))
    else:
        backend = OverlayBackend(paths, features,
                                 size_limits(config.size_limit_mechanism, paths, mounter),
                                 trash=trash)
    if was != name or not os.path.exists(backend_file(paths)):
        tmp = backend_file(paths) + ".tmp"
        with open(tmp, "w") as f:
            f.write(name + "\n")
        os.rename(tmp, backend_file(paths))
    log.info("storage backend: %s (layers shared by %s; page cache %s)", name,
             backend.shared_by, "shared" if backend.shares_page_cache else "per publication")
    return backend


def recorded_chains(state: State | None):
    """For the btrfs backend's collector: the top chain of every recorded publication's
    and release's image (a read-only view binds it), or None while a release cannot say
    which image it reads (then no chain is deleted)."""
    def chains() -> set[str] | None:
        if state is None:
            return set()
        with state.read() as r:
            digests = ([p.manifest_digest for p in r.publications()]
                       + [x.manifest_digest for x in r.releases()])
            if not all(digests):
                return None
            out = set()
            for d in set(digests):
                image = r.image(d)
                if image is not None and image.layer_ids:
                    out.add(chain_ids(image.layer_ids)[-1])
            return out
    return chains


def _recorded_views(state: State | None) -> bool:
    """Whether the state database records any publication, stage or release."""
    if state is None:
        return False
    with state.read() as r:
        return bool(r.publications() or r.stages() or r.releases())


def drop_chains(chains: str) -> None:
    """Delete the btrfs backend's chain subvolumes when a store leaves it (no publication
    of it remains): no other backend reads or collects them, and once GC has taken their
    layers they would be the last holders of that data, for good."""
    if not os.path.isdir(chains):
        return
    for name in sorted(os.listdir(chains)):
        path = os.path.join(chains, name)
        if btrfs.is_subvolume(path):
            btrfs.delete(path)
        elif os.path.isdir(path) and not os.path.islink(path):
            remove_tree(path)
        else:
            os.unlink(path)
    os.rmdir(chains)
    log.info("removed the btrfs backend's chains (%s): the store now uses another backend",
             chains)


def mechanism(setting: str, no_quotas: str) -> str:
    """The size-limit mechanism for new publications: "quota" or "loop", from
    `--size-limit-mechanism` and why the store's filesystem has no project quotas ("" when
    it enforces them). Asking for quotas where there are none stops the start."""
    if setting == "quota" and no_quotas:
        raise FailedPrecondition(
            f"--size-limit-mechanism quota, but the store's filesystem does not enforce "
            f"project quotas: {no_quotas}. Enable them (docs/size-limits.md) or use "
            f"--size-limit-mechanism auto or loop (a filesystem image per volume)")
    return "quota" if setting != "loop" and not no_quotas else "loop"


def size_limits(setting: str, paths: StorePaths, mounter: Mounter) -> Bound:
    """The bound of new size-limited publications, decided once and logged; it answers for
    the keys that the other mechanism bounded before a restart too (bound.Bounds)."""
    quotas, no_quotas = ProjectQuotas.check(paths.volumes)
    loop, quota = LoopBound(paths, mounter), QuotaBound(paths, quotas)
    if mechanism(setting, no_quotas) == "quota":
        log.info("size limits: project quotas (%r)", quotas)
        return Bounds(quota, loop)
    log.info("size limits: a filesystem image per volume on a loop device (%s)",
             "--size-limit-mechanism loop" if setting == "loop"
             else f"no project quotas: {no_quotas}")
    return Bounds(loop, quota)


def _upgrade_blocked(paths: StorePaths, alone: bool, version: int | None) -> str:
    """Why the database at `version` (None: none yet) may not be upgraded now, or ""."""
    if alone or version is None or version >= SCHEMA_VERSION:
        return ""
    return (f"the store's database {paths.state_db} needs an upgrade from schema version "
            f"{version} to {SCHEMA_VERSION}, and another process uses the store (a strata "
            "server of an earlier release, or a `strata pull` or `gc`): upgrading it beside "
            "that process would break it")


def upgrade_blocked(config: Config) -> str:
    """Why `node()` may not start on the store yet ("" when it may): its database needs a
    schema upgrade while another process uses the store. A server of the release before
    the serving role takes no serve.lock, but it does hold the store's lock shared, so this
    also keeps a new server from migrating and repairing under an old one that serves on
    other sockets. Taking the lock exclusively for a moment makes a tool starting then
    wait that moment."""
    paths = StorePaths(config.root)
    version = schema_version(paths.state_db)
    if version is None or version >= SCHEMA_VERSION:
        return ""  # the common case takes no lock
    users = StoreUsers(paths.store_lock)
    try:
        return _upgrade_blocked(paths, users.alone(), version)
    finally:
        users.close()


def node(config: Config, metrics: Metrics | None = None, mounter: Mounter | None = None,
         features: kernel.Features | None = None, clock=time.time,
         serving: ServeLock | None = None) -> Parts:
    """The parts of `strata serve`. `serving` is the store's serving role, already taken
    (server.serve waits for it); without one it is taken here, or StoreServed is raised at
    once: start-up repairs must never run beside a live server. The parts hold the role
    until they are closed. A start that fails lets go of the role, the store's lock and the
    database at any step. `clock` (wall time) is what records and GC ages are read from.

    The schema is upgraded only when no other process uses the store (as in `tool()`): a
    server of an earlier release still running on it would fail every write on the new
    schema. Otherwise SchemaMismatch, before anything is touched (server.serve waits for
    `upgrade_blocked()` first, so this is only a process that came in between).
    Start-up holds the store's lock exclusively from that check until its repairs are
    done: what it decided alone stays true."""
    paths = StorePaths(config.root).make()
    if serving is None:
        serving = ServeLock(paths.serve_lock)
        if not serving.try_take():
            holder = serving.holder()
            serving.close()
            raise StoreServed(f"another strata server ({holder}) serves the store "
                              f"{paths.root}")
    metrics = metrics or Metrics()
    users = state = releases = trash = None
    try:
        users = StoreUsers(paths.store_lock)
        alone = users.alone()
        if why := _upgrade_blocked(paths, alone, schema_version(paths.state_db)):
            raise SchemaMismatch(f"{why}; start again once it has stopped")
        state = State(paths.state_db)
        if features is None:
            features = _probe(paths.tmp)
        clones = reflink.probe(paths.tmp)
        log.info("%s", clones.describe(paths.root))
        mounter = mounter or Mounter(features=features)
        # Loop filesystems are mounted by the one executor.
        # Unpublish (and start-up's repairs) delete private state in the background.
        trash = Trash(paths.trash).start()
        backend = make_backend(config.backend, paths, features, mounter, config, state,
                               trash)
        layers = LayerStore(paths, state, clock=clock, on_unpack=metrics.on_unpack,
                            max_unpacks=config.max_parallel_unpacks)

        def collected(result) -> None:
            backend.layers_removed(result.removed)
            metrics.on_collect(result)

        gc = Collector(layers, config.gc, clock=clock, on_collect=collected,
                       on_error=metrics.on_gc_error, settling=lambda: trash.pending() > 0)
        if config.gc.reads_the_disk:  # then GC waits for the trash (settling)
            trash.on_empty = gc.collect  # what it waited for has left the disk
        releases = Releases(paths, state, backend, mounter, clock=clock, collect=gc.collect,
                            on_detach=metrics.lazy_unmounts.inc, starting=True)
        reconcile(paths, state, mounter, backend, layers, alone=alone, clock=clock,
                  releases=releases)
        releases.settle()  # what the kernel let go while we were down; the rest later
        users.share()
        puller = build_puller(config, state, layers, metrics=metrics, clock=clock)
        # Walking uppers (in the background, and once more at unpublish) is only for
        # metrics: without an endpoint nobody reads the figures.
        upper_stats = UpperStats(state, backend, interval=config.metrics_refresh_seconds) \
            if config.metrics_address else None
        volumes = VolumeManager(paths, state, backend, mounter, puller, clock=clock, gc=gc,
                                default_size_limit=config.default_size_limit_bytes,
                                releases=releases, upper_stats=upper_stats)
        gc.collect()  # released while we were down, or a policy that changed
        provisioner = Provisioner(state, Resolver(config.oci_layout_roots))
        metrics.install_store(state, backend, paths, upper_stats, config.gc,
                              config.metrics_top_layers, reflink=clones)
    except BaseException:
        if releases is not None:
            releases.stop()
        if trash is not None:
            trash.stop()
        if state is not None:
            state.close()
        if users is not None:
            users.close()
        serving.close()
        raise
    return Parts(paths, state, backend, users, layers, puller, gc, mounter, volumes,
                 provisioner, metrics, serving, releases, upper_stats, trash)


def tool(config: Config, on_unpack=None, on_bytes=None) -> Parts:
    """The store, pulls and GC for `strata pull` / `strata gc`, beside a running server.
    Holding the store's lock shared keeps a server that starts meanwhile out of our tmp/.
    The schema is upgraded only when no other process uses the store: an older server
    running on it would break on the new schema."""
    paths = StorePaths(config.root).make()
    users = StoreUsers(paths.store_lock)
    try:
        fresh = not os.path.exists(paths.state_db)  # nothing to break: create it
        state = State(paths.state_db, migrate=users.alone() or fresh)
        users.share()
    except BaseException:
        users.close()
        raise
    layers = LayerStore(paths, state, on_unpack=on_unpack,
                        max_unpacks=config.max_parallel_unpacks)
    backend = stored_backend(paths)
    if isinstance(backend, BtrfsBackend):  # `strata gc` keeps the chains recorded views bind
        backend.recorded = recorded_chains(state)
    return Parts(paths, state, backend, users, layers,
                 build_puller(config, state, layers, on_bytes=on_bytes),
                 Collector(layers, config.gc,
                           on_collect=lambda result: backend.layers_removed(result.removed)))


def reader(config: Config) -> Parts:
    """Records and the backend's answers, for the read-only tools."""
    paths = StorePaths(config.root)
    return Parts(paths, State(paths.state_db, migrate=False), stored_backend(paths))
