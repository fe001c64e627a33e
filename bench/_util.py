"""Helpers the benchmarks share."""

import os
import signal
import socket
import subprocess
import sys
import time

import grpc

from csi.proto import csi_pb2, csi_pb2_grpc

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def drop_caches() -> None:
    """Cold runs start from an empty page cache (PERFORMANCE.md); needs root."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def terminate(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM `proc` if it still runs, and SIGKILL it after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Strata:
    """A real `strata serve` on the store `root`, called over its unix socket `sock` as a
    kubelet calls it; its output in `log`. It sees none of the machine's STRATA_* settings
    nor /etc/strata/config.yaml: only `args`. Ready once Probe says so; a server that exits
    or takes longer than `startup` seconds is a RuntimeError with its log's tail."""

    def __init__(self, sock: str, root: str, log: str, *args: str,
                 log_level: str = "WARNING", startup: float = 60.0):
        self.sock, self.log = sock, log
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
        env["STRATA_CONFIG"] = ""
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "csi", "serve", "--endpoint", f"unix://{sock}",
                 "--root", root, "--node-id", "bench", "--log-level", log_level, *args],
                stdout=out, stderr=out, cwd=HERE, env=env, start_new_session=True)
        self.channel = None
        try:
            deadline = time.monotonic() + startup
            while not self._answers():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"strata serve did not start (exit "
                                       f"{self.proc.poll()}):\n{self.tail()}")
                time.sleep(0.05)
            self.node = csi_pb2_grpc.NodeStub(self.channel)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if not os.path.exists(self.sock):
            return False
        if self.channel is None:
            self.channel = grpc.insecure_channel(f"unix://{self.sock}")
        try:
            r = csi_pb2_grpc.IdentityStub(self.channel).Probe(csi_pb2.ProbeRequest(),
                                                               timeout=2)
        except grpc.RpcError:
            return False
        return not r.HasField("ready") or r.ready.value

    def tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def publish(self, vid: str, target: str, image: str) -> float:
        """Seconds an inline ephemeral NodePublishVolume of `image` at `target` took."""
        cap = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))
        t0 = time.perf_counter()
        self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, target_path=target, volume_capability=cap,
            volume_context={"image": image, "csi.storage.k8s.io/ephemeral": "true"}),
            timeout=600)
        return time.perf_counter() - t0

    def unpublish(self, vid: str, target: str) -> float:
        t0 = time.perf_counter()
        self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=target), timeout=600)
        return time.perf_counter() - t0

    def stop(self, grace: float = 60.0) -> None:
        if self.channel is not None:
            self.channel.close()
        terminate(self.proc, grace)


class NoopServer:
    """bench/_noop_server.py in its own process, as strata serve runs: `node` is its
    Node stub over `sock`, its output in `log`. A RuntimeError with the log's tail when it
    does not answer within `startup` seconds."""

    def __init__(self, sock: str, log: str, startup: float = 30.0):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "bench._noop_server", sock],
                                         cwd=HERE, start_new_session=True,
                                         stdout=out, stderr=out)
        self.channel = grpc.insecure_channel(f"unix://{sock}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=startup)
        except grpc.FutureTimeoutError:
            self.stop()
            with open(log, errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"bench/_noop_server.py did not answer:\n{tail}") from None
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        terminate(self.proc, 10)
