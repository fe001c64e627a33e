"""The plugin process: the CSI services on unix sockets, metrics over HTTP, and a graceful
stop.

`Plugin` takes its parts from the composition root (compose.node) and adds the gRPC
services (kept apart from `serve()` so tests can build one in-process); `serve()` blocks
until SIGTERM/SIGINT, then lets running RPCs finish within the grace period and removes
its sockets.
"""

import logging
import os
import signal
import stat
import threading
from concurrent import futures

import grpc
from prometheus_client import start_http_server

from csi import compose
from csi.config import Config, parse_host_port
from csi.controller import ControllerService
from csi.identity import IdentityService
from csi.interceptors import RpcInterceptor
from csi.metrics import Metrics
from csi.mount.features import Features
from csi.mount.syscalls import Mounter
from csi.node import NodeService
from csi.proto import csi_pb2_grpc

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


class Plugin:
    def __init__(self, config: Config, metrics: Metrics | None = None,
                 mounter: Mounter | None = None, features: Features | None = None):
        self.config = config
        self.parts = compose.node(config, metrics, mounter, features)
        self.state = self.parts.state
        self.metrics = self.parts.metrics
        self.mounter = self.parts.mounter
        self.volumes = self.parts.volumes
        self.gc = self.parts.gc
        self._servers: list[tuple[grpc.Server, str]] = []
        self._http = None

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
                ControllerService(self.parts.provisioner), node)
        self._add(node, cfg.socket_path)
        if has_controller and not same:
            ctrl = self._server()
            csi_pb2_grpc.add_IdentityServicer_to_server(identity, ctrl)
            csi_pb2_grpc.add_ControllerServicer_to_server(
                ControllerService(self.parts.provisioner), ctrl)
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
        self.parts.close()
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
