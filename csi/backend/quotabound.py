"""The project-quota mechanism for `sizeLimit`: where the store's filesystem enforces project
quotas, a limited publication's writes stay on the store and the filesystem counts them.

```
volumes/KEY/quota/        project ID P, FS_XFLAG_PROJINHERIT; hard limits on P's bytes
volumes/KEY/quota/upper   and inodes (one per 16 KiB of limit, as the loop mechanism's
volumes/KEY/quota/work    ext4 has): upper and work inherit P, and so does all they hold
```
A write past the limit fails inside the pod (ext4 says EDQUOT, XFS ENOSPC) and nowhere
else. Nothing is mounted or attached, and the blocks a pod frees go back to the store.

The disk is the truth about IDs: `volumes/KEY/quota` carries its ID whatever state.db
managed to record before a crash, so a free ID is one that no key under `volumes/` carries
(read back on every allocation: one ioctl per key), and `release` reads the ID to clear from
the directory itself. Allocation and assignment happen under one lock, so that two
publishes never take the same ID; the ID is on disk before the lock is let go.

An ID whose directory is gone while its limits stay set (a crash after the limits were set
and before the directory joined the project, or after `volumes/KEY` was removed without a
release) holds nothing, and is handed out again only through `ProjectQuotas.assign`, which
sets the new limits before anything joins the project: leftover limits never bound a new
publication.
"""

import errno
import logging
import os
import threading

from csi.backend import Space, Usage
from csi.backend.bound import Bound, inodes_for
from csi.backend.quota import DEFAULT_IDS, ProjectQuotas, ProjectUsage, allocate, project_of
from csi.errors import FailedPrecondition
from csi.paths import StorePaths

log = logging.getLogger(__name__)

PART = "quota"
# What a key's part can be instead of a directory we can read the ID of: gone (a key
# removed meanwhile, or bounded otherwise), a file, or a symlink (read_fsxattr does not
# follow it). None of these is a project of ours.
_NOT_OURS = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def room(used: ProjectUsage, fs: os.statvfs_result) -> Space:
    """A project's room as the pod sees it: the limit as the total; available what is left
    of the limit, but never more than the store's filesystem has free (limits are not
    reserved); inodes likewise (a project without an inode limit has the filesystem's)."""
    free = fs.f_bavail * fs.f_frsize
    inodes_total = used.inode_limit or fs.f_files
    inodes_free = (max(0, min(used.inode_limit - used.inodes, fs.f_favail))
                   if used.inode_limit else fs.f_favail)
    return Space(bytes_total=used.byte_limit, bytes_used=used.bytes,
                 bytes_available=max(0, min(used.byte_limit - used.bytes, free)),
                 inodes_total=inodes_total, inodes_used=used.inodes, inodes_free=inodes_free)


class QuotaBound(Bound):
    name = "quota"
    part = PART

    def __init__(self, paths: StorePaths, quotas: ProjectQuotas | None = None,
                 ids: range = DEFAULT_IDS):
        """`quotas`: the store filesystem's enforced project quotas; None where there are
        none (then this only finds the keys it made before, for the tools and for a server
        whose filesystem lost its quotas: their directories can still be read and removed,
        and `make` is refused). `ids`: the project IDs strata may hand out."""
        self._paths = paths
        self._quotas = quotas
        self._ids = ids
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"QuotaBound({self._quotas!r}, IDs {self._ids.start}-{self._ids.stop - 1})"

    def home(self, key: str) -> str:
        return self._paths.volume_part(key, PART)

    def project_id(self, key: str) -> int:
        """The ID `volumes/KEY/quota` carries on disk; 0 when it carries none of ours."""
        try:
            pid = project_of(self.home(key))
        except OSError as e:
            if e.errno in _NOT_OURS:
                return 0
            raise
        return pid if pid in self._ids else 0

    def in_use(self) -> set[int]:
        """The IDs the keys under `volumes/` carry: the disk's answer, crash or not."""
        try:
            keys = os.listdir(self._paths.volumes)
        except FileNotFoundError:
            return set()
        return {pid for pid in map(self.project_id, keys) if pid}

    def make(self, key: str, size: int) -> None:
        if self._quotas is None:
            raise FailedPrecondition("size limits by project quotas need a store filesystem "
                                     "that enforces them")
        home = self.home(key)
        os.mkdir(home, 0o700)
        with self._lock:
            pid = allocate(self.in_use(), self._ids)
            self._quotas.assign(home, pid, size, inodes_for(size))
        log.debug("publication %s: project %d, %d bytes, %d inodes", key, pid, size,
                  inodes_for(size))

    def release(self, key: str) -> None:
        """Clear the limits of the ID the key's directory carries (its files are about to
        go: the caller removes `volumes/KEY` next). The ID stays on the directory until
        then, so no publish takes it meanwhile."""
        pid = self.project_id(key)
        if not pid:
            return
        if self._quotas is None:
            log.warning("publication %s holds project %d, but the store's filesystem "
                        "enforces no project quotas now: its limits are left (harmless: "
                        "an ID gets new limits before it is used again)", key, pid)
            return
        self._quotas.release(pid)

    def _usage(self, key: str) -> ProjectUsage | None:
        pid = self.project_id(key)
        if not pid or self._quotas is None:
            return None
        try:
            used = self._quotas.usage(pid)
        except OSError as e:
            log.warning("cannot read the quota of project %d (publication %s): %s", pid,
                        key, e)
            return None
        return used if used.byte_limit else None  # released, or never limited

    def space(self, key: str) -> Space | None:
        used = self._usage(key)
        if used is None:
            return None
        return room(used, os.statvfs(self.home(key)))

    def usage(self, key: str) -> Usage | None:
        """What the project holds, from the quota: no walk of the upper, and it counts
        what the walk would (upper and work, and blocks reserved for delayed writes)."""
        used = self._usage(key)
        return Usage(used.bytes, used.inodes) if used is not None else None

    def repair(self, live: set[str]) -> None:
        """Release the IDs of keys on disk that no record names (the caller removes their
        directories). IDs whose directories are already gone need nothing: see the module
        docstring."""
        if self._quotas is None:
            return
        try:
            keys = os.listdir(self._paths.volumes)
        except FileNotFoundError:
            return
        for key in sorted(set(keys) - live):
            pid = self.project_id(key)
            if pid:
                log.warning("releasing project %d: publication %s is not recorded", pid, key)
                try:
                    self._quotas.release(pid)
                except OSError as e:
                    log.error("cannot release project %d: %s", pid, e)
