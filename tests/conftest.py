"""Shared fixtures: test images (built once per session), a real `strata serve` process on
real unix sockets, and clean-up that unmounts whatever a test left, even when it failed."""

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

import grpc
import pytest

from csi.image.build import LayerBuilder, write_image
from csi.mount.mountinfo import MountTable
from csi.mount.syscalls import Mounter
from csi.proto import csi_pb2, csi_pb2_grpc

# No test, nor a server it starts, reads this machine's /etc/strata/config.yaml.
os.environ["STRATA_CONFIG"] = ""

ROOT_REASON = "needs root: real overlayfs mounts, mknod and trusted.* xattrs"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

Mode = csi_pb2.VolumeCapability.AccessMode.Mode


def needs_tools(*tools: str) -> pytest.MarkDecorator:
    """Skip where one of `tools` is missing on a developer's machine; in CI (.ci/run sets
    CI and installs them) a missing tool fails the test instead of hiding it."""
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing) and not os.environ.get("CI"),
                              reason=f"missing {', '.join(missing)} (.ci/run installs them)")


def unmount_all_under(path: str) -> list[str]:
    """Unmount every mount at or below `path`, deepest first; returns what was unmounted."""
    table = MountTable()
    mounter = Mounter(table)
    left = sorted({m.mount_point for m in table.under(path)}, key=len, reverse=True)
    for mp in left:
        try:
            mounter.unmount(mp)
        except OSError:
            subprocess.run(["umount", "-l", mp], check=False)
    return left


def mount_cap(mode=Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


# -- images --------------------------------------------------------------------------------
STDLIB = sysconfig.get_paths()["stdlib"]


def base_layer() -> LayerBuilder:
    """Real files (a copy of Python's json package) plus every entry kind that matters."""
    b = LayerBuilder()
    for d in ("etc", "usr", "usr/bin", "usr/lib", "var", "var/cache", "data"):
        b.dir(d)
    b.file("etc/motd", "base motd\n")
    b.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    b.tree(os.path.join(STDLIB, "json"), "usr/lib/python3/json")
    b.file("usr/bin/tool", "#!/bin/sh\necho tool\n", mode=0o755, uid=1000, gid=1000)
    b.symlink("usr/bin/tool-link", "tool")
    b.hardlink("usr/bin/tool-hard", "usr/bin/tool")
    b.file("usr/bin/su", "setuid", mode=0o4755)
    b.file("var/cache/old1", "old cache 1\n")
    b.file("var/cache/old2", "old cache 2\n")
    b.file("data/tagged", "xattr here\n", xattrs={"user.strata": "hello"})
    b.file("data/big", random.Random(7).randbytes(256 * 1024))  # same bytes → same DiffID
    return b


def app_layer() -> LayerBuilder:
    a = LayerBuilder()
    a.file("etc/motd", "app motd\n")
    a.whiteout("usr/lib/python3/json/tool.py")
    a.opaque("var/cache")
    a.file("var/cache/new", "new cache\n")
    a.dir("srv")
    a.file("srv/index.html", "<h1>hello</h1>\n")
    return a


class Images:
    def __init__(self, root):
        self.root = root
        layout = os.path.join(root, "layout")
        write_image(layout, "app", [base_layer(), app_layer()])
        write_image(layout, "base", [base_layer()])
        other = LayerBuilder().file("opt/other.txt", "another image on the same base\n")
        write_image(layout, "other", [base_layer(), other])
        write_image(layout, "plain", [base_layer(), app_layer()], compression="none")
        write_image(layout, "zstd", [base_layer(), app_layer()], compression="zstd")
        self.app = f"oci:{layout}:app"
        self.base = f"oci:{layout}:base"
        self.other = f"oci:{layout}:other"
        self.plain = f"oci:{layout}:plain"
        self.zstd = f"oci:{layout}:zstd"
        # A layout whose top layer blob has one byte flipped (digest mismatch). That layer
        # is unique to it: a store that already holds a layer by DiffID never reads its
        # blob again, so corrupting the shared base would prove nothing.
        corrupt = os.path.join(root, "corrupt")
        write_image(corrupt, "bad", [base_layer(),
                                     LayerBuilder().file("x", os.urandom(5000).hex())])
        with open(os.path.join(corrupt, "index.json")) as f:
            manifest = json.load(f)["manifests"][0]["digest"]
        with open(os.path.join(corrupt, "blobs", *manifest.split(":"))) as f:
            top = json.load(f)["layers"][-1]["digest"]
        path = os.path.join(corrupt, "blobs", *top.split(":"))
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        self.corrupt = f"oci:{corrupt}:bad"


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Images:
    return Images(str(tmp_path_factory.mktemp("images")))


# -- the plugin process ---------------------------------------------------------------------
class Csi:
    """gRPC stubs over the plugin's real unix sockets."""

    def __init__(self, node_sock: str, ctrl_sock: str):
        self._channels = [grpc.insecure_channel(f"unix://{node_sock}"),
                          grpc.insecure_channel(f"unix://{ctrl_sock}")]
        self.identity = csi_pb2_grpc.IdentityStub(self._channels[0])
        self.node = csi_pb2_grpc.NodeStub(self._channels[0])
        self.controller = csi_pb2_grpc.ControllerStub(self._channels[1])

    def publish(self, volume_id: str, target: str, image: str = "", readonly=False,
                mode=Mode.SINGLE_NODE_WRITER, staging: str = "", ephemeral=True, **ctx):
        context = dict(ctx)
        if image:
            context["image"] = image
        if ephemeral and not staging:
            context["csi.storage.k8s.io/ephemeral"] = "true"
        return self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=str(target), readonly=readonly,
            staging_target_path=str(staging), volume_capability=mount_cap(mode),
            volume_context=context), timeout=60)

    def unpublish(self, volume_id: str, target: str):
        return self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=str(target)), timeout=60)

    def stage(self, volume_id: str, staging: str, image: str, mode=Mode.SINGLE_NODE_WRITER):
        return self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging),
            volume_capability=mount_cap(mode), volume_context={"image": image}), timeout=60)

    def unstage(self, volume_id: str, staging: str):
        return self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging)), timeout=60)

    def close(self):
        for c in self._channels:
            c.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """The plugin's /metrics as {sample name with labels: value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def read_text(path: str) -> str:
    """A log file's text; empty before the process wrote one."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


