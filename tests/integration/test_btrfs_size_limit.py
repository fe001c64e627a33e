"""`sizeLimit` on the btrfs backend where the filesystem has no quotas (the session's btrfs
has none): the publication is an overlay of the image's chain subvolume with its upper in
a loop filesystem of the limit's size (csi/backend/btrfs.py), through the backend and
through a real `strata serve --backend btrfs`. The qgroup path (quotas on) is tested in
test_btrfs_backend.py."""

import errno
import os
import signal
import uuid

import pytest

from csi.backend.btrfs import BtrfsBackend
from csi.image.build import LayerBuilder
from csi.mount import btrfs
from csi.mount.loop import LoopControl
from csi.mount.mountinfo import MountTable
from csi.mount.syscalls import Mounter
from tests.conftest import StrataProcess, unmount_all_under
from tests.integration.test_btrfs_backend import Store, read, wipe
from tests.integration.test_diff_cli import CHANGES, POD, cmd
from tests.integration.test_inspect import rename_dir
from tests.integration.test_size_limit import (
    fill,
    kill_during_a_limited_publish,
    leftovers,
    stats,
)
from tests.storefs import store_fs

MiB = 1 << 20


@pytest.fixture
def store(store_filesystems, tmp_path):
    """A btrfs-backed store on the session's btrfs (no quotas)."""
    root = os.path.join(store_fs(store_filesystems, "btrfs").root, f"lim-{uuid.uuid4().hex}")
    s = Store(root, BtrfsBackend, str(tmp_path / "mnt"))
    assert not btrfs.quota_enabled(root), "the session's btrfs has no quotas"
    try:
        yield s
    finally:
        unmount_all_under(str(tmp_path))
        for key in s.backend.keys():
            s.backend.remove(key)
        unmount_all_under(os.path.realpath(root))
        wipe(root)


def option(plan, name: str) -> str:
    return next(o.partition("=")[2] for o in plan.options if o.startswith(name + "="))


def our_loops(root: str) -> list[str]:
    root = os.path.realpath(root)
    return [d.device for d in LoopControl().attached()
            if d.backing_file.startswith(root + os.sep)]


# -- the backend -----------------------------------------------------------------------------
def test_a_limit_without_quotas_is_an_overlay_of_the_chain_over_a_loop_filesystem(store):
    s = store
    chain = [s.layer(LayerBuilder().dir("etc").file("etc/motd", "motd\n")),
             s.layer(LayerBuilder().file("top", "top\n"))]
    plan = s.backend.prepare("lim", chain, s.target("lim"), 8 * MiB)
    assert plan.type == "overlay" and plan.source == f"strata:{s.paths.root}"
    assert option(plan, "lowerdir") == s.backend.chain_path(chain), "one lowerdir: the chain"
    assert option(plan, "upperdir") == s.paths.volume_part("lim", "fs", "upper")
    assert s.backend.is_looped("lim")
    assert MountTable().is_mountpoint(s.paths.volume_part("lim", "fs"))
    with s.mounted(plan) as t:
        assert read(t, "etc/motd") == "motd\n"
        with open(os.path.join(t, "top"), "a") as f:
            f.write("more\n")
        written, err = fill(os.path.join(t, "fill"))
        assert err == errno.ENOSPC and written <= 8 * MiB
        os.unlink(os.path.join(t, "fill"))
        mounts = MountTable().mounts()
        view = next(m for m in mounts if m.mount_point == os.path.realpath(t))
        assert s.backend.recognizer(mounts)(view)
        again = BtrfsBackend(s.paths)  # a restart decides from the disk alone
        assert again.is_looped("lim")
        assert again.recognizer(mounts)(view)
        assert again.space("lim").bytes_total == 8 * MiB
        assert again.changes("lim", ()) == [("C", "/top")]
        assert again.dirs("lim").upper == s.paths.volume_part("lim", "fs", "upper")
        assert again.holder_probe("lim") is not None
    s.backend.remove("lim")
    assert s.backend.keys() == set()
    assert not MountTable().under(os.path.realpath(s.paths.root))
    assert our_loops(s.paths.root) == []


