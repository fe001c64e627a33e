"""Volume health: one verdict per publication (or stage), abnormal or not, with a message a
person can act on.

Verdicts are a pure function of what was seen (`verdict(Observation)`); `Health` is the thin
layer that gathers an observation, sampling only what is cheap on every call: whether the
target is still a mount point (statx), a stat(2) of each layer directory of the image (never
a walk of it), of the upper dir, and the usage the caller already measured. NodeGetVolumeStats
serves the verdict as VolumeCondition (CSI 1.12, what the kubelet reads today); a later
NodeGetVolumeHealth (KEP-1432) can serve the same verdicts from `Health.publication`.

What is abnormal, most urgent first:
- the mount is gone: the pod sees the empty directory beneath;
- the image is no longer complete on this node (start-up found a layer lost);
- a layer directory is missing, is not a directory, cannot be read, or was changed after it
  was unpacked: a layer is written once, in tmp/, and its record committed after, so a
  top directory (`layers/ID/fs`, or `layers/ID` that holds it) modified later than the
  record had entries removed, added or replaced (a copy put in its place) by someone else.
  Modified, not changed: mtime, not ctime, which a relabel (SELinux), an xattr or a chmod
  also moves without touching a byte the pod reads;
- the writable layer is gone;
- the writable layer is at its size limit: the pod's writes fail with ENOSPC.
"""

import dataclasses
import errno
import os
import stat
import time

from csi.backend import Backend, Space, Usage
from csi.mount.mountinfo import MountTable
from csi.paths import StorePaths
from csi.store.state import Publication, Stage, State
from csi.units import human_bytes

# How much later than its record a layer's top directories may have been modified without
# counting as changed. None needed: the unpack's last change to them (directory times are
# set last, then the rename into layers/) comes before the record's time is read, and the
# kernel stamps times from a clock that runs up to a tick behind the one the record reads.
# Only a wall-clock step backwards in those few milliseconds could make an untouched layer
# look changed.
MTIME_SLACK = 0.0


@dataclasses.dataclass(frozen=True)
class LayerSample:
    """One stat(2) of a layer directory."""

    layer_id: str
    path: str
    recorded: float = 0.0  # when its record was committed; 0: unknown
    error: int = 0  # the errno stat(2) gave (ENOENT: missing); 0 when it answered
    is_dir: bool = True
    mtime: float = 0.0  # the later of layers/ID/fs's and layers/ID's


@dataclasses.dataclass(frozen=True)
class Observation:
    target: str  # the publication's target, or the stage's staging path
    image: str
    mounted: bool | None = True  # None: nothing of ours is mounted there (a stage)
    image_complete: bool = True  # the image and all its layers are still recorded
    layers: tuple[LayerSample, ...] = ()
    writable: str = ""  # the writable layer's directory ("" for a read-only view or stage)
    writable_missing: bool = False
    size_limit: int = 0  # bytes; 0: unbounded
    used_bytes: int = 0
    available_bytes: int | None = None  # what the bound leaves, when the backend knows
    available_inodes: int | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    abnormal: bool
    message: str


def verdict(o: Observation) -> Verdict:
    """The one verdict on an observation: every problem found, most urgent first, in one
    message; "mounted" (or "staged") when there is none."""
    problems = []
    if o.mounted is False:
        problems.append(f"{o.target} is not mounted any more (unmounted behind strata's back, "
                        "or lost at a reboot): the pod sees an empty directory; restart the "
                        "pod to publish the volume again")
    if not o.image_complete:
        problems.append(f"image {o.image} is no longer complete on this node (a layer "
                        "directory was lost); restart the pod so that strata pulls it again")
    problems += _layer_problems(o)
    if o.writable and o.writable_missing:
        problems.append(f"the writable layer {o.writable} is gone: writes in the pod fail; "
                        "restart the pod")
    full = upper_full(o.size_limit, o.used_bytes, o.available_bytes, o.available_inodes)
    if full:
        problems.append(full)
    if not problems:
        return Verdict(False, "mounted" if o.mounted is not None else "staged")
    return Verdict(True, "; ".join(problems))


def _layer_problems(o: Observation) -> list[str]:
    missing, other = [], []
    for s in o.layers:
        if s.error == errno.ENOENT:
            missing.append(s)
        elif s.error:
            other.append(f"layer {s.layer_id} of image {o.image} cannot be read ({s.path}: "
                         f"{os.strerror(s.error)}): the pod may fail to read its files")
        elif not s.is_dir:
            other.append(f"layer {s.layer_id} of image {o.image} is damaged: {s.path} is not "
                         "a directory; restart strata on this node (it forgets the layer and "
                         "pulls it again), then restart the pod")
        elif s.recorded and s.mtime > s.recorded + MTIME_SLACK:
            other.append(f"layer {s.layer_id} of image {o.image} was changed after it was "
                         f"unpacked ({s.path} changed {s.mtime - s.recorded:.0f} s after its "
                         "record): the pod may read damaged files; remove the layer directory "
                         "once no pod uses it and restart strata, which pulls it again")
    problems = []
    if missing:
        names = ", ".join(f"{s.layer_id} ({s.path})" for s in missing)
        problems.append(f"{len(missing)} of {len(o.layers)} layers of image {o.image} "
                        f"{'is' if len(missing) == 1 else 'are'} missing: {names}; files "
                        "from them may vanish or fail to read in the pod; restart strata on "
                        "this node (it forgets lost layers and pulls them again), then "
                        "restart the pod")
    return problems + other


