"""The only caller of mount(2) and umount2(2).

Mounts are carried out with the syscall through ctypes: exec'ing mount(8) costs about ten
times the syscall itself (PERFORMANCE.md). Plans come from spec.py as `Mount` data, and what
the kernel can do from features.py. A plan whose options fit in a page goes to mount(2); a
larger overlay goes through the new mount API when the kernel has overlay's "lowerdir+",
and is refused (E2BIG) otherwise. A plan with a `cwd` is carried out on a short-lived
thread with a working directory of its own. The feature probe asks through trial_overlay.
"""

import ctypes
import ctypes.util
import errno
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

from csi.mount import spec
from csi.mount.features import Features, probe
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
CLONE_FS = 0x200

_FLAGS = {
    "ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "bind": MS_BIND, "rbind": MS_BIND | MS_REC,
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _flags_and_data(options: Sequence[str]) -> tuple[int, str]:
    flags = 0
    for opt in options:
        flags |= _FLAGS.get(opt, 0)
    return flags, spec.data(options)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def in_dir(cwd: str, fn: Callable[[], None]) -> None:
    """Run `fn` with relative paths resolved from `cwd`, moving no other thread.

    A process's threads share one working directory (one fs_struct), and the server runs
    requests on many threads, so chdir(2) on a request thread would move them all. `fn`
    runs instead on a new thread that first takes a private copy of the fs_struct with
    unshare(CLONE_FS), which unlike CLONE_NEWNS or CLONE_VM is allowed in a multithreaded
    process, and only then changes directory. The thread and its directory end with `fn`;
    whatever `fn` raises is raised here."""
    if not cwd:
        fn()
        return
    raised: list[BaseException] = []

    def run() -> None:
        try:
            _check(_libc.unshare(CLONE_FS), "unshare(CLONE_FS)")
            os.chdir(cwd)
            fn()
        except BaseException as e:  # handed to the caller's thread
            raised.append(e)

    t = threading.Thread(target=run, name=f"mount-in:{cwd}")
    t.start()
    t.join()
    if raised:
        raise raised[0]


# The new mount API (Linux 5.2; overlay's "lowerdir+" since 6.8). These syscall numbers are
# the same on every architecture that has them (they postdate the table unification).
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
# mount(2)'s flags as mount attributes, for fsmount(2).
_ATTRS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8}

_libc.syscall.restype = ctypes.c_long


def _fc_messages(fs: int) -> str:
    """What the filesystem said while failing, from the fs context's log: the kernel
    records its reason there ("overlayfs: failed to resolve 'x': -2") instead of dmesg."""
    lines = []
    while len(lines) < 16:
        try:
            lines.append(os.read(fs, 1024).decode(errors="replace").strip())
        except OSError:  # ENODATA: the log is empty
            break
    return "; ".join(lines)


def _sys(nr: int, *args, what: str, fs: int | None = None) -> int:
    rc = _libc.syscall(ctypes.c_long(nr), *args)
    if rc < 0:
        err = ctypes.get_errno()
        said = _fc_messages(fs) if fs is not None else ""
        raise OSError(err, f"{what}: {os.strerror(err)}" + (f" ({said})" if said else ""))
    return rc


def _fsopen_overlay() -> int:
    return _sys(SYS_FSOPEN, b"overlay", ctypes.c_uint(FSOPEN_CLOEXEC), what="fsopen overlay")


