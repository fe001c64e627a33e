"""The btrfs backend: layers as a chain of read-only subvolume snapshots, a publication as a
writable snapshot of its image's top one, as Docker's btrfs driver and containerd's btrfs
snapshotter do it. Copy-on-write is the filesystem's, per extent: a pod's first write to a
200 MB file of the image allocates the blocks it writes, not 200 MB.

Layout (the store's root must be on btrfs):
- `chains/CHAIN` a read-only subvolume: the image's files up to and including one layer.
  CHAIN is the OCI image spec's ChainID over the store's layer IDs (a layer's ID for the
  base, else sha256 of "PARENT_CHAIN LAYER_ID"), so two images share a subvolume only as far
  as they share every layer below it: sharing is by chain, not by layer. `CHAIN.layers`
  beside it lists its layer IDs, base first, for the garbage collector (`layers_removed`).
  A chain is made by snapshotting its parent chain (an empty subvolume for the base) into
  `tmp/chain-*`, applying the layer's directory `layers/ID/fs` onto it (layerapply.py:
  whiteouts become deletions, opaque directories lose what was below, data is cloned),
  renaming it into place and setting it read-only; a crash leaves a writable subvolume in
  tmp/, which start-up removes.
- `volumes/KEY/fs` a writable snapshot of the chain: the publication, bind-mounted at the
  target. `volumes/KEY/chain` names the chain it came from (what `summarize` compares it
  with). A read-only view is a read-only bind of the chain itself: no state of its own;
  the state database's record of its publication keeps the chain from the collector
  (`recorded`, compose.recorded_chains).
- `chains.lock` serialises making and deleting chains across processes (`strata gc`
  deletes them beside the server).

Size limits, where quotas are enabled on the filesystem, are btrfs qgroup limits. Under
simple quotas (`btrfs quota enable --simple ROOT`, Linux 6.7) the limit is on the
publication's group, a level-1 qgroup of its own (`btrfs.group`): what the pod writes, in
its subvolume and in any subvolume it makes inside it, which the kernel adds to the group.
Under full qgroups (`btrfs quota enable ROOT`) it is on the subvolume's own qgroup (its
exclusive bytes), and a pod that makes a subvolume of its own writes there unbounded: a
warning says so once. Even a group does not hold a subvolume made with an inheritance
the pod names itself (mount/btrfs.py): against a pod that means to escape, only the loop
mechanism bounds. Where quotas are off, a limited publication takes step 5's loop
mechanism: a snapshot cannot live inside another filesystem, so it is an overlay whose one
lowerdir is the chain subvolume (the whole image, already merged) and whose upper and work
live in a filesystem image of the limit's size (loopfs.LoopBound), planned by the overlay
backend itself over that one directory:
- `volumes/KEY/fs.img` the filesystem image: its presence is what marks such a key on
  disk (a snapshot key never has one), so a restarted server tells the two kinds apart;
- `volumes/KEY/fs/` the image mounted (ext4), with `upper/` and `work/` inside;
- `volumes/KEY/chain` as for a snapshot: the chain it reads, which GC keeps while it does.
The overlay's source is `strata:ROOT`, as the overlay backend's, which the recognizer
knows; diff, usage, stats (NodeGetVolumeStats shows the limit), the holder probe and
start-up's repair of loop devices are the overlay backend's for these keys.
Snapshots have inodes of their own, so pods of one image do not share page cache (a
loop-limited publication reads the chain's, which its image's other such pods share).
"""

import errno
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Sequence

from csi.backend import Backend, Dirs, Space, Usage, layerapply, treediff
from csi.backend.bound import Bound
from csi.backend.loopfs import IMAGE, LoopBound
from csi.backend.overlay import OverlayBackend
from csi.inspect import Summary
from csi.locks import FileLock
from csi.mount import btrfs
from csi.mount.features import Features
from csi.mount.mountinfo import MountInfo, MountTable, mount_of
from csi.mount.spec import Mount
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.tree import remove_tree

log = logging.getLogger(__name__)

FS, CHAIN = "fs", "chain"


def chain_ids(chain: Sequence[str]) -> list[str]:
    """The ChainID of each prefix of `chain` (base first), over the store's layer IDs."""
    out: list[str] = []
    for lid in chain:
        out.append(lid if not out else
                   hashlib.sha256(f"{out[-1]} {lid}".encode()).hexdigest())
    return out