def upper_full(limit: int, used: int, available: int | None,
               available_inodes: int | None) -> str:
    """Why the writable layer can take no more, or "": the one place "at its size limit" is
    decided. Where the backend says what the bound leaves (a loop filesystem's or a project
    quota's free space and inodes), that decides; otherwise the bytes used against the
    limit."""
    if not limit:
        return ""
    if available is not None or available_inodes is not None:
        if available is not None and available <= 0:
            what = "bytes"
        elif available_inodes is not None and available_inodes <= 0:
            what = "inodes"
        else:
            return ""
    elif used >= limit:
        what = "bytes"
    else:
        return ""
    return (f"the writable layer is at its size limit ({human_bytes(used)} used of "
            f"{human_bytes(limit)}, no {what} left): writes in the pod fail with ENOSPC "
            "(EDQUOT under an ext4 quota); free space inside the pod or raise the volume's "
            "sizeLimit")


class Health:
    """Gathers observations of publications and stages; `verdict` judges them."""

    def __init__(self, paths: StorePaths, state: State, backend: Backend,
                 table: MountTable | None = None, clock=time.time):
        self._clock = clock
        self._paths = paths
        self._state = state
        self._backend = backend
        self._table = table or MountTable()

    def publication(self, pub: Publication, usage: Usage | None = None,
                    space: Space | None = None) -> Verdict:
        return verdict(self.observe(pub, usage, space))

    def stage(self, stage: Stage) -> Verdict:
        return verdict(self.observe_stage(stage))

    def observe(self, pub: Publication, usage: Usage | None = None,
                space: Space | None = None) -> Observation:
        """`usage`: the backend's usage of the publication's key, if the caller measured it
        (it walks the upper); without it, the size limit is not judged. `space`: what the
        bound of a size-limited key leaves (the backend's `space`), which decides."""
        complete, layers = self._layers(pub.manifest_digest)
        writable = "" if pub.readonly else self._paths.volume(pub.key)
        available_bytes, available_inodes = _room(space)
        return Observation(
            target=pub.target, image=pub.image,
            mounted=self._table.is_mountpoint(pub.target),
            image_complete=complete, layers=layers, writable=writable,
            writable_missing=bool(writable) and not self._backend.writable(pub.key),
            size_limit=pub.size_limit if usage is not None else 0,
            used_bytes=usage.bytes if usage is not None else 0,
            available_bytes=available_bytes, available_inodes=available_inodes)

    def observe_stage(self, stage: Stage) -> Observation:
        complete, layers = self._layers(stage.manifest_digest)
        return Observation(target=stage.staging_path, image=stage.image, mounted=None,
                           image_complete=complete, layers=layers)

    def _layers(self, manifest_digest: str) -> tuple[bool, tuple[LayerSample, ...]]:
        with self._state.read() as tx:
            image = tx.image(manifest_digest)
            if image is None:
                return False, ()
            records = {lid: tx.layer(lid) for lid in dict.fromkeys(image.layer_ids)}
        return True, tuple(self._sample(lid, rec.created if rec else 0.0)
                           for lid, rec in records.items())

    def _sample(self, layer_id: str, recorded: float) -> LayerSample:
        # The layer store's own directory, whatever the backend builds from it (btrfs's
        # chains are made from it, and named by ChainID, not by layer).
        path = self._paths.layer_fs(layer_id)
        try:
            st = os.stat(path)
            home = os.stat(os.path.dirname(path))
        except OSError as e:
            return LayerSample(layer_id, path, recorded, error=e.errno or errno.EIO)
        # layers/ID is strata's own (the rename into layers/ made it); fs takes the time
        # its tar's root entry names, which may lie in the future (a build machine's clock):
        # such a time is not a modification, until the clock reaches it.
        own = st.st_mtime if st.st_mtime <= self._clock() else 0.0
        return LayerSample(layer_id, path, recorded, is_dir=stat.S_ISDIR(st.st_mode),
                           mtime=max(own, home.st_mtime))


def _room(space: Space | None) -> tuple[int | None, int | None]:
    """What the writable layer's bound leaves (bytes, inodes), where the backend says (a
    size-limited upper's filesystem or quota); None where it does not."""
    if space is None:
        return None, None
    return space.bytes_available, space.inodes_free
