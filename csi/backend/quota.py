"""Project quotas: a size limit on a publication's directory, kept by the store's own
filesystem, with no filesystem image of its own.

Where the store's filesystem enforces project quotas (XFS mounted with `prjquota`; ext4 with
the `quota` and `project` features mounted with `prjquota`), a publication's directory
(`volumes/KEY/`) gets a **project ID** of its own and a hard limit on the bytes and inodes
that project may hold, as Docker's overlay2 `--storage-opt size` does. Everything made
below the directory afterwards inherits the ID (`FS_XFLAG_PROJINHERIT`), so the overlay's
upper and work directories, created inside it, are counted together; writes past the
limit fail in the pod (EDQUOT on ext4, ENOSPC on XFS, which reports project quotas as a
full disk) and nowhere else.

Where they are not enforced, `ProjectQuotas.probe` says why (logged once at start-up) and
returns None; the caller then bounds the upper with a loop-mounted filesystem instead.

The kernel interfaces, all through ctypes:
- `quotactl_fd(2)` (Linux 5.14) on an fd of a directory of the filesystem, or on older
  kernels `quotactl(2)` on the block device the mount table names;
- `Q_XGETQSTATV` (XFS's state: is project accounting on, is it enforced), `Q_GETINFO`
  (the generic quota layer's: is project accounting on), `Q_SETQUOTA`/`Q_GETQUOTA` with
  `struct if_dqblk` (both interfaces: XFS implements the generic calls too);
- `FS_IOC_FSGETXATTR`/`FS_IOC_FSSETXATTR` with `struct fsxattr` for a directory's project
  ID, which XFS and ext4 (with the `project` feature) store whether or not quotas are on.

The disk is the truth: a directory's project ID (`project_of`) survives a crash that
state.db's record of it may not, and `allocate` picks a free ID from the IDs the caller
knows to be in use.
"""

import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import functools
import logging
import os
import re
import stat
import struct
from collections.abc import Iterable

from csi.errors import ResourceExhausted
from csi.mount.mountinfo import MountInfo, MountTable, mount_of

log = logging.getLogger(__name__)

# --- ioctl numbers: _IOC(dir, type, nr, size) as asm-generic/ioctl.h builds them (x86,
# arm64, riscv, s390; powerpc, mips and sparc lay the bits out differently).
_IOC_WRITE, _IOC_READ = 1, 2


def ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


# struct fsxattr (linux/fs.h): fsx_xflags, fsx_extsize, fsx_nextents, fsx_projid,
# fsx_cowextsize, 8 pad bytes. 28 bytes.
FSXATTR = struct.Struct("=5I8x")
FS_IOC_FSGETXATTR = ioc(_IOC_READ, "X", 31, FSXATTR.size)
FS_IOC_FSSETXATTR = ioc(_IOC_WRITE, "X", 32, FSXATTR.size)
FS_XFLAG_PROJINHERIT = 0x200


@dataclasses.dataclass(frozen=True)
class FsXattr:
    xflags: int = 0
    extsize: int = 0
    nextents: int = 0
    projid: int = 0
    cowextsize: int = 0

    def pack(self) -> bytes:
        return FSXATTR.pack(self.xflags, self.extsize, self.nextents, self.projid,
                            self.cowextsize)

    @classmethod
    def unpack(cls, raw: bytes) -> "FsXattr":
        return cls(*FSXATTR.unpack(raw))

    @property
    def inherits(self) -> bool:
        return bool(self.xflags & FS_XFLAG_PROJINHERIT)


# --- quotactl commands (linux/quota.h, linux/dqblk_xfs.h).
PRJQUOTA = 2
Q_GETINFO = 0x800005
Q_GETQUOTA = 0x800007
Q_SETQUOTA = 0x800008
Q_XGETQSTATV = (ord("X") << 8) + 8


def qcmd(cmd: int, kind: int) -> int:
    """QCMD(cmd, type): the subcommand above 8 bits, the quota type below."""
    return (cmd << 8) | (kind & 0xFF)


