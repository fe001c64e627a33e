"""The loop mechanism for `sizeLimit`: each limited publication gets a filesystem of its own.

```
volumes/KEY/fs.img     sparse file of exactly the limit's size, ext4 (mkfs.ext4, below)
volumes/KEY/fs/        fs.img mounted here, through a loop device (mount/loop.py)
volumes/KEY/fs/upper   the overlay's upper and work dirs, inside the image: ext4's root holds
volumes/KEY/fs/work    lost+found, which must not show in the pod's view
```
A write past the limit fails with ENOSPC inside the pod, as it would on a full disk of that
size, and an inode-hungry pod runs out of inodes the same way. The node's filesystem gives
the image only the blocks written (it is sparse), so the store grows by at most the limit.

The filesystem (`mkfs` below; its cost is in docs/size-limits.md):
- ext4 without a journal: the upper is thrown away at unpublish and after any unclean
  shutdown (start-up removes what no record names), so there is nothing to replay.
- `-m 0`: no blocks reserved for root; the pod may use its whole limit.
- `-i 16384`: one inode per 16 KiB of limit (ext4's own default ratio): 64 per MiB, 65536 per
  GiB. A pod bound to N bytes can create about N/16K files, as on a disk of that size.
- `-E lazy_itable_init=1,nodiscard` and the mount option `noinit_itable`: neither mkfs nor
  the kernel's lazyinit thread writes the inode tables, which would make 1.6% of the image
  real blocks for nothing: the image is a new sparse file, whose holes read as zeros already.
- `^resize_inode`: the image never grows, so no blocks are kept for growing it.
Overhead: the inode tables (1.6%) and ext4's reserve for delayed allocation (2%, at most
16 MiB) come out of the limit, so a pod can write about 96-98% of it (more for big limits).

The loop device is attached with LO_FLAGS_AUTOCLEAR and held open only until the mount
takes it: unmounting `fs/` detaches it, and a process killed at any step leaves no attached
device of its own. What a crash can leave, `repair` handles at start-up.
"""

import errno
import logging
import os
import subprocess

from csi.backend import Space
from csi.backend.bound import Bound
from csi.mount.loop import LoopControl, LoopDevice
from csi.mount.spec import Mount
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths

log = logging.getLogger(__name__)

IMAGE, MOUNT = "fs.img", "fs"
BYTES_PER_INODE = 16384
BLOCK_SIZE = 4096
FSTYPE = "ext4"
MOUNT_OPTIONS = ("noinit_itable",)
MKFS_TIMEOUT = 60  # seconds; it takes milliseconds, but a stuck disk should not hang a publish


def mkfs(image: str, mkfs_ext4: str = "mkfs.ext4") -> None:
    """Make an ext4 filesystem filling `image` (a file of the limit's size), as described in
    the module docstring. Raises OSError with mkfs's own words; ENOSPC when it said so."""
    args = [mkfs_ext4, "-q", "-F", "-b", str(BLOCK_SIZE), "-I", "256",
            "-i", str(BYTES_PER_INODE), "-m", "0", "-O", "^has_journal,^resize_inode",
            "-E", "lazy_itable_init=1,nodiscard", image]
    try:
        run = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=MKFS_TIMEOUT)
    except FileNotFoundError:
        raise OSError(errno.ENOENT, f"{mkfs_ext4} not found: size limits need e2fsprogs "
                                    "on the node") from None
    if run.returncode != 0:
        said = " ".join((run.stderr or run.stdout).split())
        code = errno.ENOSPC if "No space left" in said else errno.EIO
        raise OSError(code, f"mkfs.ext4 {image} failed ({run.returncode}): {said}")