class StrataProcess:
    """`strata serve` as a child process with node and controller sockets."""

    def __init__(self, base: str, metrics_port: int = 0, extra_args: tuple[str, ...] = (),
                 root: str = ""):
        self.base = base
        self.root = root or os.path.join(base, "store")
        self.extra_args = list(extra_args)
        self.node_sock = os.path.join(base, "node.sock")
        self.ctrl_sock = os.path.join(base, "controller.sock")
        self.log = os.path.join(base, "serve.log")
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen | None = None
        self.csi: Csi | None = None

    def start(self, timeout: float = 30) -> "StrataProcess":
        return self.launch().ready(timeout)

    def launch(self) -> "StrataProcess":
        """Start the process without waiting for it to serve (it may wait for the store)."""
        args = [sys.executable, "-m", "csi", "serve", "--endpoint", f"unix://{self.node_sock}",
                "--controller-endpoint", f"unix://{self.ctrl_sock}", "--root", self.root,
                "--node-id", "test-node", "--log-level", "DEBUG", "--grace-seconds", "5"]
        if self.metrics_port:
            args += ["--metrics-address", f"127.0.0.1:{self.metrics_port}"]
        args += self.extra_args
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        return self

    def ready(self, timeout: float = 30) -> "StrataProcess":
        """Wait until the launched process serves on both sockets and connect to them."""
        deadline = time.monotonic() + timeout
        while not (os.path.exists(self.node_sock) and os.path.exists(self.ctrl_sock)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"strata serve failed to start:\n{self.read_log()}")
            time.sleep(0.02)
        self.csi = Csi(self.node_sock, self.ctrl_sock)
        grpc.channel_ready_future(self.csi._channels[0]).result(timeout=timeout)
        return self

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.csi is not None:
            self.csi.close()
            self.csi = None
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def read_log(self) -> str:
        return read_text(self.log)


