"""Start-up reconciliation of state.db with the disk and the kernel's mount table.

A crash can leave: half-built work in tmp/ (emptied), layer or volume directories that were
never recorded (removed: unrecorded means unverified or unused), publications whose mount is
gone (forgotten and their upper layer removed), and references that no longer match the
publications and stages that exist (recomputed from scratch), and mounts of our layers that
no publication records (a publish interrupted between mount(2) and its record: unmounted, so
that the kubelet's retry finds its target free).
"""

import logging
import os
import time

from csi.mount.mountinfo import mount_id
from csi.mount.syscalls import Mounter
from csi.store.state import State, pub_holder, stage_holder
from csi.tree import remove_tree

log = logging.getLogger(__name__)

PARTIAL_MAX_AGE = 24 * 3600  # a partial download nobody resumed for a day is dropped


def reconcile(root: str, state: State, mounter: Mounter, alone: bool = True) -> None:
    """`alone`: no other process uses the store (see locks.StoreUsers). When one does (a
    `strata pull` mid-unpack), tmp/ and unrecorded layer directories are left for the
    next start."""
    tmp = os.path.join(root, "tmp")
    if not alone:
        log.warning("another strata process uses %s: tmp/ and unrecorded layer directories "
                    "are left for the next start", root)
    for name in os.listdir(tmp) if alone else ():
        path = os.path.join(tmp, name)
        if name.startswith("blob-") and name.endswith(".partial") and \
                time.time() - os.lstat(path).st_mtime < PARTIAL_MAX_AGE:
            continue  # a download to resume with Range; its digest is checked at the end
        remove_tree(path, ignore_errors=True)

    with state.transaction() as tx:
        pubs = tx.publications()
    _unmount_unrecorded(root, {p.target for p in pubs}, mounter)
    gone = [p for p in pubs if not mounter.table.is_mountpoint(p.target)]
    with state.transaction() as tx:
        for p in gone:
            log.warning("publication of %s at %s lost its mount; forgetting it", p.volume_id,
                        p.target)
            tx.delete_publication(p.target)
        # References are derived data: rebuild them from what exists. Each holder's layers
        # are read before a lost layer takes its image record with it: the layers that are
        # still there stay referenced (a live overlay may use them). A holder whose image a
        # lost layer took at an earlier start keeps the references it has.
        holders = [(pub_holder(p.target), f"publication at {p.target}", p.manifest_digest)
                   for p in tx.publications()]
        holders += [(stage_holder(s.volume_id), f"stage of {s.volume_id}", s.manifest_digest)
                    for s in tx.stages()]
        had: dict[str, list[str]] = {}
        for lid, holder in tx.holders():
            had.setdefault(holder, []).append(lid)
        held = {}
        for holder, _, digest in holders:
            image = tx.image(digest)
            held[holder] = list(image.layer_ids) if image is not None else had.get(holder, [])
        tx.drop_all_refs()
        missing = {layer.id for layer in tx.layers()
                   if not os.path.isdir(os.path.join(root, "layers", layer.id, "fs"))}
        for lid in missing:
            log.error("layer %s is recorded but its directory is gone; forgetting it and "
                      "the images that contain it (they are pulled again when used)", lid)
            tx.delete_images_with_layer(lid)
            tx.delete_layer(lid)
        for holder, what, digest in holders:
            if missing & set(held[holder]):  # its next publish pulls the image again
                log.error("%s: image %s is no longer complete on this node", what, digest)
            tx.add_refs(holder, [lid for lid in held[holder] if lid not in missing])
        live_keys = {p.key for p in tx.publications()}
        layer_ids = {layer.id for layer in tx.layers()}
    for p in gone:
        remove_tree(os.path.join(root, "volumes", p.key), ignore_errors=True)

    volumes = os.path.join(root, "volumes")
    for key in os.listdir(volumes):
        if key not in live_keys:
            log.warning("removing unrecorded volume directory %s", key)
            remove_tree(os.path.join(volumes, key), ignore_errors=True)
    layers = os.path.join(root, "layers")
    for lid in os.listdir(layers) if alone else ():
        if lid not in layer_ids:
            log.warning("removing unrecorded layer directory %s", lid)
            remove_tree(os.path.join(layers, lid), ignore_errors=True)



def _unmount_unrecorded(root: str, recorded: set[str], mounter: Mounter) -> None:
    """Mounts of our layers or upper dirs that no publication records come from a publish
    that crashed between mount(2) and its record: the kubelet never got OK for them and will
    retry, which must find the target free. Unmount them (their upper dirs go below).

    A bind of a live publication (the kubelet's subPath mounts, or a copy that mount
    propagation made) is not one of them: it shares the recorded overlay's superblock (an
    overlay's device is its own) or, for a one-layer view, the recorded view's peer group."""
    volumes = os.path.join(root, "volumes") + "/"
    layers = os.path.join(root, "layers")
    mounts = mounter.table.mounts()
    # A view's mountinfo root is the layer's path inside the store's filesystem: find the
    # mount layers/ is on (statx sees through stacked mounts; else the topmost match).
    real = os.path.realpath(layers)
    store_mount = mount_id(real)
    home = next((m for m in mounts if m.mount_id == store_mount), None)
    if home is None:
        covering = [m for m in mounts if real == m.mount_point
                    or real.startswith(m.mount_point.rstrip("/") + "/")]
        longest = max((len(m.mount_point) for m in covering), default=0)
        home = next((m for m in reversed(covering) if len(m.mount_point) == longest), None)
    views = set()
    if home is not None:
        inside = home.root.rstrip("/") + real[len(home.mount_point.rstrip("/")):]
        views = {(home.device, f"{inside}/{lid}/fs") for lid in os.listdir(layers)}
    live = [m for m in mounts if m.mount_point in recorded]
    live_overlays = {m.device for m in live if m.fstype == "overlay"}
    # Unmounting a mount unmounts its propagated copies too: a copy of a live view (same
    # peer group) must stay, or the recorded view would go with it.
    live_groups = {m.peer_group for m in live if m.peer_group}
    for m in mounts:
        if m.mount_point in recorded:
            continue
        if m.fstype == "overlay":
            ours = volumes in m.super_options or (layers + "/") in m.super_options
            bind_of_live = m.device in live_overlays
        else:  # a read-only view of a one-layer image is a bind mount of the layer
            # From mountinfo alone: stat(2) on a foreign mount could hang (a dead NFS).
            # A subPath bind of a view has a root below the layer's, so it is not ours.
            ours = (m.device, m.root) in views
            bind_of_live = bool(m.peer_group) and m.peer_group in live_groups
        if ours and not bind_of_live:
            log.warning("unmounting %s: a strata mount that no publication records "
                        "(a publish interrupted before it was recorded)", m.mount_point)
            try:
                mounter.unmount(m.mount_point)
            except OSError as e:
                log.error("cannot unmount %s: %s", m.mount_point, e)
