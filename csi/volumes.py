"""The volume manager: stage / publish / unpublish / unstage, idempotency, per-key locks.

Vocabulary (DESIGN.md): a *stage* pins an image's layers for a persistent volume on this
node; a *publication* is one volume mounted at one target path, with its own upper and work
directories under `volumes/KEY/`. Every decision about repeats is made here, from the
recorded state *and* the live mount table: an identical repeat returns early with a log
line, the same target with different arguments is ALREADY_EXISTS, and tearing down
something unknown is OK.
"""

import dataclasses
import logging
import os
import secrets
import time

from csi.errors import AlreadyExists, FailedPrecondition, Internal, NotFound
from csi.locks import KeyedLock
from csi.mount import spec as mount_spec
from csi.mount.syscalls import Mounter
from csi.pulls import Puller
from csi.store.blobs import BlobStore
from csi.store.gc import Collector
from csi.store.layers import LayerStore, lower_dirs
from csi.store.state import Publication, Stage, State, pub_holder, stage_holder
from csi.tree import remove_tree, usage

log = logging.getLogger(__name__)

# CSI VolumeCapability.AccessMode.Mode values that matter here.
SINGLE_NODE_SINGLE_WRITER = 6


@dataclasses.dataclass(frozen=True)
class StageSpec:
    volume_id: str
    staging_path: str
    image: str
    access_mode: int
    secrets: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    pull_policy: str = ""
    wait: float | None = None  # seconds a pull may take before the RPC answers ABORTED


@dataclasses.dataclass(frozen=True)
class PublishSpec:
    volume_id: str
    target: str
    image: str
    readonly: bool
    access_mode: int
    staging_path: str = ""  # empty for inline ephemeral volumes
    secrets: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    pull_policy: str = ""
    wait: float | None = None


@dataclasses.dataclass(frozen=True)
class VolumeStats:
    bytes_used: int
    bytes_total: int
    bytes_available: int
    inodes_used: int
    inodes_total: int
    inodes_free: int
    abnormal: bool
    message: str


