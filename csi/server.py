"""The plugin process: the CSI services on unix sockets, metrics over HTTP, and a graceful
stop.

`Plugin` takes its parts from the composition root (compose.node) and adds the gRPC
services (kept apart from `serve()` so tests can build one in-process); `serve()` blocks
until SIGTERM/SIGINT, then lets running RPCs finish within the grace period and removes
its sockets.

One server per store, and never two on a socket. Before it opens the database, `serve()`
takes the store's serving role (locks.ServeLock) and makes sure nothing else serves here:
while another server holds the role, or a process accepts connections on our
sockets (a server of an earlier release, which takes no role), or the database needs a
schema upgrade that another process on the store would not survive, it waits (a DaemonSet
rolled with maxSurge starts the new pod before the old one stops), or with --no-wait exits
with status 1. A socket path is taken over only when nobody accepts connections on it (a
crashed run's leftover); a live one is never unlinked (gRPC itself would unlink whatever
socket is at the path before binding it: the check must come first).

`Plugin.stop` lets go of the store only once no RPC handler runs any more: gRPC's stop
cancels the calls after the grace period but cannot stop their threads, and a handler may
still be mounting or unmounting. If one outlives the grace period and a margin, the
process keeps its locks until it exits rather than hand the store to the next server.
"""

import gc
import logging
import os
import signal
import socket
import stat
import threading
import time
from concurrent import futures

import grpc

from csi import compose
from csi.config import Config, parse_host_port
from csi.controller import ControllerService
from csi.errors import FailedPrecondition, StrataError
from csi.identity import IdentityService
from csi.interceptors import RpcInterceptor
from csi.locks import ServeLock
from csi.metrics import Metrics, start_http
from csi.mount.features import Features
from csi.mount.syscalls import Mounter
from csi.node import NodeService
from csi.paths import StorePaths
from csi.proto import csi_pb2_grpc
from csi.store.state import SchemaMismatch

log = logging.getLogger(__name__)

WAIT_POLL = 0.2  # seconds between tries of the serving role while another server holds it
WAIT_LOG = 60.0  # seconds between reminders in the log that we still wait
CONNECT_TIMEOUT = 5.0  # a listener this slow to accept is still a listener
STOP_MARGIN = 5.0  # seconds handlers may run on after gRPC cancelled their calls at stop


def _listening(path: str) -> str:
    """Why `path` must be left alone ("" when nobody accepts connections on it). Only a
    refused connection proves it stale; a slow or odd answer counts as someone there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CONNECT_TIMEOUT)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return ""
        except OSError as e:
            return f"connecting to it fails with {e.strerror or e}, so it may be live"
    return "a process accepts connections on it"


def _claim(path: str) -> None:
    """Make `path` free for our socket: remove a stale socket file, refuse anything else."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SystemExit(f"strata serve: {path} exists and is not a socket; refusing to "
                         "replace it")
    why = _listening(path)
    if why:
        raise SystemExit(f"strata serve: {path}: {why} (another strata server, on another "
                         "--root?); not taking it over")
    log.info("removing stale socket %s: nobody accepts connections on it", path)
    os.unlink(path)


def _sockets(config: Config) -> list[str]:
    """The node and the controller socket paths, each once."""
    return list(dict.fromkeys(p for p in (config.socket_path, config.controller_socket_path)
                              if p))


