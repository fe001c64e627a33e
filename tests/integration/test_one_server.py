"""One server per store, never two on a socket (issue 9, item 3), with real `strata serve`
processes: a second server on a store waits for the first (its start-up repairs included)
or, with --no-wait, exits with a message; a socket someone accepts connections on is never
taken over, and a server waits for it too; a stale one is taken over; and the first server
keeps answering whatever the second did.

The release before the serving role (OLD_RELEASE, schema v4) takes no serve.lock: a server
of this release started beside one of it (a maxSurge upgrade) waits on its sockets, or on
its use of the store, and neither migrates the database nor repairs under it. And a
stopping server keeps the store until its RPC handlers have returned, even past the
grace period: a handler blocked on a FIFO for index.json stands for a slow pull."""

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from csi import compose
from csi.config import Config
from csi.locks import ServeLock, StoreServed, StoreUsers
from csi.mount.features import Features
from csi.mount.mountinfo import MountTable
from csi.paths import StorePaths
from csi.proto import csi_pb2
from csi.store.state import SCHEMA_VERSION, SchemaMismatch, schema_version
from tests.conftest import ROOT_REASON, Csi, StrataProcess, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

WAITING = "waiting for it to stop"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OLD_RELEASE = "1dae3f6"  # the last commit before the serving role and schema v5
OLD_SCHEMA = 4


class OldStrataProcess(StrataProcess):
    """`strata serve` of the package at `code` (an earlier release), not of this tree."""

    def __init__(self, base: str, code: str, **kwargs):
        super().__init__(base, **kwargs)
        self.code = code

    def launch(self) -> "OldStrataProcess":
        args = [sys.executable, "-m", "csi", "serve", "--endpoint", f"unix://{self.node_sock}",
                "--controller-endpoint", f"unix://{self.ctrl_sock}", "--root", self.root,
                "--node-id", "test-node", "--log-level", "DEBUG", "--grace-seconds", "5",
                *self.extra_args]
        # `python -m` puts the working directory first on sys.path: run it from its code.
        env = dict(os.environ, PYTHONPATH=self.code)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.code)
        return self