# struct if_dqblk: dqb_bhardlimit, dqb_bsoftlimit (1 KiB blocks), dqb_curspace (bytes),
# dqb_ihardlimit, dqb_isoftlimit, dqb_curinodes, dqb_btime, dqb_itime, dqb_valid. The u32
# after eight u64s is padded to 72 bytes, the size the kernel copies.
IF_DQBLK = struct.Struct("=8QI4x")
QIF_BLIMITS = 1
QIF_ILIMITS = 4
QIF_LIMITS = QIF_BLIMITS | QIF_ILIMITS
QIF_DQBLKSIZE = 1024

# struct fs_quota_statv: qs_version (s8), pad, qs_flags (u16), qs_incoredqs (u32), then
# three 24-byte fs_qfilestatv, timers and warning limits: 160 bytes. Only the flags are read.
FS_QUOTA_STATV_SIZE = 160
FS_QSTATV_VERSION1 = 1
FS_QUOTA_PDQ_ACCT = 0x10
FS_QUOTA_PDQ_ENFD = 0x20


@dataclasses.dataclass(frozen=True)
class DqBlk:
    """One project's limits and usage as `struct if_dqblk` carries them, in its units."""

    bhardlimit: int = 0  # KiB; 0: none
    bsoftlimit: int = 0
    curspace: int = 0  # bytes
    ihardlimit: int = 0  # 0: none
    isoftlimit: int = 0
    curinodes: int = 0
    btime: int = 0
    itime: int = 0
    valid: int = 0

    def pack(self) -> bytes:
        return IF_DQBLK.pack(*dataclasses.astuple(self))

    @classmethod
    def unpack(cls, raw: bytes) -> "DqBlk":
        return cls(*IF_DQBLK.unpack(raw[:IF_DQBLK.size]))


