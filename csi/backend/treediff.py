"""What a writable snapshot changed, by comparing it with the tree it was snapshotted from:
the btrfs backend's answer to `summarize` and `changes`, which overlay reads off its upper.

A parallel walk of both trees. A snapshot keeps every inode number, and an inode whose
ctime has not moved has not changed (any write, chmod, chown, link or xattr change moves
it), so an unchanged entry is told apart by its lstat alone, never by its contents; a
directory is still walked (a change deep inside moves no ctime above it).

`changes` follows moby's naive diff (pkg/archive/changes.go) as inspect.diff does for an
overlay: an entry only in the snapshot is A(dded) (each entry under an added directory
too), one only in the origin D(eleted) (a deleted directory's own entry, not what was in
it), one in both C(hanged) when moby's statDifferent says so, and every directory above a
change is C up to the root. `summarize` counts the same walk as inspect.Summary counts an
upper: `created` entries only in the snapshot, `copied_up` non-directories rewritten (any
inode change), `deleted` entries only in the origin, `modified_dirs` directories whose
ctime moved; bytes are allocated bytes of the created files (st_blocks) and of the
rewritten ones' extents that are not shared (FIEMAP: a 50 MB image file with a line
appended counts the block written, not the 50 MB it still shares with the image), a
hard-linked inode once; `copied_up_logical_bytes` the sizes (st_size) of the rewritten
regular files, what overlay's copy-up without reflink would have copied.

The snapshot is the pod's to change while we read it: both trees are walked together by
directory descriptors (csi.fdwalk, the origin's directory carried along the snapshot's),
never by path and without recursion, so neither a directory swapped for a symlink nor a
tree deeper than PATH_MAX or the recursion limit leads the walk astray or raises; an entry
that changes under the walk (gone, replaced, another inode) is skipped.
"""

import fcntl
import os
import stat
import struct
from collections.abc import Callable

from csi import fdwalk
from csi.inspect import Stopped, Summary, stat_different

CAPABILITY = "security.capability"
_STOP_EVERY = 256  # entries between two questions to `stop`, as inspect asks

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap), linux/fs.h
FIEMAP_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, flags, mapped, count, rsvd
FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags (56 bytes)
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_EXTENTS = 64


def changes(origin: str, snapshot: str) -> list[tuple[str, str]]:
    """[(kind, /path)] sorted by path bytes, as inspect.diff gives them for an overlay."""
    found: dict[str, str] = {}

    def visit(rel, old, new, old_at, new_at):
        if old is None:
            found[rel] = "A"
        elif new is None:
            found[rel] = "D"
        elif _same(old, new):
            return
        elif _changed(old, new, old_at, new_at):
            found[rel] = "C"

    _walk(origin, snapshot, visit, None)
    for p in list(found):
        parent = os.path.dirname(p)
        while parent != "/" and parent not in found:
            found[parent] = "C"
            parent = os.path.dirname(parent)
    return sorted(((k, p) for p, k in found.items()), key=lambda c: os.fsencode(c[1]))


def summarize(origin: str, snapshot: str, *,
              stop: Callable[[], bool] | None = None) -> Summary:
    """What the snapshot changed, counted; `stop`, asked every _STOP_EVERY entries, ends
    the walk with `Stopped` when it says so."""
    n = dict(created=0, copied_up=0, deleted=0, modified_dirs=0, upper_inodes=0,
             copied_up_bytes=0, created_bytes=0, copied_up_logical_bytes=0)
    seen: set[int] = set()

    def visit(rel, old, new, old_at, new_at):
        if new is None:
            n["deleted"] += 1
            return
        if old is not None and _same(old, new):
            return
        is_dir = stat.S_ISDIR(new.st_mode)
        if old is not None and is_dir and stat.S_ISDIR(old.st_mode):
            n["modified_dirs"] += 1
            n["upper_inodes"] += 1
            return
        if new.st_nlink > 1 and not is_dir:
            if new.st_ino in seen:
                return
            seen.add(new.st_ino)
        n["upper_inodes"] += 1
        size = new.st_blocks * 512
        if old is None or stat.S_ISDIR(old.st_mode) != is_dir or is_dir:
            n["created"] += 1
            n["created_bytes"] += size
        else:
            n["copied_up"] += 1
            n["copied_up_bytes"] += _unshared(*new_at, new, size)
            if stat.S_ISREG(new.st_mode):
                n["copied_up_logical_bytes"] += new.st_size

    _walk(origin, snapshot, visit, stop)
    return Summary(**n, upper_bytes=n["created_bytes"] + n["copied_up_bytes"])


