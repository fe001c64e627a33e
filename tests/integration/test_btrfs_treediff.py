"""treediff on a real loop-mounted btrfs, against what a pod can do to its writable snapshot
while the metrics thread or `strata diff` walks it: trees deeper than the recursion limit
and PATH_MAX, directories swapped for symlinks out of the snapshot between the listing and
the descent, and the walk's own bookkeeping (descriptors, `stop`, logical bytes)."""

import os
import shutil
import uuid

import pytest

from csi import fdwalk
from csi.backend import treediff
from csi.inspect import Stopped
from csi.mount import btrfs
from tests.integration.test_inspect import listing_then
from tests.storefs import delete_subvolumes, store_fs

MiB = 1 << 20


def write(path, data="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data)


class Pair:
    """An origin subvolume (made read-only, as a chain is) and a writable snapshot of it."""

    def __init__(self, root: str):
        self.root = root
        self.origin = os.path.join(root, "origin")
        self.snapshot = os.path.join(root, "snap")
        btrfs.create(self.origin)

    def snap(self) -> str:
        btrfs.set_readonly(self.origin)
        btrfs.snapshot(self.origin, self.snapshot)
        return self.snapshot

    def changes(self):
        return treediff.changes(self.origin, self.snapshot)

    def summarize(self, **kw):
        return treediff.summarize(self.origin, self.snapshot, **kw)


@pytest.fixture
def pair(store_filesystems):
    root = os.path.join(store_fs(store_filesystems, "btrfs").root, f"td-{uuid.uuid4().hex}")
    os.makedirs(root)
    try:
        yield Pair(root)
    finally:
        delete_subvolumes(root)  # deep trees live only inside the subvolumes
        shutil.rmtree(root, ignore_errors=True)


def chain(top: str, name: str, depth: int) -> str:
    """`depth` nested directories `name` below `top`, made by descriptor (the path would
    pass PATH_MAX); returns the bottom's path relative to `top` (for assertions only)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            fd, parent = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent)
    finally:
        os.close(fd)
    return f"/{name}" * depth


def at_bottom(top: str, name: str, depth: int, act) -> None:
    """Runs `act(fd)` in the bottom directory of a `chain`."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            fd, parent = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent)
        act(fd)
    finally:
        os.close(fd)


def create(fd: int, name: str, data: bytes) -> None:
    with open(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "wb") as f:
        f.write(data)


def counting_fds(monkeypatch, held: list) -> None:
    real = os.scandir

    def scandir(fd):
        if isinstance(fd, int):
            held.append(len(os.listdir("/proc/self/fd")))
        return real(fd)
    monkeypatch.setattr(fdwalk.os, "scandir", scandir)


def test_a_pod_made_tree_deeper_than_the_recursion_limit_is_counted(pair, monkeypatch):
    """1100 levels made by the pod (past Python's recursion limit of 1000): every one
    counted and listed, with a bounded number of descriptors."""
    pair.snap()
    bottom = chain(pair.snapshot, "d", 1100)
    at_bottom(pair.snapshot, "d", 1100, lambda fd: create(fd, "f", b"y" * MiB))
    held = []
    with monkeypatch.context() as m:
        counting_fds(m, held)
        s = pair.summarize()
    assert (s.created, s.upper_inodes, s.copied_up, s.deleted) == (1101, 1101, 0, 0)
    assert s.created_bytes >= MiB
    assert max(held) - min(held) <= 2 * fdwalk.OPEN_DEPTH + 8
    changes = pair.changes()
    assert len(changes) == 1101
    assert changes[0] == ("A", "/d") and changes[-1] == ("A", bottom + "/f")


def test_a_change_at_the_bottom_of_a_deep_image_tree_past_path_max(pair, monkeypatch):
    """The deep tree in the image too, 1100 levels of 10-byte names (12 KB of path, past
    PATH_MAX): the origin's directories are carried along the snapshot's past the
    descriptors kept open, a file written, one added and one deleted at the bottom."""
    name = "abcdefghij"
    bottom = chain(pair.origin, name, 1100)
    at_bottom(pair.origin, name, 1100, lambda fd: (create(fd, "kept", b"k" * 4096),
                                                     create(fd, "gone", b"g"),
                                                     create(fd, "same", b"s")))
    pair.snap()

    def pod(fd):
        with open(os.open("kept", os.O_WRONLY | os.O_APPEND, dir_fd=fd), "wb") as f:
            f.write(b"more")
        os.unlink("gone", dir_fd=fd)
        create(fd, "new", b"n")
    at_bottom(pair.snapshot, name, 1100, pod)
    held = []
    with monkeypatch.context() as m:
        counting_fds(m, held)
        s = pair.summarize()
    assert (s.created, s.copied_up, s.deleted, s.modified_dirs) == (1, 1, 1, 1)
    assert s.copied_up_logical_bytes == 4096 + 4
    assert max(held) - min(held) <= 2 * fdwalk.OPEN_DEPTH + 8
    changes = pair.changes()
    assert len(changes) == 1100 + 3
    assert changes[-3:] == [("D", bottom + "/gone"), ("C", bottom + "/kept"),
                            ("A", bottom + "/new")]
    assert all(k == "C" for k, _ in changes[:-3])


@pytest.fixture
def outside(tmp_path):
    """A host directory with something to find, outside the snapshot."""
    write(str(tmp_path / "host/secret"), "s" * MiB)
    write(str(tmp_path / "host/sub/deeper"), "s")
    return tmp_path / "host"


def test_a_directory_swapped_for_a_symlink_during_the_walk_is_not_followed(
        pair, monkeypatch, outside):
    """Between the snapshot root's listing and the descent the pod replaces `x` (in the
    image) and `n` (its own) by symlinks to a host directory, and `y` by another
    directory: none of them is entered, nothing outside is listed or counted."""
    write(f"{pair.origin}/x/old")
    write(f"{pair.origin}/keep")
    pair.snap()
    write(f"{pair.snapshot}/x/f")
    write(f"{pair.snapshot}/n/f")
    write(f"{pair.snapshot}/y/f")
    write(f"{pair.snapshot}/z/other/f")  # a rename does not cross subvolumes
    read = []

    def swap(fd):
        read.append(os.readlink(f"/proc/self/fd/{fd}"))
        if read[-1] == pair.snapshot and os.path.isdir(f"{pair.snapshot}/x"):
            for d in ("x", "n", "y"):
                shutil.rmtree(f"{pair.snapshot}/{d}")
            os.symlink(outside, f"{pair.snapshot}/x")
            os.symlink(outside, f"{pair.snapshot}/n")
            os.rename(f"{pair.snapshot}/z/other", f"{pair.snapshot}/y")

    def reset():
        for d in ("x", "n", "y"):
            p = f"{pair.snapshot}/{d}"
            os.unlink(p) if os.path.islink(p) else shutil.rmtree(p)
            write(f"{p}/f")
        write(f"{pair.snapshot}/z/other/f")  # a rename does not cross subvolumes
        read.clear()

    monkeypatch.setattr(fdwalk.os, "scandir", listing_then(os.scandir, swap))
    s = pair.summarize()
    z = f"{pair.snapshot}/z"
    assert read == [pair.snapshot, pair.origin, z]  # x, n, y not entered: z (now empty)
    assert (s.created, s.created_bytes, s.copied_up, s.modified_dirs) == (3, 0, 0, 1)
    reset()
    changes = pair.changes()
    assert read == [pair.snapshot, pair.origin, z]
    assert changes == [("A", "/n"), ("A", "/y"), ("A", "/z")]  # x's own entry unchanged


def test_a_symlink_to_the_host_root_is_listed_never_followed(pair, outside):
    pair.snap()
    os.symlink("/", f"{pair.snapshot}/root")
    os.symlink(outside, f"{pair.snapshot}/host")
    assert pair.changes() == [("A", "/host"), ("A", "/root")]
    assert pair.summarize().created == 2


def test_entries_gone_or_replaced_during_the_walk_are_skipped(pair, monkeypatch):
    """ENOENT (a directory removed), ENOTDIR (one replaced by a file) between the listing
    and the descent: skipped, never raised."""
    pair.snap()
    write(f"{pair.snapshot}/a/f")
    write(f"{pair.snapshot}/b/f")

    def race(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == pair.snapshot and os.path.isdir(
                f"{pair.snapshot}/a"):
            shutil.rmtree(f"{pair.snapshot}/a")
            shutil.rmtree(f"{pair.snapshot}/b")
            write(f"{pair.snapshot}/b", "now a file")

    monkeypatch.setattr(fdwalk.os, "scandir", listing_then(os.scandir, race))
    assert pair.changes() == [("A", "/a"), ("A", "/b")]


def test_stop_ends_the_walk_and_closes_its_descriptors(pair):
    pair.snap()
    for i in range(3000):
        write(f"{pair.snapshot}/d{i % 3}/f{i}")
    asked = []

    def stop():
        asked.append(1)
        return len(asked) == 2

    fds = os.listdir("/proc/self/fd")
    with pytest.raises(Stopped):
        pair.summarize(stop=stop)
    assert len(asked) == 2
    assert os.listdir("/proc/self/fd") == fds
    assert pair.summarize(stop=lambda: False) == pair.summarize()


def test_copied_up_logical_bytes_are_the_rewritten_files_sizes(pair):
    write(f"{pair.origin}/big", "b" * (4 * MiB))
    write(f"{pair.origin}/small", "s" * 100)
    os.link(f"{pair.origin}/small", f"{pair.origin}/small-link")
    pair.snap()
    with open(f"{pair.snapshot}/big", "a") as f:
        f.write("appended\n")
    with open(f"{pair.snapshot}/small", "a") as f:
        f.write("!")
    os.sync()
    s = pair.summarize()
    assert s.copied_up == 2  # the hard-linked inode once
    assert s.copied_up_logical_bytes == 4 * MiB + 9 + 101
    assert 0 < s.copied_up_bytes < MiB, "not the 4 MiB big still shares"
