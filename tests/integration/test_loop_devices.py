"""csi/mount/loop.py against the kernel's real loop devices: attach with LOOP_CONFIGURE,
autoclear on the last close or unmount, detach, the listing, a missing /dev node, and the
race for a free device. And the images a limited publication's filesystem lives on
(csi/backend/loopfs.py): mkfs, and copies of a size's template.

Loop devices are global to the machine and other processes use them meanwhile: every check
here looks only at devices backed by this test's own files."""

import errno
import os
import stat
import subprocess

import pytest

from csi.backend.loopfs import MOUNT_OPTIONS, Templates, mkfs
from csi.mount.loop import LoopControl
from csi.mount.mountinfo import MountTable
from csi.mount.spec import Mount
from csi.mount.syscalls import Mounter
from tests.conftest import ROOT_REASON, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

MiB = 1 << 20


def attached_to(loops: LoopControl, prefix: str) -> list[str]:
    """Devices whose backing file is below `prefix`."""
    return [d.device for d in loops.attached() if d.backing_file.startswith(str(prefix))]


@pytest.fixture
def work(tmp_path):
    """A directory of image files; anything the test left attached is detached after."""
    loops = LoopControl()
    try:
        yield tmp_path
    finally:
        unmount_all_under(str(tmp_path))
        for device in attached_to(loops, tmp_path):
            loops.detach(device)


def image(path, size=16 * MiB, fs=False) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    if fs:
        mkfs(str(path))
    return str(path)


def test_attach_shows_the_file_and_the_last_close_detaches(work):
    loops = LoopControl()
    img = image(work / "a.img")
    with loops.attach(img) as held:
        assert stat.S_ISBLK(os.stat(held.device).st_mode)
        assert attached_to(loops, work) == [held.device]
        st = os.stat(img)
        assert loops.identity(held.device) == (st.st_dev, st.st_ino)
        with open(held.device, "rb") as dev:  # the device reads the file's bytes
            dev.seek(0, os.SEEK_END)
            assert dev.tell() == 16 * MiB
    assert attached_to(loops, work) == [], "autoclear: the last close detaches"


def test_a_mount_holds_the_device_and_its_unmount_detaches_it(work):
    loops, mounter = LoopControl(), Mounter()
    img = image(work / "fs.img", fs=True)
    target = work / "mnt"
    target.mkdir()
    with loops.attach(img) as held:
        mounter.mount(Mount("ext4", held.device, str(target), MOUNT_OPTIONS))
    assert attached_to(loops, work) == [held.device], "held by the mount"
    (target / "f").write_text("on the image\n")
    mounter.unmount(str(target))
    assert attached_to(loops, work) == []


def test_detach_and_detaching_an_unbound_device(work):
    loops = LoopControl()
    with loops.attach(image(work / "a.img"), autoclear=False) as held:
        pass
    assert attached_to(loops, work) == [held.device], "no autoclear: stays attached"
    loops.detach(held.device)
    assert attached_to(loops, work) == []
    assert loops.identity(held.device) is None
    loops.detach(held.device)  # unbound: not an error


def test_detaching_a_mounted_device_waits_for_its_unmount(work):
    loops, mounter = LoopControl(), Mounter()
    target = work / "mnt"
    target.mkdir()
    with loops.attach(image(work / "fs.img", fs=True), autoclear=False) as held:
        mounter.mount(Mount("ext4", held.device, str(target), MOUNT_OPTIONS))
    loops.detach(held.device)  # deferred by the kernel: the mount still holds it
    assert MountTable().is_mountpoint(str(target))
    (target / "f").write_text("still writable\n")
    mounter.unmount(str(target))
    assert attached_to(loops, work) == []


def test_the_listing_marks_a_deleted_backing_file(work):
    loops = LoopControl()
    img = image(work / "gone.img")
    with loops.attach(img) as held:
        os.unlink(img)
        [dev] = [d for d in loops.attached() if d.device == held.device]
        assert dev.deleted and dev.backing_file == img


def test_a_missing_device_node_is_made(work):
    """As in a kind node's container: /dev lacks the node of the device the kernel made."""
    dev = work / "dev"
    dev.mkdir()
    ctl = os.stat("/dev/loop-control")
    os.mknod(dev / "loop-control", 0o600 | stat.S_IFCHR, ctl.st_rdev)
    loops = LoopControl(dev=str(dev))
    with loops.attach(image(work / "a.img")) as held:
        assert os.path.dirname(held.device) == str(dev)
        assert stat.S_ISBLK(os.stat(held.device).st_mode)
        assert held.device.replace(str(dev), "/dev") in attached_to(LoopControl(), work)


