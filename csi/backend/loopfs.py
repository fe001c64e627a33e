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
- every feature named (`MKE2FS_CONF`), none taken from the node's or the image's
  /etc/mke2fs.conf: e2fsprogs 1.47 turns on `orphan_file`, which kernels before 5.15 refuse
  to mount read-write, and a distribution may add `metadata_csum_seed` or others; what the
  kernel must mount should not depend on which e2fsprogs the plugin image carries.
- the mount option `nobarrier`: ext4 sends the loop device no cache flushes, each of which
  the loop driver turns into an fsync of the image on the node's disk. Durability buys
  nothing here, as for `volatile` overlays: an unclean shutdown discards the upper anyway,
  and while the kernel runs, the page cache holds what the pod wrote. A pod's fsync costs
  0.3 ms instead of 3, and the unmount at unpublish 0.3 ms instead of 4-8.
Overhead: the inode tables (1.6%) and ext4's reserve for delayed allocation (2%, at most
16 MiB) come out of the limit, so a pod can write about 96-98% of it (more for big limits).

mkfs.ext4 is most of what a limit adds to a publish (an exec, and the fsync it does at the
end: about 13 ms of 20). A new filesystem of a given size is the same bytes every time but
for its UUID, its directory-hash seed and its creation time, and only a few of those bytes
are not holes (40 KiB for 64 MiB, 76 KiB for 1 GiB, 160 KiB for 10 GiB). So `Templates`
runs mkfs once per size, keeps those data segments in memory, and writes them into each
later image of that size (0.1 ms). Every such image shares its template's UUID and hash
seed: nothing keys on them here (the filesystem is private to one publication, never
listed in fstab, never checked by fsck, gone at unpublish), and ext4 mounts filesystems
with equal UUIDs side by side.

The loop device is attached with LO_FLAGS_AUTOCLEAR and held open only until the mount
takes it: unmounting `fs/` detaches it, and a process killed at any step leaves no attached
device of its own. What a crash can leave, `repair` handles at start-up.
"""

import collections
import errno
import logging
import os
import subprocess
import tempfile
import threading

from csi.backend import Space, Usage
from csi.backend.bound import BYTES_PER_INODE, Bound
from csi.errors import FailedPrecondition
from csi.mount.loop import LoopControl, LoopDevice
from csi.mount.spec import Mount
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.tree import usage

log = logging.getLogger(__name__)

IMAGE, MOUNT = "fs.img", "fs"
BLOCK_SIZE = 4096
FSTYPE = "ext4"
MOUNT_OPTIONS = ("noinit_itable", "nobarrier")
MKFS_TIMEOUT = 60  # seconds; it takes milliseconds, but a stuck disk should not hang a publish


# The features every kernel since 3.x mounts (no journal, no resize inode: see above). The
# usage types mke2fs picks by size (floppy, small, default, big, huge) are declared empty so
# that it does not warn about them; -b, -I and -i on the command line set what they would.
MKE2FS_CONF = """[defaults]
	base_features = sparse_super,large_file,filetype,dir_index,ext_attr
[fs_types]
	ext4 = {
		features = extent,flex_bg,huge_file,dir_nlink,extra_isize
	}
	floppy = {
	}
	small = {
	}
	default = {
	}
	big = {
	}
	huge = {
	}
"""


def mkfs(image: str, mkfs_ext4: str = "mkfs.ext4") -> None:
    """Make an ext4 filesystem filling `image` (a file of the limit's size), as described in
    the module docstring. Raises OSError with mkfs's own words; ENOSPC when it said so."""
    args = [mkfs_ext4, "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-I", "256",
            "-i", str(BYTES_PER_INODE), "-m", "0", "-E", "lazy_itable_init=1,nodiscard", image]
    with tempfile.NamedTemporaryFile("w", prefix=".mke2fs-", suffix=".conf",
                                     dir=os.path.dirname(image)) as conf:
        conf.write(MKE2FS_CONF)
        conf.flush()
        try:
            run = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=MKFS_TIMEOUT,
                                 env={**os.environ, "MKE2FS_CONFIG": conf.name})
        except FileNotFoundError:
            raise FailedPrecondition(f"{mkfs_ext4} not found: size limits need e2fsprogs on "
                                     "the node") from None
        except subprocess.TimeoutExpired:
            raise OSError(errno.ETIMEDOUT, f"mkfs.ext4 {image} took longer than "
                          f"{MKFS_TIMEOUT:.0f} s") from None
    if run.returncode != 0:
        said = " ".join((run.stderr or run.stdout).split())
        code = errno.ENOSPC if "No space left" in said else errno.EIO
        raise OSError(code, f"mkfs.ext4 {image} failed ({run.returncode}): {said}")


