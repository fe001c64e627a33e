"""The only caller of mount(2) and umount2(2).

Mounts are carried out with the syscall through ctypes: exec'ing mount(8) costs about ten
times the syscall itself (PERFORMANCE.md). Plans come from spec.py as `Mount` data.
"""

import ctypes
import ctypes.util
import errno
import logging
import os
import time

from csi.mount.mountinfo import MountTable
from csi.mount.spec import Mount

log = logging.getLogger(__name__)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

_FLAGS = {
    "ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "bind": MS_BIND, "rbind": MS_BIND | MS_REC,
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _flags_and_data(options: tuple[str, ...]) -> tuple[int, str]:
    flags, data = 0, []
    for opt in options:
        if opt in _FLAGS:
            flags |= _FLAGS[opt]
        else:
            data.append(opt)
    return flags, ",".join(data)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# The new mount API (Linux 5.2; overlay's "lowerdir+" since 6.8). These syscall numbers are
# the same on every architecture that has them (they postdate the table unification).
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100

_libc.syscall.restype = ctypes.c_long


def _sys(nr: int, *args, what: str) -> int:
    rc = _libc.syscall(ctypes.c_long(nr), *args)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def _mount_overlay_fsconfig(m: Mount) -> None:
    """Mount an overlay whose options do not fit in one page: fsopen, one fsconfig call per
    option (each lowerdir appended with "lowerdir+"), fsmount, then move_mount onto the
    target. Flags such as "ro" become mount attributes."""
    fs = _sys(SYS_FSOPEN, b"overlay", ctypes.c_uint(FSOPEN_CLOEXEC), what="fsopen overlay")
    try:
        def set_string(key: str, value: str) -> None:
            _sys(SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(FSCONFIG_SET_STRING),
                 key.encode(), value.encode(), ctypes.c_int(0),
                 what=f"fsconfig {key} for {m.target}")

        attrs = 0
        for opt in m.options:
            if opt == "ro":
                attrs |= MOUNT_ATTR_RDONLY
            elif opt.startswith("lowerdir="):
                for lower in opt[len("lowerdir="):].split(":"):
                    set_string("lowerdir+", lower)
            else:
                key, _, value = opt.partition("=")
                set_string(key, value)
        _sys(SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None,
             ctypes.c_int(0), what=f"create overlay for {m.target}")
        mnt = _sys(SYS_FSMOUNT, ctypes.c_int(fs), ctypes.c_uint(FSMOUNT_CLOEXEC),
                   ctypes.c_uint(attrs), what=f"fsmount {m.target}")
        try:
            _sys(SYS_MOVE_MOUNT, ctypes.c_int(mnt), b"", ctypes.c_int(AT_FDCWD),
                 m.target.encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
                 what=f"move_mount onto {m.target}")
        finally:
            os.close(mnt)
    finally:
        os.close(fs)


class Mounter:
    """Executes `Mount` plans. `table` is injectable so tests can read their own mountinfo."""

    def __init__(self, table: MountTable | None = None, busy_retries: int = 5,
                 busy_delay: float = 0.05):
        self.table = table or MountTable()
        self._busy_retries = busy_retries
        self._busy_delay = busy_delay

    def mount(self, m: Mount) -> None:
        flags, data = _flags_and_data(m.options)
        target = m.target.encode()
        if len(data) >= os.sysconf("SC_PAGESIZE"):
            # mount(2) copies at most one page of options: about 90 layers under
            # /var/lib/strata. The new mount API takes each lowerdir on its own.
            if m.type != "overlay":
                raise OSError(errno.E2BIG, f"mount options for {m.target} exceed one page")
            _mount_overlay_fsconfig(m)
            return
        if flags & MS_BIND:
            # A bind mount ignores MS_RDONLY on the first call; read-only takes a remount.
            _check(_libc.mount(m.source.encode(), target, None, flags & (MS_BIND | MS_REC), None),
                   f"bind mount {m.source} on {m.target}")
            extra = flags & ~(MS_BIND | MS_REC)
            if extra:
                try:
                    _check(_libc.mount(None, target, None, MS_REMOUNT | MS_BIND | extra, None),
                           f"remount {m.target} {','.join(m.options)}")
                except OSError:
                    self.unmount(m.target)
                    raise
            return
        _check(_libc.mount(m.source.encode(), target, m.type.encode(), flags,
                           data.encode() if data else None),
               f"mount {m.type} on {m.target}")

    def unmount(self, target: str) -> None:
        """Unmount everything stacked on `target`. EBUSY is retried; a lazy detach is the
        last resort, logged, so that a stuck reader cannot leak the publication."""
        while self.table.is_mountpoint(target):
            for attempt in range(self._busy_retries + 1):
                rc = _libc.umount2(target.encode(), UMOUNT_NOFOLLOW)
                if rc == 0:
                    break
                err = ctypes.get_errno()
                if err == errno.EINVAL and not self.table.is_mountpoint(target):
                    return
                if err != errno.EBUSY:
                    raise OSError(err, f"umount {target}: {os.strerror(err)}")
                if attempt < self._busy_retries:
                    time.sleep(self._busy_delay * (2 ** attempt))
            else:
                log.warning("%s is still busy after %d tries; detaching it lazily",
                            target, self._busy_retries + 1)
                _check(_libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW),
                       f"lazy umount {target}")
