"""btrfs subvolumes, snapshots and qgroups, by ioctl: the kernel side of the btrfs backend.

The plugin's image has no btrfs-progs, so every operation is the ioctl `btrfs(8)` itself
makes, with the structures of the kernel's `include/uapi/linux/btrfs.h`:

- a **subvolume** is a directory with a tree of its own: its root has inode number 256
  (`BTRFS_FIRST_FREE_OBJECTID`) and a device number of its own. `create` makes an empty one
  (`BTRFS_IOC_SUBVOL_CREATE`), `snapshot` a copy of one that shares every extent and keeps
  every inode number (`BTRFS_IOC_SNAP_CREATE_V2`, read-only with `BTRFS_SUBVOL_RDONLY`),
  `delete` removes one (`BTRFS_IOC_SNAP_DESTROY`; the subvolumes nested in it first, since
  the kernel refuses a subvolume that has any), `readonly`/`set_readonly` read and flip its
  read-only flag (`BTRFS_IOC_SUBVOL_GETFLAGS`/`SETFLAGS`).
- a **qgroup** `0/ID` counts what subvolume ID references and what it alone holds
  (exclusive); once quotas are enabled on the filesystem (`BTRFS_IOC_QUOTA_CTL`), the
  kernel keeps one per subvolume, and `limit` (`BTRFS_IOC_QGROUP_LIMIT`) makes writes past
  its limit fail with EDQUOT. `usage` reads the counts from sysfs, which the kernel updates
  at each transaction commit (a `syncfs` makes them current).
- a **group** is a level-1 qgroup `1/ID` of a subvolume's own (`BTRFS_IOC_QGROUP_CREATE`,
  `BTRFS_IOC_QGROUP_ASSIGN`), limited instead of `0/ID`. Under *simple* quotas
  (`quota_mode` "squota", Linux 6.7) a subvolume made inside another without naming
  qgroups to inherit (as `btrfs subvolume create` makes it) joins the level-1 qgroups of
  the one it is made in, however deep, so the group's limit also bounds what is written
  into it; a plain `0/ID` limit, and any limit under full qgroups, does not (such a
  subvolume has a qgroup of its own). A process that names an empty inheritance itself
  (`BTRFS_SUBVOL_QGROUP_INHERIT`, no privilege needed) still makes one outside the group.

A path that is not on btrfs is refused with `NotBtrfs` (the kernel would say ENOTTY), a
directory that is not a subvolume with `NotSubvolume`; everything else the kernel refuses
is its OSError (EEXIST, ENOTEMPTY, EROFS, EPERM).
"""

import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import os
import stat
import struct
import uuid

from csi.errors import FailedPrecondition

# _IOC(dir, type, nr, size) of asm-generic/ioctl.h.
_NONE, _WRITE, _READ = 0, 1, 2
MAGIC = 0x94


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (MAGIC << 8) | nr


VOL_ARGS_SIZE = 4096      # struct btrfs_ioctl_vol_args: __s64 fd; char name[4088]
VOL_ARGS_V2_SIZE = 4096   # fd, transid, flags, a 32-byte union, char name[4040]
VOL_ARGS_V2_NAME = 56     # offsetof(struct btrfs_ioctl_vol_args_v2, name)
INO_LOOKUP_SIZE = 4096    # __u64 treeid; __u64 objectid; char name[4080]
FS_INFO_SIZE = 1024       # struct btrfs_ioctl_fs_info_args; fsid at offset 16
QGROUP_LIMIT_SIZE = 48    # __u64 qgroupid; struct btrfs_qgroup_limit (5 x __u64)
QGROUP_ASSIGN_SIZE = 24   # __u64 assign (1: add, 0: remove); __u64 src; __u64 dst
SEARCH_ARGS_SIZE = 4096   # struct btrfs_ioctl_search_key (104 bytes), then items
SEARCH_KEY_SIZE = 104     # tree_id, min/max objectid, offset, transid; min/max type; nr_items
SEARCH_HEADER_SIZE = 32   # an item's transid, objectid, offset, type, len
QUOTA_TREE_OBJECTID = 8
QGROUP_RELATION_KEY = 246
QGROUP_CREATE_SIZE = 16   # __u64 create (1: create, 0: destroy); __u64 qgroupid