@pytest.fixture(scope="session")
def strata(tmp_path_factory):
    """One plugin process for the session: tests use unique volume IDs and targets."""
    if os.geteuid() != 0:
        pytest.skip(ROOT_REASON)
    base = str(tmp_path_factory.mktemp("strata"))
    proc = StrataProcess(base).start()
    try:
        yield proc
    finally:
        proc.stop()
        unmount_all_under(base)


@pytest.fixture
def csi(strata) -> Csi:
    return strata.csi


@pytest.fixture
def pods(tmp_path):
    """A per-test directory for targets; anything still mounted below it is unmounted after
    the test, pass or fail, and reported as a failure of the test's own clean-up."""
    yield tmp_path
    left = unmount_all_under(str(tmp_path))
    assert not left, f"test left mounts behind: {left}"


@contextlib.contextmanager
def strata_servers(base):
    """`start(*args, **kw)`: a new real `strata serve` under `base` (p0, p1, …), with
    `args` after its usual ones; every one started is killed at the end, and whatever is
    mounted under `base` unmounted, even when the test failed."""
    started = []

    def start(*args, **kw):
        p = StrataProcess(str(base / f"p{len(started)}"), extra_args=tuple(args), **kw)
        os.makedirs(p.base)
        started.append(p)
        return p.start()

    try:
        yield start
    finally:
        for p in started:
            p.stop(signal.SIGKILL)
        unmount_all_under(str(base))


@pytest.fixture(scope="session")
def store_filesystems(tmp_path_factory):
    """A loop-mounted ext4, XFS (reflink=1) and btrfs (tests/storefs.py), made once per
    session and unmounted at its end whatever happened; tests make directories of their
    own names in them (a store root each)."""
    from tests.storefs import make_stores

    if os.geteuid() != 0:
        pytest.skip("needs root: loop-mounted filesystems")
    base = tmp_path_factory.mktemp("store-fs")
    try:
        yield make_stores(base)
    finally:
        unmount_all_under(str(base))


# -- every backend ---------------------------------------------------------------------------
# The storage backends the behaviour tests run against (`--backend`). A test that asks for
# the `backend` fixture runs once per backend, its ID naming it (test_x[btrfs]); one marked
# `overlay_only(reason)` checks overlay's internals (its upper dir, whiteout devices, mount
# options) and runs on overlay alone. A backend this machine cannot run (no btrfs) skips
# with the reason, and the end of the run says so per backend (pytest_terminal_summary).
BACKENDS = ("overlay", "btrfs")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "overlay_only(reason): checks overlay's internals; runs on the overlay "
                   "backend only (the reason says why the others have no such thing)")


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    only = metafunc.definition.get_closest_marker("overlay_only")
    if only is not None:
        assert only.args and only.args[0].strip(), \
            f"{metafunc.definition.nodeid}: overlay_only needs a reason"
    names = ["overlay"] if only is not None else list(BACKENDS)
    metafunc.parametrize("backend", names, indirect=True, ids=names)


def pytest_collection_modifyitems(config, items):
    config.stash[_BACKEND_OF] = {
        item.nodeid: item.callspec.params["backend"] for item in items
        if hasattr(item, "callspec") and "backend" in item.callspec.params}


_BACKEND_OF = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, config):
    """One line per backend: how many parametrised tests ran on it, and which were skipped
    and why (a backend the machine cannot run)."""
    backend_of = config.stash.get(_BACKEND_OF, {})
    if not backend_of:
        return
    tally: dict[str, dict[str, int]] = {b: {} for b in BACKENDS}
    reasons: dict[str, set[str]] = {b: set() for b in BACKENDS}
    for outcome in ("passed", "failed", "skipped", "error", "xfailed", "xpassed"):
        for rep in terminalreporter.stats.get(outcome, []):
            name = backend_of.get(getattr(rep, "nodeid", ""))
            if name is None or (outcome in ("passed", "failed") and rep.when != "call"):
                continue
            tally[name][outcome] = tally[name].get(outcome, 0) + 1
            if outcome == "skipped" and isinstance(rep.longrepr, tuple):
                reasons[name].add(rep.longrepr[2].removeprefix("Skipped: "))
    if not any(tally.values()):
        return  # nothing ran (--collect-only, or all deselected)
    terminalreporter.section("storage backends")
    for name in BACKENDS:
        counts = ", ".join(f"{n} {o}" for o, n in sorted(tally[name].items())) or "no tests"
        line = f"{name}: {counts}"
        if reasons[name]:
            line += " -- skipped because: " + "; ".join(sorted(reasons[name]))
        terminalreporter.write_line(line)