def _configure(fs: int, options: Sequence[str], target: str, source: str = "",
               split_lowerdir: bool = True) -> int:
    """Pass `options` to the overlay context `fs` one fsconfig call each, "lowerdir=a:b"
    as one "lowerdir+" per layer (unless not `split_lowerdir`: "lowerdir+" needs Linux
    6.8); returns the mount attributes that mount(2) flags become. A bare option is a
    flag: fsconfig refuses a flag passed as an empty string."""
    attrs = 0
    # mountinfo's source field: without it the mount shows "none" where mount(2) would
    # have shown the plan's source, and readers of the table should not see a difference.
    for opt in ([f"source={source}"] if source else []) + list(options):
        if opt in _ATTRS:
            attrs |= _ATTRS[opt]
            continue
        if opt in spec.FLAGS:
            raise ValueError(f"{opt!r} does not apply to an overlay (mount of {target})")
        key, eq, value = opt.partition("=")
        split = key == "lowerdir" and split_lowerdir
        values = value.split(":") if split else [value]
        if split:
            key = "lowerdir+"
        for v in values:
            _sys(SYS_FSCONFIG, ctypes.c_int(fs),
                 ctypes.c_uint(FSCONFIG_SET_STRING if eq else FSCONFIG_SET_FLAG),
                 key.encode(), os.fsencode(v) if eq else None, ctypes.c_int(0),
                 what=f"fsconfig {key} for {target}", fs=fs)
    _sys(SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None,
         ctypes.c_int(0), what=f"create overlay for {target}", fs=fs)
    return attrs