SUBVOL_CREATE = _ioc(_WRITE, 14, VOL_ARGS_SIZE)
SNAP_DESTROY = _ioc(_WRITE, 15, VOL_ARGS_SIZE)
INO_LOOKUP = _ioc(_READ | _WRITE, 18, INO_LOOKUP_SIZE)
SNAP_CREATE_V2 = _ioc(_WRITE, 23, VOL_ARGS_V2_SIZE)
SUBVOL_GETFLAGS = _ioc(_READ, 25, 8)
SUBVOL_SETFLAGS = _ioc(_WRITE, 26, 8)
FS_INFO = _ioc(_READ, 31, FS_INFO_SIZE)
QUOTA_CTL = _ioc(_READ | _WRITE, 40, 16)
TREE_SEARCH = _ioc(_READ | _WRITE, 17, SEARCH_ARGS_SIZE)
QGROUP_ASSIGN = _ioc(_WRITE, 41, QGROUP_ASSIGN_SIZE)
QGROUP_CREATE = _ioc(_WRITE, 42, QGROUP_CREATE_SIZE)
QGROUP_LIMIT = _ioc(_READ, 43, QGROUP_LIMIT_SIZE)  # _IOR in the header, though it writes
QUOTA_RESCAN_WAIT = _ioc(_NONE, 46, 0)

SUPER_MAGIC = 0x9123683E  # statfs(2) f_type
FIRST_FREE_OBJECTID = 256  # a subvolume root's inode number
SUBVOL_RDONLY = 1 << 1
QUOTA_CTL_ENABLE = 1
QUOTA_CTL_ENABLE_SIMPLE_QUOTA = 4
GROUP_LEVEL = 1  # a qgroup ID is level << 48 | id
QGROUP_LIMIT_MAX_RFER = 1 << 0
QGROUP_LIMIT_MAX_EXCL = 1 << 1
NAME_MAX = 255


class NotBtrfs(FailedPrecondition):
    """A btrfs operation on a path of another filesystem."""


class NotSubvolume(FailedPrecondition):
    """A subvolume operation on a directory that is not one."""


def is_btrfs(path: str) -> bool:
    """Whether `path` lies on btrfs (the fs of the path itself: a symlink is followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_PATH)
    try:
        return _fs_type(fd) == SUPER_MAGIC
    finally:
        os.close(fd)


def is_subvolume(path: str) -> bool:
    """Whether `path` (not followed if a symlink) is the root of a btrfs subvolume."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_ino == FIRST_FREE_OBJECTID
            and is_btrfs(path))


def create(path: str) -> None:
    """Make an empty subvolume at `path` (EEXIST if anything is there)."""
    with _parent(path) as (fd, name):
        args = bytearray(VOL_ARGS_SIZE)
        args[8:8 + len(name)] = name
        fcntl.ioctl(fd, SUBVOL_CREATE, args)


def snapshot(source: str, dest: str, readonly: bool = False) -> None:
    """Make `dest` a snapshot of the subvolume `source`: the same files, inode numbers and
    extents, written to apart from then on; read-only if `readonly`."""
    src = _open_subvolume(source)
    try:
        with _parent(dest) as (fd, name):
            args = bytearray(VOL_ARGS_V2_SIZE)
            struct.pack_into("=qQQ", args, 0, src, 0, SUBVOL_RDONLY if readonly else 0)
            args[VOL_ARGS_V2_NAME:VOL_ARGS_V2_NAME + len(name)] = name
            fcntl.ioctl(fd, SNAP_CREATE_V2, args)
    finally:
        os.close(src)


def delete(path: str) -> None:
    """Delete the subvolume `path` and every subvolume nested in it, children first. The
    kernel deletes a subvolume's files itself (in the background, however many)."""
    _open_subvolume(path, close=True)  # refuse a plain directory, or another filesystem
    try:
        _destroy(path)
    except OSError as e:
        if e.errno != errno.ENOTEMPTY:
            raise
        for child in nested(path):
            delete(child)
        _destroy(path)




