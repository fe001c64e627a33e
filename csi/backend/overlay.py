"""The overlayfs backend: a publication is an overlay of the image's shared layers with a
private upper and work directory (`volumes/KEY/upper`, `volumes/KEY/work`).

Reads come from the layers; the first write to a lower file copies it up into the upper
directory; a delete leaves a whiteout there. A read-only view needs no upper: an overlay of
lowerdirs alone, or, for a one-layer image (overlay wants at least two lowerdirs without an
upper), a read-only bind mount of the layer, as containerd's overlay snapshotter does.

Every overlay strata makes has the mount source `strata:ROOT`, so that start-up can tell
its own overlays on this store from anyone else's even when their lowerdirs are relative
(below); older strata versions mounted `overlay`/`none` and are recognised by their
absolute upper and lower paths.

Long layer chains: mount(2) copies one page of options, about 90 absolute lowerdirs under
/var/lib/strata. Beyond that the executor uses `lowerdir+` (Linux 6.8) where the kernel has
it; elsewhere (Ubuntu 22.04, RHEL 9, Bottlerocket/COS) this backend makes
`volumes/KEY/lower/N` symlinks to the layers (0 is the base) and plans a mount whose
lowerdirs are those short names, relative to that directory: Docker's overlay2 `l/` links
and containerd's relative-lowerdir mount, per publication.

Size limits: a limited publication's upper and work directories go one level down, into the
room its `Bound` makes (`volumes/KEY/fs/`, a filesystem image of the limit's size, with the
loop mechanism; `volumes/KEY/quota/`, a directory with a project quota, with the other);
`remove` has the bound release that room (unmount it, clear the quota) before deleting.
"""

import contextlib
import dataclasses
import errno
import functools
import os
from collections.abc import Callable, Iterator, Sequence

from csi import inspect
from csi.backend import Backend, Dirs, Space, Usage
from csi.backend.bound import Bound, Bounds
from csi.backend.loopfs import LoopBound
from csi.backend.quotabound import QuotaBound
from csi.inspect import Summary
from csi.mount import spec
from csi.mount.features import Features
from csi.mount.mountinfo import MountInfo, mount_of
from csi.mount.spec import Mount
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.trash import Trash
from csi.tree import remove_tree, usage

UPPER, WORK, LOWER = "upper", "work", "lower"
OVERLAY_PATH_KEYS = ("lowerdir", "lowerdir+", "datadir+", "upperdir", "workdir")