def _mount_overlay_fsconfig(m: Mount) -> None:
    """Mount an overlay whose options do not fit in one page: fsopen, one fsconfig call per
    option and per lowerdir, fsmount, then move_mount onto the target."""
    fs = _fsopen_overlay()
    try:
        attrs = _configure(fs, m.options, m.target, m.source)
        mnt = _sys(SYS_FSMOUNT, ctypes.c_int(fs), ctypes.c_uint(FSMOUNT_CLOEXEC),
                   ctypes.c_uint(attrs), what=f"fsmount {m.target}", fs=fs)
        try:
            _sys(SYS_MOVE_MOUNT, ctypes.c_int(mnt), b"", ctypes.c_int(AT_FDCWD),
                 os.fsencode(m.target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
                 what=f"move_mount onto {m.target}")
        finally:
            os.close(mnt)
    finally:
        os.close(fs)


def trial_overlay(options: Sequence[str], target: str, fsconfig_only: bool = False) -> None:
    """Have the kernel build an overlay from `options` and drop it: the probe's way of
    asking whether it takes them. With fsopen (5.2), FSCONFIG_CMD_CREATE makes a superblock
    that is never attached anywhere and goes when the context is closed. Without it
    (ENOSYS), mount(2) on the empty directory `target`, then unmount at once, unless
    `fsconfig_only` (the question was about fsconfig itself): then ENOSYS is raised."""
    try:
        fs = _fsopen_overlay()
    except OSError as e:
        if e.errno != errno.ENOSYS or fsconfig_only:
            raise
    else:
        try:
            # "lowerdir" as given: a question about any other option must not depend on
            # whether this kernel has "lowerdir+" (6.8), which asks for it by name.
            _configure(fs, options, target, split_lowerdir=False)
        finally:
            os.close(fs)
        return
    flags, data = _flags_and_data(options)
    _check(_libc.mount(b"overlay", os.fsencode(target), b"overlay", flags,
                       os.fsencode(data) or None), f"trial mount of overlay on {target}")
    if _libc.umount2(os.fsencode(target), UMOUNT_NOFOLLOW) != 0:
        # Nothing can hold a mount no one has seen yet; detach regardless, so that the
        # probe's clean-up never deletes through it.
        _check(_libc.umount2(os.fsencode(target), MNT_DETACH | UMOUNT_NOFOLLOW),
               f"detach trial overlay from {target}")


class Mounter:
    """Executes `Mount` plans. `table` is injectable so tests can read their own mountinfo.

    `features` says what the kernel can do. Left out, it is probed the first time a plan
    needs it (options over a page), in a temporary directory: a guess would be wrong on
    some kernel either way (lowerdir+ assumed fails with a cryptic EINVAL before 6.8, assumed
    absent refuses deep images on 6.8+), and most mounts never need to ask. The plugin's
    start-up should probe on the store's filesystem and pass the result in."""

    def __init__(self, table: MountTable | None = None, busy_retries: int = 5,
                 busy_delay: float = 0.01, features: Features | None = None):
        self.table = table or MountTable()
        self._busy_retries = busy_retries
        self._busy_delay = busy_delay
        self._features = features
        self._features_lock = threading.Lock()

    @property
    def features(self) -> Features:
        if self._features is None:
            with self._features_lock:
                if self._features is None:
                    with tempfile.TemporaryDirectory(prefix="strata-probe-") as scratch:
                        self._features = probe(scratch)
        return self._features

    def mount(self, m: Mount) -> None:
        # The page size needs no probe: a mount that fits never asks for more.
        page = self._features.page_size if self._features else os.sysconf("SC_PAGESIZE")
        if spec.fits(m, page):
            in_dir(m.cwd, lambda: self._mount2(m))
        elif m.type == "overlay" and self.features.lowerdir_plus:
            # mount(2) copies at most one page of options: about 90 layers under
            # /var/lib/strata. fsconfig takes each lowerdir on its own.
            in_dir(m.cwd, lambda: _mount_overlay_fsconfig(m))
        else:
            size = len(os.fsencode(spec.data(m.options)))
            why = ("the kernel's overlay has no lowerdir+ (Linux 6.8)" if m.type == "overlay"
                   else "only an overlay's can be passed one by one")
            raise OSError(errno.E2BIG, f"cannot mount {m.type} on {m.target}: its options "
                                       f"({size} bytes) exceed one page ({page} bytes) and "
                                       f"{why}")

    def _mount2(self, m: Mount) -> None:
        flags, data = _flags_and_data(m.options)
        target = os.fsencode(m.target)
        if flags & MS_BIND:
            # A bind mount ignores MS_RDONLY on the first call; read-only takes a remount.
            _check(_libc.mount(os.fsencode(m.source), target, None, flags & (MS_BIND | MS_REC),
                               None),
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
        _check(_libc.mount(os.fsencode(m.source), target, m.type.encode(), flags,
                           os.fsencode(data) if data else None),
               f"mount {m.type} on {m.target}")

    def unmount(self, target: str, lazy: bool = True) -> bool:
        """Unmount everything stacked on `target`. EBUSY (a process has a file open or its
        working directory there) is retried with backoff, about 0.3 s in all by default.
        Then, with `lazy`, the mount is detached (MNT_DETACH), logged, and True returned:
        it leaves the mount table, but the filesystem lives on until its last user lets go.
        Without `lazy`, OSError(EBUSY) is raised instead, so that the caller can keep what
        the detached filesystem may still write to (see `detach`)."""
        detached = False
        while self.table.is_mountpoint(target):
            for attempt in range(self._busy_retries + 1):
                rc = _libc.umount2(target.encode(), UMOUNT_NOFOLLOW)
                if rc == 0:
                    break
                err = ctypes.get_errno()
                if err == errno.EINVAL and not self.table.is_mountpoint(target):
                    return detached
                if err != errno.EBUSY:
                    raise OSError(err, f"umount {target}: {os.strerror(err)}")
                if attempt < self._busy_retries:
                    time.sleep(self._busy_delay * (2 ** attempt))
            else:
                if not lazy:
                    raise OSError(errno.EBUSY, f"umount {target}: still busy after "
                                               f"{self._busy_retries + 1} tries")
                self.detach(target)
                detached = True
        return detached

    def detach(self, target: str) -> None:
        """Detach the mount on `target` lazily (MNT_DETACH): gone from every path at once,
        alive for whoever still holds it."""
        log.warning("%s is still busy after %d tries; detaching it lazily", target,
                    self._busy_retries + 1)
        _check(_libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW),
               f"lazy umount {target}")

    def in_use(self, probe: Mount) -> bool:
        """Try `probe`, a plan from spec.holder_probe, and read the kernel's answer: True
        while a live overlay (mounted anywhere, or detached and still held) uses its upper
        dir, False once none does. Raises OSError when the kernel answers anything else;
        then nobody can tell. Every answer leaves a line in the kernel log (overlayfs
        reports both refusals there), so callers ask only where an overlay may outlive its
        mount, and back off while it does."""
        try:
            trial_overlay(probe.options, probe.target)
        except OSError as e:
            if e.errno == errno.EBUSY:
                return True
            if e.errno == errno.EINVAL:
                return False
            raise
        raise OSError(errno.EEXIST, f"the kernel built the probe overlay on {probe.target}, "
                                    "which it should have refused; cannot tell whether the "
                                    "upper is in use")
