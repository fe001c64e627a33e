"""How a publication's private writable state is held to its `sizeLimit`: the seam between a
backend and the mechanism that enforces the limit.

A backend asks its `Bound` for a directory whose contents cannot grow past a size, then
makes its upper and work directories inside it; writes past the limit fail with ENOSPC (or
EDQUOT) in the pod, and the node's other users never see the store's filesystem fill. Two
mechanisms fit this shape:

- `loopfs.LoopBound` (every node): a sparse filesystem image per key, on a loop device,
  mounted inside the key's directory.
- project quotas (where the store's filesystem enforces them: XFS `prjquota`, ext4 with the
  `project` and `quota` features), as Docker's overlay2 `--storage-opt size`: a directory of
  the key given a project ID with an inheritable flag and a quota. `quota.ProjectQuotas` is
  that mechanism's kernel side; the composition root will choose it when
  `ProjectQuotas.probe` finds it, and this loop mechanism otherwise.

Like a backend, a bound keeps no state beyond the disk (and the kernel): a new instance after
a restart answers for every key the old one made.
"""

import abc

from csi.backend import Space, Usage


class Bound(abc.ABC):
    name: str = ""
    # The directory of `volumes/KEY/` under which a bounded key's writes live (the backend
    # makes its upper and work directories there).
    part: str = ""

    @abc.abstractmethod
    def make(self, key: str, size: int) -> None:
        """Make `volumes/KEY/PART`, bounded to `size` bytes and to inodes in proportion,
        inside `volumes/KEY` (which the caller made). A failure leaves what was made for
        `release` and the caller's removal of `volumes/KEY`."""

    @abc.abstractmethod
    def release(self, key: str) -> None:
        """Undo what `make` did beyond files (unmount a filesystem, free a project ID), so
        that `volumes/KEY` can be deleted like any directory. A key with nothing to release
        is not an error."""

    @abc.abstractmethod
    def space(self, key: str) -> Space | None:
        """The bounded key's room (total = its limit); None for a key that has no bound, or
        whose bound cannot be read here."""

    def usage(self, key: str) -> Usage | None:
        """What a bounded key's files take where a walk of `volumes/KEY` cannot see them (a
        filesystem of its own); None where it can (a quota's directory is on the store)."""
        return None

    @abc.abstractmethod
    def repair(self, live: set[str]) -> None:
        """Start-up: release what a crash left held for keys not in `live` (the recorded
        publications'), and restore what a live key needs that a restart took away."""