def test_a_snapshot_key_is_not_taken_for_a_looped_one(store):
    """Both kinds keep `volumes/KEY/fs`: only the filesystem image tells them apart, and a
    pod creating /upper in its snapshot must not make the backend look for an overlay."""
    s = store
    chain = [s.layer(LayerBuilder().file("f", "x\n"))]
    with s.mounted(s.backend.prepare("snap", chain, s.target("snap"))) as t:
        os.mkdir(os.path.join(t, "upper"))
        assert not s.backend.is_looped("snap")
        assert s.backend.dirs("snap") is None and s.backend.holder_probe("snap") is None
        assert s.backend.changes("snap", chain) == [("A", "/upper")]
        assert s.backend.space("snap") is None


def test_gc_keeps_a_chain_that_a_looped_key_reads(store):
    s = store
    lid = s.layer(LayerBuilder().file("f", "x\n"))
    chain_dir = s.backend.chain_path([lid])
    with s.mounted(s.backend.prepare("lim", [lid], s.target("lim"), 8 * MiB)) as t:
        s.backend.layers_removed([lid])
        assert btrfs.is_subvolume(chain_dir), "the overlay's lowerdir is kept"
        assert read(t, "f") == "x\n"
    s.backend.remove("lim")
    s.backend.layers_removed(())  # a later collection: nothing reads it now
    assert btrfs.is_subvolume(chain_dir), "its layer is still in the store"
    os.rename(s.paths.layer(lid), os.path.join(s.paths.tmp, "gone"))  # as GC removes it
    s.backend.layers_removed(())
    assert not os.path.exists(chain_dir)


def test_a_failed_looped_prepare_leaves_nothing(store):
    s = store
    lid = s.layer(LayerBuilder().file("f", "x\n"))
    s.backend.prepare("lim", [lid], s.target("lim"), 8 * MiB)
    with pytest.raises(FileExistsError):
        s.backend.prepare("lim", [lid], s.target("lim2"), 8 * MiB)  # a key in use
    s.backend.remove("lim")
    with pytest.raises(OSError):
        s.backend.prepare("tiny", [lid], s.target("tiny"), 4096)  # too small for ext4
    assert s.backend.keys() == set()
    assert not MountTable().under(os.path.realpath(s.paths.root))
    assert our_loops(s.paths.root) == []


# -- through the server ----------------------------------------------------------------------
@pytest.fixture
def server(store_filesystems, tmp_path):
    """`strata serve --backend btrfs` on the session's btrfs, of the test's own."""
    root = os.path.join(store_fs(store_filesystems, "btrfs").root, f"slim-{uuid.uuid4().hex}")
    proc = StrataProcess(str(tmp_path), root=root, extra_args=("--backend", "btrfs"))
    try:
        yield proc
    finally:
        proc.stop()
        unmount_all_under(str(tmp_path))
        unmount_all_under(os.path.realpath(root))  # the keys' loop filesystems
        wipe(root)


def test_a_limited_publish_writes_up_to_its_limit_diffs_and_leaves_nothing(
        server, images, tmp_path):
    p = server.start()
    t = tmp_path / "pod"
    p.csi.publish("lim-w", t, images.app, sizeLimit="16Mi", **POD)
    try:
        (t / "etc/new.conf").write_text("new\n")
        with open(t / "etc/motd", "a") as f:
            f.write("appended\n")
        os.chmod(t / "usr/bin/tool", 0o700)
        os.unlink(t / "etc/passwd")
        rename_dir(str(t / "srv"), str(t / "srv2"))
        out = cmd("diff", str(t), root=p.root, check=0).stdout
        assert out.splitlines() == CHANGES, "overlay's answer: the upper against the chain"
        ls = cmd("ls", root=p.root, check=0).stdout
        row = next(line for line in ls.splitlines() if line.endswith(str(t)))
        assert "loop" in row.split(), row
        assert cmd("df", root=p.root, check=0).stdout
        total, used, available = stats(p.csi, "lim-w", t)["BYTES"]
        assert total == 16 * MiB and 0 < available < total
        written, err = fill(str(t / "fill"))
        assert err == errno.ENOSPC and 0.9 * 16 * MiB <= written <= 16 * MiB
        assert stats(p.csi, "lim-w", t)["BYTES"][2] < MiB
        assert (t / "etc/motd").read_text().endswith("appended\n")
    finally:
        p.csi.unpublish("lim-w", t)
    assert not os.path.ismount(t)
    assert leftovers(p.root) == []


