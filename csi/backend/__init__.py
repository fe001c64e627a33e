"""Storage backends: how a chain of shared layers becomes one publication's filesystem.

The interface has the shape of containerd's `Snapshotter`, narrowed to what a CSI node needs.
Its vocabulary:

- a **chain** is an image's layer IDs, base first, as the layer store keeps them
  (`layers/ID/fs`). The same layer may appear twice; a backend decides what that means.
- a **key** names one publication's private state (`volumes/KEY/`). Keys are chosen by the
  caller, unique, and recorded in state.db with the publication.
- **prepare(key, chain, target, size_limit)** creates the private writable layer over the
  chain and returns the `Mount` (data, not an action) that shows it at `target`. With a
  `size_limit`, the layer cannot hold more than that many bytes (nor more inodes than a disk
  of that size): the backend's `Bound` (bound.py) makes the room it lives in.
  **view(key, chain, target)** does the same for a read-only view.
  The caller executes the mount (mount/syscalls.py is the only executor) and, when anything
  fails, calls **remove(key)**, which also runs at unpublish once the mount is gone.
- **summarize(key, chain)** and **changes(key, chain)** say what a prepared key changed
  in the view of `chain` (the counts and bytes the copy-up metrics and `strata ls` show,
  and `strata diff`'s list); how is the backend's business: overlay reads its upper dir
  against the layers, a snapshotting backend compares the snapshot with its origin.
  **dirs(key)** says where an overlay-shaped backend's writes land (None for one without
  an upper), **lowers(chain)** the layer directories a view reads through,
  **usage(key)** what the key's private state takes on the store's disk, **space(key)**
  a limited key's room (its limit, what is left) as the pod sees it, and
  **project_id(key)** the project quota ID bounding it, if a quota does (state.db records it).
- **holder_probe(key)** is how to ask the kernel whether a view of `key` that left the mount
  table (detached lazily, or still mounted in another namespace) can still write to its
  private state, which must not be deleted until it cannot (see csi/releases.py);
  **snapshot(key)** names the subvolume a snapshotting backend's view binds, to be asked
  about by its device instead.
- **keys()** lists the keys with state on disk (start-up removes those no record names),
  **recognizer(mounts)** answers "is this mount one of mine?" from the mount table alone,
  for start-up to unmount what a crash left mounted but unrecorded, and **repair(live)**
  releases what the backend holds outside the mount table and `volumes/` for keys no record
  names (loop devices, project quotas).

A worked example, for an image whose layers are `a` (base) and `b`:

    m = backend.prepare("k1", ["a", "b"], "/pods/p1/vol")   # volumes/k1/{upper,work} made
    mounter.mount(m)                                        # overlay lowerdir=b:a
    ... the pod writes: backend.dirs("k1").upper holds its changes ...
    mounter.unmount("/pods/p1/vol"); backend.remove("k1")   # volumes/k1 gone

Overlayfs (`overlay.py`) is the first backend; the conformance suite in
`tests/backend/` tests any backend through this interface alone.
"""

import abc
import dataclasses
import logging
from collections.abc import Callable, Sequence

from csi.inspect import Summary
from csi.mount.mountinfo import MountInfo
from csi.mount.spec import Mount

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Usage:
    bytes: int  # allocated (st_blocks), not apparent sizes
    inodes: int


@dataclasses.dataclass(frozen=True)
class Space:
    """A size-limited key's room, as the pod sees it (NodeGetVolumeStats): `bytes_total` is
    the limit; `bytes_used` what the pod's files take; the rest of the total that is not
    available is the mechanism's own overhead (a filesystem's metadata)."""

    bytes_total: int
    bytes_used: int
    bytes_available: int
    inodes_total: int
    inodes_used: int
    inodes_free: int


@dataclasses.dataclass(frozen=True)
class Dirs:
    """Where a prepared key's writes land. `upper` holds everything the publication changed
    (created files, copied-up files, whiteouts); `work` is the backend's scratch space."""

    upper: str
    work: str