class LoopBound(Bound):
    name = "loop"
    part = MOUNT

    def __init__(self, paths: StorePaths, mounter: Mounter, loops: LoopControl | None = None,
                 mkfs_ext4: str = "mkfs.ext4"):
        self._paths = paths
        self._mounter = mounter
        self._loops = loops or LoopControl()
        self._mkfs = mkfs_ext4

    def home(self, key: str) -> str:
        return self._paths.volume_part(key, MOUNT)

    def image(self, key: str) -> str:
        return self._paths.volume_part(key, IMAGE)

    def make(self, key: str, size: int) -> None:
        image, home = self.image(key), self.home(key)
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: no block is allocated until written
        finally:
            os.close(fd)
        mkfs(image, self._mkfs)
        os.mkdir(home, 0o700)
        with self._loops.attach(image) as device:
            self._mount(device.device, home)

    def _mount(self, device: str, home: str) -> None:
        self._mounter.mount(Mount(FSTYPE, device, home, MOUNT_OPTIONS))

    def release(self, key: str) -> None:
        home = self.home(key)
        if self._mounter.table.is_mountpoint(home):
            self._mounter.unmount(home)  # the last unmount detaches the loop device

    def space(self, key: str) -> Space | None:
        home = self.home(key)
        if not self._mounter.table.is_mountpoint(home):
            return None  # no limit, or not mounted in this mount namespace (see repair)
        try:
            size = os.stat(self.image(key)).st_size
        except FileNotFoundError:
            return None
        fs = os.statvfs(home)
        return Space(
            bytes_total=size, bytes_used=(fs.f_blocks - fs.f_bfree) * fs.f_frsize,
            bytes_available=fs.f_bavail * fs.f_frsize, inodes_total=fs.f_files,
            inodes_used=fs.f_files - fs.f_ffree, inodes_free=fs.f_favail)

    # -- start-up ----------------------------------------------------------------------
    def repair(self, live: set[str]) -> None:
        """Loop devices whose backing file is one of this store's images:
        - a key no record names: detached (its directory is removed by the caller; the
          kernel defers the detach while something still holds the device);
        - a live key whose filesystem is not mounted at `fs/` here: mounted again. A plugin
          that runs in a container gets a new mount namespace when it is replaced: the old
          one's mount of `fs/` is gone, while the pod's overlay still holds the filesystem
          (and so the device). Mounting the device again shows the same filesystem, so that
          diff, stats and unpublish find the upper where it is."""
        for dev, key in self._ours():
            if key not in live:
                log.warning("detaching %s: its image %s belongs to no recorded publication",
                            dev.device, dev.backing_file)
                try:
                    self._loops.detach(dev.device)
                except OSError as e:
                    log.error("cannot detach %s: %s", dev.device, e)
            elif not dev.deleted and not self._mounter.table.is_mountpoint(self.home(key)):
                log.warning("the filesystem of publication %s (%s) is not mounted here; "
                            "mounting it again", key, dev.device)
                try:
                    self._mount(dev.device, self.home(key))
                except OSError as e:
                    log.error("cannot mount %s at %s: %s", dev.device, self.home(key), e)

    def _ours(self) -> list[tuple[LoopDevice, str]]:
        """(device, key) for every loop device backed by `volumes/KEY/fs.img` of this
        store: by path, then confirmed by the file's identity (a path alone could be
        another container's store at the same place)."""
        volumes = os.path.realpath(self._paths.volumes)
        try:
            store_dev = os.stat(volumes).st_dev
        except FileNotFoundError:
            return []
        out = []
        for dev in self._loops.attached():
            parent, name = os.path.split(dev.backing_file)
            key = os.path.basename(parent)
            if name != IMAGE or os.path.dirname(parent) != volumes:
                continue
            try:
                held = self._loops.identity(dev.device)
            except OSError as e:
                log.error("cannot ask %s for its backing file: %s", dev.device, e)
                continue
            if held is None:
                continue  # detached since we listed it
            try:
                st = os.stat(dev.backing_file)
                here = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                here = None
            if held == here or (dev.deleted and held[0] == store_dev):
                out.append((dev, key))
        return out
