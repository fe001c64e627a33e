"""How much of a layer's file data sits in the page cache.

Overlayfs serves reads of a file that was not copied up from the lower file's own page
cache, so every pod reading a shared layer shares one cached copy; with a private copy of
the image per pod each would cache its own. What is resident for a layer used by k pods
therefore stands for (k-1) times as much that sharing saves.

cachestat(2) (Linux 6.5) answers per file without mapping it; older kernels get mmap(2) +
mincore(2), which also never faults a page in. Opening with O_NOATIME keeps the walk from
dirtying inodes.
"""

import ctypes
import ctypes.util
import errno
import os
import stat

PAGE = os.sysconf("SC_PAGE_SIZE")
_SYS_CACHESTAT = 451  # asm-generic numbering: the same on x86_64 and arm64
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_READ, _MAP_SHARED = 0x1, 0x01


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64),
                ("nr_writeback", ctypes.c_uint64), ("nr_evicted", ctypes.c_uint64),
                ("nr_recently_evicted", ctypes.c_uint64)]


def cachestat_pages(fd: int) -> int | None:
    """Pages of the open file in the page cache; None where the kernel lacks cachestat."""
    rng, out = _Range(0, 0), _Stat()  # len 0: to the end of the file
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(out), 0) == 0:
        return out.nr_cache
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM):  # old kernel, or a seccomp filter
        return None
    raise OSError(err, os.strerror(err))


def mincore_pages(fd: int, size: int) -> int:
    """Pages of the open file in the page cache, by mapping it and asking mincore(2)."""
    if size == 0:
        return 0
    addr = _libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    try:
        vec = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
        if _libc.mincore(addr, size, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return sum(b & 1 for b in vec.raw)
    finally:
        _libc.munmap(addr, size)


class Meter:
    """Resident bytes of files and trees; remembers whether cachestat works here."""

    def __init__(self, use_cachestat: bool = True):
        self._cachestat = use_cachestat

    def file(self, path: str) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                         | os.O_NOATIME)
        except PermissionError:  # O_NOATIME needs the owner or CAP_FOWNER
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                return 0
            pages = cachestat_pages(fd) if self._cachestat else None
            if pages is None:
                self._cachestat = False
                pages = mincore_pages(fd, st.st_size)
            return min(pages * PAGE, st.st_size)
        finally:
            os.close(fd)

    def tree(self, top: str) -> int:
        """Resident bytes of every regular file under `top` (symlinks not followed;
        a file that vanishes meanwhile counts nothing)."""
        total, stack = 0, [top]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except OSError:
                continue
            for e in entries:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        total += self.file(e.path)
                except OSError:
                    pass
        return total