class Backend(abc.ABC):
    """A storage driver. Implementations hold no state of their own beyond the disk: every
    answer must survive a restart (start-up builds a new instance and asks it)."""

    name: str = ""
    # Whether publications of one image read its files through the same inodes, and so
    # share their page cache (overlay: the lower files are the layer store's; a snapshot
    # has inodes of its own, cached once per snapshot). The page-cache metrics say what
    # sharing saves only where it is true.
    shares_page_cache: bool = True
    # What the store's unit of sharing is: "layer" (one directory per layer, whatever
    # image has it: by DiffID) or "chain" (one filesystem per layer *and everything under
    # it*: by ChainID, as a snapshotting driver keeps them).
    shared_by: str = "layer"

    @abc.abstractmethod
    def prepare(self, key: str, chain: Sequence[str], target: str,
                size_limit: int = 0) -> Mount:
        """Create `key`'s private writable layer over `chain` and return the mount that
        shows it at `target`. The root of the view takes the owner and mode of the chain's
        root directory. `size_limit` (bytes, 0: none) bounds what the layer can hold; the
        room for it is made here (a limited layer may mount a filesystem of its own, which
        `remove` unmounts), but the view itself is not mounted."""

    @abc.abstractmethod
    def view(self, key: str, chain: Sequence[str], target: str) -> Mount:
        """A read-only view of `chain` at `target`. It may create state under `key` (which
        `remove` deletes), but never anything writable."""

    @abc.abstractmethod
    def remove(self, key: str) -> None:
        """Delete `key`'s private state; a key with none is not an error. Called only once
        nothing is mounted from it. Never deletes into a mount found inside it."""

    def remove_or_log(self, key: str) -> None:
        """`remove`, with a failure logged instead of raised: for callers whose own work is
        done (an unpublish, a publish being undone, start-up); start-up removes what is
        left of a key no record names."""
        try:
            self.remove(key)
        except OSError as e:
            log.error("cannot remove the private state of publication %s: %s", key, e)

    @abc.abstractmethod
    def summarize(self, key: str, chain: Sequence[str], *, stop=None) -> Summary | None:
        """What `key`'s publication changed in its view of `chain` (inspect.Summary's
        counts and bytes); None for a read-only view, an unknown key, or one whose private
        state cannot be read here (its own filesystem not mounted). `stop`, called now and
        then, may raise inspect.Stopped to abandon the walk."""

    @abc.abstractmethod
    def changes(self, key: str, chain: Sequence[str]) -> list[tuple[str, str]] | None:
        """`docker diff`'s list for `key`: (kind, path) with kind A(dded), C(hanged) or
        D(eleted), paths absolute in the view, sorted; None as for `summarize`."""

    def dirs(self, key: str) -> Dirs | None:
        """Where `key`'s writes land, for a backend whose writes land in an upper dir;
        None for a read-only view, an unknown key, or a backend without one."""
        return None

    @abc.abstractmethod
    def lowers(self, chain: Sequence[str]) -> list[str]:
        """The layer directories a view of `chain` reads through, nearest (topmost) first."""

    @abc.abstractmethod
    def usage(self, key: str) -> Usage:
        """Bytes and inodes `key`'s private state takes (zero for none)."""

    def writable(self, key: str) -> bool:
        """Whether `key`'s writable state is still on disk (volume health: a pod's writes
        deleted behind the server's back). Where writes land in `dirs`, those."""
        return self.dirs(key) is not None

    def space(self, key: str) -> Space | None:
        """A size-limited key's room; None for a key without a limit."""
        return None

    def limit_kind(self, key: str) -> str:
        """What bounds a size-limited key other than a project quota (`strata ls`): the
        loop mechanism's filesystem, unless the backend says otherwise."""
        return "loop"

    def project_id(self, key: str) -> int:
        """The filesystem project ID whose quota bounds `key` (recorded with the
        publication); 0 for a key bounded otherwise, or not at all."""
        return 0

    def layers_removed(self, layer_ids: Sequence[str]) -> None:
        """The garbage collector removed `layer_ids` from the layer store: drop whatever
        the backend made of them (a snapshotting backend's chains); nothing by default."""
        return None

    @abc.abstractmethod
    def holder_probe(self, key: str) -> Mount | None:
        """A plan that `Mounter.in_use` tries (never mounts) to learn whether a live view
        can still write to `key`'s private state; None when nothing could, or when the
        view has a device number of its own to be asked about by instead (releases.py
        scans /proc for it): a read-only overlay view, a btrfs snapshot."""

    def snapshot(self, key: str) -> str | None:
        """The directory a writable view of `key` binds when the view is a snapshot of
        its own (a btrfs subvolume), whose device number holders of a detached view show
        in /proc (releases.py asks by it); None for a key whose view is an overlay, and by
        default."""
        return None

    @abc.abstractmethod
    def keys(self) -> set[str]:
        """Every key with private state on disk."""

    @abc.abstractmethod
    def repair(self, live: set[str]) -> None:
        """Start-up, once the keys no record names are removed: release what the backend
        holds for them beyond their directories (loop devices, project quotas), and
        restore what a live key needs that the plugin's restart took away. `live`: the
        recorded keys."""

    @abc.abstractmethod
    def recognizer(self, mounts: Sequence[MountInfo]) -> Callable[[MountInfo], bool]:
        """A predicate over `mounts` (one reading of the mount table): is this mount a view
        this backend made on this store? Decided from the table alone: a stat(2) of a
        foreign mount could hang (a dead NFS server)."""