@pytest.fixture(scope="session")
def old_release(tmp_path_factory) -> str:
    """The `csi` package of OLD_RELEASE, unpacked from this clone's history."""
    found = subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{OLD_RELEASE}^{{commit}}"],
                           capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {OLD_RELEASE} (the release before the serving role) is not in "
                    "this clone")
    dest = str(tmp_path_factory.mktemp("old-release"))
    archive = subprocess.run(["git", "-C", REPO, "archive", OLD_RELEASE, "csi"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


@pytest.fixture
def procs(tmp_path):
    """StrataProcess(NAME, root=...) makers; every one is stopped, and everything mounted
    under tmp_path unmounted, whatever the test did. `code`: run an earlier release."""
    made: list[StrataProcess] = []

    def make(name: str, root: str = "", extra_args: tuple[str, ...] = (),
             code: str = "") -> StrataProcess:
        base = tmp_path / name
        base.mkdir()
        if code:
            p = OldStrataProcess(str(base), code, root=root, extra_args=extra_args)
        else:
            p = StrataProcess(str(base), root=root, extra_args=extra_args)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            p.stop(signal.SIGKILL)
        unmount_all_under(str(tmp_path))


def wait_for_log(proc: StrataProcess, text: str, timeout: float = 60) -> str:
    """The process's log once it says `text` (the deadline only guards against a hang)."""
    deadline = time.monotonic() + timeout
    while text not in (log := proc.read_log()):
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{log}"
        time.sleep(0.05)
    return log


def exited(proc: StrataProcess, timeout: float = 60) -> tuple[int, str]:
    rc = proc.proc.wait(timeout=timeout)
    proc.proc = None
    return rc, proc.read_log()


def answers(node_sock: str) -> bool:
    """A fresh connection's Probe: the server at this path serves."""
    csi = Csi(node_sock, node_sock)
    try:
        return csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
    finally:
        csi.close()


def inode(path: str) -> int:
    return os.lstat(path).st_ino


def role_held(root: str) -> bool:
    """Whether a process holds the store's serving role, asked without taking it."""
    fd = os.open(StorePaths(root).serve_lock, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def same_sockets(proc: StrataProcess, as_: StrataProcess) -> StrataProcess:
    proc.node_sock, proc.ctrl_sock = as_.node_sock, as_.ctrl_sock
    return proc


def test_a_second_server_on_the_store_waits_and_takes_over_when_the_first_stops(
        procs, tmp_path, images):
    first = procs("first").start()
    target = tmp_path / "pod"
    first.csi.publish("one-server", target, images.app)
    (target / "written").write_text("by the pod\n")
    # Start-up empties tmp/: while this survives, the second server's repairs have not run.
    leftover = os.path.join(first.root, "tmp", "leftover")
    os.mkdir(leftover)

    second = procs("second", root=first.root).launch()
    log = wait_for_log(second, WAITING)
    assert f"pid {first.proc.pid} on host {socket.gethostname()}" in log
    assert second.proc.poll() is None
    assert not os.path.exists(second.node_sock) and not os.path.exists(second.ctrl_sock)
    assert os.path.isdir(leftover), "start-up repairs ran beside a live server"
    assert answers(first.node_sock)
    first.csi.publish("while-waiting", tmp_path / "pod2", images.app)  # it serves fully
    first.csi.unpublish("while-waiting", tmp_path / "pod2")

    assert first.stop(signal.SIGTERM) == 0
    second.ready()
    assert "took over the store" in second.read_log()
    assert not os.path.exists(leftover), "the new server repairs the store once it holds it"
    # The first server's publication, its mount and what the pod wrote are all there.
    assert len(MountTable().at(str(target))) == 1
    assert (target / "written").read_text() == "by the pod\n"
    assert "no publication records" not in second.read_log()
    assert "lost its mount" not in second.read_log()
    second.csi.publish("one-server", target, images.app)  # the kubelet's retry: already
    assert "already published" in second.read_log()
    second.csi.unpublish("one-server", target)
    assert not target.exists()
    assert os.listdir(os.path.join(second.root, "volumes")) == []


def test_no_wait_exits_with_a_message_and_leaves_the_first_server_alone(procs):
    first = procs("first").start()
    sock = inode(first.node_sock)
    second = procs("second", root=first.root, extra_args=("--no-wait",)).launch()
    rc, log = exited(second)
    assert rc == 1
    assert f"another strata server (pid {first.proc.pid}" in log
    assert f"serves the store {first.root}; not waiting for it (--no-wait)" in log
    assert not os.path.exists(second.node_sock) and not os.path.exists(second.ctrl_sock)
    assert inode(first.node_sock) == sock
    assert answers(first.node_sock) and first.csi.identity.Probe(
        csi_pb2.ProbeRequest(), timeout=10).ready.value


def test_sigterm_while_waiting_exits_cleanly_without_touching_the_store(procs):
    first = procs("first").start()
    second = procs("second", root=first.root).launch()
    wait_for_log(second, WAITING)
    second.proc.send_signal(signal.SIGTERM)
    rc, log = exited(second)
    assert rc == 0
    assert "stopped while waiting for the store" in log
    assert "probed overlayfs" not in log, "a waiting server must not start up"
    assert answers(first.node_sock)


def test_a_live_socket_of_a_server_on_another_root_is_refused_with_no_wait(procs):
    first = procs("first").start()
    sock = inode(first.node_sock)
    other = same_sockets(procs("other", extra_args=("--no-wait",)), first)  # its own store
    other.launch()
    rc, log = exited(other)
    assert rc == 1
    assert f"{first.node_sock}: a process accepts connections on it" in log
    assert "not waiting for it (--no-wait)" in log
    assert "probed overlayfs" not in log, "refused before opening its store"
    assert inode(first.node_sock) == sock, "a live socket must never be unlinked"
    assert answers(first.node_sock)
    first.stop(signal.SIGTERM)  # and the first still removes its own socket at the end
    assert not os.path.exists(first.node_sock)


def test_a_server_waits_while_its_socket_is_live_and_starts_once_it_is_free(procs):
    first = procs("first").start()
    sock = inode(first.node_sock)
    other = same_sockets(procs("other"), first)  # another store, the same sockets
    other.launch()
    log = wait_for_log(other, WAITING)
    assert f"{first.node_sock}: a process accepts connections on it" in log
    assert "probed overlayfs" not in log, "a waiting server must not open its store"
    assert other.proc.poll() is None
    assert inode(first.node_sock) == sock, "a live socket must never be unlinked"
    assert answers(first.node_sock)
    assert first.stop(signal.SIGTERM) == 0
    other.ready()
    assert "took over the store" in other.read_log()
    assert answers(other.node_sock)


def test_a_socket_nobody_listens_on_is_replaced(procs):
    proc = procs("stale")
    for path in (proc.node_sock, proc.ctrl_sock):  # left by a crashed run
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
    proc.start()
    assert "removing stale socket" in proc.read_log()
    assert answers(proc.node_sock)


def test_tools_work_beside_a_server(procs):
    first = procs("first").start()
    for args in (["gc"], ["ls"], ["df"]):
        r = subprocess.run([sys.executable, "-m", "csi", *args, "--root", first.root],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (args, r.stderr)
    assert answers(first.node_sock)


def test_serve_help_names_no_wait():
    r = subprocess.run([sys.executable, "-m", "csi", "serve", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--no-wait" in r.stdout and "STRATA_NO_WAIT" in r.stdout


def test_the_composition_root_refuses_a_served_store_before_any_repair(tmp_path):
    paths = StorePaths(str(tmp_path / "store")).make()
    config = Config(root=paths.root, node_id="t")
    leftover = os.path.join(paths.tmp, "leftover")
    os.mkdir(leftover)
    held = ServeLock(paths.serve_lock)
    assert held.try_take()
    try:
        with pytest.raises(StoreServed, match=f"pid {os.getpid()} on host"):
            compose.node(config, features=Features())
        assert os.path.isdir(leftover), "start-up repairs ran beside a live server"
    finally:
        held.close()
    parts = compose.node(config, features=Features())
    try:
        assert not os.path.exists(leftover)
        with pytest.raises(StoreServed):  # held now by the parts, until they close
            compose.node(config, features=Features())
    finally:
        parts.close()
    compose.node(config, features=Features()).close()


# -- beside a server of the release before the serving role -----------------------------------
def test_an_upgrade_beside_an_old_release_server_waits_for_it_and_leaves_it_serving(
        procs, tmp_path, images, old_release):
    """A maxSurge roll from OLD_RELEASE: the new server, on the same store and sockets,
    waits for the old one, which keeps publishing on its schema; once it stops the new one
    migrates, repairs and takes over its publication."""
    old = procs("old", code=old_release).start()
    target = tmp_path / "pod"
    old.csi.publish("old-pod", target, images.app)
    (target / "written").write_text("by the pod\n")
    db = StorePaths(old.root).state_db
    assert schema_version(db) == OLD_SCHEMA
    leftover = os.path.join(old.root, "tmp", "leftover")
    os.mkdir(leftover)

    new = same_sockets(procs("new", root=old.root), old).launch()
    log = wait_for_log(new, WAITING)
    assert f"{old.node_sock}: a process accepts connections on it" in log
    assert new.proc.poll() is None
    assert "probed overlayfs" not in log, "a waiting server must not open the store"
    assert schema_version(db) == OLD_SCHEMA, "migrated under a live old server"
    assert os.path.isdir(leftover), "start-up repairs ran beside a live server"
    # The old server serves fully meanwhile: a write on its schema, and a teardown.
    old.csi.publish("while-waiting", tmp_path / "pod2", images.app)
    old.csi.unpublish("while-waiting", tmp_path / "pod2")

    assert old.stop(signal.SIGTERM) == 0
    new.ready()
    log = new.read_log()
    assert "took over the store" in log
    assert schema_version(db) == SCHEMA_VERSION
    assert not os.path.exists(leftover)
    assert len(MountTable().at(str(target))) == 1
    assert (target / "written").read_text() == "by the pod\n"
    assert "no publication records" not in log and "lost its mount" not in log
    new.csi.publish("old-pod", target, images.app)  # the kubelet's retry: already
    assert "already published" in new.read_log()
    new.csi.unpublish("old-pod", target)
    assert not target.exists()
    assert os.listdir(os.path.join(new.root, "volumes")) == []


def test_no_wait_beside_an_old_release_server_exits_and_leaves_it_alone(
        procs, tmp_path, images, old_release):
    old = procs("old", code=old_release).start()
    new = same_sockets(procs("new", root=old.root, extra_args=("--no-wait",)), old).launch()
    rc, log = exited(new)
    assert rc == 1
    assert f"{old.node_sock}: a process accepts connections on it" in log
    assert "not waiting for it (--no-wait)" in log
    assert schema_version(StorePaths(old.root).state_db) == OLD_SCHEMA
    old.csi.publish("after", tmp_path / "pod", images.app)
    old.csi.unpublish("after", tmp_path / "pod")


def test_an_old_release_server_on_other_sockets_keeps_the_schema_until_it_stops(
        procs, tmp_path, images, old_release):
    """Its sockets tell nothing here; its shared hold on store.lock does: the database is
    neither upgraded nor the store repaired while it runs."""
    old = procs("old", code=old_release).start()
    db = StorePaths(old.root).state_db
    new = procs("new", root=old.root).launch()  # sockets of its own
    log = wait_for_log(new, WAITING)
    assert f"{db} needs an upgrade from schema version {OLD_SCHEMA} to {SCHEMA_VERSION}" in log
    assert "another process uses the store" in log
    assert schema_version(db) == OLD_SCHEMA
    assert not os.path.exists(new.node_sock)
    old.csi.publish("while-waiting", tmp_path / "pod", images.app)
    old.csi.unpublish("while-waiting", tmp_path / "pod")
    assert old.stop(signal.SIGTERM) == 0
    new.ready()
    assert schema_version(db) == SCHEMA_VERSION
    assert answers(new.node_sock)


def test_the_composition_root_never_migrates_beside_another_user_of_the_store(
        tmp_path, images, old_release):
    """compose.node, called with the role but while another process uses a store of the
    old schema (one that came in after serve() checked): a clear error, nothing touched."""
    root = str(tmp_path / "store")
    r = subprocess.run([sys.executable, "-m", "csi", "pull", images.base, "--root", root],
                       cwd=old_release,
                       env=dict(os.environ, PYTHONPATH=old_release), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    paths = StorePaths(root)
    assert schema_version(paths.state_db) == OLD_SCHEMA
    leftover = os.path.join(paths.tmp, "leftover")
    os.mkdir(leftover)
    config = Config(root=root, node_id="t")
    other = StoreUsers(paths.store_lock).share()  # an old server, or a `strata pull`
    try:
        assert "another process uses the store" in compose.upgrade_blocked(config)
        with pytest.raises(SchemaMismatch, match="start again once it has stopped"):
            compose.node(config, features=Features())
        assert schema_version(paths.state_db) == OLD_SCHEMA
        assert os.path.isdir(leftover)
        assert not role_held(root), "a failed start lets go of the role"
    finally:
        other.close()
    assert compose.upgrade_blocked(config) == ""
    parts = compose.node(config, features=Features())
    try:
        assert schema_version(paths.state_db) == SCHEMA_VERSION
        assert not os.path.exists(leftover)
    finally:
        parts.close()


# -- a stopping server keeps the store while its handlers run ---------------------------------
@pytest.fixture
def slow_image(tmp_path, images):
    """(image, release): images.app from a layout whose index.json is a FIFO, so that a
    publish of it blocks in its handler until release() writes the index."""
    src = images.app.split(":")[1]
    layout = tmp_path / "slow-layout"
    layout.mkdir()
    shutil.copy(os.path.join(src, "oci-layout"), layout / "oci-layout")
    os.symlink(os.path.join(src, "blobs"), layout / "blobs")
    with open(os.path.join(src, "index.json"), "rb") as f:
        index = f.read()
    fifo = str(layout / "index.json")
    os.mkfifo(fifo)
    fed = threading.Event()

    def release(timeout: float = 60) -> None:
        """Write the index to the reader blocked on the FIFO (there is one: a publish)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                break
            except OSError as e:  # ENXIO: nobody has it open for reading yet
                assert time.monotonic() < deadline, f"nobody reads {fifo}: {e}"
                time.sleep(0.05)
        try:
            os.set_blocking(fd, True)
            os.write(fd, index)
        finally:
            os.close(fd)
        fed.set()

    yield f"oci:{layout}:app", release
    if not fed.is_set():  # a failed test: unblock a reader that may still wait
        with contextlib.suppress(AssertionError):
            release(timeout=0)


def publish_in_background(proc: StrataProcess, volume_id: str, target, image: str):
    """The publish runs on a thread; its outcome (response or gRPC error) in `result`."""
    result: list = []

    def call():
        try:
            result.append(proc.csi.publish(volume_id, target, image))
        except grpc.RpcError as e:
            result.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    wait_for_log(proc, f'NodePublishVolume: volume_id: "{volume_id}"')
    return thread, result


STILL_RUN = "the RPC handlers that still run before letting go of the store"
KEPT = "keeping the store locked until this process exits"


def test_a_stopping_server_lets_go_of_the_store_only_after_its_handlers_return(
        procs, tmp_path, slow_image):
    image, release = slow_image
    first = procs("first", extra_args=("--grace-seconds", "1")).start()
    target = tmp_path / "pod"
    thread, result = publish_in_background(first, "slow", target, image)
    second = procs("second", root=first.root).launch()
    wait_for_log(second, WAITING)

    first.proc.send_signal(signal.SIGTERM)
    log = wait_for_log(first, STILL_RUN)  # gRPC cancelled the call; its handler runs on
    assert "NodePublishVolume (for " in log[log.index(STILL_RUN):]
    assert role_held(first.root)
    assert first.proc.poll() is None
    assert "took over the store" not in second.read_log()
    thread.join(timeout=60)
    assert isinstance(result[0], grpc.RpcError)  # the caller was answered: cancelled

    release()
    rc, log = exited(first)
    assert rc == 0
    assert log.index("NodePublishVolume ok") < log.index("csi.server: stopped")
    assert KEPT not in log
    second.ready()
    assert "took over the store" in second.read_log()
    # What the handler did after its call was cancelled is the second server's now.
    assert len(MountTable().at(str(target))) == 1
    second.csi.unpublish("slow", target)
    assert not target.exists()


def test_a_handler_outliving_the_stop_keeps_the_store_until_the_process_exits(
        procs, tmp_path, slow_image):
    image, release = slow_image
    first = procs("first", extra_args=("--grace-seconds", "1")).start()
    target = tmp_path / "pod"
    thread, _ = publish_in_background(first, "stuck", target, image)
    second = procs("second", root=first.root).launch()
    wait_for_log(second, WAITING)

    first.proc.send_signal(signal.SIGTERM)
    log = wait_for_log(first, KEPT)
    assert "NodePublishVolume (for " in log[log.index(KEPT) - 300:]
    assert "csi.server: stopped" not in log
    assert first.proc.poll() is None, "the process waits for its handler"
    assert role_held(first.root)
    assert "took over the store" not in second.read_log()

    release()
    rc, log = exited(first)
    assert rc == 1  # an unclean stop
    assert "NodePublishVolume ok" in log
    second.ready()
    assert "took over the store" in second.read_log()
    second.csi.unpublish("stuck", target)
    assert not target.exists()
    thread.join(timeout=60)
