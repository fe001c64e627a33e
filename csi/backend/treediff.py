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
hard-linked inode once.
"""

import fcntl
import os
import stat
import struct
from collections.abc import Callable

from csi.inspect import Stopped, Summary

CAPABILITY = "security.capability"
_STOP_EVERY = 1024

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap), linux/fs.h
FIEMAP_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, flags, mapped, count, rsvd
FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags (56 bytes)
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_EXTENTS = 64


def changes(origin: str, snapshot: str) -> list[tuple[str, str]]:
    """[(kind, /path)] sorted by path bytes, as inspect.diff gives them for an overlay."""
    found: dict[str, str] = {}

    def visit(rel, old, new, old_path, new_path):
        if old is None:
            found[rel] = "A"
        elif new is None:
            found[rel] = "D"
        elif _same(old, new):
            return
        elif _changed(old, new, old_path, new_path):
            found[rel] = "C"

    _walk(origin, snapshot, "", visit, None)
    for p in list(found):
        parent = os.path.dirname(p)
        while parent != "/" and parent not in found:
            found[parent] = "C"
            parent = os.path.dirname(parent)
    return sorted(((k, p) for p, k in found.items()), key=lambda c: os.fsencode(c[1]))


def summarize(origin: str, snapshot: str, stop: Callable[[], bool] | None = None) -> Summary:
    n = dict(created=0, copied_up=0, deleted=0, modified_dirs=0, upper_inodes=0,
             copied_up_bytes=0, created_bytes=0)
    seen: set[int] = set()

    def visit(rel, old, new, old_path, new_path):
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
            n["copied_up_bytes"] += _unshared(new_path, size)

    _walk(origin, snapshot, "", visit, stop)
    return Summary(**n, upper_bytes=n["created_bytes"] + n["copied_up_bytes"])


def _unshared(path: str, allocated: int) -> int:
    """Bytes of `path`'s extents that no other file shares (FIEMAP), or `allocated` where
    the kernel cannot map it (not a regular file, gone, no FIEMAP)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return allocated
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return allocated
        total, start = 0, 0
        while True:
            buf = bytearray(FIEMAP_HEADER.size + _EXTENTS * FIEMAP_EXTENT.size)
            FIEMAP_HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, 0, 0, _EXTENTS, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
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
        os.close(fd)


def _walk(origin: str, snapshot: str, rel: str, visit, stop, count=None) -> None:
    """Visit every entry below `rel` of either tree: visit(rel, old_lstat, new_lstat,
    old_path, new_path), None for the side without it; into directories of the snapshot
    (with the origin's directory of that name, if it is one)."""
    count = count if count is not None else [0]
    old_dir, new_dir = origin + rel, snapshot + rel
    old_names = set(_list(old_dir)) if old_dir is not None else set()
    new_names = _list(new_dir)
    for name in sorted(old_names | set(new_names)):
        count[0] += 1
        if stop is not None and count[0] % _STOP_EVERY == 0 and stop():
            raise Stopped()
        child = f"{rel}/{name}"
        op = f"{old_dir}/{name}" if name in old_names else None
        np = f"{new_dir}/{name}" if name in new_names else None
        old = _lstat(op) if op else None
        new = _lstat(np) if np else None
        visit(child, old, new, op, np)
        if new is not None and stat.S_ISDIR(new.st_mode):
            if old is not None and stat.S_ISDIR(old.st_mode):
                _walk(origin, snapshot, child, visit, stop, count)
            else:
                _added(snapshot, child, visit, stop, count)


def _added(snapshot: str, rel: str, visit, stop, count) -> None:
    for name in sorted(_list(snapshot + rel)):
        count[0] += 1
        if stop is not None and count[0] % _STOP_EVERY == 0 and stop():
            raise Stopped()
        child = f"{rel}/{name}"
        st = _lstat(snapshot + child)
        if st is None:
            continue
        visit(child, None, st, None, snapshot + child)
        if stat.S_ISDIR(st.st_mode):
            _added(snapshot, child, visit, stop, count)


def _list(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None  # gone while we walked: the pod is writing


def _same(old: os.stat_result, new: os.stat_result) -> bool:
    """The snapshot's entry is the origin's, untouched: same inode, ctime never moved."""
    return old.st_ino == new.st_ino and old.st_ctime_ns == new.st_ctime_ns


def _same_time(a: int, b: int) -> bool:
    """moby's sameFsTime: equal, or the same second with either's nanoseconds zero."""
    return a == b or (a // 10**9 == b // 10**9 and (a % 10**9 == 0 or b % 10**9 == 0))


def _changed(old: os.stat_result, new: os.stat_result, old_path: str, new_path: str) -> bool:
    """moby's statDifferent, then addChanges' security.capability comparison."""
    if (old.st_mode != new.st_mode or old.st_uid != new.st_uid or old.st_gid != new.st_gid
            or old.st_rdev != new.st_rdev):
        return True
    if not stat.S_ISDIR(old.st_mode) and (not _same_time(old.st_mtime_ns, new.st_mtime_ns)
                                          or old.st_size != new.st_size):
        return True
    return _xattr(old_path, CAPABILITY) != _xattr(new_path, CAPABILITY)


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None
