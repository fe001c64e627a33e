"""One server per store, never two on a socket (issue 9, item 3), with real `strata serve`
processes: a second server on a store waits for the first (its start-up repairs included)
or, with --no-wait, exits with a message; a socket someone accepts connections on is never
taken over; a stale one is; and the first server keeps answering whatever the second did."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from csi import compose
from csi.config import Config
from csi.locks import ServeLock, StoreServed
from csi.mount.features import Features
from csi.mount.mountinfo import MountTable
from csi.paths import StorePaths
from csi.proto import csi_pb2
from tests.conftest import ROOT_REASON, Csi, StrataProcess, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

WAITING = "waiting for it to stop"


@pytest.fixture
def procs(tmp_path):
    """StrataProcess(NAME, root=...) makers; every one is stopped, and everything mounted
    under tmp_path unmounted, whatever the test did."""
    made: list[StrataProcess] = []

    def make(name: str, root: str = "", extra_args: tuple[str, ...] = ()) -> StrataProcess:
        base = tmp_path / name
        base.mkdir()
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


def test_a_live_socket_of_a_server_on_another_root_is_refused_and_kept(procs):
    first = procs("first").start()
    sock = inode(first.node_sock)
    other = procs("other")  # a store of its own
    other.node_sock = first.node_sock
    other.launch()
    rc, log = exited(other)
    assert rc == 1
    assert f"{first.node_sock}: a process accepts connections on it" in log
    assert inode(first.node_sock) == sock, "a live socket must never be unlinked"
    assert not os.path.exists(other.ctrl_sock), "refused before binding anything"
    assert answers(first.node_sock)
    first.stop(signal.SIGTERM)  # and the first still removes its own socket at the end
    assert not os.path.exists(first.node_sock)


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