def nested(path: str) -> list[str]:
    """The subvolumes directly nested in subvolume `path` (not their own nested ones): the
    directories of its tree whose root is another subvolume's. Walks the whole tree."""
    found = []
    dev = os.lstat(path).st_dev
    for top, dirs, _ in os.walk(path):
        keep = []
        for d in dirs:
            st = os.lstat(os.path.join(top, d))
            if st.st_dev != dev and st.st_ino == FIRST_FREE_OBJECTID:
                found.append(os.path.join(top, d))
            elif st.st_dev == dev:
                keep.append(d)  # not into mounts
        dirs[:] = keep
    return found


def readonly(path: str) -> bool:
    fd = _open_subvolume(path)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, SUBVOL_GETFLAGS, buf)
        return bool(struct.unpack("=Q", buf)[0] & SUBVOL_RDONLY)
    finally:
        os.close(fd)


def set_readonly(path: str, value: bool = True) -> None:
    fd = _open_subvolume(path)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, SUBVOL_GETFLAGS, buf)
        flags = struct.unpack("=Q", buf)[0]
        flags = flags | SUBVOL_RDONLY if value else flags & ~SUBVOL_RDONLY
        fcntl.ioctl(fd, SUBVOL_SETFLAGS, struct.pack("=Q", flags))
    finally:
        os.close(fd)


def subvolume_id(path: str) -> int:
    """The ID of the subvolume `path` (its root: any path inside one names the same)."""
    fd = _open_btrfs(path)
    try:
        args = bytearray(INO_LOOKUP_SIZE)
        struct.pack_into("=QQ", args, 0, 0, FIRST_FREE_OBJECTID)  # treeid 0: fd's own
        fcntl.ioctl(fd, INO_LOOKUP, args)
        return struct.unpack_from("=Q", args, 0)[0]
    finally:
        os.close(fd)


def fs_uuid(path: str) -> str:
    """The filesystem's UUID, as /sys/fs/btrfs/ names it."""
    fd = _open_btrfs(path)
    try:
        args = bytearray(FS_INFO_SIZE)
        fcntl.ioctl(fd, FS_INFO, args)
        return str(uuid.UUID(bytes=bytes(args[16:32])))
    finally:
        os.close(fd)


def _qgroups(path: str) -> str:
    return f"/sys/fs/btrfs/{fs_uuid(path)}/qgroups"


def _qgroup_dir(path: str, level: int) -> str:
    """Where sysfs shows qgroup LEVEL/ID of subvolume `path` (once quotas are on)."""
    return os.path.join(_qgroups(path), f"{level}_{subvolume_id(path)}")


def quota_enabled(path: str) -> bool:
    """Whether the filesystem of `path` keeps qgroups."""
    return os.path.isdir(_qgroups(path))


def quota_mode(path: str) -> str:
    """How the filesystem of `path` keeps quotas: "" (it does not), "qgroup" (full
    qgroups, `btrfs quota enable`) or "squota" (simple quotas, `btrfs quota enable
    --simple`: each extent counted to the subvolume that wrote it)."""
    try:
        with open(os.path.join(_qgroups(path), "mode")) as f:
            return f.read().strip()
    except FileNotFoundError:  # quotas off, or a kernel before 6.7 (full qgroups only)
        return "qgroup" if quota_enabled(path) else ""


def enable_quota(path: str, simple: bool = False) -> None:
    """Turn quotas on for the filesystem of `path` (a no-op where they are on): full
    qgroups, once the kernel's first count of what is already there is done, or `simple`
    quotas (which count only what is written from then on, and need no count)."""
    if quota_enabled(path):
        return
    fd = _open_btrfs(path)
    try:
        cmd = QUOTA_CTL_ENABLE_SIMPLE_QUOTA if simple else QUOTA_CTL_ENABLE
        fcntl.ioctl(fd, QUOTA_CTL, bytearray(struct.pack("=QQ", cmd, 0)))
        if not simple:
            fcntl.ioctl(fd, QUOTA_RESCAN_WAIT)
    finally:
        os.close(fd)