class VolumeManager:
    def __init__(self, root: str, state: State, layers: LayerStore, mounter: Mounter,
                 puller: Puller | None = None, clock=time.time, locks=None,
                 gc: Collector | None = None):
        self.volumes_dir = os.path.join(root, "volumes")
        os.makedirs(self.volumes_dir, mode=0o700, exist_ok=True)
        self._state = state
        self._layers = layers
        self._mounter = mounter
        self._puller = puller or Puller(state, layers, BlobStore(root))
        self._clock = clock
        self._locks = locks or KeyedLock()
        self._gc = gc

    # -- stage -------------------------------------------------------------------------
    def stage(self, s: StageSpec) -> None:
        s = dataclasses.replace(s, staging_path=canonical(s.staging_path))
        with self._locks.hold("vol:" + s.volume_id):
            with self._state.transaction() as tx:
                existing = tx.stage(s.volume_id)
            unpacked = self._layers.unpacked
            if existing is not None:
                if existing.staging_path != s.staging_path or existing.image != s.image:
                    raise AlreadyExists(f"volume {s.volume_id} is already staged at "
                                        f"{existing.staging_path} with image {existing.image}")
                self._stage_layers(existing, s.secrets, s.pull_policy, s.wait)
                log.info("volume %s already staged at %s, nothing to do", s.volume_id,
                         s.staging_path)
            else:
                source, image = self._puller.pull(s.image, s.secrets, s.pull_policy, s.wait)
                with self._layers.acquire(source, image) as layer_ids:
                    with self._state.transaction() as tx:
                        tx.put_stage(Stage(s.volume_id, s.staging_path, s.image,
                                           image.manifest_digest, s.access_mode,
                                           self._clock()))
                        tx.add_refs(stage_holder(s.volume_id), layer_ids)
                log.info("staged volume %s: image %s (%s), %d layers", s.volume_id, s.image,
                         image.manifest_digest, len(layer_ids))
        if self._layers.unpacked != unpacked:
            self._collect()  # the store grew: an LRU policy may need to make room

    def _stage_layers(self, stage: Stage, secrets: dict, policy: str,
                      wait: float | None) -> list[str]:
        """The layers a stage pins. If start-up found one of them lost and forgot the image,
        pull it again and re-pin it: the kubelet stages a volume once, so whichever call
        comes next (a publish, or a repeated stage) repairs the stage."""
        with self._state.transaction() as tx:
            image = tx.image(stage.manifest_digest)
        if image is not None:
            return list(image.layer_ids)
        log.warning("volume %s: staged image %s is no longer complete on this node; pulling "
                    "it again", stage.volume_id, stage.image)
        source, pulled = self._puller.pull(stage.image, secrets, policy, wait)
        with self._layers.acquire(source, pulled) as layer_ids:
            with self._state.transaction() as tx:
                tx.delete_stage(stage.volume_id)
                tx.put_stage(dataclasses.replace(stage, manifest_digest=pulled.manifest_digest))
                tx.drop_refs(stage_holder(stage.volume_id))
                tx.add_refs(stage_holder(stage.volume_id), layer_ids)
        return layer_ids

    def unstage(self, volume_id: str, staging_path: str) -> None:
        staging_path = canonical(staging_path)
        with self._locks.hold("vol:" + volume_id):
            with self._state.transaction() as tx:
                st = tx.stage(volume_id)
                if st is None:
                    log.info("volume %s is not staged, nothing to do", volume_id)
                    return
                if st.staging_path != staging_path:
                    # CSI: "not staged to the staging_target_path" -> OK, and leave the
                    # stage that exists alone.
                    log.info("volume %s is staged at %s, not %s: nothing to do", volume_id,
                             st.staging_path, staging_path)
                    return
                pubs = [p.target for p in tx.publications(volume_id) if p.staging_path]
                if pubs:
                    raise FailedPrecondition(f"volume {volume_id} is still published at "
                                             f"{', '.join(pubs)}; unpublish it first")
                tx.delete_stage(volume_id)
                released = tx.drop_refs(stage_holder(volume_id))
                tx.touch_layers(released, self._clock())  # --gc-min-age counts from here
            log.info("unstaged volume %s", volume_id)
        self._collect()

    # -- publish -----------------------------------------------------------------------
    def publish(self, p: PublishSpec) -> None:
        p = dataclasses.replace(p, target=canonical(p.target),
                                staging_path=canonical(p.staging_path) if p.staging_path else "")
        if os.path.islink(p.target):
            # mount(2) would follow it, but the mount table, statx and umount2(NOFOLLOW)
            # would not: the record and the kernel would disagree about where we mounted.
            raise FailedPrecondition(f"target {p.target} is a symbolic link; the kubelet "
                                     "passes a directory or nothing")
        with self._locks.hold("vol:" + p.volume_id, "target:" + p.target):
            with self._state.transaction() as tx:
                existing = tx.publication(p.target)
                others = [x for x in tx.publications(p.volume_id) if x.target != p.target]
                stage = tx.stage(p.volume_id) if p.staging_path else None
            if existing is not None:
                if self._same(existing, p):
                    if self._mounter.table.is_mountpoint(p.target):
                        log.info("volume %s already published at %s, nothing to do",
                                 p.volume_id, p.target)
                        return
                    log.warning("publication of %s at %s is recorded but not mounted; "
                                "publishing it again", p.volume_id, p.target)
                    self._teardown(existing)
                else:
                    raise AlreadyExists(
                        f"target {p.target} already holds volume {existing.volume_id} "
                        f"(image {existing.image}, readonly={existing.readonly})")
            if others and (p.access_mode == SINGLE_NODE_SINGLE_WRITER
                           or any(o.access_mode == SINGLE_NODE_SINGLE_WRITER for o in others)):
                raise FailedPrecondition(
                    f"volume {p.volume_id} is single-writer and already published at "
                    f"{others[0].target}")
            if p.staging_path:
                if stage is None or stage.staging_path != p.staging_path:
                    raise FailedPrecondition(f"volume {p.volume_id} is not staged at "
                                             f"{p.staging_path}")
                # The stage's references pin these layers; the volume lock keeps it staged.
                unpacked = self._layers.unpacked
                layer_ids = self._stage_layers(stage, p.secrets, p.pull_policy, p.wait)
                with self._state.transaction() as tx:
                    stage = tx.stage(p.volume_id)
                self._mount(p, stage.image, stage.manifest_digest, layer_ids)
                if self._layers.unpacked != unpacked:
                    self._collect()
                return
            unpacked = self._layers.unpacked
            source, image = self._puller.pull(p.image, p.secrets, p.pull_policy, p.wait)
            with self._layers.acquire(source, image) as layer_ids:
                self._mount(p, p.image, image.manifest_digest, layer_ids)
        if self._layers.unpacked != unpacked:
            self._collect()

    def _same(self, pub: Publication, p: PublishSpec) -> bool:
        """CSI: a repeat with a different capability or readonly is ALREADY_EXISTS."""
        return (pub.volume_id == p.volume_id and pub.readonly == p.readonly
                and pub.access_mode == p.access_mode
                and pub.staging_path == p.staging_path
                and (p.staging_path != "" or pub.image == p.image))

    def _mount(self, p: PublishSpec, image_name: str, manifest_digest: str,
               layer_ids: list[str]) -> None:
        lowers = lower_dirs(self._layers.root, layer_ids)
        key = secrets.token_hex(8)
        vdir = os.path.join(self.volumes_dir, key)
        created_target = False
        mounted = False
        try:
            if p.readonly:
                m = mount_spec.view(lowers, p.target)
            else:
                upper, work = os.path.join(vdir, "upper"), os.path.join(vdir, "work")
                os.makedirs(work, mode=0o700)
                os.mkdir(upper)
                # The merged root takes the upper dir's owner and mode: match the image's.
                st = os.stat(lowers[0])
                os.chown(upper, st.st_uid, st.st_gid)
                os.chmod(upper, st.st_mode & 0o7777)
                m = mount_spec.overlay(lowers, upper, work, p.target)
            if self._mounter.table.is_mountpoint(p.target):
                raise FailedPrecondition(f"{p.target} is already a mount point that strata "
                                         "did not record")
            if not os.path.isdir(p.target):
                try:
                    os.mkdir(p.target, mode=0o750)  # the kubelet creates its parent
                except FileNotFoundError:
                    raise FailedPrecondition(f"the parent of target {p.target} does not "
                                             "exist") from None
                created_target = True
            self._mounter.mount(m)
            mounted = True
            with self._state.transaction() as tx:
                tx.put_publication(Publication(
                    p.target, p.volume_id, key, image_name,
                    manifest_digest, p.readonly, p.staging_path, p.access_mode, self._clock()))
                tx.add_refs(pub_holder(p.target), layer_ids)
                tx.touch_layers(layer_ids, self._clock())
        except BaseException:
            if mounted:
                try:
                    self._mounter.unmount(p.target)
                except OSError:
                    log.exception("cannot undo the mount at %s", p.target)
                    raise
            remove_tree(vdir, ignore_errors=True)
            if created_target:
                _rmdir(p.target)
            raise
        log.info("published volume %s at %s: %s (%d layers, %s)", p.volume_id, p.target,
                 image_name, len(layer_ids), "read-only" if p.readonly else "upper " + key)

    # -- unpublish ---------------------------------------------------------------------
    def unpublish(self, volume_id: str, target: str) -> None:
        target = canonical(target)
        with self._locks.hold("vol:" + volume_id, "target:" + target):
            with self._state.transaction() as tx:
                pub = tx.publication(target)
            if pub is None:
                log.info("volume %s is not published at %s, nothing to do", volume_id, target)
                return
            if pub.volume_id != volume_id:
                raise NotFound(f"target {target} holds volume {pub.volume_id}, not {volume_id}")
            self._teardown(pub)
            _rmdir(target)
            log.info("unpublished volume %s from %s", volume_id, target)
        self._collect()

    def _collect(self) -> None:
        """Run GC after references were released (or the store grew). Its failure never
        fails the RPC that triggered it: the volume work is done and recorded."""
        if self._gc is None:
            return
        try:
            self._gc.collect()
        except Exception:
            log.exception("garbage collection failed")

    def _teardown(self, pub: Publication) -> None:
        """Unmount, forget, then delete the ephemeral upper layer (record before files)."""
        self._mounter.unmount(pub.target)
        if self._mounter.table.is_mountpoint(pub.target):
            raise Internal(f"{pub.target} is still mounted after unmount")
        with self._state.transaction() as tx:
            tx.delete_publication(pub.target)
            released = tx.drop_refs(pub_holder(pub.target))
            tx.touch_layers(released, self._clock())  # --gc-min-age counts from here
        try:  # a read-only publication has none: remove_tree accepts a missing path
            remove_tree(os.path.join(self.volumes_dir, pub.key))
        except OSError as e:
            log.error("cannot remove upper layer %s: %s", pub.key, e)

    # -- stats -------------------------------------------------------------------------
    def stats(self, volume_id: str, path: str) -> VolumeStats:
        path = canonical(path) if os.path.isabs(path) else path
        with self._locks.hold("vol:" + volume_id, "target:" + path):
            return self._stats_locked(volume_id, path)

    def _stats_locked(self, volume_id: str, path: str) -> VolumeStats:
        with self._state.transaction() as tx:
            pub = tx.publication(path) if os.path.isabs(path) else None
            stage = tx.stage(volume_id)
        if pub is not None and pub.volume_id == volume_id:
            used, inodes = usage(os.path.join(self.volumes_dir, pub.key))
            mounted = self._mounter.table.is_mountpoint(pub.target)
            message = "mounted" if mounted else f"{pub.target} is not mounted any more"
            return self._stats(used, inodes, not mounted, message)
        if stage is not None and stage.staging_path == path:
            return self._stats(0, 0, False, "staged")
        raise NotFound(f"volume {volume_id} is not published or staged at {path}")

    def _stats(self, used: int, inodes: int, abnormal: bool, message: str) -> VolumeStats:
        fs = os.statvfs(self.volumes_dir)
        return VolumeStats(
            bytes_used=used, bytes_total=fs.f_blocks * fs.f_frsize,
            bytes_available=fs.f_bavail * fs.f_frsize, inodes_used=inodes,
            inodes_total=fs.f_files, inodes_free=fs.f_favail, abnormal=abnormal,
            message=message)


def canonical(path: str) -> str:
    """The path as the mount table will show it: symlinks in its parent resolved. The last
    component is kept as given (it is ours to create, and may be a mount point)."""
    parent, name = os.path.split(os.path.normpath(path))
    return os.path.join(os.path.realpath(parent), name)


def _rmdir(path: str) -> None:
    """Remove a target dir we created: rmdir only, never rmtree (it may still hold data)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e.strerror)
