"""How a publication's private writable state is held to its `sizeLimit`: the seam between a
backend and the mechanism that enforces the limit.

A backend asks its `Bound` for a directory whose contents cannot grow past a size, then
makes its upper and work directories inside it; writes past the limit fail with ENOSPC (or
EDQUOT) in the pod, and the node's other users never see the store's filesystem fill. Two
mechanisms fit this shape:

- `loopfs.LoopBound` (every node): a sparse filesystem image per key, on a loop device,
  mounted inside the key's directory.
- `quotabound.QuotaBound` (where the store's filesystem enforces project quotas: XFS
  `prjquota`, ext4 with the `project` and `quota` features), as Docker's overlay2
  `--storage-opt size`: a directory of the key given a project ID with an inheritable flag
  and a quota. The composition root chooses it when `ProjectQuotas.check` finds
  enforcement, the loop mechanism otherwise (`--size-limit-mechanism`).

Like a backend, a bound keeps no state beyond the disk (and the kernel): a new instance after
a restart answers for every key the old one made. Each mechanism makes a part of its own
name, so the disk also says which mechanism made a key (`holds`): `Bounds` answers for keys
of every mechanism while making new ones with one, since a restart may change the mechanism
under live publications (an upgrade from a version that had only loop filesystems, or
`--size-limit-mechanism` changed).
"""

import abc
import os

from csi.backend import Space, Usage

# One inode per 16 KiB of limit, ext4's own default ratio (64 per MiB, 65536 per GiB): a
# pod bound to N bytes can create about N/16K files whichever mechanism bounds it.
BYTES_PER_INODE = 16384


def inodes_for(size: int) -> int:
    """The inodes a limit of `size` bytes allows."""
    return max(1, size // BYTES_PER_INODE)


class Bound(abc.ABC):
    name: str = ""
    # The directory of `volumes/KEY/` under which a bounded key's writes live (the backend
    # makes its upper and work directories there).
    part: str = ""

    @abc.abstractmethod
    def home(self, key: str) -> str:
        """`volumes/KEY/PART`: where a key this mechanism bounds keeps its writes."""

    def holds(self, key: str) -> bool:
        """Whether `key` was bounded by this mechanism: its part is on disk."""
        return os.path.lexists(self.home(key))

    @property
    def parts(self) -> tuple[str, ...]:
        """Every part a key's writes may live in, for finding them (`Bounds`: several)."""
        return (self.part,)

    def project_id(self, key: str) -> int:
        """The filesystem project ID bounding `key` (recorded with its publication); 0 for
        a mechanism without one."""
        return 0

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


class Bounds(Bound):
    """New keys bounded by `first`; a key on disk answered by whichever of all the
    mechanisms made it (the one whose part it holds), so that a restart with another
    mechanism still releases, measures and repairs the keys of the one before."""

    def __init__(self, first: Bound, *others: Bound):
        self.first = first
        self.all = (first, *others)
        if len({b.part for b in self.all}) != len(self.all):
            raise ValueError("each size-limit mechanism needs a part of its own")
        self.name = first.name
        self.part = first.part

    def __repr__(self) -> str:
        return f"Bounds({', '.join(b.name for b in self.all)})"

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(b.part for b in self.all)

    def of(self, key: str) -> Bound | None:
        """The mechanism that bounded `key`; None for a key without a bound."""
        return next((b for b in self.all if b.holds(key)), None)

    def home(self, key: str) -> str:
        made = self.of(key)
        return (made or self.first).home(key)

    def holds(self, key: str) -> bool:
        return self.of(key) is not None

    def project_id(self, key: str) -> int:
        made = self.of(key)
        return made.project_id(key) if made is not None else 0

    def make(self, key: str, size: int) -> None:
        self.first.make(key, size)

    def release(self, key: str) -> None:
        made = self.of(key)
        if made is not None:
            made.release(key)

    def space(self, key: str) -> Space | None:
        made = self.of(key)
        return made.space(key) if made is not None else None

    def usage(self, key: str) -> Usage | None:
        made = self.of(key)
        return made.usage(key) if made is not None else None

    def repair(self, live: set[str]) -> None:
        for b in self.all:
            b.repair(live)