def _qgroup_id(level: int, sid: int) -> int:
    return (level << 48) | sid


def limit(path: str, nbytes: int, exclusive: bool = True, level: int = 0) -> None:
    """Limit qgroup 0/ID of subvolume `path` (`level` 1: its group, 1/ID) to `nbytes` (0:
    no limit) of what it holds alone (`exclusive`: its own writes, not what it shares
    with the snapshot it came from) or of everything it references."""
    # The kernel lifts a limit when its flag comes with the value (u64)-1.
    value = nbytes if nbytes else (1 << 64) - 1
    flag = QGROUP_LIMIT_MAX_EXCL if exclusive else QGROUP_LIMIT_MAX_RFER
    qgroup = _qgroup_id(level, subvolume_id(path))
    fd = _open_subvolume(path)
    try:
        args = bytearray(QGROUP_LIMIT_SIZE)  # qgroupid, flags, max_rfer, max_excl, rsv x2
        struct.pack_into("=QQQQQQ", args, 0, qgroup, flag,
                         0 if exclusive else value, value if exclusive else 0, 0, 0)
        fcntl.ioctl(fd, QGROUP_LIMIT, args)
    finally:
        os.close(fd)


def group(path: str, nbytes: int) -> None:
    """Make subvolume `path`'s group 1/ID, put `path` in it and limit it to `nbytes` of
    what its members reference. Under simple quotas a subvolume made inside `path` the
    ordinary way joins it (the module docstring), so the limit holds for it too. A group
    left by an earlier subvolume of the same ID (a removal that failed) is dissolved
    first: its members are long gone."""
    sid = subvolume_id(path)
    group_id = _qgroup_id(GROUP_LEVEL, sid)
    fd = _open_subvolume(path)
    try:
        try:
            _create(fd, group_id, True)
        except FileExistsError:
            _dissolve(fd, group_id)
            _create(fd, group_id, True)
        _assign(fd, sid, group_id, True)
    finally:
        os.close(fd)
    limit(path, nbytes, exclusive=False, level=GROUP_LEVEL)


def _members(fd: int, group_id: int) -> list[int]:
    """The qgroups in `group_id`, from its relation items in the quota tree
    (`BTRFS_IOC_TREE_SEARCH`: key (group, QGROUP_RELATION, member))."""
    found: list[int] = []
    offset = 0
    while True:
        args = bytearray(SEARCH_ARGS_SIZE)
        struct.pack_into("=QQQQQQQIII", args, 0, QUOTA_TREE_OBJECTID, group_id, group_id,
                         offset, (1 << 64) - 1, 0, (1 << 64) - 1,
                         QGROUP_RELATION_KEY, QGROUP_RELATION_KEY, 512)
        fcntl.ioctl(fd, TREE_SEARCH, args)
        count = struct.unpack_from("=I", args, 64)[0]  # nr_items: how many came back
        pos = SEARCH_KEY_SIZE
        for _ in range(count):
            _, objectid, member, kind, size = struct.unpack_from("=QQQII", args, pos)
            if objectid == group_id and kind == QGROUP_RELATION_KEY:
                found.append(member)
            pos += SEARCH_HEADER_SIZE + size
        if count == 0 or not found or found[-1] == (1 << 64) - 1:
            return found
        offset = found[-1] + 1


def grouped(path: str) -> bool:
    """Whether subvolume `path` has a group (1/ID)."""
    return os.path.isdir(_qgroup_dir(path, GROUP_LEVEL))