class OverlayBackend(Backend):
    name = "overlay"

    def __init__(self, paths: StorePaths, features: Features | None = None,
                 bound: Bound | None = None,
                 layer_dir: Callable[[str], str] | None = None, trash: Trash | None = None):
        """`bound` enforces size limits; left out, the loop mechanism with a mounter of
        its own, which also finds the keys that project quotas bounded (the tools that
        only read and remove need nothing more). `layer_dir` maps an ID of a chain to the
        directory the overlay reads it through: the layer store's `layers/ID/fs` unless
        told otherwise (the btrfs backend plans its size-limited publications with this
        class over one directory: a chain subvolume, the whole image already merged).
        `trash`: where removed keys go to be deleted in the background (the server's);
        left out, a key is deleted at once."""
        self._paths = paths
        self._trash = trash or Trash(paths.trash)
        self._layer_dir = layer_dir or paths.layer_fs
        self._features = features or Features()
        self._bound = bound or Bounds(LoopBound(paths, Mounter(features=features)),
                                      QuotaBound(paths))
        self.source = f"strata:{paths.root}"

    # -- views -------------------------------------------------------------------------
    def lowers(self, chain: Sequence[str]) -> list[str]:
        """Nearest (topmost) first; a layer the image lists twice only once, at its topmost
        place (overlay refuses a repeated lowerdir, and the lower copy is hidden anyway)."""
        return [self._layer_dir(lid) for lid in dict.fromkeys(reversed(tuple(chain)))]

    def prepare(self, key: str, chain: Sequence[str], target: str,
                size_limit: int = 0) -> Mount:
        lowers = self._lowers(chain)
        home = (self._bound.part,) if size_limit else ()
        upper = self._paths.volume_part(key, *home, UPPER)
        work = self._paths.volume_part(key, *home, WORK)
        with self._making(key):
            if size_limit:
                self._bound.make(key, size_limit)
            os.mkdir(work, 0o700)
            os.mkdir(upper)
            # The merged root takes the upper dir's owner and mode: match the image's root.
            st = os.stat(lowers[0])
            os.chown(upper, st.st_uid, st.st_gid)
            os.chmod(upper, st.st_mode & 0o7777)
            plan = functools.partial(spec.overlay, upper=upper, work=work, target=target,
                                     volatile=self._features.volatile)
            m = self._tagged(plan(lowers))
            return m if self._fits(m) else self._relative(key, lowers, plan)

    def view(self, key: str, chain: Sequence[str], target: str) -> Mount:
        lowers = self._lowers(chain)
        if len(lowers) == 1:
            return spec.view(lowers, target)  # a read-only bind of the layer
        plan = functools.partial(spec.view, target=target)
        m = self._tagged(plan(lowers))
        if self._fits(m):
            return m  # no state of its own
        with self._making(key):
            return self._relative(key, lowers, plan)

    def _lowers(self, chain: Sequence[str]) -> list[str]:
        """The chain's layer directories, each one checked: a plan naming a missing layer
        would only fail later, at mount(2), with a vaguer error, or (relative lowerdirs)
        through a dangling link."""
        lowers = self.lowers(chain)
        if not lowers:
            raise ValueError("a view needs at least one layer")
        for lower in lowers:
            if not os.path.isdir(lower):
                raise FileNotFoundError(errno.ENOENT, "layer directory missing", lower)
        return lowers

    @contextlib.contextmanager
    def _making(self, key: str) -> Iterator[None]:
        """Create `volumes/KEY` (a key in use is refused and left alone) and remove what
        was made of it when anything inside fails, so a failed prepare leaves no state."""
        os.mkdir(self._paths.volume(key), 0o700)
        try:
            yield
        except BaseException:
            self.remove_or_log(key)
            raise

    def _tagged(self, m: Mount) -> Mount:
        return dataclasses.replace(m, source=self.source)

    def _fits(self, m: Mount) -> bool:
        """Whether the executor can mount `m` as planned: its options fit one page, or the
        kernel takes each lowerdir on its own (`lowerdir+`)."""
        return spec.fits(m, self._features.page_size) or self._features.lowerdir_plus

    def _relative(self, key: str, lowers: list[str], plan: Callable[..., Mount]) -> Mount:
        """`plan` over short lowerdirs relative to `volumes/KEY/lower/`, made here (in
        `volumes/KEY`, which the caller made): links named 0 (the base) to N-1."""
        links = self._paths.volume_part(key, LOWER)
        os.mkdir(links, 0o700)
        count = len(lowers)
        for i, lower in enumerate(lowers):  # nearest first
            os.symlink(lower, os.path.join(links, str(count - 1 - i)))
        return self._tagged(plan([str(count - 1 - i) for i in range(count)], cwd=links))

    # -- a publication's state ---------------------------------------------------------
    def remove(self, key: str) -> None:
        self._bound.release(key)  # neither way of deleting enters a mount: unmount first
        if os.path.isdir(self._paths.volume_part(key, UPPER)):
            # Unlimited: only the disk counts its files, so they may go in the background.
            self._trash.discard(self._paths.volume(key))
        else:
            # A limited key's files count toward its project ID, which is free for the
            # next publish once volumes/KEY is gone (quotabound.in_use): they go first.
            # (A loop-limited key is one sparse image; a read-only view, links.)
            remove_tree(self._paths.volume(key))

    def dirs(self, key: str) -> Dirs | None:
        for home in ((), *((part,) for part in self._bound.parts)):
            upper = self._paths.volume_part(key, *home, UPPER)
            if os.path.isdir(upper):
                return Dirs(upper, self._paths.volume_part(key, *home, WORK))
        return None

    def summarize(self, key: str, chain: Sequence[str], *, stop=None) -> Summary | None:
        dirs = self.dirs(key)
        return None if dirs is None else inspect.summarize(dirs.upper, self.lowers(chain),
                                                           stop=stop)

    def changes(self, key: str, chain: Sequence[str]) -> list[tuple[str, str]] | None:
        dirs = self.dirs(key)
        return None if dirs is None else inspect.diff(dirs.upper, self.lowers(chain))

    def holder_probe(self, key: str) -> Mount | None:
        # The one thing a detached overlay writes to is its upper (its work dir lies beside
        # it and goes with it); overlayfs marks the upper in use for the overlay's lifetime.
        dirs = self.dirs(key)
        return spec.holder_probe(dirs.upper) if dirs is not None else None

    def usage(self, key: str) -> Usage:
        """Bytes and inodes of the publication's files (allocated: st_blocks); for a
        limited key whose bound is a filesystem of its own, walked inside it (see
        LoopBound.usage), not the blocks its image has on the store's disk so far."""
        return self._bound.usage(key) or Usage(*usage(self._paths.volume(key)))

    def space(self, key: str) -> Space | None:
        return self._bound.space(key)

    def project_id(self, key: str) -> int:
        return self._bound.project_id(key)

    def keys(self) -> set[str]:
        try:  # a stray file is state too, to be removed if no publication names it
            return set(os.listdir(self._paths.volumes))
        except FileNotFoundError:
            return set()

    # -- start-up ----------------------------------------------------------------------
    def repair(self, live: set[str]) -> None:
        self._bound.repair(live)

    def recognizer(self, mounts: Sequence[MountInfo]) -> Callable[[MountInfo], bool]:
        views = self._layer_views(mounts)

        def mine(m: MountInfo) -> bool:
            if m.fstype == "overlay":
                return m.source == self.source or self._ours_by_paths(m.super_options)
            # A read-only view of a one-layer image is a bind mount of the layer. A subPath
            # bind of a view has a root below the layer's, so it is not one of ours.
            return (m.device, m.root) in views

        return mine

    def _ours_by_paths(self, super_options: str) -> bool:
        """An untagged overlay (mounted by a strata before the source tag) is ours if its
        upper dir is one of our publications', or, read-only, if every lower is one of our
        layers: someone else's overlay may well stack one of our layers among its own."""
        dirs = overlay_dirs(super_options)
        if "upperdir" in dirs:
            return all(d.startswith(self._paths.volumes + "/") for d in dirs["upperdir"])
        lowers = dirs.get("lowerdir", [])
        return bool(lowers) and all(d.startswith(self._paths.layers + "/") for d in lowers)

    def _layer_views(self, mounts: Sequence[MountInfo]) -> set[tuple[str, str]]:
        """(device, root) that a bind mount of each layer directory shows in mountinfo: the
        layer's path inside the filesystem of the mount layers/ is on."""
        real = os.path.realpath(self._paths.layers)
        home = mount_of(real, list(mounts))
        if home is None:
            return set()
        base = home.root.rstrip("/") + real[len(home.mount_point.rstrip("/")):]
        return {(home.device, f"{base}/{lid}/fs") for lid in os.listdir(real)}


def overlay_dirs(super_options: str) -> dict[str, list[str]]:
    """The directories an overlay's options name, by role: `lowerdir` (from `lowerdir=a:b`
    or one `lowerdir+=` each, as the kernel shows the new mount API's), `datadir`,
    `upperdir`, `workdir`."""
    out: dict[str, list[str]] = {}
    for opt in super_options.split(","):
        key, sep, value = opt.partition("=")
        if sep and key in OVERLAY_PATH_KEYS:
            role = key.rstrip("+")
            out.setdefault(role, []).extend(value.split(":") if key == "lowerdir" else [value])
    return out
