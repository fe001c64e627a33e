"""Views that outlive their mount, with real mounts, real mount namespaces and a real
`strata serve` whose GC removes every unreferenced layer at once: the private state and the
layers such a view uses stay until it is gone (csi/releases.py).

Each test's processes that hold a view are short-lived and killed in `finally`: a process
in a mount namespace of its own holds a copy of every mount of the machine while it lives,
which other servers on this machine would see as views still held.
"""

import ast
import os
import signal
import subprocess
import sys

import pytest

from csi.mount.mountinfo import MountTable
from csi.store.state import State
from tests.conftest import ROOT_REASON, StrataProcess, free_port, unmount_all_under
from tests.integration.test_life_events import metric, record, volumes, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

# A process of the pod, working in the volume (its working directory): answers each
# command on stdin ("read PATH", "list PATH", "write PATH TEXT") with a Python literal
# on stdout: the file's text, the sorted names, "ok", or "error: ...".
POD = r"""
import os, sys
os.chdir(sys.argv[1])
print(repr("ready"), flush=True)
for line in sys.stdin:
    cmd, _, arg = line.rstrip("\n").partition(" ")
    try:
        if cmd == "read":
            with open(arg) as f:
                out = f.read()
        elif cmd == "list":
            out = sorted(os.listdir(arg))
        else:
            name, _, text = arg.partition(" ")
            with open(name, "a") as f:
                f.write(text + "\n")
            out = "ok"
    except OSError as e:
        out = f"error: {e}"
    print(repr(out), flush=True)
"""