class BtrfsBackend(Backend):
    name = "btrfs"
    shares_page_cache = False
    shared_by = "chain"

    def __init__(self, paths: StorePaths, features: Features | None = None,
                 bound: Bound | None = None,
                 recorded: Callable[[], set[str] | None] | None = None):
        """`features` (the kernel's overlay features) and `bound` (the loop mechanism,
        mounting with the server's executor) are for size-limited publications on a btrfs
        without quotas; `bound` left out, a loop mechanism with a mounter of its own (the
        tools, which only read and remove, need nothing more). `recorded()` names the
        chains that the state database's publications and releases bind (None: it cannot
        say, keep every chain); the collector never deletes those."""
        self._paths = paths
        self.chains = os.path.join(paths.root, "chains")
        self.recorded = recorded or (lambda: set())
        self._lock: FileLock | None = None  # made on first use: the read-only tools never do
        self._warned_escapable = False
        self._looped = OverlayBackend(
            paths, features, bound or LoopBound(paths, Mounter(features=features)),
            layer_dir=lambda cid: os.path.join(self.chains, cid))

    # -- chains ------------------------------------------------------------------------
    def _chains_lock(self) -> FileLock:
        """One maker or deleter of chains at a time, across processes: `strata gc` runs
        `layers_removed` beside the server, which may be building a chain of the same
        layers. A lock of its own, not the layer store's: the collector calls
        `layers_removed` after its sweep, and a chain takes long to build."""
        if self._lock is None:
            self._lock = FileLock(os.path.join(self._paths.root, "chains.lock"))
        return self._lock

    def chain_path(self, chain: Sequence[str]) -> str:
        return os.path.join(self.chains, chain_ids(chain)[-1])

    def lowers(self, chain: Sequence[str]) -> list[str]:
        """The chain subvolume a view shows (one: it holds every layer below it)."""
        chain = tuple(chain)
        return [self.chain_path(chain)] if chain else []

    def _chain(self, chain: Sequence[str]) -> str:
        """The read-only subvolume of `chain`, made (with those below it) if missing."""
        chain = tuple(chain)
        if not chain:
            raise ValueError("a view needs at least one layer")
        for lid in chain:
            if not os.path.isdir(self._paths.layer_fs(lid)):
                raise FileNotFoundError(errno.ENOENT, "layer directory missing",
                                        self._paths.layer_fs(lid))
        with self._chains_lock():
            for lid in chain:  # again: a deleter holds the lock while it checks them
                if not os.path.isdir(self._paths.layer_fs(lid)):
                    raise FileNotFoundError(errno.ENOENT, "layer directory missing",
                                            self._paths.layer_fs(lid))
            os.makedirs(self.chains, mode=0o700, exist_ok=True)
            ids = chain_ids(chain)
            start = len(ids)
            while start > 0 and not os.path.isdir(os.path.join(self.chains, ids[start - 1])):
                start -= 1
            for i in range(start, len(ids)):
                self._make(ids[i - 1] if i else None, ids[i], chain[:i + 1])
            top = os.path.join(self.chains, ids[-1])
            if not btrfs.readonly(top):  # renamed into place, then a crash
                btrfs.set_readonly(top)
            return top

    def _make(self, parent: str | None, cid: str, layers: Sequence[str]) -> None:
        work = os.path.join(self._paths.tmp, f"chain-{secrets.token_hex(6)}")
        if parent is None:
            btrfs.create(work)
        else:
            btrfs.snapshot(os.path.join(self.chains, parent), work)
        try:
            layerapply.apply_layer(self._paths.layer_fs(layers[-1]), work)
            listing = os.path.join(self.chains, f"{cid}.layers")
            with open(listing + ".tmp", "w") as f:
                f.write("\n".join(layers) + "\n")
            os.rename(listing + ".tmp", listing)
            final = os.path.join(self.chains, cid)
            os.rename(work, final)
        except BaseException:
            btrfs.delete(work)
            raise
        btrfs.set_readonly(final)
        log.info("made chain subvolume %s (%d layers, top %s)", cid, len(layers), layers[-1])

    def layers_removed(self, layer_ids) -> None:
        """The garbage collector removed layers: delete every chain subvolume that contains
        a layer no longer in the layer store (chains are siblings, not nested: no order
        between them). `layer_ids` is only a hint: the sweep is over by now and a layer may
        have been pulled again and a chain of it built and mounted since, so what decides,
        under the chains lock (which chain building takes too), is whether `layers/ID`
        exists now. Kept besides: a chain that a key on disk names (a loop-limited
        publication's overlay reads it as its lowerdir, a snapshot's diff compares with
        it), and a chain that a recorded publication or release binds (a read-only view is
        a bind of the chain itself and has no key on disk; the state database is its
        crash-safe record). The kernel would delete a chain from under its mounts."""
        del layer_ids
        with self._chains_lock():
            try:
                names = os.listdir(self.chains)
            except FileNotFoundError:
                return
            used = self._named()
            recorded = self.recorded()
            for name in names:
                if not name.endswith(".layers"):
                    continue
                cid = name[:-len(".layers")]
                try:
                    with open(os.path.join(self.chains, name)) as f:
                        lids = set(f.read().split())
                except FileNotFoundError:
                    continue
                if all(os.path.isdir(self._paths.layer(lid)) for lid in lids):
                    continue
                if cid in used:
                    log.info("keeping chain subvolume %s: publication %s reads it", cid,
                             used[cid])
                    continue
                if recorded is None or cid in recorded:
                    log.info("keeping chain subvolume %s: a recorded publication or "
                             "release binds it", cid)
                    continue
                path = os.path.join(self.chains, cid)
                try:
                    if btrfs.is_subvolume(path):
                        btrfs.delete(path)
                    os.unlink(os.path.join(self.chains, name))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.error("cannot delete chain subvolume %s: %s", cid, e)

    def _named(self) -> dict[str, str]:
        """{chain ID: a key naming it} over every key on disk (`volumes/KEY/chain`)."""
        out = {}
        for key in self.keys():
            try:
                with open(self._paths.volume_part(key, CHAIN)) as f:
                    out.setdefault(f.read().strip(), key)
            except (FileNotFoundError, NotADirectoryError):
                pass
        return out

    # -- views -------------------------------------------------------------------------
    def prepare(self, key: str, chain: Sequence[str], target: str,
                size_limit: int = 0) -> Mount:
        top = self._chain(chain)
        if size_limit and not btrfs.quota_enabled(self._paths.root):
            return self._prepare_looped(key, os.path.basename(top), target, size_limit)
        os.mkdir(self._paths.volume(key), 0o700)
        try:
            fs = self._paths.volume_part(key, FS)
            self._write_chain(key, os.path.basename(top))
            btrfs.snapshot(top, fs)
            if size_limit:
                self._limit(fs, size_limit)
        except BaseException:
            self.remove_or_log(key)
            raise
        return Mount(type="bind", source=fs, target=target, options=("rbind",))

    def _limit(self, fs: str, size_limit: int) -> None:
        if btrfs.quota_mode(fs) == "squota":
            btrfs.group(fs, size_limit)
            return
        btrfs.limit(fs, size_limit)
        if not self._warned_escapable:
            log.warning("the btrfs of %s keeps full qgroups: a sizeLimit bounds what a pod "
                        "writes in its own subvolume, not in a subvolume it makes inside it "
                        "(a new qgroup of its own). Simple quotas (`btrfs quota enable "
                        "--simple`, Linux and btrfs-progs 6.7) bound those made the "
                        "ordinary way; only quotas off (loop filesystems) bound a pod that "
                        "means to escape (docs/size-limits.md)", self._paths.root)
            self._warned_escapable = True

    def _prepare_looped(self, key: str, cid: str, target: str, size_limit: int) -> Mount:
        """An overlay of the chain `cid` with its upper in a loop filesystem of
        `size_limit` bytes (the module docstring). The overlay backend makes
        `volumes/KEY` and removes what it made if it fails; the chain's name goes last."""
        m = self._looped.prepare(key, [cid], target, size_limit)
        try:
            self._write_chain(key, cid)
        except BaseException:
            self.remove_or_log(key)
            raise
        log.debug("publication %s: limited to %d bytes by a loop filesystem (no quotas on "
                  "the btrfs of %s)", key, size_limit, self._paths.root)
        return m

    def _write_chain(self, key: str, cid: str) -> None:
        with open(self._paths.volume_part(key, CHAIN), "w") as f:
            f.write(cid + "\n")

    def view(self, key: str, chain: Sequence[str], target: str) -> Mount:
        return Mount(type="bind", source=self._chain(chain), target=target,
                     options=("rbind", "ro"))

    # -- a publication's state ---------------------------------------------------------
    def is_looped(self, key: str) -> bool:
        """Whether `key` is a loop-limited overlay (not a snapshot): its filesystem image
        is on disk. The image is the first thing the loop mechanism makes in
        `volumes/KEY`, and a snapshot key never has one."""
        return os.path.lexists(self._paths.volume_part(key, IMAGE))

    def remove(self, key: str) -> None:
        if self.is_looped(key):
            self._looped.remove(key)  # unmounts the loop filesystem first
            return
        home = self._paths.volume(key)
        fs = os.path.join(home, FS)
        if btrfs.is_subvolume(fs):
            real = os.path.realpath(fs)
            if MountTable().under(real):
                raise OSError(errno.EBUSY, "a mount inside the publication's subvolume", real)
            if btrfs.grouped(fs):
                self._ungroup(key, fs)
            btrfs.delete(fs)
        remove_tree(home)

    @staticmethod
    def _ungroup(key: str, fs: str) -> None:
        """Destroy the snapshot's group before its subvolumes go. Where the kernel refuses
        (EBUSY: a member it still counts), the group is left, logged, without its limit:
        deleting reserves metadata against it, and a full group would refuse that."""
        try:
            btrfs.ungroup(fs)
        except OSError as e:
            log.error("publication %s: cannot destroy its qgroup group (%s); it stays, "
                      "unlimited, and the subvolume is deleted", key, e.strerror or e)
            btrfs.limit(fs, 0, exclusive=False, level=btrfs.GROUP_LEVEL)

    def _origin(self, key: str) -> tuple[str, str] | None:
        """(chain subvolume, the key's snapshot) for a writable key; None otherwise."""
        fs = self._paths.volume_part(key, FS)
        try:
            with open(self._paths.volume_part(key, CHAIN)) as f:
                cid = f.read().strip()
        except FileNotFoundError:
            return None
        origin = os.path.join(self.chains, cid)
        if not (os.path.isdir(fs) and os.path.isdir(origin)):
            return None
        return origin, fs

    def _looped_chain(self, key: str, chain: Sequence[str]) -> list[str]:
        """The one-chain "layer list" a loop-limited key's overlay reads: the chain its
        key names, or (a crash before the name was written) the top of `chain`; [] when
        neither says."""
        try:
            with open(self._paths.volume_part(key, CHAIN)) as f:
                return [f.read().strip()]
        except FileNotFoundError:
            return [chain_ids(chain)[-1]] if chain else []

    def summarize(self, key: str, chain: Sequence[str], *, stop=None) -> Summary | None:
        if self.is_looped(key):
            cids = self._looped_chain(key, chain)
            return self._looped.summarize(key, cids, stop=stop) if cids else None
        pair = self._origin(key)
        return None if pair is None else treediff.summarize(*pair, stop=stop)

    def changes(self, key: str, chain: Sequence[str]) -> list[tuple[str, str]] | None:
        if self.is_looped(key):
            cids = self._looped_chain(key, chain)
            return self._looped.changes(key, cids) if cids else None
        pair = self._origin(key)
        return None if pair is None else treediff.changes(*pair)

    def dirs(self, key: str) -> Dirs | None:
        """A loop-limited key's upper and work dirs; None for a snapshot (no upper)."""
        return self._looped.dirs(key) if self.is_looped(key) else None

    def limit_kind(self, key: str) -> str:
        return "loop" if self.is_looped(key) else "qgroup"

    def writable(self, key: str) -> bool:
        if self.is_looped(key):
            return self._looped.writable(key)
        return btrfs.is_subvolume(self._paths.volume_part(key, FS))  # the pod's snapshot

    def holder_probe(self, key: str) -> Mount | None:
        if self.is_looped(key):
            return self._looped.holder_probe(key)  # an overlay: its upper's in-use mark
        # No mount plan to try: a snapshot has no upper for overlayfs to mark. A view of
        # one has a device number of its own (a subvolume's), so releases.py asks about a
        # detached view by that device, as for a read-only overlay: whether anything in
        # /proc still uses it. It matters: the kernel deletes a subvolume even while a
        # bind of it lives on, which then shows a dead directory.
        return None

    def snapshot(self, key: str) -> str | None:
        # A loop-limited key's volumes/KEY/fs is its loop filesystem's mount point: a
        # device of its own too, but no view binds it (the overlay over it is asked
        # about through its upper, and before the upper exists nothing can hold it).
        return None if self.is_looped(key) else self._paths.volume_part(key, FS)

    def usage(self, key: str) -> Usage:
        """With quotas on, what counts against its limit (`_counted`); else the files it
        created or rewrote (allocated bytes, which on btrfs include extents still shared). A
        loop-limited key: the files in its filesystem, as the overlay backend counts them."""
        if self.is_looped(key):
            return self._looped.usage(key)
        fs = self._paths.volume_part(key, FS)
        if not btrfs.is_subvolume(fs):
            return Usage(0, 0)
        if btrfs.quota_enabled(fs):
            try:
                return Usage(self._counted(fs)[0], self._inodes(key))
            except FileNotFoundError:
                pass
        s = self.summarize(key, ())
        return Usage(0, 0) if s is None else Usage(s.upper_bytes, s.upper_inodes)

    def _inodes(self, key: str) -> int:
        s = self.summarize(key, ())
        return 0 if s is None else s.upper_inodes

    def space(self, key: str) -> Space | None:
        if self.is_looped(key):
            return self._looped.space(key)  # the loop filesystem's: total = the limit
        fs = self._paths.volume_part(key, FS)
        if not btrfs.is_subvolume(fs) or not btrfs.quota_enabled(fs):
            return None
        used, limit = self._counted(fs)
        if not limit:
            return None
        return Space(limit, used, max(0, limit - used), 0, self._inodes(key), 0)

    @staticmethod
    def _counted(fs: str) -> tuple[int, int]:
        """(bytes counted against the snapshot's limit, the limit or 0): its group's count
        where it has one (what it and the subvolumes made inside it hold), else its own
        exclusive bytes. FileNotFoundError where quotas are off."""
        try:
            u = btrfs.usage(fs, level=btrfs.GROUP_LEVEL)
        except FileNotFoundError:  # no group (sysfs has no 1_ID): its own qgroup
            u = btrfs.usage(fs)
            return u.exclusive, u.max_exclusive
        return u.referenced, u.max_referenced

    def keys(self) -> set[str]:
        try:
            return set(os.listdir(self._paths.volumes))
        except FileNotFoundError:
            return set()

    # -- start-up ----------------------------------------------------------------------
    def repair(self, live: set[str]) -> None:
        """Half-made chains in tmp/ (a crash while applying a layer) are deleted, and
        chains whose layers are gone from the layer store (removed while no server ran
        the collector's hook) unless a key names them. Loop-limited keys: the loop
        mechanism's repair (a dead key's loop device detached, a live key's filesystem
        mounted again where a new mount namespace lost it)."""
        self._looped.repair(live)
        self.layers_removed(())  # the chains of layers no longer in the store
        self._seal_chains()
        try:
            names = os.listdir(self._paths.tmp)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(self._paths.tmp, name)
            if name.startswith("chain-") and btrfs.is_subvolume(path):
                try:
                    btrfs.delete(path)
                except OSError as e:
                    log.error("cannot delete the half-made chain %s: %s", path, e)

    def _seal_chains(self) -> None:
        """Every chain read-only: a crash between a chain's rename into place and its
        set_readonly leaves it writable, and a chain below another is never reached by
        `_chain`'s own check of the top."""
        try:
            names = os.listdir(self.chains)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(self.chains, name)
            try:
                if btrfs.is_subvolume(path) and not btrfs.readonly(path):
                    btrfs.set_readonly(path)
                    log.warning("chain subvolume %s was left writable (a crash): made "
                                "read-only", name)
            except OSError as e:
                log.error("cannot make the chain %s read-only: %s", path, e)

    def recognizer(self, mounts: Sequence[MountInfo]) -> Callable[[MountInfo], bool]:
        """Binds of this store's snapshots and chains, and the overlays of its
        loop-limited publications (source `strata:ROOT`, as the overlay backend tags its
        own: this store's and no other's)."""
        views = self._views(mounts)
        source = self._looped.source
        return lambda m: ((m.fstype == "btrfs" and (m.device, m.root) in views)
                          or (m.fstype == "overlay" and m.source == source))

    def _views(self, mounts: Sequence[MountInfo]) -> set[tuple[str, str]]:
        """(device, root) of a bind of each publication's snapshot and each chain, as
        mountinfo shows them: their paths inside the filesystem the store is on."""
        real = os.path.realpath(self._paths.root)
        home = mount_of(real, list(mounts))
        if home is None:
            return set()
        base = home.root.rstrip("/") + real[len(home.mount_point.rstrip("/")):]
        out = set()
        for key in self.keys():
            out.add((home.device, f"{base}/volumes/{key}/{FS}"))
        try:
            out |= {(home.device, f"{base}/chains/{c}") for c in os.listdir(self.chains)}
        except FileNotFoundError:
            pass
        return out
