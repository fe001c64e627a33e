"""A file's extents, as the kernel tells them: cloning one file's extents into another
(FICLONE, the start-up probe of whether the store's filesystem shares blocks) and how many of
a file's bytes lie in extents it shares with another file (FIEMAP, for copy-up metrics).

On XFS (reflink=1) and btrfs, overlayfs copies a lower file up by cloning its extents
(vfs_clone_file_range, before it falls back to copying): the upper file's st_blocks then
count every block, although none is newly allocated until the pod writes over it. FIEMAP's
FIEMAP_EXTENT_SHARED flag tells those blocks apart (fs/ioctl.c, Documentation/filesystems/
fiemap.rst). Neither call exists in Python's standard library: they are ioctls on
descriptors, with the structures laid out here.
"""

import errno
import fcntl
import struct

FICLONE = 0x40049409          # _IOW(0x94, 9, int)
FS_IOC_FIEMAP = 0xC020660B    # _IOWR('f', 11, struct fiemap)
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000

# struct fiemap: fm_start, fm_length (u64), fm_flags, fm_mapped_extents, fm_extent_count,
# fm_reserved (u32); then struct fiemap_extent[fm_extent_count]: fe_logical, fe_physical,
# fe_length, fe_reserved64[2] (u64), fe_flags, fe_reserved[3] (u32).
_HEAD = struct.Struct("=QQIIII")
_EXTENT = struct.Struct("=QQQQQIIII")
# Extents asked per call: most files (and every clone of an unfragmented one) answer in one
# ioctl; a fragmented file takes one more call per this many extents.
BATCH = 128
_MAX = 0xFFFFFFFFFFFFFFFF

# What FICLONE answers where the filesystem cannot share extents between these two files:
# no remap_file_range (EOPNOTSUPP; ENOTTY from a filesystem that does not know the ioctl),
# different filesystems (EXDEV), or a range it will not clone (EINVAL).
NOT_SHARED = frozenset({errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY})


def clone(src_fd: int, dst_fd: int) -> None:
    """Make the file at `dst_fd` share every extent of the one at `src_fd` (FICLONE);
    raises the kernel's OSError (an errno in NOT_SHARED where it cannot)."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def shared_bytes(fd: int) -> int:
    """Bytes of the file at `fd` in extents the filesystem says it shares with another
    file (a clone's source, a snapshot). Not synced first (FIEMAP_FLAG_SYNC would write
    back a pod's dirty data for a metric): data not yet written back is in delayed
    extents, which are never shared. 0 where the filesystem has no FIEMAP (EOPNOTSUPP,
    ENOTTY: it shares nothing it could tell us of)."""
    total, start = 0, 0
    while True:
        buf = bytearray(_HEAD.size + BATCH * _EXTENT.size)
        _HEAD.pack_into(buf, 0, start, _MAX - start, 0, 0, BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                return 0
            raise
        mapped = _HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            return total
        last = None
        for i in range(mapped):
            logical, _, length, _, _, flags, *_ = _EXTENT.unpack_from(
                buf, _HEAD.size + i * _EXTENT.size)
            if flags & FIEMAP_EXTENT_SHARED:
                total += length
            last = (logical, length, flags)
        logical, length, flags = last
        if flags & FIEMAP_EXTENT_LAST or mapped < BATCH:
            return total
        start = logical + length
