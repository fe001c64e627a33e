"""The plugin process: builds the store and services, serves gRPC on unix sockets, and
stops gracefully.

`Plugin` wires the parts (kept apart from `serve()` so tests can build one in-process);
`serve()` blocks until SIGTERM/SIGINT, then lets running RPCs finish within the grace
period and removes its sockets.
"""

import logging
import os
import signal
import stat
import threading
from concurrent import futures

import grpc
from prometheus_client import start_http_server

from csi.config import Config, parse_host_port
from csi.controller import ControllerService
from csi.identity import IdentityService
from csi.image.auth import Keyring
from csi.image.registry import RegistryClient
from csi.image.resolver import Resolver
from csi.interceptors import RpcInterceptor
from csi.locks import StoreUsers
from csi.metrics import Metrics
from csi.mount.syscalls import Mounter
from csi.node import NodeService
from csi.proto import csi_pb2_grpc
from csi.provision import Provisioner
from csi.pulls import Puller
from csi.reconcile import reconcile
from csi.store.blobs import BlobStore
from csi.store.gc import Collector
from csi.store.layers import LayerStore
from csi.store.state import State
from csi.volumes import VolumeManager

log = logging.getLogger(__name__)


def _bind_path(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket from a previous run
        else:
            raise SystemExit(f"{path} exists and is not a socket; refusing to replace it")
    except FileNotFoundError:
        pass


def build_puller(config: Config, state: State, layers: LayerStore,
                 metrics: Metrics | None = None, on_bytes=None) -> Puller:
    """The pull path shared by the server and `strata pull`."""
    def count_bytes(n: int) -> None:
        if metrics is not None:
            metrics.blob_bytes.inc(n)
        if on_bytes is not None:
            on_bytes(n)

    client = RegistryClient(config.registry, on_bytes=count_bytes)
    keyring = Keyring.from_file(config.registry_config) if config.registry_config else None
    blobs = BlobStore(config.root, on_fetch=metrics.on_blob if metrics else None)
    return Puller(state, layers, blobs, client, keyring, tag_ttl=config.tag_ttl,
                  on_pull=metrics.on_pull if metrics else None,
                  layout_roots=config.oci_layout_roots)


class Plugin:
    def __init__(self, config: Config, metrics: Metrics | None = None,
                 mounter: Mounter | None = None):
        self.config = config
        root = config.root
        os.makedirs(root, mode=0o700, exist_ok=True)
        for sub in ("tmp", "layers", "volumes"):
            os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
        self.metrics = metrics or Metrics()
        self.mounter = mounter or Mounter()
        self._users = StoreUsers(root)
        self.state = None
        try:  # a start that fails lets go of the store's lock and database
            self.state = State(os.path.join(root, "state.db"))
            reconcile(root, self.state, self.mounter, alone=self._users.alone())
            self._users.share()
            self.layers = LayerStore(root, self.state, on_unpack=self.metrics.on_unpack)
            self.gc = Collector(self.layers, config.gc, on_collect=self.metrics.on_collect)
            self.puller = build_puller(config, self.state, self.layers, metrics=self.metrics)
            self.volumes = VolumeManager(root, self.state, self.layers, self.mounter,
                                         puller=self.puller, gc=self.gc)
            self.gc.collect()  # released while we were down, or a policy that changed
            self.provisioner = Provisioner(self.state, Resolver(config.oci_layout_roots))
            self.metrics.install_store(self.state, root)
        except BaseException:
            if self.state is not None:
                self.state.close()
            self._users.close()
            raise
        self._servers: list[tuple[grpc.Server, str]] = []
        self._http = None

    def ready(self) -> bool:
        """Probe's answer: the store's database answers and its directories are there."""
        try:
            with self.state.transaction() as tx:
                tx.refcount("")
        except Exception:
            log.exception("probe: the store's database does not answer")
            return False
        return all(os.path.isdir(os.path.join(self.config.root, d))
                   for d in ("tmp", "layers", "volumes"))

    def _server(self) -> grpc.Server:
        # Publishes may wait on pulls (at most 48 at once, see Puller): the rest of the pool
        # keeps Probe, unpublish and stats answering.
        return grpc.server(futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
                           interceptors=[RpcInterceptor(self.metrics)])

    def start(self) -> None:
        cfg = self.config
        same = cfg.controller_endpoint and cfg.controller_socket_path == cfg.socket_path
        has_controller = bool(cfg.controller_endpoint)
        identity = IdentityService(controller=has_controller, ready=self.ready)
        node = self._server()
        csi_pb2_grpc.add_IdentityServicer_to_server(identity, node)
        csi_pb2_grpc.add_NodeServicer_to_server(
            NodeService(self.volumes, cfg.node_id, pull_wait=cfg.pull_wait), node)
        if same:
            csi_pb2_grpc.add_ControllerServicer_to_server(
                ControllerService(self.provisioner), node)
        self._add(node, cfg.socket_path)
        if has_controller and not same:
            ctrl = self._server()
            csi_pb2_grpc.add_IdentityServicer_to_server(identity, ctrl)
            csi_pb2_grpc.add_ControllerServicer_to_server(
                ControllerService(self.provisioner), ctrl)
            self._add(ctrl, cfg.controller_socket_path)
        if cfg.metrics_address:
            host, port = parse_host_port(cfg.metrics_address)
            self._http = start_http_server(port, addr=host, registry=self.metrics.registry)
            log.info("metrics on http://%s/metrics", cfg.metrics_address)

    def _add(self, server: grpc.Server, path: str) -> None:
        _bind_path(path)
        server.add_insecure_port("unix://" + path)
        server.start()
        self._servers.append((server, path))
        log.info("serving CSI on unix://%s", path)

    def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_seconds if grace is None else grace
        events = [server.stop(grace) for server, _ in self._servers]
        for event in events:
            event.wait()
        for _, path in self._servers:
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
        self.state.close()
        self._users.close()
        log.info("stopped")


def serve(config: Config) -> int:
    plugin = Plugin(config)
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s, stopping (grace %.0fs)", signal.Signals(signum).name,
                 config.grace_seconds)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    plugin.start()
    stop.wait()
    plugin.stop()
    return 0
