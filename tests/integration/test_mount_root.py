"""statx(2)'s mount-root answer agrees with mountinfo (bind mounts on one filesystem too)."""

import os
import subprocess

import pytest

from csi.mount.mountinfo import MountTable, mount_root


def test_plain_directories_and_missing_paths(tmp_path):
    assert mount_root("/") is True
    assert mount_root(str(tmp_path)) in (False, None)
    assert mount_root(str(tmp_path / "missing")) is False


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_bind_mount_of_a_directory_on_the_same_filesystem(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
    try:
        assert mount_root(str(dst)) is True  # same st_dev as its parent: statx still knows
        assert MountTable().is_mountpoint(str(dst))
        assert MountTable().at(str(dst))
    finally:
        subprocess.run(["umount", str(dst)], check=True)
    assert not MountTable().is_mountpoint(str(dst))


def _agree(path) -> bool:
    """statx's answer, checked against the mount table's (the slow way, by parsing)."""
    fast = MountTable().is_mountpoint(str(path))
    assert fast == bool(MountTable().at(str(path))), path
    return fast


@pytest.fixture
def mounted(tmp_path):
    """Mount points made by a test, unmounted (lazily, deepest first) whatever happens."""
    made = []
    yield made
    for p in sorted(made, key=len, reverse=True):
        while MountTable().at(p):
            subprocess.run(["umount", "-l", p], check=False)


def _overlay(tmp_path, target):
    from csi.mount import spec
    from csi.mount.syscalls import Mounter

    for d in ("lo1", "lo2", "up", "wk"):
        (tmp_path / d).mkdir()
    (tmp_path / "lo1" / "sub").mkdir()
    m = Mounter()
    m.mount(spec.overlay([str(tmp_path / "lo2"), str(tmp_path / "lo1")], str(tmp_path / "up"),
                         str(tmp_path / "wk"), str(target), volatile=m.features.volatile))
    return m


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_an_overlay_target_and_what_lies_inside_it(tmp_path, mounted):
    target = tmp_path / "t"
    target.mkdir()
    mounted.append(str(target))
    m = _overlay(tmp_path, target)
    assert _agree(target)
    assert not _agree(target / "sub")  # a directory inside the mount: not its root
    link = tmp_path / "link"
    link.symlink_to(target)
    assert not _agree(link)  # the link itself is no mount point; callers refuse links
    m.unmount(str(target), lazy=False)
    assert not _agree(target)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_stacked_mounts_are_unmounted_to_the_last(tmp_path, mounted):
    target = tmp_path / "t"
    target.mkdir()
    mounted.append(str(target))
    m = _overlay(tmp_path, target)
    subprocess.run(["mount", "-t", "tmpfs", "stacked", str(target)], check=True)
    assert _agree(target) and len(MountTable().at(str(target))) == 2
    m.unmount(str(target), lazy=False)
    assert not _agree(target)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_a_lazily_detached_target_still_held_is_no_mount_point(tmp_path, mounted):
    """After MNT_DETACH the overlay lives on for the process holding it, but the target
    path shows the directory below again: an unpublish retry must see it unmounted."""
    target = tmp_path / "t"
    target.mkdir()
    mounted.append(str(target))
    m = _overlay(tmp_path, target)
    fd = os.open(target / "sub", os.O_RDONLY | os.O_DIRECTORY)
    try:
        m.detach(str(target))
        assert not _agree(target)
        assert os.listdir(target) == []  # the plain directory under it
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_a_bind_mounted_file_is_a_mount_point(tmp_path, mounted):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_text("x")
    dst.write_text("")
    mounted.append(str(dst))
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
    assert _agree(dst)
    subprocess.run(["umount", str(dst)], check=True)
    assert not _agree(dst)
