"""remove_tree: any depth, never through a symlink, hostile names included."""

import os

from csi.tree import remove_tree


def test_removes_a_tree_deeper_than_recursion_allows(tmp_path):
    root = tmp_path / "deep"
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        os.mkdir("deep", dir_fd=fd)
        cur = os.open("deep", os.O_RDONLY, dir_fd=fd)
        for i in range(3000):  # deeper than Python's recursion limit and PATH_MAX
            os.mkdir("d", dir_fd=cur)
            with open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=cur), "w") as f:
                f.write(str(i))
            nxt = os.open("d", os.O_RDONLY, dir_fd=cur)
            os.close(cur)
            cur = nxt
        os.close(cur)
    finally:
        os.close(fd)
    remove_tree(str(root))
    assert not root.exists()


def test_does_not_follow_symlinks_and_survives_colliding_names(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    root = tmp_path / "tree"
    (root / "a" / ".rm-1" / ".rm-2").mkdir(parents=True)
    (root / ".rm-1").mkdir()
    (root / ".rm-1" / "x").write_text("x")
    (root / ".rm-3").write_text("a file where a hoisted dir would go")
    (root / "a" / "link").symlink_to(outside)
    (root / "a" / ".rm-3").mkdir()
    os.mkfifo(root / "a" / "fifo")
    remove_tree(str(root))
    assert not root.exists()
    assert (outside / "keep").read_text() == "keep"


def test_missing_path_and_plain_file(tmp_path):
    remove_tree(str(tmp_path / "nope"))
    f = tmp_path / "file"
    f.write_text("x")
    remove_tree(str(f))
    assert not f.exists()