@dataclasses.dataclass(frozen=True)
class StoreBackend:
    """A backend to run `strata serve` with, and where its stores go: overlay's in the
    test's own directory (as every other test's), btrfs's in a fresh directory on the
    session's loop-mounted btrfs (`fs_root`)."""

    name: str
    fs_root: str = ""

    def root(self, base: str) -> str:
        """A new store root for a server under `base`."""
        if not self.fs_root:
            return os.path.join(base, "store")
        return tempfile.mkdtemp(prefix="store-", dir=self.fs_root)

    def args(self) -> tuple[str, ...]:
        return ("--backend", self.name) if self.name != "overlay" else ()

    def process(self, base: str, extra_args: tuple[str, ...] = (), **kw) -> StrataProcess:
        return StrataProcess(base, root=self.root(base), extra_args=self.args() + extra_args,
                             **kw)

    def written(self, root: str, key: str) -> str:
        """Where publication `key`'s writes can be read from the store, mounted or not:
        each backend's documented layout (overlay: its upper dir; btrfs: its snapshot)."""
        part = "upper" if self.name == "overlay" else "fs"
        return os.path.join(root, "volumes", key, part)

    def wipe(self, root: str) -> None:
        """Delete a store made on the shared filesystem, once nothing of it is mounted:
        its subvolumes by ioctl (rmtree cannot delete a read-only chain), then the rest.
        Overlay's stores go with the test's tmp dir."""
        if not self.fs_root or not os.path.isdir(root):
            return
        from csi.mount import btrfs

        for top, dirs, _ in os.walk(root):
            for d in list(dirs):
                path = os.path.join(top, d)
                if btrfs.is_subvolume(path):
                    btrfs.delete(path)
                    dirs.remove(d)
        shutil.rmtree(root)


@pytest.fixture(scope="session")
def backend(request) -> StoreBackend:
    """The backend of this test's parameter (see BACKENDS); skips, saying why, where this
    machine cannot run it."""
    if os.geteuid() != 0:
        pytest.skip(ROOT_REASON)
    if request.param == "overlay":
        return StoreBackend("overlay")
    from tests.storefs import store_fs

    fs = store_fs(request.getfixturevalue("store_filesystems"), request.param)
    return StoreBackend(request.param, fs.root)


@pytest.fixture(scope="session")
def served(backend, request, tmp_path_factory) -> StrataProcess:
    """The backend's session-wide plugin process (overlay's is `strata`): tests use unique
    volume IDs and targets."""
    if backend.name == "overlay":
        yield request.getfixturevalue("strata")
        return
    base = str(tmp_path_factory.mktemp(f"strata-{backend.name}"))
    proc = backend.process(base)
    try:
        yield proc.start()
    finally:
        proc.stop()
        unmount_all_under(base)
        backend.wipe(proc.root)


@pytest.fixture
def new_server(backend, tmp_path):
    """`new(name="", *extra_args, metrics=False)`: a `strata serve` on this test's backend
    under tmp_path/name (not started). Every one made is killed at the end, whatever is
    mounted under tmp_path unmounted and its store wiped, even when the test failed."""
    made: list[StrataProcess] = []

    def new(name: str = "", *extra_args: str, metrics: bool = False) -> StrataProcess:
        base = tmp_path / name if name else tmp_path
        base.mkdir(exist_ok=True)
        p = backend.process(str(base), extra_args=extra_args,
                            metrics_port=free_port() if metrics else 0)
        made.append(p)
        return p

    try:
        yield new
    finally:
        for p in made:
            p.stop(signal.SIGKILL)
        unmount_all_under(str(tmp_path))
        for p in made:
            backend.wipe(p.root)


@pytest.fixture
def server(new_server) -> StrataProcess:
    """A `strata serve` of this test's own on its backend, with metrics, started."""
    return new_server(metrics=True).start()