def ungroup(path: str) -> None:
    """Take subvolume `path` and the subvolumes nested in it out of its group (1/ID) and
    destroy the group: before they are deleted, so that deleting them reserves nothing
    against its limit (a full group refuses that with EDQUOT) and a retry after a crash
    finds the group still there. A member already out, a group already gone, or quotas
    off is no error."""
    group_id = _qgroup_id(GROUP_LEVEL, subvolume_id(path))
    # From the directory holding it: the ioctls' transaction reserves metadata in the
    # subvolume of the fd they come through, and a full group would refuse it (EDQUOT).
    fd = _open_btrfs(os.path.dirname(os.path.abspath(path)))
    try:
        _dissolve(fd, group_id)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTCONN):  # no group; quotas off
            raise
    finally:
        os.close(fd)


def _dissolve(fd: int, group_id: int) -> None:
    """Take every member out of `group_id` and destroy it (ENOENT: there is none)."""
    for member in _members(fd, group_id):
        try:
            _assign(fd, member, group_id, False)
        except FileNotFoundError:  # gone meanwhile
            pass
    _create(fd, group_id, False)


def _create(fd: int, qgroup: int, create: bool) -> None:
    """Create qgroup `qgroup`, or destroy it."""
    fcntl.ioctl(fd, QGROUP_CREATE, bytearray(struct.pack("=QQ", int(create), qgroup)))


def _assign(fd: int, member: int, parent: int, assign: bool) -> None:
    """Make qgroup `member` a member of `parent`, or no longer one."""
    fcntl.ioctl(fd, QGROUP_ASSIGN, bytearray(struct.pack("=QQQ", int(assign), member, parent)))


@dataclasses.dataclass(frozen=True)
class QgroupUsage:
    referenced: int  # bytes of every extent the subvolume's files use
    exclusive: int   # bytes of the extents no other subvolume shares
    max_referenced: int = 0  # the limits (0: none)
    max_exclusive: int = 0


def usage(path: str, level: int = 0) -> QgroupUsage:
    """What qgroup 0/ID of subvolume `path` (`level` 1: its group, 1/ID) counts, as of
    the last transaction commit; FileNotFoundError where quotas are off (or it has no
    group)."""
    here = _qgroup_dir(path, level)

    def read(name: str) -> int:
        try:
            with open(os.path.join(here, name)) as f:
                text = f.read().strip()
        except FileNotFoundError:
            if name.startswith("max_"):
                return 0
            raise
        return 0 if text == "none" else int(text)

    return QgroupUsage(read("referenced"), read("exclusive"),
                       read("max_referenced"), read("max_exclusive"))


# -- helpers ------------------------------------------------------------------------------
class _parent:
    """The directory that will hold `path` (opened) and `path`'s name, for the ioctls that
    name a new or doomed subvolume inside a directory fd."""

    def __init__(self, path: str):
        head, name = os.path.split(os.path.abspath(path))
        self.name = os.fsencode(name)
        if not self.name or len(self.name) > NAME_MAX or self.name in (b".", b".."):
            raise OSError(errno.EINVAL, "not a name for a subvolume", path)
        self.fd = _open_btrfs(head)

    def __enter__(self):
        return self.fd, self.name

    def __exit__(self, *exc):
        os.close(self.fd)


def _destroy(path: str) -> None:
    with _parent(path) as (fd, name):
        args = bytearray(VOL_ARGS_SIZE)
        args[8:8 + len(name)] = name
        fcntl.ioctl(fd, SNAP_DESTROY, args)


def _open_btrfs(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if _fs_type(fd) != SUPER_MAGIC:
        os.close(fd)
        raise NotBtrfs(f"{path} is not on btrfs")
    return fd


def _open_subvolume(path: str, close: bool = False) -> int:
    fd = _open_btrfs(path)
    if os.fstat(fd).st_ino != FIRST_FREE_OBJECTID:
        os.close(fd)
        raise NotSubvolume(f"{path} is a directory, not a btrfs subvolume")
    if close:
        os.close(fd)
    return fd


def _fs_type(fd: int) -> int:
    """statfs(2)'s f_type, through fstatfs: Python's os.fstatvfs does not return it."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.fstatfs(fd, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    # f_type is the first member, a word (__fsword_t) wide.
    return struct.unpack_from("@l", buf.raw, 0)[0] & 0xFFFFFFFF

