"""The volume manager: stage / publish / unpublish / unstage, idempotency, per-key locks.

Vocabulary (DESIGN.md): a *stage* pins an image's layers for a persistent volume on this
node; a *publication* is one volume mounted at one target path, with its own upper and work
directories under `volumes/KEY/`. Every decision about repeats is made here, from the
recorded state *and* the live mount table: an identical repeat returns early with a log
line, the same target with different arguments is ALREADY_EXISTS, and tearing down
something unknown is OK.
"""

import dataclasses
import errno
import logging
import os
import secrets
import time

from csi import quantity
from csi.backend import Backend, Space, Usage
from csi.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    NotFound,
    ResourceExhausted,
    is_no_space,
    no_space,
)
from csi.health import Health
from csi.image.podtokens import TOKENS_KEY, Identity
from csi.locks import KeyedLock
from csi.mount.syscalls import Mounter
from csi.mount.users import device_of
from csi.paths import StorePaths
from csi.proto.csi_pb2 import VolumeCapability
from csi.pulls import Puller
from csi.releases import Releases
from csi.store.gc import Collector
from csi.store.layers import Lease
from csi.store.state import Publication, Stage, State
from csi.upper_stats import UpperStats

log = logging.getLogger(__name__)

SINGLE_NODE_SINGLE_WRITER = VolumeCapability.AccessMode.SINGLE_NODE_SINGLE_WRITER


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
class Pod:
    """The pod a publication is for (the kubelet's podInfoOnMount attributes)."""

    namespace: str = ""
    name: str = ""
    uid: str = ""
    service_account: str = ""


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
    size_limit: int = 0  # bytes the upper layer may hold; 0: none named
    pod: Pod = Pod()
    # The pod's service-account tokens (TOKENS_KEY, from the CSIDriver's tokenRequests) for
    # the credential providers that take them; never logged.
    tokens: str = dataclasses.field(default="", repr=False, compare=False)

    @property
    def identity(self) -> Identity:
        return Identity(self.pod.namespace, self.pod.name, self.pod.uid,
                        self.pod.service_account, self.tokens)