def limits(size_bytes: int, inodes: int) -> DqBlk:
    """The Q_SETQUOTA request for hard limits of `size_bytes` (rounded up to the KiB the
    interface counts in: a limit is never below what was asked) and `inodes` (0: none).
    No soft limits: below the hard limit one would only start a grace timer, and equal
    to it it adds nothing."""
    if size_bytes < 0 or inodes < 0:
        raise ValueError(f"a quota limit cannot be negative ({size_bytes} bytes, {inodes} inodes)")
    return DqBlk(bhardlimit=-(-size_bytes // QIF_DQBLKSIZE), ihardlimit=inodes,
                 valid=QIF_LIMITS)


def statv_flags(raw: bytes) -> int:
    """qs_flags from a `struct fs_quota_statv`."""
    return struct.unpack_from("=bBH", raw)[2]


def statv_request() -> ctypes.Array:
    """A buffer for Q_XGETQSTATV: the caller states the version it understands."""
    buf = ctypes.create_string_buffer(FS_QUOTA_STATV_SIZE)
    buf[0] = FS_QSTATV_VERSION1
    return buf


# --- project IDs.
# Kubelet's quota monitoring allocates from 1048577 upwards and administrators write small
# IDs in /etc/projid; strata's default range sits far from both.
DEFAULT_IDS = range(1 << 30, (1 << 30) + (1 << 20))
MAX_ID = (1 << 32) - 2  # projid_t is u32, and (u32)-1 is the kernel's INVALID_PROJID


def check_ids(ids: range) -> range:
    """`ids` if it can hold project IDs; ValueError naming the problem otherwise. 0 is
    every file's project when none was set, so it is never handed out."""
    if ids.step != 1 or not ids or ids.start < 1 or ids[-1] > MAX_ID:
        raise ValueError(f"project IDs must be a non-empty range within 1-{MAX_ID}, "
                         f"not {ids.start}-{ids.stop - 1}")
    return ids


def parse_ids(text: str) -> range:
    """"FIRST-LAST" (inclusive), as an operator writes a range of project IDs."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"project IDs: expected FIRST-LAST, got {text!r}")
    return check_ids(range(int(m[1]), int(m[2]) + 1))


def allocate(in_use: Iterable[int], ids: range = DEFAULT_IDS) -> int:
    """The lowest ID of `ids` not in `in_use` (the IDs state.db records, and any found on
    disk that it does not). Lowest first keeps IDs small and reuse predictable; an ID is
    reused only after `release` cleared its limits."""
    taken = {i for i in in_use if i in ids}
    for candidate in ids:
        if candidate not in taken:
            return candidate
    raise ResourceExhausted(f"no free project ID: all {len(ids)} of "
                            f"{ids.start}-{ids.stop - 1} are in use")


# --- the kernel calls.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.quotactl.argtypes = [ctypes.c_uint, ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p]
# Syscall numbers from 424 on are the same on every architecture.
SYS_QUOTACTL_FD = 443


def _open_dir(path: str) -> int:
    """A publication's directory, not whatever a symlink put in its place."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def read_fsxattr(path: str) -> FsXattr:
    """The `struct fsxattr` of a directory or regular file (not through a symlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return _get_fsxattr(fd)
    finally:
        os.close(fd)


def _get_fsxattr(fd: int) -> FsXattr:
    buf = bytearray(FSXATTR.size)
    fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
    return FsXattr.unpack(bytes(buf))


def project_of(path: str) -> int:
    """The project ID a directory (or file) carries on disk (0: none). Works without
    quotas: XFS and ext4 with the `project` feature store the ID either way."""
    return read_fsxattr(path).projid


def set_project(directory: str, project_id: int) -> None:
    """Put `directory` in project `project_id`, with PROJINHERIT so that what is created
    below it later joins the same project. Only the directory itself changes: files already
    inside keep their project (`assign` is meant for a directory made for it)."""
    fd = _open_dir(directory)
    try:
        now = _get_fsxattr(fd)
        want = dataclasses.replace(now, projid=project_id,
                                   xflags=now.xflags | FS_XFLAG_PROJINHERIT)
        if want != now:
            fcntl.ioctl(fd, FS_IOC_FSSETXATTR, want.pack())
    finally:
        os.close(fd)


@functools.cache
def has_quotactl_fd() -> bool:
    """Whether this kernel has quotactl_fd(2) (5.14). Asked with a bad fd, because the
    call's ENOSYS also means "this filesystem has no quota operations" (XFS built without
    CONFIG_XFS_QUOTA answers so): EBADF says the call exists."""
    rc = _libc.syscall(ctypes.c_long(SYS_QUOTACTL_FD), ctypes.c_int(-1),
                       ctypes.c_uint(qcmd(Q_GETINFO, PRJQUOTA)), ctypes.c_uint(0), None)
    return not (rc < 0 and ctypes.get_errno() == errno.ENOSYS)


def _quotactl(path: str, device: str, cmd: int, project_id: int, buf) -> None:
    """One project-quota command on the filesystem of `path`: through quotactl_fd on a
    directory fd, or quotactl(2) on `device` when that is given (kernels before 5.14)."""
    full = qcmd(cmd, PRJQUOTA)
    if device:
        rc = _libc.quotactl(full, os.fsencode(device), project_id, buf)
    else:
        # Any fd on the filesystem will do; the store's root may well be a symlink.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            rc = _libc.syscall(ctypes.c_long(SYS_QUOTACTL_FD), ctypes.c_int(fd),
                               ctypes.c_uint(full), ctypes.c_uint(project_id), buf)
        finally:
            os.close(fd)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"quotactl({cmd:#x}, project {project_id}) on {device or path}: "
                           f"{os.strerror(err)}")


def _errno_of(fn) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno or errno.EIO
    return 0


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the kernel said about one filesystem's project quotas; `judge` decides from
    these alone, so every verdict can be tested without a kernel that has quotas."""

    fstype: str
    mount_point: str
    super_options: str = ""
    unreachable: str = ""  # why no quotactl could be asked at all; "" when one was
    statv_errno: int = 0  # Q_XGETQSTATV (0: it answered)
    statv_flags: int = 0
    info_errno: int = 0  # Q_GETINFO for PRJQUOTA (the generic interface)


_EXT4_HOW = ("ext4 needs the quota and project features, from mkfs.ext4 -O quota,project "
             "or tune2fs -O quota,project on the unmounted filesystem, and the prjquota "
             "mount option")


