"""Start-up reconciliation of state.db with the disk and the kernel's mount table.

A crash can leave: half-built work in tmp/ (emptied), layer or publication directories
that were never recorded (removed: unrecorded means unverified or unused, but a publication's
only once no overlay uses it, see releases.py), publications whose mount is gone (forgotten
and their private state removed, unless a view of them lives on: then released, with their
references), releases whose lazy detach was interrupted after their record (detached now),
references that no longer match the publications and stages that exist (rebuilt by the
state), and mounts of this store that no publication records (a publish interrupted between
mount(2) and its record: unmounted, so that the kubelet's retry finds its target free).
Which mounts are this store's, and which directories a publication owns, the backend says;
it also restores and releases what it holds outside the mount table (a size-limited key's
filesystem and loop device): restores first, so that every key can be asked about, and
releases last, once the keys no record names are gone.

Nothing recorded here wakes the releases' background thread: the caller's
`Releases.settle()` sweeps once start-up is done, then keeps asking.
"""

import logging
import os
import time

from csi.backend import Backend
from csi.mount.mountinfo import mount_of
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.releases import Releases
from csi.store.layers import LayerStore
from csi.store.state import State
from csi.tree import remove_tree

log = logging.getLogger(__name__)

PARTIAL_MAX_AGE = 24 * 3600  # a partial download nobody resumed for a day is dropped


def reconcile(paths: StorePaths, state: State, mounter: Mounter, backend: Backend,
              layers: LayerStore, alone: bool = True, clock=time.time,
              releases: Releases | None = None) -> None:
    """`alone`: no other process uses the store (see locks.StoreUsers). When one does (a
    `strata pull` mid-unpack), tmp/, unrecorded layer directories and the other process's
    leases are left for the next start. `releases` decides about private state that a
    live overlay may still use (releases.py): the keys of pending releases are left to it,
    and unrecorded keys go only once the kernel says no overlay uses them."""
    if alone:
        _clean_tmp(paths.tmp, clock())
    else:
        log.warning("another strata process uses %s: tmp/ and unrecorded layer directories "
                    "are left for the next start", paths.root)
    releases = releases or Releases(paths, state, backend, mounter, clock=clock,
                                    starting=True)
    with state.read() as tx:
        pubs = tx.publications()
        pending = tx.releases()
    recorded = {p.target for p in pubs}
    for r in pending:  # record-then-detach, interrupted after the record
        if r.target and r.target not in recorded:
            releases.finish_detach(r.target)
    _unmount_unrecorded(paths, recorded, mounter, backend)
    # Before anything is asked about a key: a live limited key's filesystem that a new
    # mount namespace lost is mounted again, or its upper could not be found to ask about.
    # Loop devices of keys whose directory is gone altogether are detached here too.
    backend.repair({p.key for p in pubs} | {r.key for r in pending} | backend.keys())
    for p in pubs:
        if not mounter.table.is_mountpoint(p.target):
            # Asked before the record changes: a view that lives on (a lazy detach behind
            # our back, a copy in another namespace) keeps the publication's references.
            log.warning("publication of %s at %s lost its mount", p.volume_id, p.target)
            releases.end(p)
    with state.transaction() as tx:
        lost = {layer.id for layer in tx.layers()
                if not os.path.isdir(paths.layer_fs(layer.id))}
        for lid in sorted(lost):
            log.error("layer %s is recorded but its directory is gone; forgetting it and "
                      "the images that contain it (they are pulled again when used)", lid)
        for line in tx.rebuild_references(lost, keep_leases=not alone):
            log.error("%s", line)  # its next publish pulls the image again
        live_keys = {p.key for p in tx.publications()} | {r.key for r in tx.releases()}
        layer_ids = {layer.id for layer in tx.layers()}
    for key in sorted(backend.keys() - live_keys):
        # A size-limited key's filesystem is unmounted first (remove never enters a mount).
        releases.remove_unless_held(key, f"unrecorded publication {key}")
    # Loop devices no record owns now. What is still on disk was kept on purpose (a key
    # pending release: its filesystem is under the detached overlay).
    backend.repair(live_keys | backend.keys())
    if alone:
        layers.remove_unrecorded(layer_ids)


def _clean_tmp(tmp: str, now: float) -> None:
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if name.startswith("blob-") and name.endswith(".partial") and \
                now - os.lstat(path).st_mtime < PARTIAL_MAX_AGE:
            continue  # a download to resume with Range; its digest is checked at the end
        remove_tree(path, ignore_errors=True)


def _unmount_unrecorded(paths: StorePaths, recorded: set[str], mounter: Mounter,
                        backend: Backend) -> None:
    """Mounts of this store that no publication records come from a publish that crashed
    between mount(2) and its record: the kubelet never got OK for them and will retry,
    which must find the target free. Unmount them (their private state goes below).

    A copy of a live publication's mount is not one of them: the kubelet's subPath binds,
    or a copy that mount propagation made (unmounting that would take the live one too).
    Such a copy has the live mount's superblock, where that is the publication's own (an
    overlay's is), or else its peer group (a one-layer view is a bind of a layer, whose
    superblock is the store's filesystem, shared by every such view)."""
    mounts = mounter.table.mounts()
    mine = backend.recognizer(mounts)
    home = mount_of(paths.root, mounts)
    store_device = home.device if home is not None else ""
    live = [m for m in mounts if m.mount_point in recorded]
    live_devices = {m.device for m in live if m.device != store_device}
    live_groups = {m.peer_group for m in live if m.peer_group}
    for m in mounts:
        if m.mount_point in recorded or not mine(m):
            continue
        if m.device in live_devices or (m.peer_group and m.peer_group in live_groups):
            continue
        log.warning("unmounting %s: a strata mount that no publication records "
                    "(a publish interrupted before it was recorded)", m.mount_point)
        try:
            mounter.unmount(m.mount_point)
        except OSError as e:
            log.error("cannot unmount %s: %s", m.mount_point, e)