class Plugin:
    def __init__(self, config: Config, metrics: Metrics | None = None,
                 mounter: Mounter | None = None, features: Features | None = None,
                 serving: ServeLock | None = None):
        """`serving`: the store's serving role, already taken (see serve()); without it
        the role is taken here or StoreServed raised (compose.node)."""
        self.config = config
        self.parts = compose.node(config, metrics, mounter, features, serving=serving)
        self.state = self.parts.state
        self.metrics = self.parts.metrics
        self.mounter = self.parts.mounter
        self.volumes = self.parts.volumes
        self.gc = self.parts.gc
        self._servers: list[tuple[grpc.Server, str]] = []
        self._http = None
        self.rpcs = RpcInterceptor(self.metrics)  # one for both sockets: stop waits on all

    def ready(self) -> bool:
        """Probe's answer: the store's database answers and its directories are there."""
        try:
            with self.state.read() as tx:
                tx.refcount("")
        except Exception:
            log.exception("probe: the store's database does not answer")
            return False
        return self.parts.paths.complete()

    def _server(self) -> grpc.Server:
        # Publishes may wait on pulls (at most 48 at once, see Puller): the rest of the pool
        # keeps Probe, unpublish and stats answering.
        return grpc.server(futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
                           interceptors=[self.rpcs])

    def start(self) -> None:
        cfg = self.config
        same = cfg.controller_endpoint and cfg.controller_socket_path == cfg.socket_path
        has_controller = bool(cfg.controller_endpoint)
        # Both paths and the metrics port before either server starts: a refusal then
        # leaves nothing bound, and no publish lands in a server about to exit.
        for path in _sockets(cfg):
            _claim(path)
        if cfg.metrics_address:
            host, port = parse_host_port(cfg.metrics_address)
            try:
                self._http = start_http(host, port, self.metrics.registry)
            except OSError as e:  # taken, or not an address of this node
                raise FailedPrecondition(f"--metrics-address {cfg.metrics_address}: cannot "
                                         f"listen: {e.strerror or e}") from None
        identity = IdentityService(controller=has_controller, ready=self.ready)
        node = self._server()
        csi_pb2_grpc.add_IdentityServicer_to_server(identity, node)
        csi_pb2_grpc.add_NodeServicer_to_server(
            NodeService(self.volumes, cfg.node_id, pull_wait=cfg.pull_wait), node)
        if same:
            csi_pb2_grpc.add_ControllerServicer_to_server(
                ControllerService(self.parts.provisioner), node)
        self._add(node, cfg.socket_path)
        if has_controller and not same:
            ctrl = self._server()
            csi_pb2_grpc.add_IdentityServicer_to_server(identity, ctrl)
            csi_pb2_grpc.add_ControllerServicer_to_server(
                ControllerService(self.parts.provisioner), ctrl)
            self._add(ctrl, cfg.controller_socket_path)
        if self._http is not None:
            if self.parts.upper_stats is not None:  # the per-publication figures
                self.parts.upper_stats.start()
            log.info("metrics on http://%s/metrics", cfg.metrics_address)

    def _add(self, server: grpc.Server, path: str) -> None:
        try:
            server.add_insecure_port("unix://" + path)
        except RuntimeError:  # gRPC says only "Failed to bind"; the path is what to check
            raise FailedPrecondition(f"cannot listen on unix://{path} (--endpoint or "
                                     "--controller-endpoint): check that its directory "
                                     "exists and is writable") from None
        server.start()
        self._servers.append((server, path))
        log.info("serving CSI on unix://%s", path)

    def stop(self, grace: float | None = None) -> bool:
        """Stop serving, let running RPCs finish within `grace` seconds (then gRPC cancels
        them), and let go of the store once no handler runs. False when a handler still
        ran STOP_MARGIN seconds after the grace period: then the store stays locked (its
        database open, the serving role held) until the process exits, which it does only
        once that handler returns (gRPC's workers are joined at exit) or when killed. A
        waiting server would otherwise repair the store beside a handler still mounting."""
        grace = self.config.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace + STOP_MARGIN
        events = [server.stop(grace) for server, _ in self._servers]
        for event in events:
            event.wait()
        for _, path in self._servers:
            # gRPC unlinks the path itself when its listener closes; this is for a server
            # that never got that far. Nobody else can be serving on the path meanwhile:
            # no strata takes over a socket while someone accepts connections on it.
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._servers.clear()
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            self._http = None
        if running := self.rpcs.running():
            log.warning("waiting up to %.1fs for the RPC handlers that still run before "
                        "letting go of the store: %s", max(0.0, deadline - time.monotonic()),
                        ", ".join(running))
            if running := self.rpcs.wait_idle(deadline - time.monotonic()):
                log.error("RPC handlers still run %.0fs after the grace period: %s; keeping "
                          "the store locked until this process exits (no other server may "
                          "start on it while they may still mount or unmount)", STOP_MARGIN,
                          ", ".join(running))
                return False
        self.parts.close()
        log.info("stopped")
        return True