def judge(f: Facts) -> str | None:
    """None when the filesystem enforces project quotas; otherwise why not, naming the
    filesystem and what it lacks, for the operator who reads the start-up log."""
    where = f"{f.fstype} at {f.mount_point}"
    if f.unreachable:
        return f"{where}: {f.unreachable}"
    if f.fstype == "xfs":
        if f.statv_errno == errno.ENOSYS:
            return f"{where}: this kernel has no XFS quota support (CONFIG_XFS_QUOTA is off)"
        if f.statv_errno:
            return f"{where}: Q_XGETQSTATV failed: {os.strerror(f.statv_errno)}"
        if not f.statv_flags & FS_QUOTA_PDQ_ACCT:
            return f"{where} is mounted without project quotas (mount it with -o prjquota)"
        if not f.statv_flags & FS_QUOTA_PDQ_ENFD:
            return (f"{where} accounts project quotas but does not enforce them "
                    "(mounted with pqnoenforce; mount it with -o prjquota)")
        return None
    if f.info_errno == errno.ENOSYS:
        return f"{where}: this kernel has no quota support for {f.fstype}"
    if f.info_errno == errno.ESRCH:
        how = _EXT4_HOW if f.fstype.startswith("ext") else "it needs project quota turned on"
        return f"{where} has no project quota accounting: {how}"
    if f.info_errno:
        return f"{where}: Q_GETINFO failed: {os.strerror(f.info_errno)}"
    # Accounting is on (with ext4's quota feature it always is); enforcement is what the
    # prjquota mount option adds. The generic layer reports it through Q_XGETQSTATV too;
    # where that does not answer, the option in the mount table says it.
    if f.statv_errno == 0:
        enforced = bool(f.statv_flags & FS_QUOTA_PDQ_ENFD)
    else:
        enforced = "prjquota" in f.super_options.split(",")
    if not enforced:
        return (f"{where} accounts project quotas but does not enforce them "
                "(mount it with -o prjquota)")
    return None


def _block_device(mount: MountInfo, dev: int) -> tuple[str, str]:
    """The block device quotactl(2) needs, from the mount table: (path, "") when the
    source is the device the filesystem is on, else ("", why not)."""
    try:
        st = os.stat(mount.source)
    except OSError as e:
        return "", f"no quotactl_fd(2) in this kernel, and its source {mount.source!r} " \
                   f"cannot be opened for quotactl(2): {e.strerror}"
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != dev:
        return "", (f"no quotactl_fd(2) in this kernel, and its source {mount.source!r} "
                    "is not its block device, which quotactl(2) needs")
    return mount.source, ""


@dataclasses.dataclass(frozen=True)
class ProjectUsage:
    """What a project holds and may hold, for NodeGetVolumeStats: bytes and inodes used,
    and the hard limits (0: none)."""

    bytes: int
    inodes: int
    byte_limit: int
    inode_limit: int


