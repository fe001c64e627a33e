"""Loop devices: a regular file shown as a block device, through ioctls (no losetup).

A size-limited publication keeps its upper layer on a filesystem image of its own, and the
kernel mounts an image only through a block device. This module attaches a file to a free
loop device, detaches one, and lists the devices attached with their backing files.

- **attach** asks /dev/loop-control for a free device (LOOP_CTL_GET_FREE, which creates one
  when none is free) and binds the file to it with one LOOP_CONFIGURE (Linux 5.8): file,
  block size and flags together, where LOOP_SET_FD + LOOP_SET_STATUS64 left a window in
  which the device was bound but not yet configured. Another process may take the same free
  device between the two calls; the kernel then answers EBUSY and we ask again.
- **LO_FLAGS_AUTOCLEAR**: the device detaches itself when its last opener closes it. The
  caller holds the device open (`Attached`) until the filesystem on it is mounted; from
  then on the mount holds it, and the last unmount detaches it. A process killed between
  the two drops its descriptor, which detaches the device too: a crash cannot leak one.
- Containers (kind nodes) often have a /dev without the node of a device the kernel just
  created (no udev, a /dev that is not devtmpfs); attach makes it with mknod(2), with the
  numbers /sys/block/loopN/dev gives.
- **attached()** reads /sys/block/loop*/loop/backing_file. The kernel prints the path as
  seen from the reader's root, and as the path inside its own mount namespace when the file
  is not reachable from there (another container's), so a path match is confirmed by the
  file's device and inode (LOOP_GET_STATUS64) before anything is detached (`identity`).
"""

import ctypes
import dataclasses
import errno
import fcntl
import glob
import logging
import os
import stat

log = logging.getLogger(__name__)

LOOP_CLR_FD = 0x4C01
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_AUTOCLEAR = 4

LO_NAME_SIZE = 64
LO_KEY_SIZE = 32
DELETED = " (deleted)"  # what d_path appends to the name of an unlinked file

# How often attach asks for another free device when others keep taking the one it was
# given. Each EBUSY means another attach succeeded, so this bounds starvation, not progress.
ATTACH_TRIES = 32


class LoopInfo64(ctypes.Structure):
    """struct loop_info64 (include/uapi/linux/loop.h)."""

    _fields_ = [
        ("lo_device", ctypes.c_uint64),  # the backing file's st_dev (read-only)
        ("lo_inode", ctypes.c_uint64),  # and its inode (read-only)
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * LO_KEY_SIZE),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class LoopConfig(ctypes.Structure):
    """struct loop_config, LOOP_CONFIGURE's argument."""

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),  # 0: the kernel's default (512)
        ("info", LoopInfo64),
        ("__reserved", ctypes.c_uint64 * 8),
    ]


assert ctypes.sizeof(LoopInfo64) == 232 and ctypes.sizeof(LoopConfig) == 304


@dataclasses.dataclass(frozen=True)
class LoopDevice:
    """An attached loop device: `device` is its /dev path, `backing_file` the path the kernel
    gives for the file behind it (without the " (deleted)" mark, which sets `deleted`)."""

    name: str  # loopN
    device: str
    backing_file: str
    deleted: bool = False


