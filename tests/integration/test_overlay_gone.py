"""The unpublish's cheap question "is this overlay gone?" (releases.py `_overlay_gone`,
users.superblock_exists) against real overlays, bind mounts and mount namespaces: it may
only ever answer "gone" for an overlay that is, and anything it cannot show goes on to the
kernel's in-use mark, as before.

A process in a mount namespace of its own keeps a copy of every mount of the machine (other
tests' too) while it lives: a "gone" that waits for our own holder's end is waited for,
since another session's short-lived namespace may keep our overlay a little longer."""

import os
import subprocess

import pytest

from csi.config import Config
from csi.mount import spec
from csi.mount.syscalls import Mounter
from csi.mount.users import parse, superblock_exists
from csi.releases import _overlay_gone
from csi.statx import device
from tests.conftest import ROOT_REASON, unmount_all_under
from tests.integration.test_life_events import wait_for

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
              pytest.mark.skipif(superblock_exists((0, 0xFFFFF)) is None,
                                 reason="no ustat(2) here: the probe alone answers")]


@pytest.fixture
def box(tmp_path):
    try:
        yield tmp_path
    finally:
        unmount_all_under(str(tmp_path))


def overlay(box, name="o"):
    """A writable overlay as strata mounts one (volatile where the kernel has it):
    (mounter, target, upper)."""
    base = box / name
    for d in ("l1", "l2", "upper", "work", "t"):
        (base / d).mkdir(parents=True)
    (base / "l1" / "f").write_text("lower\n")
    m = Mounter()
    target = str(base / "t")
    m.mount(spec.overlay([str(base / "l2"), str(base / "l1")], str(base / "upper"),
                         str(base / "work"), target, volatile=m.features.volatile))
    return m, target, str(base / "upper")


def seen(target):
    """What an unpublish reads before it unmounts: the device and root inode there."""
    dev = device(target)
    return f"{dev[0]}:{dev[1]}", os.lstat(target).st_ino


class Holder:
    """A copy of every mount in a private mount namespace of its own, as a pod's
    containers keep one; gone with its only process."""

    def __init__(self):
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private",
                                      "sh", "-c", "echo ready; exec sleep 600"],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def end(self):
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def test_an_overlay_unmounted_with_nothing_holding_it_is_gone(box):
    m, target, upper = overlay(box)
    dev, ino = seen(target)
    assert superblock_exists(parse(dev)) is True
    assert not _overlay_gone(upper, dev, ino)  # still mounted
    m.unmount(target, lazy=False)
    wait_for(lambda: _overlay_gone(upper, dev, ino), what="the overlay's superblock to go")
    assert superblock_exists(parse(dev)) is False


def test_a_copy_in_another_namespace_keeps_it_alive(box):
    m, target, upper = overlay(box)
    dev, ino = seen(target)
    holder = Holder()
    try:
        m.unmount(target, lazy=False)  # succeeds here: the copy is not busy here
        assert superblock_exists(parse(dev)) is True
        assert not _overlay_gone(upper, dev, ino)
        assert m.in_use(spec.holder_probe(upper))  # and the kernel's mark agrees
    finally:
        holder.end()
    wait_for(lambda: _overlay_gone(upper, dev, ino), what="the copy's namespace to go")


def test_a_lazily_detached_overlay_held_by_a_process_is_alive(box):
    m, target, upper = overlay(box)
    dev, ino = seen(target)
    fd = os.open(os.path.join(target, "f"), os.O_RDONLY)
    try:
        m.detach(target)
        assert not _overlay_gone(upper, dev, ino)
    finally:
        os.close(fd)
    wait_for(lambda: _overlay_gone(upper, dev, ino), what="the detached overlay to go")


def test_a_bind_mount_of_the_upper_proves_nothing(box):
    """A bind of the upper dir shows the upper's own inode, but on the upper's device:
    not an overlay's, so no answer."""
    m, target, upper = overlay(box)
    m.unmount(target, lazy=False)
    m.mount(spec.Mount(type="bind", source=upper, target=target, options=("bind",)))
    dev, ino = seen(target)
    m.unmount(target, lazy=False)
    assert not _overlay_gone(upper, dev, ino)


def test_another_mount_stacked_on_the_target_proves_nothing(box):
    """Something mounted over the publication (its root is not the upper's inode): the
    device read is not the overlay's, and its going says nothing about the overlay."""
    m, target, upper = overlay(box)
    subprocess.run(["mount", "-t", "tmpfs", "stacked", target], check=True)
    dev, ino = seen(target)
    holder = Holder()  # keeps the overlay below alive
    try:
        m.unmount(target, lazy=False)  # both
        assert not _overlay_gone(upper, dev, ino)
    finally:
        holder.end()


def test_an_unpublish_asks_the_kernel_mark_only_when_it_cannot_tell(box):
    """Through the volume manager: a clean unpublish deletes the upper without the probe
    (no line in the kernel log); one whose overlay lives on in another namespace still
    keeps it, told by the probe."""
    from csi import compose
    from csi.demo import build_demo_image
    from csi.volumes import PublishSpec

    probes = []

    class Counting(Mounter):
        def in_use(self, probe):
            probes.append(probe.target)
            return super().in_use(probe)

    image = build_demo_image(str(box / "image"))
    parts = compose.node(Config(root=str(box / "store"), node_id="t"), mounter=Counting())
    try:
        vm = parts.volumes
        vm.publish(PublishSpec("a", str(box / "a"), image, False, 1))
        vm.unpublish("a", str(box / "a"))
        assert probes == []
        assert os.listdir(box / "store" / "volumes") == []

        vm.publish(PublishSpec("b", str(box / "b"), image, False, 1))
        holder = Holder()
        try:
            vm.unpublish("b", str(box / "b"))
            assert len(probes) == 1
            assert len(os.listdir(box / "store" / "volumes")) == 1  # kept: a release
            with parts.state.read() as tx:
                assert [r.volume_id for r in tx.releases()] == ["b"]
        finally:
            holder.end()
    finally:
        parts.close()