_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _unshared(fd: int, name: str, st: os.stat_result, allocated: int) -> int:
    """Bytes of the file `name` in the directory `fd` (listed with `st`) in extents that no
    other file shares (FIEMAP), or `allocated` where the kernel cannot map it (not a
    regular file, gone or replaced, no FIEMAP)."""
    try:
        f = os.open(name, _FILE, dir_fd=fd)
    except OSError as e:
        if e.errno in fdwalk.EXHAUSTED:
            raise
        return allocated
    try:
        now = os.fstat(f)
        if not stat.S_ISREG(now.st_mode) or fdwalk.key(now) != fdwalk.key(st):
            return allocated
        total, start = 0, 0
        while True:
            buf = bytearray(FIEMAP_HEADER.size + _EXTENTS * FIEMAP_EXTENT.size)
            FIEMAP_HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, 0, 0, _EXTENTS, 0)
            fcntl.ioctl(f, FS_IOC_FIEMAP, buf)
            mapped = FIEMAP_HEADER.unpack_from(buf, 0)[3]
            if not mapped:
                return total
            for i in range(mapped):
                logical, _, length, flags = FIEMAP_EXTENT.unpack_from(
                    buf, FIEMAP_HEADER.size + i * FIEMAP_EXTENT.size)
                if not flags & FIEMAP_EXTENT_SHARED:
                    total += length
                if flags & FIEMAP_EXTENT_LAST:
                    return total
                start = logical + length
    except OSError:
        return allocated
    finally:
        os.close(f)


def _walk(origin: str, snapshot: str, visit, stop) -> None:
    """Visit every entry of either tree: visit(rel, old_lstat, new_lstat, old_at, new_at),
    None for the side without it, `*_at` the entry as (directory fd, name); into the
    snapshot's directories (with the origin's directory of that name, if it is one).
    Entries are visited in name order, a directory's before what it holds."""
    count = 0

    def each(fds: tuple, rel: str) -> list:
        nonlocal count
        new_fd, old_fd = fds
        new = _stats(new_fd)
        old = _stats(old_fd)
        subdirs = []
        for name in sorted(old.keys() | new.keys()):
            count += 1
            if stop is not None and count % _STOP_EVERY == 0 and stop():
                raise Stopped()
            child = f"{rel}/{name}"
            o, s = old.get(name), new.get(name)
            visit(child, o, s, (old_fd, name), (new_fd, name))
            if s is not None and stat.S_ISDIR(s.st_mode):
                into = fdwalk.key(o) if o is not None and stat.S_ISDIR(o.st_mode) else None
                subdirs.append((name, (fdwalk.key(s), into), child))
        subdirs.reverse()  # the walk pops from the end: names in order
        return subdirs

    fdwalk.walk((snapshot, origin), "", each)


def _stats(fd: int | None) -> dict[str, os.stat_result]:
    """The lstat of each entry of the directory `fd`; an entry gone meanwhile is left out
    (the pod is writing)."""
    found = {}
    for e in fdwalk.entries(fd):
        try:
            found[e.name] = e.stat(follow_symlinks=False)
        except OSError as err:
            if err.errno in fdwalk.EXHAUSTED:
                raise
    return found


def _same(old: os.stat_result, new: os.stat_result) -> bool:
    """The snapshot's entry is the origin's, untouched: same inode, ctime never moved."""
    return old.st_ino == new.st_ino and old.st_ctime_ns == new.st_ctime_ns


def _changed(old: os.stat_result, new: os.stat_result, old_at: tuple, new_at: tuple) -> bool:
    """moby's statDifferent (inspect's, as overlay's diff asks it), then addChanges'
    security.capability comparison."""
    if stat_different(old, new):
        return True
    return _xattr(*old_at, CAPABILITY) != _xattr(*new_at, CAPABILITY)


def _xattr(fd: int, entry: str, name: str) -> bytes | None:
    try:
        return os.getxattr(fdwalk.at(fd, entry), name, follow_symlinks=False)
    except OSError:
        return None
