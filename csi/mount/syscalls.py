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
            # The kernel copies at most one page of mount data; longer lowerdir lists need
            # shorter (relative) paths, which later steps add for very deep images.
            raise OSError(errno.E2BIG, f"mount options for {m.target} exceed one page")
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
