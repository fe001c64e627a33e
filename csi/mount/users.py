"""Who still uses a filesystem, found by its device number in /proc: how releases.py tells
whether a lazily detached read-only view still lives. A view has no upper dir, so the
kernel's in-use mark (Mounter.in_use) cannot be asked about it, and the layers it reads must
stay until it is gone.

A view's superblock lives while anything holds it, and each holder shows its device
number somewhere in /proc:
- a mount of it in any mount namespace (a pod's containers keep a private copy of the
  target mount): /proc/PID/mountinfo, read once per namespace (processes are grouped by
  the inode of /proc/PID/ns/mnt), whose third column is the superblock's major:minor;
  a btrfs subvolume has a device number of its own (what stat shows) that mountinfo never
  shows: a bind of it there has the filesystem's superblock device and, as its root, the
  subvolume's path inside the filesystem, so such a view is found by that pair (`binds`);
- a process's working directory, root or open file: /proc/PID/{cwd,root,fd/N}, whose
  device statx(2) reads through the link without ever waiting on a network server;
- a mapping (a program run from the view, with its file closed): the device column of
  /proc/PID/maps (overlayfs maps the file below; since Linux 6.8 maps shows the overlay's).

What it cannot see keeps a view alive unseen: a file descriptor in flight over a unix
socket, io_uring's registered files, a thread that unshared its working directory
(/proc/PID/task/TID/cwd), a loop device backed by a file in the view, another overlay that
stacks a directory of the view as a lower layer. A device number freed by the view's end
and taken by a new filesystem reads as still used: that errs toward keeping.
"""

import ctypes
import ctypes.util
import errno
import os
import platform

from csi.mount.mountinfo import MountInfo, _unescape, mount_of
from csi.statx import device

Device = tuple[int, int]
Bind = tuple[str, str]  # (superblock "major:minor", root inside the filesystem)


def parse(text: str) -> Device | None:
    """"major:minor" (decimal, as mountinfo and releases record it) as a pair; None for ""
    or anything else."""
    major, sep, minor = text.partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        return None
    if int(major) == int(minor) == 0:
        # No filesystem's: what a bind of a deleted btrfs subvolume shows. Asking /proc
        # about it finds unrelated things (and would keep a release for good).
        return None
    return int(major), int(minor)


def device_of(path: str) -> str:
    """"major:minor" of the filesystem at `path` (a mount point: its mount), "" when it
    cannot be read."""
    dev = device(path)
    return f"{dev[0]}:{dev[1]}" if dev is not None else ""


# ustat(2) has a number only where the old syscall table survives: never on arm64 (the
# generic table left it out), and glibc 2.28 dropped its wrapper.
_USTAT = {"x86_64": 136, "i386": 62, "i686": 62}.get(platform.machine())
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def superblock_exists(dev: Device) -> bool | None:
    """Whether the kernel still has a live superblock with the device number `dev`, in any
    mount namespace or in none (a detached mount still held): ustat(2), which looks `dev`
    up in the kernel's list of every superblock and answers EINVAL when none has it (or
    when the one that has it is being destroyed). None when it cannot be asked: no ustat on
    this architecture, a seccomp filter, a number ustat's 32 bits cannot carry.

    A superblock keeps its device number for life, so False proves that one which had `dev`
    is gone. True proves nothing about a particular one: a device number freed by its end
    is given to the next new filesystem (the lowest free anonymous number first)."""
    major, minor = dev
    if _USTAT is None or major >= 1 << 12 or minor >= 1 << 20:
        return None
    # The kernel's new_decode_dev: minor's low byte, major, then minor's upper 12 bits.
    encoded = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    buf = ctypes.create_string_buffer(64)  # struct ustat is 32 bytes
    if _libc.syscall(ctypes.c_long(_USTAT), ctypes.c_uint(encoded), buf) == 0:
        return True
    return False if ctypes.get_errno() == errno.EINVAL else None


def bind_of(path: str, mounts: list[MountInfo]) -> Bind | None:
    """How mountinfo shows a bind of the directory `path` (its filesystem's superblock
    device, and its path inside that filesystem as the mount's root), from one reading
    of this namespace's table; None when no mount covers it."""
    real = os.path.realpath(path)
    home = mount_of(real, mounts)
    if home is None:
        return None
    rel = real[len(home.mount_point.rstrip("/")):] if home.mount_point != "/" else real
    return home.device, (home.root.rstrip("/") + rel) or "/"