class Templates:
    """New ext4 images by size: the first of a size by mkfs, the next ones by writing the
    first one's data segments (kept in memory) into a new sparse file. A template is kept
    only while small (`max_template`: the metadata of a very large filesystem is large
    too) and the cache as a whole stays under `max_bytes`, least recently used first out.
    Only what this process made itself is kept: nothing is read from disk that another
    version of mkfs, or of these options, could have made."""

    def __init__(self, mkfs_ext4: str = "mkfs.ext4", max_template: int = 4 << 20,
                 max_bytes: int = 16 << 20):
        self._mkfs = mkfs_ext4
        self._max_template = max_template
        self._max_bytes = max_bytes
        self._cache: collections.OrderedDict[int, list[tuple[int, bytes]]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def make(self, image: str, size: int) -> None:
        """Create `image` (it must not exist): a sparse file of `size` bytes holding a new
        ext4 filesystem. ENOSPC from the store's filesystem is raised as such."""
        with self._lock:
            segments = self._cache.get(size)
            if segments is not None:
                self._cache.move_to_end(size)
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: no block is allocated until written
            for offset, data in segments or ():
                view = memoryview(data)
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
        finally:
            os.close(fd)
        if segments is None:
            mkfs(image, self._mkfs)
            self._keep(size, image)

    def _keep(self, size: int, image: str) -> None:
        segments = _data_segments(image, self._max_template)
        if segments is None:
            return
        with self._lock:
            self._cache[size] = segments
            total = sum(len(d) for segs in self._cache.values() for _, d in segs)
            while total > self._max_bytes and len(self._cache) > 1:
                _, dropped = self._cache.popitem(last=False)
                total -= sum(len(d) for _, d in dropped)


def _data_segments(path: str, limit: int) -> list[tuple[int, bytes]] | None:
    """(offset, bytes) of every stretch of `path` that is not a hole, or None when they add
    up to more than `limit` (or the filesystem cannot tell holes: then it is all data)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        spans, offset = [], 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole up to the end
                    break
                raise
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            spans.append((start, offset - start))
        if sum(length for _, length in spans) > limit:
            return None
        return [(start, os.pread(fd, length, start)) for start, length in spans]
    finally:
        os.close(fd)


class LoopBound(Bound):
    name = "loop"
    part = MOUNT

    def __init__(self, paths: StorePaths, mounter: Mounter, loops: LoopControl | None = None,
                 templates: Templates | None = None):
        self._paths = paths
        self._mounter = mounter
        self._loops = loops or LoopControl()
        self._templates = templates or Templates()

    def home(self, key: str) -> str:
        return self._paths.volume_part(key, MOUNT)

    def image(self, key: str) -> str:
        return self._paths.volume_part(key, IMAGE)

    def make(self, key: str, size: int) -> None:
        image, home = self.image(key), self.home(key)
        self._templates.make(image, size)
        os.mkdir(home, 0o700)
        try:
            held = self._loops.attach(image)
        except OSError as e:
            # No /dev/loop-control, or a kernel without LOOP_CONFIGURE (before 5.8): the
            # node cannot do it, whatever the request (the image was just made).
            if e.errno in (errno.ENOENT, errno.ENOTTY):
                raise FailedPrecondition(f"size limits need loop devices: {e}") from None
            raise
        with held:
            self._mount(held.device, home)

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

    def usage(self, key: str) -> Usage | None:
        """The files inside the key's filesystem (upper and work), walked: ext4 counts a
        file's blocks as soon as they are written (delayed allocation included), while the
        image's own blocks on the store's disk lag the page cache's writeback, and with
        `volatile` may not grow until unmount."""
        home = self.home(key)
        if not self._mounter.table.is_mountpoint(home):
            return None
        return Usage(*usage(home))

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
