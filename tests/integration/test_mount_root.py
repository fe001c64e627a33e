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
