"""Walks a directory tree that a pod may be changing while it is read (an overlay upper, a
writable btrfs snapshot), by directory descriptors, never by path.

Each directory is opened by name in its parent's descriptor with O_NOFOLLOW and kept only if
it is the inode its parent's listing gave (st_dev, st_ino), so a directory swapped for a
symlink (to `/`, say) or for another directory between the listing and the descent is
skipped, never followed; no path grows with the depth (no ENAMETOOLONG past PATH_MAX); the
walk is a loop over an explicit stack (no recursion limit), holding at most OPEN_DEPTH
descriptors a tree whatever the depth.

The walk may carry companions along the tree it walks: the directories at the same places of
other trees (the read-only tree a snapshot is compared with), opened the same way.
"""

import dataclasses
import errno
import os
from collections.abc import Callable, Sequence

OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Descriptors kept open (a tree) along the current path, the root's aside: an ancestor
# deeper than this is closed, and reopened through ".." on the way back up, so a walk holds
# at most this many a tree (plus scandir's one) whatever the depth, far below RLIMIT_NOFILE.
OPEN_DEPTH = 64
# Out of descriptors (or memory) says nothing of the tree: raised, not read as "gone", so a
# caller reports an error rather than counts short of a subtree.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
Key = tuple[int, int]  # (st_dev, st_ino)


def key(st: os.stat_result) -> Key:
    return st.st_dev, st.st_ino


def at(fd: int, name: str) -> str:
    """`name` in the directory open as `fd`, for the calls that take no dir_fd (the xattr
    ones): the kernel resolves the descriptor itself, and a last component that is a
    symlink is not followed (follow_symlinks=False)."""
    return f"/proc/self/fd/{fd}/{name}"


def open_dir(fd: int, name: str, want: Key) -> int | None:
    """The directory `name` in `fd`, if it is still the inode `want`: None if it is gone, or
    was replaced (by a symlink: ELOOP, a file: ENOTDIR, another directory: a new inode)."""
    try:
        child = os.open(name, OPEN, dir_fd=fd)
    except OSError as e:
        if e.errno in EXHAUSTED:
            raise
        return None
    try:
        st = os.fstat(child)
    except BaseException:
        os.close(child)
        raise
    if key(st) == want:
        return child
    os.close(child)
    return None


def entries(fd: int | None) -> list[os.DirEntry]:
    """The entries of the directory open as `fd` ([] for None, or if it cannot be read);
    their stat(follow_symlinks=False) is an fstatat in `fd`."""
    if fd is None:
        return []
    try:
        with os.scandir(fd) as it:
            return list(it)
    except OSError as e:
        if e.errno in EXHAUSTED:
            raise
        return []


@dataclasses.dataclass(slots=True)
class _Frame:
    fds: list   # a tree's descriptor here: None where closed, or where that tree has none
    keys: list  # a tree's directory here, None where it has none
    name: str
    todo: list  # subdirectories still to walk: (name, keys, context)

    def closed(self) -> bool:
        return any(fd is None and k is not None for fd, k in zip(self.fds, self.keys, strict=True))

    def close(self) -> None:
        for i, fd in enumerate(self.fds):
            if fd is not None:
                self.fds[i] = None
                os.close(fd)


def walk(roots: Sequence[str], context, visit: Callable) -> None:
    """Calls `visit(fds, context)` for roots[0] and each directory below it, depth first;
    `fds` has one descriptor a root: the first tree's directory, then each companion's
    directory at the same place (None where that tree has none). `visit` returns the
    subdirectories to walk as (name, keys, their context), `keys` one a tree: the
    (st_dev, st_ino) its listing gave for `name`, None where that tree has no directory
    `name` to go into. A subdirectory of the first tree that is gone or no longer the inode
    listed when it is opened is skipped; a companion's is None then. What remained to walk
    in a directory that cannot be reached again is skipped. Nothing is walked if roots[0]
    cannot be opened."""
    frames: list[_Frame] = []
    try:
        root = _Frame([], [], "", [])
        frames.append(root)
        for path in roots:
            try:
                fd = os.open(path, OPEN)
            except OSError as e:
                if e.errno in EXHAUSTED:
                    raise
                fd = None
            root.fds.append(fd)
            root.keys.append(None if fd is None else key(os.fstat(fd)))
        if root.fds[0] is None:
            return  # no tree (yet, or any more): nothing to walk
        root.todo = visit(tuple(root.fds), context)
        while frames:
            top = frames[-1]
            if not top.todo:
                frames.pop()
                try:
                    if frames and frames[-1].closed():
                        _reopen(frames, top)
                finally:
                    top.close()
                continue
            name, keys, sub = top.todo.pop()
            fd = open_dir(top.fds[0], name, keys[0])
            if fd is None:
                continue
            frame = _Frame([fd], [keys[0]], name, [])
            frames.append(frame)
            for i in range(1, len(top.fds)):
                k = keys[i] if i < len(keys) else None
                c = open_dir(top.fds[i], name, k) if k is not None and top.fds[i] is not None \
                    else None
                frame.fds.append(c)
                frame.keys.append(k if c is not None else None)
            if len(frames) > OPEN_DEPTH + 1:
                frames[-OPEN_DEPTH - 1].close()
            frame.todo = visit(tuple(frame.fds), sub)
    finally:
        for f in frames:
            f.close()


def _reopen(frames: list[_Frame], child: _Frame) -> None:
    """Opens frames[-1] again, tree by tree: its child's ".." if that is still it, else by
    name from the nearest open ancestor (the child was moved); if a tree's cannot be found
    again, what remained to walk there is skipped."""
    f = frames[-1]
    for t, want in enumerate(f.keys):
        if want is None or f.fds[t] is not None:
            continue
        fd = open_dir(child.fds[t], "..", want) if child.fds[t] is not None else None
        if fd is None:
            i = max(i for i, g in enumerate(frames) if g.fds[t] is not None)  # the root's
            fd = frames[i].fds[t]
            for g in frames[i + 1:]:
                parent = fd
                try:
                    fd = open_dir(parent, g.name, g.keys[t])
                finally:
                    if parent != frames[i].fds[t]:
                        os.close(parent)
                if fd is None:
                    f.todo = []
                    return
        f.fds[t] = fd