@dataclasses.dataclass
class Attached:
    """A device just attached, held open by `fd` until `close()` (or the end of a `with`
    block): with LO_FLAGS_AUTOCLEAR, the close detaches it unless something else (a mount)
    holds it by then."""

    device: str
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Attached":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LoopControl:
    """The loop devices of this kernel. `dev` and `sys_block` are injectable: tests point
    `dev` at a directory of their own to see a missing node made."""

    def __init__(self, dev: str = "/dev", sys_block: str = "/sys/block"):
        self._dev = dev
        self._sys = sys_block

    def attach(self, backing: str, autoclear: bool = True) -> Attached:
        """Attach `backing` (read-write) to a free loop device, held open: use it in a
        `with` block and mount it inside. On leaving, the hold is dropped (with autoclear,
        the device goes unless mounted). Raises OSError with the kernel's reason."""
        file_fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
        try:
            config = LoopConfig(fd=file_fd)  # block size 0: 512, whatever the file is on
            config.info.lo_flags = LO_FLAGS_AUTOCLEAR if autoclear else 0
            name = os.fsencode(backing)[:LO_NAME_SIZE - 1]
            ctypes.memmove(config.info.lo_file_name, name, len(name))
            return self._configure(config, backing)
        finally:
            os.close(file_fd)  # the device holds the file now

    def _configure(self, config: LoopConfig, backing: str) -> Attached:
        for _ in range(ATTACH_TRIES):
            number = self._get_free()
            device = self._node(number)
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, LOOP_CONFIGURE, config)
            except OSError as e:
                os.close(fd)
                if e.errno == errno.EBUSY:
                    continue  # another process bound it since GET_FREE: ask again
                if e.errno == errno.ENOTTY:
                    raise OSError(e.errno, "LOOP_CONFIGURE needs Linux 5.8; this kernel "
                                           f"is {os.uname().release}") from None
                raise OSError(e.errno, f"attach {backing} to {device}: "
                                       f"{os.strerror(e.errno)}") from None
            log.debug("attached %s to %s", backing, device)
            return Attached(device, fd)
        raise OSError(errno.EBUSY, f"attach {backing}: every free loop device was taken "
                                   f"by another process {ATTACH_TRIES} times in a row")

    def _get_free(self) -> int:
        control = os.path.join(self._dev, "loop-control")
        try:
            fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no loop devices here (the loop module not "
                                                  "loaded, or /dev not the host's)",
                                    control) from None
        try:
            return fcntl.ioctl(fd, LOOP_CTL_GET_FREE)
        finally:
            os.close(fd)

    def _node(self, number: int) -> str:
        """/dev/loopN, made if the kernel has the device but /dev lacks its node."""
        device = os.path.join(self._dev, f"loop{number}")
        with open(os.path.join(self._sys, f"loop{number}", "dev")) as f:
            major, minor = (int(x) for x in f.read().split(":"))
        rdev = os.makedev(major, minor)
        try:
            os.mknod(device, 0o660 | stat.S_IFBLK, rdev)
            log.info("made the missing device node %s (%d:%d)", device, major, minor)
        except FileExistsError:  # the usual case (udev, devtmpfs), or a racing attach
            pass
        st = os.stat(device)
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != rdev:
            raise OSError(errno.ENODEV, f"{device} is not block device {major}:{minor}")
        return device

    def detach(self, device: str) -> None:
        """Unbind `device` from its file. The kernel defers it while the device is open
        (mounted): it then detaches at the last close. An unbound device is not an error."""
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD)
        except OSError as e:
            if e.errno != errno.ENXIO:  # not bound
                raise OSError(e.errno, f"detach {device}: {os.strerror(e.errno)}") from None
        finally:
            os.close(fd)

    def identity(self, device: str) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the file behind `device`, as the kernel holds it; None when
        the device is not bound."""
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            info = LoopInfo64()
            fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return None
            raise
        finally:
            os.close(fd)
        return info.lo_device, info.lo_inode

    def attached(self) -> list[LoopDevice]:
        """Every bound loop device, with the path of its backing file."""
        out = []
        for entry in sorted(glob.glob(os.path.join(self._sys, "loop*", "loop", "backing_file"))):
            name = entry.split(os.sep)[-3]
            try:
                with open(entry, "rb") as f:
                    path = os.fsdecode(f.read().rstrip(b"\n"))
            except FileNotFoundError:  # detached while we listed
                continue
            deleted = path.endswith(DELETED)
            out.append(LoopDevice(name, os.path.join(self._dev, name),
                                  path[:-len(DELETED)] if deleted else path, deleted))
        return out

