"""Directory trees of any depth: removing and measuring them, never crossing into a mount.

`shutil.rmtree` recurses once per level and fails on trees about a thousand levels deep, which
a hostile layer or a pod's writes make in a few kilobytes, and it deletes into whatever is
mounted inside the tree. `remove_tree` walks down with one open directory at a time (it
returns through `..`, checking that `..` is the directory it came from), so neither
recursion, descriptors nor path lengths grow with the depth, and it opens every directory
before entering it and compares its mount ID (statx, Linux 5.8; the device number before
that) with the tree's: a mount point inside the tree (a leftover loop or bind mount under
`volumes/KEY/`) is never entered, emptied or renamed. Removal stops there, the mount point
and the directories above it stay, and the refusal is logged and raised.
"""

import errno
import logging
import os
import stat
from collections.abc import Callable

from csi.statx import identity, mount_root

log = logging.getLogger(__name__)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class MountInside(OSError):
    """remove_tree found a mount point in the tree and left it, and what holds it, alone."""


class Interrupted(Exception):
    """remove_tree was told to stop; what it had not deleted yet is still there."""


def remove_tree(path: str, ignore_errors: bool = False,
                stop: Callable[[], bool] | None = None) -> None:
    """Delete `path` and everything below it; a missing path is not an error. With
    `ignore_errors`, a failure (a mount inside included) is logged instead of raised.
    `stop`, asked before each directory is entered, ends the removal there with
    Interrupted when it answers True."""
    try:
        _remove_tree(path, stop or _never)
    except OSError as e:
        if not ignore_errors:
            raise
        log.warning("cannot remove %s: %s", path, e)


def _same_mount(a: tuple, b: tuple) -> bool:
    """Whether two identities are on one mount: by mount ID where the kernel gives one,
    else by device (which cannot tell a bind mount of the same filesystem)."""
    if a[0] is not None and b[0] is not None:
        return a[0] == b[0]
    return a[1] == b[1]


def _refuse(root: str, where: str) -> MountInside:
    log.error("not removing %s: %s is a mount point; unmount it first", root, where)
    return MountInside(f"{where} is a mount point inside {root}; not removed")


def _empty_files(fd: int) -> list[str]:
    """Unlink everything in the directory but subdirectories; return those."""
    with os.scandir(fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    subdirs = []
    for name, is_dir in entries:
        if is_dir:
            subdirs.append(name)
        else:
            os.unlink(name, dir_fd=fd)
    return subdirs


def _never() -> bool:
    return False


def _remove_tree(path: str, stop: Callable[[], bool]) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    if mount_root(path):
        raise _refuse(path, path)
    cur = os.open(path, _DIR)
    try:
        home = identity(cur)
        names: list[str] = []  # names[i]: the directory entered at depth i + 1
        levels = [(home, _empty_files(cur))]  # (identity, subdirectories still to remove)
        while True:
            ident, pending = levels[-1]
            if pending:
                if stop():
                    raise Interrupted(f"removal of {path} stopped")
                name = pending.pop()
                try:
                    sub = os.open(name, _DIR, dir_fd=cur)
                except FileNotFoundError:
                    continue
                except OSError as e:  # replaced by a symlink or a file meanwhile
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    os.unlink(name, dir_fd=cur)
                    continue
                sub_ident = identity(sub)
                if not _same_mount(sub_ident, home):
                    os.close(sub)
                    raise _refuse(path, os.path.join(path, *names, name))
                os.close(cur)
                cur = sub
                names.append(name)
                levels.append((sub_ident, _empty_files(sub)))
                continue
            if not names:
                break
            parent = os.open("..", _DIR, dir_fd=cur)
            if identity(parent) != levels[-2][0]:
                os.close(parent)
                raise OSError(f"{os.path.join(path, *names)} was moved while being removed")
            os.close(cur)
            cur = parent
            levels.pop()
            os.rmdir(names.pop(), dir_fd=cur)
    finally:
        os.close(cur)
    os.rmdir(path)


def usage(path: str) -> tuple[int, int]:
    """(bytes, inodes) used under `path`: allocated bytes (st_blocks), hardlinks counted
    once, symlinks not followed, other filesystems not entered."""
    seen: set[tuple[int, int]] = set()
    total = inodes = 0
    try:
        root_dev = os.lstat(path).st_dev
    except FileNotFoundError:
        return 0, 0
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            continue  # removed while we walked (a racing unpublish): it uses nothing now
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
            inodes += 1
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev == root_dev:
                    stack.append(e.path)
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_blocks * 512
            inodes += 1
    return total, inodes
