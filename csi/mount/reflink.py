"""Whether the store's filesystem clones extents (reflink), found out once at start-up by
asking it: what overlayfs's copy-up costs depends on it.

Overlayfs copies a lower file up on its first write. It first asks the filesystem to clone
the file's extents (vfs_clone_file_range: XFS with reflink=1, btrfs), and only where that is
refused copies the whole file. So on ext4 a pod appending one line to a 200 MB image file
waits for 200 MB to be copied and holds them in its upper; on XFS (reflink) or btrfs it gets
a clone and allocates one block. The probe does what the copy-up does: FICLONE of a small
file onto another, both in the store's `tmp/` (the filesystem of the layers and the uppers),
both removed after. docs/reflink.md says how to get a store that clones.
"""

import dataclasses
import logging
import os
import tempfile

from csi.extents import NOT_SHARED, clone
from csi.mount.mountinfo import MountTable, mount_of

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Reflink:
    """The store's filesystem type (mountinfo's name, "" if unknown) and whether it cloned
    a file's extents when asked."""

    filesystem: str = ""
    clones: bool = False

    def describe(self, root: str) -> str:
        how = ("copy-up clones extents (reflink)" if self.clones
               else "copy-up copies whole files")
        return f"store {root} on {self.filesystem or 'an unknown filesystem'}: {how}"


def filesystem(path: str, table: MountTable | None = None) -> str:
    """The type of the filesystem `path` is on, as mountinfo names it ("" if unknown)."""
    try:
        found = mount_of(path, (table or MountTable()).mounts())
    except OSError:
        return ""
    return found.fstype if found is not None else ""


def probe(scratch_dir: str, table: MountTable | None = None) -> Reflink:
    """Ask the filesystem of `scratch_dir` to clone a file. Nothing is left behind. A refusal
    that says the filesystem cannot share extents (NOT_SHARED) is a no; any other failure
    (ENOSPC, EIO, ...) is a no as well, with a warning: start-up must not fail over it."""
    fs = filesystem(scratch_dir, table)
    try:
        return Reflink(fs, _clones(scratch_dir))
    except OSError as e:  # making, writing or removing the files: ENOSPC, EROFS, EIO, ...
        log.warning("probing whether %s clones extents failed (%s); reporting that it does "
                    "not", scratch_dir, e)
        return Reflink(fs, False)


def _clones(scratch_dir: str) -> bool:
    d = tempfile.mkdtemp(prefix=".reflink-probe-", dir=scratch_dir)
    try:
        src, dst = os.path.join(d, "src"), os.path.join(d, "dst")
        with open(src, "w+b") as s, open(dst, "wb") as t:  # FICLONE reads src
            s.write(b"strata reflink probe\n" * 200)  # a few KiB: one block or more
            s.flush()
            try:
                clone(s.fileno(), t.fileno())
            except OSError as e:
                if e.errno in NOT_SHARED:
                    return False
                raise
        return True
    finally:
        for name in ("src", "dst"):
            try:
                os.unlink(os.path.join(d, name))
            except FileNotFoundError:
                pass
        os.rmdir(d)