def service_account_tokens(volume_context, secrets) -> str:
    """The pod's service-account tokens as NodePublishVolume carries them when the
    CSIDriver has tokenRequests: in `secrets` if it sets serviceAccountTokenInSecrets
    (KEP-5538), else in `volume_context`; "" when none came.

    Only the kubelet can have put them in `secrets` (a Secret's keys cannot hold a "/").
    In `volume_context` they are the kubelet's only when the CSIDriver has tokenRequests:
    otherwise a pod's inline volumeAttributes pass through unchanged, so whatever is found
    there is checked against the pod (podtokens.service_account) before any use."""
    if TOKENS_KEY in secrets:
        if TOKENS_KEY in volume_context:
            # The kubelet put its tokens in secrets: this one is the volume's own
            # attributes, i.e. written by whoever wrote the pod (or the PV).
            log.warning("%s in volume_context ignored: the kubelet's are in secrets",
                        TOKENS_KEY)
        return secrets[TOKENS_KEY]
    return volume_context.get(TOKENS_KEY, "")


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
    def __init__(self, paths: StorePaths, state: State, backend: Backend, mounter: Mounter,
                 puller: Puller, clock=time.time, locks=None, gc: Collector | None = None,
                 default_size_limit: int = 0, releases: Releases | None = None,
                 health: Health | None = None, upper_stats: UpperStats | None = None):
        """`upper_stats` (metrics) hears of each publication made and gone."""
        self._default_size_limit = default_size_limit
        self._upper_stats = upper_stats
        self._paths = paths
        self._state = state
        self._backend = backend
        self._mounter = mounter
        self._puller = puller
        self._clock = clock
        self._locks = locks or KeyedLock()
        self._gc = gc
        self._releases = releases or Releases(paths, state, backend, mounter, clock=clock)
        self._health = health or Health(paths, state, backend, mounter.table)

    # -- stage -------------------------------------------------------------------------
    def stage(self, s: StageSpec) -> None:
        s = dataclasses.replace(s, staging_path=canonical(s.staging_path))
        with self._locks.hold("vol:" + s.volume_id):
            with self._state.read() as tx:
                existing = tx.stage(s.volume_id)
            if existing is not None:
                if existing.staging_path != s.staging_path or existing.image != s.image:
                    raise AlreadyExists(f"volume {s.volume_id} is already staged at "
                                        f"{existing.staging_path} with image {existing.image}")
                self._stage_layers(existing, s.secrets, s.pull_policy, s.wait)
                log.info("volume %s already staged at %s, nothing to do", s.volume_id,
                         s.staging_path)
            else:
                source, image = self._puller.pull(s.image, s.secrets, s.pull_policy, s.wait)
                with self._puller.acquire(source, image) as lease:
                    with self._state.transaction() as tx:
                        tx.record_stage(Stage(s.volume_id, s.staging_path, s.image,
                                              image.manifest_digest, s.access_mode,
                                              self._clock()), lease.layer_ids, self._clock())
                        lease.hand_over(tx)
                log.info("staged volume %s: image %s (%s), %d layers", s.volume_id, s.image,
                         image.manifest_digest, len(lease.layer_ids))
        self._collect(grown_only=True)

    def _stage_layers(self, stage: Stage, secrets: dict, policy: str,
                      wait: float | None) -> list[str]:
        """The layers a stage pins. If start-up found one of them lost and forgot the image,
        pull it again and re-pin it: the kubelet stages a volume once, so whichever call
        comes next (a publish, or a repeated stage) repairs the stage."""
        with self._state.read() as tx:
            image = tx.image(stage.manifest_digest)
        if image is not None:  # recorded means complete on this node
            return list(image.layer_ids)
        log.warning("volume %s: staged image %s is no longer complete on this node; pulling "
                    "it again", stage.volume_id, stage.image)
        source, pulled = self._puller.pull(stage.image, secrets, policy, wait)
        with self._puller.acquire(source, pulled) as lease:
            with self._state.transaction() as tx:
                tx.record_stage(dataclasses.replace(
                    stage, manifest_digest=pulled.manifest_digest), lease.layer_ids,
                    self._clock())
                lease.hand_over(tx)
        return lease.layer_ids

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
                tx.forget_stage(volume_id, self._clock())
            log.info("unstaged volume %s", volume_id)
        self._collect()

    # -- publish -----------------------------------------------------------------------
    def publish(self, p: PublishSpec) -> None:
        named_limit = 0 if p.readonly else p.size_limit
        p = dataclasses.replace(p, target=canonical(p.target),
                                staging_path=canonical(p.staging_path) if p.staging_path else "",
                                # a read-only view has no upper layer to bound
                                size_limit=0 if p.readonly else
                                p.size_limit or self._default_size_limit)
        if os.path.islink(p.target):
            # mount(2) would follow it, but the mount table, statx and umount2(NOFOLLOW)
            # would not: the record and the kernel would disagree about where we mounted.
            raise FailedPrecondition(f"target {p.target} is a symbolic link; the kubelet "
                                     "passes a directory or nothing")
        with self._locks.hold("vol:" + p.volume_id, "target:" + p.target):
            with self._state.read() as tx:
                existing = tx.publication(p.target)
                others = [x for x in tx.publications(p.volume_id) if x.target != p.target]
                stage = tx.stage(p.volume_id) if p.staging_path else None
            if existing is not None:
                if self._same(existing, p, named_limit):
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
                layer_ids = self._stage_layers(stage, p.secrets, p.pull_policy, p.wait)
                with self._state.read() as tx:
                    stage = tx.stage(p.volume_id)
                self._mount(p, stage.image, stage.manifest_digest, layer_ids)
            else:
                source, image = self._puller.pull(p.image, p.secrets, p.pull_policy, p.wait,
                                                  p.identity)
                with self._puller.acquire(source, image) as lease:
                    self._mount(p, p.image, image.manifest_digest, lease.layer_ids, lease)
        self._collect(grown_only=True)

    def _same(self, pub: Publication, p: PublishSpec, named_limit: int) -> bool:
        """CSI: a repeat with a different capability, readonly or sizeLimit is
        ALREADY_EXISTS. Only a sizeLimit the request names counts: a repeat that names none
        matches whatever --default-size-limit gave the publication (or did not, if the flag
        was set, changed or the publication made before this strata)."""
        return (pub.volume_id == p.volume_id and pub.readonly == p.readonly
                and pub.access_mode == p.access_mode
                and pub.staging_path == p.staging_path
                and (not named_limit or pub.size_limit == named_limit)
                and (p.staging_path != "" or pub.image == p.image))

    def _mount(self, p: PublishSpec, image_name: str, manifest_digest: str,
               layer_ids: list[str], lease: Lease | None = None) -> None:
        """Mount `p` over `layer_ids` and record it. `lease`: what holds the layers until
        the publication's own record does (none for a staged volume: its stage holds
        them), handed over in the transaction that records it."""
        key = secrets.token_hex(8)
        created_target = False
        mounted = False
        try:
            if p.readonly:
                m = self._backend.view(key, layer_ids, p.target)
            else:
                m = self._prepare(key, layer_ids, p)
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
                tx.record_publication(Publication(
                    p.target, p.volume_id, key, image_name, manifest_digest, p.readonly,
                    p.staging_path, p.access_mode, self._clock(),
                    pod_namespace=p.pod.namespace, pod_name=p.pod.name, pod_uid=p.pod.uid,
                    service_account=p.pod.service_account, size_limit=p.size_limit,
                    project_id=self._backend.project_id(key) if p.size_limit else 0),
                    layer_ids, self._clock())
                if lease is not None:
                    lease.hand_over(tx)
        except BaseException:
            if mounted:
                try:
                    self._mounter.unmount(p.target)
                except OSError:
                    log.exception("cannot undo the mount at %s", p.target)
                    raise
            self._backend.remove_or_log(key)
            if created_target:
                _rmdir(p.target)
            raise
        if self._upper_stats is not None:
            self._upper_stats.published(key)
        log.info("published volume %s at %s: %s (%d layers, %s)", p.volume_id, p.target,
                 image_name, len(layer_ids), "read-only" if p.readonly else "upper " + key)

    def _prepare(self, key: str, layer_ids: list[str], p: PublishSpec):
        """The backend's writable layer for `p`, within its size limit. A limit the
        store's filesystem has no room for is refused before anything is made: the image
        is sparse, so nothing would fail now, but the pod would find the node's disk full
        before its own limit. (Limits are not reserved: publications together may promise
        more than the disk holds, as emptyDir size limits do.)"""
        if p.size_limit:
            fs = os.statvfs(self._paths.volumes)
            free = fs.f_bavail * fs.f_frsize
            if p.size_limit > free:
                raise ResourceExhausted(
                    f"sizeLimit {quantity.human(p.size_limit)} ({p.size_limit} bytes) is more "
                    f"than the {quantity.human(free)} free on the store's filesystem")
        try:
            return self._backend.prepare(key, layer_ids, p.target, size_limit=p.size_limit)
        except OSError as e:
            if is_no_space(e):
                raise no_space(f"making the writable layer of {p.target}") from e
            raise

    # -- unpublish ---------------------------------------------------------------------
    def unpublish(self, volume_id: str, target: str) -> None:
        target = canonical(target)
        with self._locks.hold("vol:" + volume_id, "target:" + target):
            with self._state.read() as tx:
                pub = tx.publication(target)
            if pub is None:
                if self._releases.finish_detach(target):  # a detach a crash interrupted
                    _rmdir(target)
                    return
                self._clean_unrecorded_target(volume_id, target)
                return
            if pub.volume_id != volume_id:
                raise NotFound(f"target {target} holds volume {pub.volume_id}, not {volume_id}")
            self._teardown(pub)
            _rmdir(target)
            log.info("unpublished volume %s from %s", volume_id, target)
        self._collect()

    def _clean_unrecorded_target(self, volume_id: str, target: str) -> None:
        """Unpublish of a target no publication records answers OK. An empty directory
        there that is not a mount point is most likely the target a killed unpublish (or
        publish) left between forgetting the record and removing it: remove it, as
        csi-driver-host-path's CleanupMountPoint does, or the retry would answer OK around
        it. Anything else (files in it, a mount, not a directory) is not ours to touch."""
        if (os.path.isdir(target) and not os.path.islink(target)
                and not self._mounter.table.is_mountpoint(target)):
            try:
                os.rmdir(target)
            except FileNotFoundError:
                pass
            except OSError as e:  # ENOTEMPTY, EBUSY: leave it
                log.warning("volume %s is not published at %s, which is left as it is: %s",
                            volume_id, target, e.strerror)
                return
            else:
                log.info("volume %s is not published at %s; removed the empty target dir",
                         volume_id, target)
                return
        log.info("volume %s is not published at %s, nothing to do", volume_id, target)

    def _collect(self, grown_only: bool = False) -> None:
        """Run GC after references were released, or (`grown_only`) if the store grew. Its
        failure never fails the RPC that triggered it: the volume work is done and
        recorded."""
        if self._gc is None:
            return
        try:
            if grown_only:
                self._gc.collect_if_grown()
            else:
                self._gc.collect()
        except Exception:
            log.exception("garbage collection failed")

    def _teardown(self, pub: Publication) -> None:
        """Unmount, then forget the publication and delete its private state (record before
        files), unless a view of it lives on: a mount that stays busy (a process in the pod
        holds it) is detached lazily; a mount that is gone from here may still live in
        another mount namespace (a pod's containers keep a copy of the target mount) or
        held after a detach behind our back. Either way the publication becomes a release
        that keeps its private state and layers until the view is gone (releases.py). The
        target is no longer a mount point when this returns."""
        lost = not self._mounter.table.is_mountpoint(pub.target)
        # Which view: read while mounted (releases.py asks the kernel about it by these).
        device = "" if lost else device_of(pub.target)
        root_inode = None if lost else _inode(pub.target)
        try:
            self._mounter.unmount(pub.target, lazy=False)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            self._releases.detach(pub)
            if self._upper_stats is not None:  # a pod may still write: its last summary
                self._upper_stats.retire(pub, measure=False)
            return
        if self._mounter.table.is_mountpoint(pub.target):
            raise Internal(f"{pub.target} is still mounted after unmount")
        if lost:
            log.warning("publication of %s at %s lost its mount behind strata's back",
                        pub.volume_id, pub.target)
        if self._upper_stats is not None:  # unmounted, not yet deleted: measured once more
            self._upper_stats.retire(pub)
        self._releases.end(pub, device, root_inode)

    # -- stats -------------------------------------------------------------------------
    def stats(self, volume_id: str, path: str) -> VolumeStats:
        path = canonical(path) if os.path.isabs(path) else path
        with self._locks.hold("vol:" + volume_id, "target:" + path):
            return self._stats_locked(volume_id, path)

    def _stats_locked(self, volume_id: str, path: str) -> VolumeStats:
        with self._state.read() as tx:
            pub = tx.publication(path) if os.path.isabs(path) else None
            stage = tx.stage(volume_id)
        if pub is not None and pub.volume_id == volume_id:
            space = self._backend.space(pub.key) if pub.size_limit else None
            # A limited upper's filesystem (or quota) says what it holds: no walk needed.
            used = Usage(space.bytes_used, space.inodes_used) if space is not None \
                else self._backend.usage(pub.key)
            health = self._health.publication(pub, used, space)
            if space is not None:
                return _limited(space, health.abnormal, health.message)
            return self._stats(used.bytes, used.inodes, health.abnormal, health.message)
        if stage is not None and stage.staging_path == path:
            health = self._health.stage(stage)
            return self._stats(0, 0, health.abnormal, health.message)
        raise NotFound(f"volume {volume_id} is not published or staged at {path}")

    def _stats(self, used: int, inodes: int, abnormal: bool, message: str) -> VolumeStats:
        """An unlimited publication's room is the store's filesystem's."""
        fs = os.statvfs(self._paths.volumes)
        return VolumeStats(
            bytes_used=used, bytes_total=fs.f_blocks * fs.f_frsize,
            bytes_available=fs.f_bavail * fs.f_frsize, inodes_used=inodes,
            inodes_total=fs.f_files, inodes_free=fs.f_favail, abnormal=abnormal,
            message=message)


def _limited(space: Space, abnormal: bool, message: str) -> VolumeStats:
    """A limited publication's room is its limit: the kubelet and the pod's owner see the
    limit as the total, and what the pod can still write as available."""
    return VolumeStats(
        bytes_used=space.bytes_used, bytes_total=space.bytes_total,
        bytes_available=space.bytes_available, inodes_used=space.inodes_used,
        inodes_total=space.inodes_total, inodes_free=space.inodes_free, abnormal=abnormal,
        message=message)


def canonical(path: str) -> str:
    """The path as the mount table will show it: symlinks in its parent resolved. The last
    component is kept as given (it is ours to create, and may be a mount point)."""
    parent, name = os.path.split(os.path.normpath(path))
    return os.path.join(os.path.realpath(parent), name)


def _inode(path: str) -> int | None:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return None


def _rmdir(path: str) -> None:
    """Remove a target dir we created: rmdir only, never rmtree (it may still hold data)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e.strerror)