def find(devs: set[Device], proc: str = "/proc",
         binds: dict[Device, Bind] | None = None) -> dict[Device, str]:
    """Which of `devs` something in `proc` still uses, each with the first user found,
    described for a log line ("a mount at /x in the mount namespace of pid 42 (sh)", "pid
    42 (sh), its working directory"). One pass over /proc for all of them; best effort: a
    process that goes meanwhile, or that is not ours to read, is skipped. `binds`: for
    a device of `devs` that mountinfo cannot show (a btrfs subvolume's), the (superblock,
    root) of a bind of it: a mount with that superblock whose root is that path or below
    it uses the device."""
    binds = binds or {}
    found: dict[Device, str] = {}
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    seen: set[int] = set()
    for pid in pids:
        left = devs - found.keys()
        if not left:
            break
        base = os.path.join(proc, pid)
        try:
            ns = os.stat(os.path.join(base, "ns", "mnt")).st_ino
        except OSError:
            ns = None  # cannot tell its namespace: read its table anyway
        if ns is None or ns not in seen:
            if ns is not None:
                seen.add(ns)
            for dev, where in _mounted(os.path.join(base, "mountinfo"), left,
                                       binds).items():
                found[dev] = (f"a mount at {where} in the mount namespace of pid {pid} "
                              f"({comm(base)})")
            left = devs - found.keys()
        for dev, what in _held(base, left).items():
            found[dev] = f"pid {pid} ({comm(base)}), its {what}"
    return found


def _mounted(mountinfo: str, devs: set[Device],
             binds: dict[Device, Bind]) -> dict[Device, str]:
    """The mount point of a mount of each of `devs` in this mountinfo."""
    want = {f"{d[0]}:{d[1]}": d for d in devs}
    roots: dict[str, list[tuple[str, Device]]] = {}
    for d, (sb, root) in binds.items():
        if d in devs:
            roots.setdefault(sb, []).append((root.rstrip("/"), d))
    out: dict[Device, str] = {}
    if not want:
        return out
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split(" ", 5)
                if len(fields) <= 4:
                    continue
                if fields[2] in want:
                    out.setdefault(want[fields[2]], fields[4])
                for root, d in roots.get(fields[2], ()):
                    r = _unescape(fields[3])
                    if r == root or r.startswith(root + "/"):
                        out.setdefault(d, _unescape(fields[4]))
    except OSError:
        pass
    return out


def _held(base: str, devs: set[Device]) -> dict[Device, str]:
    """Which of the process's links (or mappings) is on each of `devs`."""
    out: dict[Device, str] = {}
    if not devs:
        return out
    for name, what in (("cwd", "working directory"), ("root", "root directory")):
        dev = device(f"{base}/{name}")
        if dev in devs:
            out.setdefault(dev, what)
    fds = f"{base}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        names = []
    for fd in names:  # a process may have thousands: paths joined by hand, no more
        link = f"{fds}/{fd}"
        try:
            if not os.readlink(link).startswith("/"):
                continue  # a socket, pipe or anonymous inode: in no filesystem of ours
        except OSError:
            continue
        dev = device(link)
        if dev in devs:
            out.setdefault(dev, f"open file (fd {fd})")
    hexdevs = {f" {d[0]:02x}:{d[1]:02x} ": d for d in devs}
    try:
        with open(f"{base}/maps") as f:
            text = f.read()
    except OSError:
        return out
    if any(h in text for h in hexdevs):  # most processes map nothing of it: one search
        for line in text.splitlines():
            fields = line.split(None, 5)
            key = f" {fields[3]} " if len(fields) > 3 else ""
            if key in hexdevs:
                name = fields[5].strip() if len(fields) > 5 else "a file"
                out.setdefault(hexdevs[key], "mapping of " + name)
    return out


def comm(base: str) -> str:
    """The command name of the process at /proc/PID (`base`), or "?" once it is gone."""
    try:
        with open(os.path.join(base, "comm")) as f:
            return f.read().strip()
    except OSError:
        return "?"