class ProjectQuotas:
    """Project quotas on one filesystem (the one `path` is on), found enforced by `probe`.

    A publication's directory is `assign`ed a project ID and limits before its upper and
    work directories are made inside it, `usage` reports what the project holds, and
    `release` clears the limits once the directory is gone so that the ID can be reused.
    The object holds no state beyond the disk: a new one after a restart reads the same."""

    def __init__(self, path: str, fstype: str, device: str = ""):
        """`path`: a directory on the filesystem (the store's root). `device`: its block
        device, for quotactl(2) on a kernel without quotactl_fd(2); "" to use the fd."""
        self.path = path
        self.fstype = fstype
        self.device = device
        self._dev = os.stat(path).st_dev

    def __repr__(self) -> str:
        via = f"quotactl on {self.device}" if self.device else "quotactl_fd"
        return f"ProjectQuotas({self.path!r}, {self.fstype}, {via})"

    @classmethod
    def probe(cls, path: str, table: MountTable | None = None) -> "ProjectQuotas | None":
        """Project quotas on the filesystem holding `path` if it enforces them; None
        otherwise, with the reason logged. Called once at start-up."""
        quotas, reason = cls.check(path, table)
        if quotas is None:
            log.info("no project quotas for %s: %s", path, reason)
        else:
            log.info("project quotas enforced on %s (%r)", path, quotas)
        return quotas

    @classmethod
    def check(cls, path: str, table: MountTable | None = None,
              quotactl_fd: bool | None = None) -> "tuple[ProjectQuotas | None, str]":
        """`probe`'s answer and its reason ("" when quotas are enforced), unlogged.
        `quotactl_fd`: whether to use quotactl_fd(2); None asks the kernel whether it has
        it, False takes the path of kernels before 5.14 (quotactl(2) on the device)."""
        mounts = (table or MountTable()).mounts()
        mount = mount_of(path, mounts)
        if mount is None:
            return None, f"{path} is on no mount in the mount table"
        device, unreachable = "", ""
        if not (has_quotactl_fd() if quotactl_fd is None else quotactl_fd):
            device, unreachable = _block_device(mount, os.stat(path).st_dev)
        facts = _ask(path, device, mount, unreachable)
        reason = judge(facts)
        if reason is not None:
            return None, reason
        return cls(path, mount.fstype, device), ""

    def _call(self, cmd: int, project_id: int, buf) -> None:
        _quotactl(self.path, self.device, cmd, project_id, buf)

    def set_limits(self, project_id: int, size_bytes: int, inodes: int) -> None:
        """Hard limits for `project_id`: `size_bytes` (rounded up to a KiB) and `inodes`
        (0: none). Zero for both clears them."""
        buf = ctypes.create_string_buffer(limits(size_bytes, inodes).pack(), IF_DQBLK.size)
        self._call(Q_SETQUOTA, project_id, buf)

    def assign(self, directory: str, project_id: int, size_bytes: int, inodes: int) -> None:
        """Bound what `directory` and everything later made below it may hold to
        `size_bytes` and `inodes` (0: no inode limit), as project `project_id`.

        Call it on a publication's directory before its upper and work directories are
        made inside it: they inherit the ID, and they must share one, because overlayfs
        renames copied-up files from work into upper and XFS refuses (EXDEV) a rename into
        a PROJINHERIT directory of another project.

        The limits are set before the directory joins the project, so that it is never in
        a project without them; if joining fails the limits stay until `release`."""
        if size_bytes <= 0:
            raise ValueError(f"a project quota needs a positive size, not {size_bytes}")
        if not 0 < project_id <= MAX_ID:
            raise ValueError(f"project ID {project_id} is outside 1-{MAX_ID}")
        if os.stat(directory).st_dev != self._dev:
            raise ValueError(f"{directory} is not on the filesystem of {self.path}, "
                             "whose project quotas these are")
        self.set_limits(project_id, size_bytes, inodes)
        set_project(directory, project_id)

    def release(self, project_id: int) -> None:
        """Clear `project_id`'s limits (its directory is gone or about to be), so that the
        ID can be handed out again."""
        self.set_limits(project_id, 0, 0)

    def usage(self, project_id: int) -> ProjectUsage:
        """Bytes and inodes project `project_id` holds, and its hard limits."""
        buf = ctypes.create_string_buffer(IF_DQBLK.size)
        try:
            self._call(Q_GETQUOTA, project_id, buf)
        except OSError as e:
            # XFS keeps no record of a project that never held anything or had its
            # limits cleared while empty: it holds nothing and may hold anything.
            if e.errno == errno.ENOENT:
                return ProjectUsage(0, 0, 0, 0)
            raise
        q = DqBlk.unpack(buf.raw)
        return ProjectUsage(bytes=q.curspace, inodes=q.curinodes,
                            byte_limit=q.bhardlimit * QIF_DQBLKSIZE, inode_limit=q.ihardlimit)


def _ask(path: str, device: str, mount: MountInfo, unreachable: str) -> Facts:
    """Gather `Facts` about the filesystem of `path`: read-only quotactl calls, which the
    kernel answers for unprivileged callers too."""
    base = Facts(fstype=mount.fstype, mount_point=mount.mount_point,
                 super_options=mount.super_options, unreachable=unreachable)
    if unreachable:
        return base
    statv = statv_request()
    statv_errno = _errno_of(lambda: _quotactl(path, device, Q_XGETQSTATV, 0, statv))
    info_errno = 0
    if mount.fstype != "xfs":
        info = ctypes.create_string_buffer(24)  # struct if_dqinfo
        info_errno = _errno_of(lambda: _quotactl(path, device, Q_GETINFO, 0, info))
    return dataclasses.replace(base, statv_errno=statv_errno, info_errno=info_errno,
                               statv_flags=statv_flags(statv.raw) if not statv_errno else 0)