def test_a_device_taken_meanwhile_is_retried(work):
    """Another process binds the free device between LOOP_CTL_GET_FREE and LOOP_CONFIGURE:
    the kernel answers EBUSY and attach asks for another."""
    loops = LoopControl()
    with loops.attach(image(work / "taken.img")) as taken:
        number = int(taken.device.removeprefix("/dev/loop"))

        class Racing(LoopControl):
            calls = 0

            def _get_free(self) -> int:
                Racing.calls += 1
                return number if Racing.calls == 1 else super()._get_free()

        with Racing().attach(image(work / "mine.img")) as mine:
            assert mine.device != taken.device and Racing.calls == 2
            assert sorted(attached_to(loops, work)) == sorted([taken.device, mine.device])


def test_attaching_a_missing_file_says_so(work):
    with pytest.raises(FileNotFoundError):
        with LoopControl().attach(str(work / "nothing.img")):
            pass


def test_mkfs_failure_reports_its_reason(work):
    (work / "a-dir.img").mkdir()
    with pytest.raises(OSError) as e:
        mkfs(str(work / "a-dir.img"))
    assert e.value.errno == errno.EIO and "mkfs.ext4" in str(e.value)
    assert sorted(os.listdir(work)) == ["a-dir.img"], "its config file is gone too"


def test_mkfs_names_every_feature_whatever_the_node_s_mke2fs_conf_says(work, monkeypatch):
    """What the kernel must mount does not depend on the e2fsprogs the image carries: a
    config asking for a journal and orphan_file (e2fsprogs 1.47's default) is not read."""
    conf = work / "node-mke2fs.conf"
    conf.write_text("[fs_types]\n\text4 = {\n\t\tfeatures = has_journal,orphan_file,"
                    "metadata_csum\n\t}\n")
    monkeypatch.setenv("MKE2FS_CONFIG", str(conf))
    img = image(work / "x.img", fs=True)
    out = subprocess.run(["dumpe2fs", "-h", img], capture_output=True, text=True).stdout
    features = set(next(line for line in out.splitlines()
                        if line.startswith("Filesystem features:")).split(":")[1].split())
    assert features == {"ext_attr", "dir_index", "filetype", "extent", "flex_bg",
                        "sparse_super", "large_file", "huge_file", "dir_nlink", "extra_isize"}
    assert sorted(os.listdir(work)) == ["node-mke2fs.conf", "x.img"]


def fsck(image: str) -> None:
    run = subprocess.run(["e2fsck", "-f", "-n", image], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_template_copy_is_the_filesystem_mkfs_made(work):
    templates = Templates()
    first, second = str(work / "first.img"), str(work / "second.img")
    templates.make(first, 64 * MiB)  # mkfs
    templates.make(second, 64 * MiB)  # the template's data segments, written
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()
    assert os.stat(second).st_blocks * 512 <= 256 * 1024, "sparse"
    fsck(second)
    # Used, and unmounted: still a clean filesystem (no journal to replay, none needed).
    target = work / "mnt"
    target.mkdir()
    with LoopControl().attach(second) as held:
        Mounter().mount(Mount("ext4", held.device, str(target), MOUNT_OPTIONS))
    (target / "f").write_bytes(os.urandom(MiB))
    Mounter().unmount(str(target))
    fsck(second)


def counting_mkfs(work):
    """A mkfs.ext4 that notes each image it makes: (its path, the images made so far)."""
    log = work / "calls"
    wrapper = work / "mkfs-counting"
    wrapper.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\nexec mkfs.ext4 \"$@\"\n")
    wrapper.chmod(0o755)

    def calls() -> list[str]:
        return [line.rsplit("/", 1)[1] for line in log.read_text().splitlines()]

    return str(wrapper), calls


def test_templates_are_kept_per_size_while_small(work):
    """mkfs runs for the first image of each size only, and only for sizes whose template
    is small enough to keep (a counting wrapper around mkfs.ext4 says which ran)."""
    wrapper, calls = counting_mkfs(work)
    templates = Templates(wrapper, max_template=64 * 1024)
    for i, size in enumerate([64 * MiB, 64 * MiB, 10 << 30, 10 << 30, 64 * MiB]):
        templates.make(str(work / f"{i}.img"), size)
    # 64 MiB: one mkfs (a 40 KiB template); 10 GiB: a 160 KiB template, too big to keep.
    assert calls() == ["0.img", "2.img", "3.img"]


def test_the_least_recently_used_template_goes_first(work):
    wrapper, calls = counting_mkfs(work)
    templates = Templates(wrapper, max_bytes=60 * 1024)  # room for one 40 KiB template
    for i, size in enumerate([32 * MiB, 64 * MiB, 64 * MiB, 32 * MiB]):
        templates.make(str(work / f"{i}.img"), size)
    assert calls() == ["0.img", "1.img", "3.img"]
