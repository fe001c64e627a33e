"""Start-up reconciliation of state.db with the disk and the kernel's mount table.

A crash can leave: half-built work in tmp/ (emptied), layer or volume directories that were
never recorded (removed: unrecorded means unverified or unused), publications whose mount is
gone (forgotten and their upper layer removed), and references that no longer match the
publications and stages that exist (recomputed from scratch). Overlay mounts that use our
volumes but that the database does not know are reported, never touched.
"""

import logging
import os
import shutil

from csi.mount.syscalls import Mounter
from csi.store.state import State, pub_holder, stage_holder

log = logging.getLogger(__name__)


def reconcile(root: str, state: State, mounter: Mounter) -> None:
    tmp = os.path.join(root, "tmp")
    for name in os.listdir(tmp):
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)

    with state.transaction() as tx:
        pubs = tx.publications()
    gone = [p for p in pubs if not mounter.table.is_mountpoint(p.target)]
    with state.transaction() as tx:
        for p in gone:
            log.warning("publication of %s at %s lost its mount; forgetting it", p.volume_id,
                        p.target)
            tx.delete_publication(p.target)
        # References are derived data: rebuild them from what exists.
        known = {i.manifest_digest: i.layer_ids for i in tx.images()}
        tx.drop_all_refs()
        for p in tx.publications():
            tx.add_refs(pub_holder(p.target), list(known.get(p.manifest_digest, ())))
        for s in tx.stages():
            tx.add_refs(stage_holder(s.volume_id), list(known.get(s.manifest_digest, ())))
        live_keys = {p.key for p in tx.publications()}
        layer_ids = {layer.id for layer in tx.layers()}
        missing = [layer.id for layer in tx.layers()
                   if not os.path.isdir(os.path.join(root, "layers", layer.id, "fs"))]
        for lid in missing:
            log.error("layer %s is recorded but its directory is gone; forgetting it", lid)
            tx.delete_layer_refs(lid)
            tx.delete_layer(lid)
    for p in gone:
        shutil.rmtree(os.path.join(root, "volumes", p.key), ignore_errors=True)

    volumes = os.path.join(root, "volumes")
    for key in os.listdir(volumes):
        if key not in live_keys:
            log.warning("removing unrecorded volume directory %s", key)
            shutil.rmtree(os.path.join(volumes, key), ignore_errors=True)
    layers = os.path.join(root, "layers")
    for lid in os.listdir(layers):
        if lid not in layer_ids:
            log.warning("removing unrecorded layer directory %s", lid)
            shutil.rmtree(os.path.join(layers, lid), ignore_errors=True)

    known_targets = {p.target for p in pubs} - {p.target for p in gone}
    for m in mounter.table.mounts():
        if m.fstype == "overlay" and volumes + "/" in m.super_options \
                and m.mount_point not in known_targets:
            log.warning("overlay at %s uses strata's volumes but is not recorded; leaving it",
                        m.mount_point)
