"""Kubelet life events, with real mounts and a real `strata serve`: an unpublish while a
process in the pod still holds the volume (EBUSY), a node reboot, and a plugin upgrade."""

import os
import signal
import subprocess
import sys
import time

import pytest

from csi.mount.mountinfo import MountTable
from csi.store.state import State
from tests.conftest import ROOT_REASON, StrataProcess, scrape, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

# A process of the pod: holds the volume through an open file ("file") or its working
# directory ("cwd"), and appends each line it reads from stdin to `held.txt` in the volume,
# answering "ok"; it exits at end of input.
HOLDER = r"""
import os, sys
target, how = sys.argv[1], sys.argv[2]
if how == "file":
    held = open(os.path.join(target, "held.txt"), "a")
else:
    os.chdir(target)
print("ready", flush=True)
for line in sys.stdin:
    f = held if how == "file" else open("held.txt", "a")
    f.write(line)
    f.flush()
    if how != "file":
        f.close()
    print("ok", flush=True)
"""


class Holder:
    def __init__(self, target, how: str):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), how],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"

    def write(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "ok\n"

    def exit(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def wait_for(condition, timeout: float = 60.0, what: str = "") -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds (a bound on a wait for
    an event, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what or condition}")
        time.sleep(0.1)


# Every test here runs on each backend: `server` (tests/conftest.py) is a `strata serve` of
# the test's own on the backend its ID names. Where a publication's writes land is each
# backend's documented layout (`backend.written`: overlay's upper, btrfs's snapshot).


def record(p: StrataProcess, target) -> "tuple":
    """(the publication at `target` or None, the pending releases) from state.db."""
    st = State(os.path.join(p.root, "state.db"), migrate=False)
    try:
        with st.read() as tx:
            return tx.publication(str(target)), tx.releases()
    finally:
        st.close()


def volumes(p: StrataProcess) -> set[str]:
    return set(os.listdir(os.path.join(p.root, "volumes")))


def metric(p: StrataProcess, name: str) -> float:
    return scrape(p.metrics_port).get(name, 0.0)


# -- unpublish while a process in the pod holds the volume ---------------------------------
@pytest.mark.parametrize("how", ["file", "cwd"])
def test_busy_unpublish_detaches_lazily_and_keeps_the_upper_until_the_holder_exits(
        backend, server, images, tmp_path, how):
    target = tmp_path / "pod" / "vol"
    target.parent.mkdir()
    server.csi.publish("busy", target, images.app)
    pub, _ = record(server, target)
    upper = backend.written(server.root, pub.key)
    holder = Holder(target, how)
    try:
        holder.write("before")
        server.csi.unpublish("busy", target)  # OK: the kubelet moves on
        assert not MountTable().is_mountpoint(str(target))
        assert not target.exists(), "the target dir is removed"
        assert metric(server, "strata_lazy_unmounts_total") == 1
        assert metric(server, "strata_pending_releases") == 1
        gone, [release] = record(server, target)
        assert gone is None and release.key == pub.key and release.target == str(target)
        assert "detached lazily" in server.read_log()
        # The detached view lives on: its writable layer stays, and the pod's writes land
        # in it.
        holder.write("after")
        with open(os.path.join(upper, "held.txt")) as f:
            assert f.read() == "before\nafter\n"
        assert pub.key in volumes(server)
    finally:
        holder.exit()
    wait_for(lambda: pub.key not in volumes(server), what="the upper to be released")
    assert record(server, target) == (None, [])
    assert metric(server, "strata_pending_releases") == 0
    assert volumes(server) == set()


def test_a_pending_release_survives_a_restart(backend, server, images, tmp_path):
    target = tmp_path / "pod" / "vol"
    target.parent.mkdir()
    server.csi.publish("busy-restart", target, images.app)
    pub, _ = record(server, target)
    holder = Holder(target, "file")
    try:
        server.csi.unpublish("busy-restart", target)
        server.stop()
        server.start()
        # Start-up asked the kernel: the view is still held, so its writable layer stays,
        # and the layers it reads stay referenced.
        assert pub.key in volumes(server)
        _, [release] = record(server, target)
        assert release.key == pub.key
        holder.write("written across the restart")
        with open(os.path.join(backend.written(server.root, pub.key), "held.txt")) as f:
            assert f.read() == "written across the restart\n"
        st = State(os.path.join(server.root, "state.db"), migrate=False)
        with st.read() as tx:
            assert {h for _, h in tx.holders()} == {"release:" + pub.key}
        st.close()
    finally:
        holder.exit()
    wait_for(lambda: pub.key not in volumes(server), what="the upper to be released")
    assert record(server, target) == (None, [])
    st = State(os.path.join(server.root, "state.db"), migrate=False)
    with st.read() as tx:
        assert tx.holders() == []
    st.close()


# -- a node reboot -------------------------------------------------------------------------
@pytest.mark.parametrize("boot", ["rebooted", "same boot"])
def test_node_reboot_republishes_fresh_and_leaves_nothing_stale(server, images, tmp_path,
                                                                boot):
    """A reboot keeps state.db and the target dirs and loses every mount. The kubelet's
    retries publish again (and stage again first: a stage is its own record); what the pods
    wrote before is gone, as an ephemeral upper should be. "same boot" is the same loss
    without a reboot (every mount lost behind strata's back): start-up must then ask the
    kernel before it deletes anything."""
    eph, pub, staging = tmp_path / "pods/a/vol", tmp_path / "pods/b/vol", tmp_path / "staging"
    eph.parent.mkdir(parents=True)
    pub.parent.mkdir(parents=True)
    server.csi.publish("eph", eph, images.app)
    server.csi.stage("pv", staging, images.other)
    server.csi.publish("pv", pub, staging=staging)
    for t in (eph, pub):
        (t / "written-before.txt").write_text("gone after a reboot\n")
    before = volumes(server)
    assert len(before) == 2
    server.stop()
    unmount_all_under(str(tmp_path))  # every mount of the store and of the pods
    if boot == "rebooted":
        with open(os.path.join(server.root, "boot_id"), "w") as f:
            f.write("a-boot-before-this-one\n")
    assert eph.is_dir() and pub.is_dir(), "the kubelet's target dirs stay"
    server.start()
    assert volumes(server) == set(), "uppers from before the reboot are discarded"
    server.csi.publish("eph", eph, images.app)  # the kubelet's retry, unchanged
    server.csi.stage("pv", staging, images.other)
    server.csi.publish("pv", pub, staging=staging)
    assert (eph / "etc/motd").read_text() == "app motd\n"
    assert (pub / "opt/other.txt").read_text().startswith("another image")
    assert not (eph / "written-before.txt").exists()
    assert not (pub / "written-before.txt").exists()
    after = volumes(server)
    assert len(after) == 2 and not after & before
    server.csi.unpublish("eph", eph)
    server.csi.unpublish("pv", pub)
    server.csi.unstage("pv", staging)
    assert volumes(server) == set()
    assert not MountTable().under(str(tmp_path))


# -- a plugin upgrade ----------------------------------------------------------------------
# A pod that keeps writing: one numbered line every few milliseconds until its input ends.
WRITER = r"""
import os, sys, threading
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
n = 0
with open(os.path.join(sys.argv[1], "log.txt"), "a") as f:
    while not stop.wait(0.005):
        f.write(f"{n}\n")
        f.flush()
        n += 1
"""


def lines(path) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def test_plugin_upgrade_leaves_live_mounts_and_their_writes_alone(backend, server, images,
                                                                 tmp_path):
    """SIGTERM while a pod writes, then a new `strata serve` on the same store (a rolling
    upgrade of the DaemonSet): the mount, its upper and the writes go on untouched, and the
    new server unpublishes it cleanly later."""
    target = tmp_path / "pod" / "vol"
    target.parent.mkdir()
    server.csi.publish("upgrade", target, images.app)
    [mount] = MountTable().at(str(target))
    pub, _ = record(server, target)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)],
                              stdin=subprocess.PIPE)
    try:
        wait_for(lambda: (target / "log.txt").exists() and len(lines(target / "log.txt")) > 10)
        assert server.stop(signal.SIGTERM) == 0
        written = len(lines(target / "log.txt"))
        server.start()
        wait_for(lambda: len(lines(target / "log.txt")) > written + 10,
                 what="the pod to go on writing")
        assert MountTable().at(str(target)) == [mount], "the same mount, untouched"
        assert record(server, target)[0] == pub
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)
    log = lines(target / "log.txt")
    assert log == [str(i) for i in range(len(log))], "no write lost or torn"
    with open(os.path.join(backend.written(server.root, pub.key), "log.txt")) as f:
        assert f.read().splitlines() == log
    server.csi.unpublish("upgrade", target)
    assert metric(server, "strata_lazy_unmounts_total") == 0
    assert not target.exists()
    assert volumes(server) == set()
    assert not MountTable().under(str(tmp_path))