def take_store(config: Config, stop: threading.Event) -> ServeLock | None:
    """The store's serving role, once nothing keeps this server out: at once, or once what
    does has stopped. None when `stop` is set while waiting; SystemExit (status 1) with
    --no-wait. What keeps it out, each checked before the database is opened:
    - another server holding the role (serve.lock);
    - a process accepting connections on our node or controller socket: a server of the
      release before the role existed never takes serve.lock, and a DaemonSet rolled with
      maxSurge starts us beside it on the same sockets (or a server on another --root);
    - a database that needs a schema upgrade while another process uses the store (such
      an old server on other sockets): see compose.upgrade_blocked.
    The role, once taken, is held while we wait for the others, so that no third server
    gets in meanwhile."""
    try:
        paths = StorePaths(config.root).make()
    except OSError as e:
        raise SystemExit(f"strata serve: cannot create the store at {config.root} (--root): "
                         f"{e.strerror}") from None
    lock = ServeLock(paths.serve_lock)
    sockets = _sockets(config)
    held = False

    def blocker() -> str:
        nonlocal held
        held = held or lock.try_take()
        if not held:
            return f"another strata server ({lock.holder()}) serves the store {paths.root}"
        for path in sockets:
            if why := _listening(path):
                return (f"{path}: {why} (a strata server of an earlier release, or one on "
                        "another --root?)")
        return compose.upgrade_blocked(config)

    why = blocker()
    if not why:
        return lock
    if config.no_wait:
        lock.close()
        raise SystemExit(f"strata serve: {why}; not waiting for it (--no-wait)")
    log.warning("%s; waiting for it to stop before starting (--no-wait to exit instead)", why)
    started = time.monotonic()
    remind = started + WAIT_LOG
    while not stop.wait(WAIT_POLL):
        was, why = why, blocker()
        if not why:
            log.info("took over the store %s after waiting %.1fs", paths.root,
                     time.monotonic() - started)
            return lock
        if why != was:
            log.warning("%s; waiting for it to stop before starting", why)
        elif time.monotonic() >= remind:
            log.warning("still waiting: %s", why)
        else:
            continue
        remind = time.monotonic() + WAIT_LOG
    lock.close()
    log.info("stopped while waiting for the store %s", paths.root)
    return None


def serve(config: Config) -> int:
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s, stopping (grace %.0fs)", signal.Signals(signum).name,
                 config.grace_seconds)
        stop.set()

    # Before anything that may wait: a server still waiting for the store stops cleanly.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serving = take_store(config, stop)
    if serving is None:
        return 0
    try:
        plugin = Plugin(config, serving=serving)  # owns the role from here, even if it fails
    except (StrataError, SchemaMismatch) as e:  # the node cannot start as asked: say why
        raise SystemExit(f"strata serve: {e}") from None
    try:
        plugin.start()
        # Everything start-up made (modules, protobuf descriptors, the parts) lives as long
        # as the process: out of the cyclic GC's reach, a full collection walks only what
        # requests made since (24.6 ms -> 0.35 ms with 1,000 publications live: a pause
        # that landed on whichever RPC triggered it).
        gc.freeze()
        log.debug("froze %d start-up objects out of the cyclic garbage collector's walks",
                  gc.get_freeze_count())
    except StrataError as e:
        plugin.stop(0)
        raise SystemExit(f"strata serve: {e}") from None
    except BaseException:
        plugin.stop(0)
        raise
    stop.wait()
    return 0 if plugin.stop() else 1
