"""statx(2), for the two answers stat(2) cannot give: which mount a path is on
(STATX_MNT_ID, Linux 5.8) and whether it is the root of a mount (STATX_ATTR_MOUNT_ROOT, 5.8).

Both see through stacked and bind mounts of one filesystem, where comparing `st_dev` cannot:
a bind mount has its source's device. Where the kernel or libc cannot say, the answer is
None and callers fall back to what they can still tell.
"""

import ctypes
import ctypes.util
import errno
import os
import sys

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_STATX_DONT_SYNC = 0x4000  # never wait on a network filesystem's server
STATX_BASIC_STATS = 0x7FF
STATX_MNT_ID = 0x1000
STATX_ATTR_MOUNT_ROOT = 0x2000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_statx = getattr(_libc, "statx", None)  # glibc >= 2.28
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                       ctypes.c_void_p]


def _call(path: str, dir_fd: int | None, flags: int, mask: int) -> bytes | int:
    """The raw struct statx, or the errno."""
    buf = ctypes.create_string_buffer(256)
    fd = AT_FDCWD if dir_fd is None else dir_fd
    if _statx(fd, os.fsencode(path), flags | AT_STATX_DONT_SYNC, mask, buf) != 0:
        return ctypes.get_errno()
    return buf.raw


def mount_id(path: str, dir_fd: int | None = None) -> int | None:
    """The ID (mountinfo's first field) of the mount `path` is on. With `dir_fd`, `path` is
    relative to it, and "" means the directory itself. A mount point's answer is the mount
    on it (path walks cross into mounts), which is how a walk notices one."""
    if _statx is None:
        return None
    raw = _call(path, dir_fd, AT_EMPTY_PATH if path == "" else 0, STATX_MNT_ID)
    if isinstance(raw, int):
        if raw in (errno.ENOENT, errno.ENOTDIR):
            raise FileNotFoundError(raw, os.strerror(raw), path)
        return None
    if not int.from_bytes(raw[0:4], sys.byteorder) & STATX_MNT_ID:  # stx_mask
        return None
    return int.from_bytes(raw[144:152], sys.byteorder)  # stx_mnt_id


def mount_root(path: str) -> bool | None:
    """Whether `path` is the root of a mount; None when the kernel cannot say."""
    if _statx is None:
        return None
    raw = _call(path, None, AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS)
    if isinstance(raw, int):
        return False if raw in (errno.ENOENT, errno.ENOTDIR) else None
    attributes = int.from_bytes(raw[8:16], sys.byteorder)  # stx_attributes
    supported = int.from_bytes(raw[56:64], sys.byteorder)  # stx_attributes_mask
    if not supported & STATX_ATTR_MOUNT_ROOT:
        return None
    return bool(attributes & STATX_ATTR_MOUNT_ROOT)


def identity(fd: int) -> tuple[int | None, int, int]:
    """(mount ID or None, st_dev, st_ino) of an open file: what it is, and on which mount."""
    st = os.fstat(fd)
    return mount_id("", dir_fd=fd), st.st_dev, st.st_ino


def device(path: str) -> tuple[int, int] | None:
    """(major, minor) of the filesystem `path` is on, following it as stat(2) does (a
    /proc/PID/fd/N link leads to the open file itself) but never waiting on a network
    filesystem's server; None when it cannot be read (gone, or not ours to read)."""
    if _statx is None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return os.major(st.st_dev), os.minor(st.st_dev)
    raw = _call(path, None, 0, 0)  # the device comes with any answer: ask for nothing more
    if isinstance(raw, int):
        return None
    return (int.from_bytes(raw[136:140], sys.byteorder),  # stx_dev_major
            int.from_bytes(raw[140:144], sys.byteorder))  # stx_dev_minor
