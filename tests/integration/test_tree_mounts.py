"""remove_tree never crosses a mount boundary: a mount found inside the tree (another
filesystem, or a bind mount of the same one, at any depth, or the tree's root itself) is
never entered, emptied or moved; removal stops, logs and raises, and the mount stays where
it was with everything in it."""

import logging
import os
import subprocess

import pytest

from csi.mount.mountinfo import MountTable
from csi.tree import MountInside, remove_tree
from tests.conftest import needs_root, unmount_all_under

pytestmark = needs_root


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    for d in ("a/b/c", "a/x", "z"):
        (root / d).mkdir(parents=True)
    for f in ("a/f1", "a/b/f2", "a/b/c/f3", "z/f4"):
        (root / f).write_text(f)
    yield root
    unmount_all_under(str(tmp_path))


def _tmpfs(path) -> None:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "strata-test", str(path)], check=True)
    (path / "precious").write_text("mounted data")


@pytest.mark.parametrize("where", ["z", "a/b", "a/b/c/deep"])
def test_another_filesystem_inside_is_left_alone(tree, where, caplog):
    mnt = tree / where
    _tmpfs(mnt)
    with caplog.at_level(logging.ERROR), pytest.raises(MountInside) as e:
        remove_tree(str(tree))
    assert str(mnt) in str(e.value)
    assert (mnt / "precious").read_text() == "mounted data"
    assert MountTable().is_mountpoint(str(mnt)), "the mount point was not moved"
    assert "mount point" in caplog.text


def test_a_bind_mount_of_the_same_filesystem_is_seen_too(tree, tmp_path):
    """Same st_dev as the tree: only the mount ID tells it apart."""
    source = tmp_path / "elsewhere"
    source.mkdir()
    (source / "keep").write_text("bound")
    target = tree / "a" / "x"
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    assert os.stat(target).st_dev == os.stat(tree).st_dev
    with pytest.raises(MountInside):
        remove_tree(str(tree))
    assert (source / "keep").read_text() == "bound"
    assert (target / "keep").read_text() == "bound"


def test_the_root_itself_a_mount_point(tmp_path):
    root = tmp_path / "root"
    _tmpfs(root)
    try:
        with pytest.raises(MountInside):
            remove_tree(str(root))
        assert (root / "precious").read_text() == "mounted data"
    finally:
        unmount_all_under(str(tmp_path))


def test_ignore_errors_logs_and_keeps_the_mount(tree, caplog):
    mnt = tree / "a" / "b"
    _tmpfs(mnt)
    with caplog.at_level(logging.WARNING):
        remove_tree(str(tree), ignore_errors=True)
    assert (mnt / "precious").read_text() == "mounted data"
    assert "cannot remove" in caplog.text


def test_after_the_unmount_everything_goes(tree):
    mnt = tree / "a" / "b" / "c"
    _tmpfs(mnt)
    with pytest.raises(MountInside):
        remove_tree(str(tree))
    subprocess.run(["umount", str(mnt)], check=True)
    remove_tree(str(tree))
    assert not tree.exists()