def test_a_kill_9_and_restart_keep_a_limited_publication_then_unpublish_cleans(
        server, images, tmp_path):
    p = server.start()
    t = tmp_path / "pod"
    p.csi.publish("lim-k", t, images.app, sizeLimit="8Mi")
    (t / "kept").write_text("written before the kill\n")
    p.stop(signal.SIGKILL)
    p.start()
    assert (t / "kept").read_text() == "written before the kill\n"
    assert stats(p.csi, "lim-k", t)["BYTES"][0] == 8 * MiB
    assert fill(str(t / "fill"))[1] == errno.ENOSPC, "still bounded"
    p.csi.publish("lim-k", t, images.app, sizeLimit="8Mi")  # the kubelet's repeat: OK
    p.csi.unpublish("lim-k", t)
    assert not os.path.ismount(t)
    assert leftovers(p.root) == []


def test_a_limited_key_s_filesystem_lost_from_the_namespace_is_mounted_again(
        server, images, tmp_path):
    """A plugin container replaced by a new one loses its mount of the key's filesystem
    while the pod's overlay keeps it; start-up mounts the same device again."""
    p = server.start()
    t = tmp_path / "pod"
    p.csi.publish("lim-ns", t, images.app, sizeLimit="8Mi")
    (t / "kept").write_text("kept\n")
    p.stop(signal.SIGKILL)
    [fs] = [m.mount_point for m in MountTable().under(os.path.realpath(p.root))]
    Mounter().unmount(fs)
    p.start()
    assert MountTable().is_mountpoint(fs)
    assert cmd("diff", str(t), root=p.root, check=0).stdout.splitlines() == ["A /kept"]
    p.csi.unpublish("lim-ns", t)
    assert leftovers(p.root) == []


def test_a_limited_publication_unrecorded_at_the_kill_is_cleared_at_start(
        server, images, tmp_path):
    """A crash between mounting and recording: start-up recognises the overlay as this
    store's, unmounts it, and the key's filesystem and loop device go with the key."""
    from csi.store.state import State

    p = server.start()
    t = tmp_path / "pod"
    p.csi.publish("lim-unrec", t, images.app, sizeLimit="8Mi")
    p.stop(signal.SIGKILL)
    st = State(os.path.join(p.root, "state.db"))
    with st.transaction() as tx:
        tx.forget_publication(str(t), 0)
    st.close()
    assert our_loops(p.root) != []
    p.start()
    assert not MountTable().is_mountpoint(str(t))
    assert leftovers(p.root) == []
    p.csi.publish("lim-unrec", t, images.app, sizeLimit="8Mi")  # the kubelet's retry
    p.csi.unpublish("lim-unrec", t)
    assert leftovers(p.root) == []


def test_after_a_reboot_a_lost_limited_publication_goes(server, images, tmp_path):
    p = server.start()
    t = tmp_path / "pod"
    p.csi.publish("lim-reboot", t, images.app, sizeLimit="8Mi")
    p.stop(signal.SIGKILL)
    unmount_all_under(str(tmp_path))  # the reboot: the pod's overlay and the key's fs
    unmount_all_under(os.path.realpath(p.root))
    p.start()
    assert leftovers(p.root) == []
    p.csi.publish("lim-reboot", t, images.app, sizeLimit="8Mi")
    assert (t / "etc/motd").read_text() == "app motd\n"
    p.csi.unpublish("lim-reboot", t)
    assert leftovers(p.root) == []


@pytest.mark.parametrize("delay_ms", [0, 8, 14, 20])
def test_a_kill_at_any_step_of_a_limited_publish_leaves_nothing(
        server, images, tmp_path, delay_ms):
    """As test_size_limit's kill loop, on btrfs: kill -9 somewhere in a limited publish
    (the chain already made), restart, the kubelet's retry, unpublish: nothing left."""
    kill_during_a_limited_publish(server.start(), tmp_path, images, delay_ms)