class Pod:
    """A process of the pod, in this mount namespace or (`namespace`) in a private one of
    its own, as a container's: `unshare -m --propagation private` copies every mount, and
    an unmount here leaves its copy alive."""

    def __init__(self, target, namespace: bool = False):
        cmd = [sys.executable, "-c", POD, str(target)]
        if namespace:
            cmd = ["unshare", "-m", "--propagation", "private", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        try:
            assert self.ask() == "ready"
        except BaseException:
            self.kill()
            raise

    def ask(self, line: str = ""):
        if line:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the pod's process died"
        return ast.literal_eval(answer)

    def kill(self) -> None:
        """Gone, with its mount namespace (it is the only process in it)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


@pytest.fixture
def server(tmp_path):
    proc = StrataProcess(str(tmp_path), metrics_port=free_port(),
                         extra_args=("--gc-policy", "immediate", "--gc-min-age", "0"))
    try:
        yield proc.start()
    finally:
        proc.stop(signal.SIGKILL)
        unmount_all_under(str(tmp_path))


def layer_dirs(p: StrataProcess) -> set[str]:
    return set(os.listdir(os.path.join(p.root, "layers")))


def holders(p: StrataProcess) -> set[str]:
    st = State(os.path.join(p.root, "state.db"), migrate=False)
    try:
        with st.read() as tx:
            return {h for _, h in tx.holders()}
    finally:
        st.close()


def edit_state(p: StrataProcess, change) -> None:
    """Change state.db while the server is down: what a crash at a given step leaves."""
    st = State(os.path.join(p.root, "state.db"))
    try:
        with st.transaction() as tx:
            change(tx)
    finally:
        st.close()


def strata_gc(p: StrataProcess) -> str:
    """A GC run beside the server (`strata gc`), removing every unreferenced layer."""
    return subprocess.run([sys.executable, "-m", "csi", "gc", "--root", p.root,
                           "--gc-policy", "immediate", "--gc-min-age", "0"],
                          capture_output=True, text=True, check=True).stdout


def reads_the_image(pod: Pod, motd: str = "app motd\n") -> None:
    """The pod reads files of every layer that it never looked up before (a lookup cached
    in the overlay could outlive a deleted layer)."""
    assert pod.ask("read etc/motd") == motd
    assert pod.ask("read usr/lib/python3/json/decoder.py").startswith('"""Implementation')
    assert "scanner.py" in pod.ask("list usr/lib/python3/json")


# -- a copy of the mount in another mount namespace ---------------------------------------
def test_an_unmount_here_keeps_the_upper_a_copy_in_another_namespace_writes(server, images,
                                                                             tmp_path):
    target = tmp_path / "pod" / "vol"
    target.parent.mkdir()
    server.csi.publish("ns-copy", target, images.app)
    (target / "a.txt").write_text("a\n")
    pub, _ = record(server, target)
    upper = os.path.join(server.root, "volumes", pub.key, "upper")
    layers = layer_dirs(server)
    pod = Pod(target, namespace=True)
    try:
        server.csi.unpublish("ns-copy", target)  # OK: the umount here succeeds
        assert not MountTable().is_mountpoint(str(target)) and not target.exists()
        assert metric(server, "strata_lazy_unmounts_total") == 0, "a clean unmount"
        gone, [release] = record(server, target)
        assert gone is None and release.key == pub.key
        assert release.manifest_digest == pub.manifest_digest
        assert holders(server) == {"release:" + pub.key}, "its references moved to it"
        # The container goes on writing, into the upper that is still there.
        assert pod.ask("write a.txt b") == "ok"
        assert pod.ask("write new.txt c") == "ok"
        with open(os.path.join(upper, "a.txt")) as f:
            assert f.read() == "a\nb\n"
        with open(os.path.join(upper, "new.txt")) as f:
            assert f.read() == "c\n"
        strata_gc(server)
        assert layer_dirs(server) == layers
        reads_the_image(pod)
    finally:
        pod.kill()
    wait_for(lambda: pub.key not in volumes(server), what="the upper to be released")
    assert record(server, target) == (None, [])
    wait_for(lambda: layer_dirs(server) == set(), what="GC after the release")


def test_an_unpublish_with_no_other_namespace_deletes_at_once(server, images, tmp_path):
    target = tmp_path / "pod" / "vol"
    target.parent.mkdir()
    server.csi.publish("plain", target, images.app)
    (target / "a.txt").write_text("a\n")
    server.csi.unpublish("plain", target)
    assert record(server, target) == (None, [])
    assert volumes(server) == set() and layer_dirs(server) == set()


# -- a mount lost behind strata's back ------------------------------------------------------
@pytest.mark.parametrize("when", ["unpublish", "start-up"])
def test_a_mount_detached_behind_our_back_keeps_its_upper_and_layers(server, images, tmp_path,
                                                                     when):
    target = tmp_path / "pod" / "vol"
    target.parent.mkdir()
    server.csi.publish("lost", target, images.app)
    pub, _ = record(server, target)
    layers = layer_dirs(server)
    pod = Pod(target)
    try:
        assert pod.ask("write held.txt before") == "ok"
        subprocess.run(["umount", "-l", str(target)], check=True)
        if when == "start-up":
            server.stop()
            server.start()  # reconcile: the publication lost its mount
            assert record(server, target)[0] is None
            server.csi.unpublish("lost", target)  # the kubelet's, later: nothing to do
        else:
            server.csi.unpublish("lost", target)
        _, [release] = record(server, target)
        assert release.key == pub.key and release.manifest_digest == pub.manifest_digest
        assert holders(server) == {"release:" + pub.key}
        strata_gc(server)
        assert layer_dirs(server) == layers, "GC leaves what the live overlay reads"
        reads_the_image(pod)
        assert pod.ask("write held.txt after") == "ok"
        with open(os.path.join(server.root, "volumes", pub.key, "upper", "held.txt")) as f:
            assert f.read() == "before\nafter\n"
    finally:
        pod.kill()
    wait_for(lambda: record(server, target) == (None, []), what="the release to go")
    wait_for(lambda: layer_dirs(server) == set(), what="GC after the release")
    assert volumes(server) == set()


# -- crashes around a lazy detach -----------------------------------------------------------
def test_a_detach_interrupted_after_its_record_is_finished_at_start_up(server, images,
                                                                       tmp_path):
    """Releases.detach records the release, then detaches: a crash in between leaves a
    release whose mount is still there."""
    target = tmp_path / "pod" / "vol"
    target.parent.mkdir()
    server.csi.publish("half", target, images.app)
    pub, _ = record(server, target)
    [mount] = MountTable().at(str(target))
    pod = Pod(target)
    try:
        server.stop(signal.SIGKILL)
        edit_state(server, lambda tx: tx.release_publication(str(target), mount.device, 1.0))
        server.start()
        assert not MountTable().is_mountpoint(str(target)), "detached at start-up"
        assert "its detach was interrupted" in server.read_log()
        _, [release] = record(server, target)
        assert release.key == pub.key and holders(server) == {"release:" + pub.key}
        server.csi.unpublish("half", target)  # the kubelet's retry: OK, target removed
        assert not target.exists()
        assert pod.ask("write held.txt kept") == "ok"
        reads_the_image(pod)
    finally:
        pod.kill()
    wait_for(lambda: record(server, target) == (None, []), what="the release to go")
    # The record goes before the files (a crash between leaves files start-up removes).
    wait_for(lambda: volumes(server) == set(), what="its private state to go")


@pytest.mark.parametrize("busy", [True, False])
def test_a_detach_interrupted_after_its_record_is_finished_by_the_unpublish_retry(
        server, images, tmp_path, busy):
    """The same while the server runs (the MNT_DETACH after the record failed): the
    kubelet's retry of the unpublish finds the release still mounted and detaches it."""
    target = tmp_path / "pod" / "vol"
    target.parent.mkdir()
    server.csi.publish("retry", target, images.app)
    pub, _ = record(server, target)
    [mount] = MountTable().at(str(target))
    pod = Pod(target) if busy else None
    try:
        edit_state(server, lambda tx: tx.release_publication(str(target), mount.device, 1.0))
        server.csi.unpublish("retry", target)
        assert not MountTable().is_mountpoint(str(target)) and not target.exists()
        if pod is not None:
            _, [release] = record(server, target)
            assert release.key == pub.key
            assert pod.ask("write held.txt kept") == "ok"
    finally:
        if pod is not None:
            pod.kill()
    wait_for(lambda: record(server, target) == (None, []), what="the release to go")
    # The record goes before the files (a crash between leaves files start-up removes).
    wait_for(lambda: volumes(server) == set(), what="its private state to go")


def test_an_unrecorded_overlay_detached_at_start_up_pauses_gc_until_it_goes(server, images,
                                                                          tmp_path):
    """A publish that crashed between mount(2) and its record, while a process holds the
    mount: start-up detaches it lazily, and its private state becomes a release that
    cannot say which layers it reads."""
    target = tmp_path / "pod" / "vol"
    target.parent.mkdir()
    server.csi.publish("unrecorded", target, images.app)
    pub, _ = record(server, target)
    layers = layer_dirs(server)
    pod = Pod(target)
    try:
        server.stop(signal.SIGKILL)
        edit_state(server, lambda tx: tx.forget_publication(str(target), 1.0))
        server.start()
        assert not MountTable().is_mountpoint(str(target))
        _, [release] = record(server, target)
        assert release.key == pub.key and release.manifest_digest == ""
        assert holders(server) == set(), "which layers it reads is not known"
        assert "removed 0 layers" in strata_gc(server)
        assert "paused" in server.read_log()
        assert layer_dirs(server) == layers
        reads_the_image(pod)
    finally:
        pod.kill()
    wait_for(lambda: record(server, target) == (None, []), what="the release to go")
    wait_for(lambda: layer_dirs(server) == set(), what="GC once the release went")


# -- read-only views: no upper, asked about by their device --------------------------------
@pytest.mark.parametrize("kind", ["overlay", "one-layer bind"])
def test_a_detached_read_only_view_keeps_its_layers_while_used(server, images, tmp_path, kind):
    image, motd = (images.app, "app motd\n") if kind == "overlay" else (images.base,
                                                                         "base motd\n")
    target = tmp_path / "pod" / "vol"
    target.parent.mkdir()
    server.csi.publish("ro", target, image, readonly=True)
    pub, _ = record(server, target)
    [mount] = MountTable().at(str(target))
    layers = layer_dirs(server)
    pod = Pod(target)
    try:
        server.csi.unpublish("ro", target)  # busy: detached lazily
        assert not MountTable().is_mountpoint(str(target))
        _, [release] = record(server, target)
        assert release.device == mount.device and holders(server) == {"release:" + pub.key}
        still = f"the view of {pub.key} ({target}) is still held"
        wait_for(lambda: server.read_log().count(still) >= 2
                 or record(server, target)[1] == [], timeout=30,
                 what="two sweeps (or the release to go)")
        assert record(server, target)[1] == [release], "kept past two sweeps"
        strata_gc(server)
        assert layer_dirs(server) == layers
        reads_the_image(pod, motd)
    finally:
        pod.kill()
    if kind == "overlay":
        wait_for(lambda: record(server, target) == (None, []), what="the release to go")
        wait_for(lambda: layer_dirs(server) == set(), what="GC once the release went")
        return
    # A bind of the layer: its holders cannot be told from the store's own users, so the
    # release lasts until the next boot.
    server.stop()
    server.start()
    assert [r.key for r in record(server, target)[1]] == [pub.key]
    assert layer_dirs(server) == layers
    server.stop()
    with open(os.path.join(server.root, "boot_id"), "w") as f:
        f.write("a-boot-before-this-one\n")
    server.start()
    assert record(server, target) == (None, [])
    assert layer_dirs(server) == set()


# -- a size-limited publication whose filesystem a new mount namespace lost ----------------
def test_a_lost_limited_mount_is_asked_about_once_its_filesystem_is_mounted_again(
        server, images, tmp_path):
    """A plugin replaced in a new mount namespace lost its mount of a limited key's
    filesystem (`fs/`), and the target's mount was lost too while the pod holds it:
    start-up mounts `fs/` again first, so that the kernel can be asked about the upper."""
    target = tmp_path / "pod" / "vol"
    target.parent.mkdir()
    server.csi.publish("limited", target, images.app, sizeLimit="16Mi")
    pub, _ = record(server, target)
    fs = os.path.join(server.root, "volumes", pub.key, "fs")
    pod = Pod(target)
    try:
        assert pod.ask("write held.txt before") == "ok"
        server.stop(signal.SIGKILL)
        subprocess.run(["umount", "-l", str(target)], check=True)
        subprocess.run(["umount", "-l", fs], check=True)
        server.start()
        _, [release] = record(server, target)
        assert release.key == pub.key and holders(server) == {"release:" + pub.key}
        assert MountTable().is_mountpoint(fs), "mounted again"
        assert pod.ask("write held.txt after") == "ok"
        with open(os.path.join(fs, "upper", "held.txt")) as f:
            assert f.read() == "before\nafter\n"
    finally:
        pod.kill()
    wait_for(lambda: record(server, target) == (None, []), what="the release to go")
    # The record goes before the files (a crash between leaves files start-up removes).
    wait_for(lambda: volumes(server) == set(), what="its private state to go")
    assert not MountTable().under(server.root)
