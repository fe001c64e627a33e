"""Mount plans as data. Pure functions, no I/O: the executor in syscalls.py carries them out.

A writable view of an image is an overlay whose lowerdirs are the image's layers, nearest
(topmost) first, with a private upperdir/workdir. A read-only view needs no upper: overlay
accepts lowerdirs alone only when there are at least two, so a one-layer image is a
read-only bind mount instead (containerd's overlay snapshotter does the same).

A plan may name its paths relative to a directory, `cwd`: mount(2) copies at most one page
of option data, and a deep image's absolute lowerdirs do not fit in it. `fits` says whether
a plan's options do; the backend plans with it and the executor decides with it.
"""

import dataclasses
import os
from collections.abc import Sequence

# Options that mount(2) takes as MS_* bits in `flags`; every other option is filesystem
# data, the string the kernel copies into one page.
FLAGS = frozenset({"ro", "nosuid", "nodev", "noexec", "bind", "rbind"})


@dataclasses.dataclass(frozen=True)
class Mount:
    type: str
    source: str
    target: str
    options: tuple[str, ...] = ()
    # When set, relative paths in the plan (lowerdirs, a bind source) are resolved from this
    # directory instead of the process's working directory.
    cwd: str = ""

    def __post_init__(self) -> None:
        if self.cwd and not os.path.isabs(self.cwd):
            raise ValueError(f"a mount's cwd must be absolute, not {self.cwd!r}")


def data(options: Sequence[str]) -> str:
    """The option string mount(2) receives as its `data` argument: every option but flags."""
    return ",".join(o for o in options if o not in FLAGS)


def fits(m: Mount, page_size: int) -> bool:
    """Whether mount(2) can take `m`'s options. The kernel copies one page of data and
    writes a NUL into its last byte (path_mount), so the data must be shorter than a page."""
    return len(os.fsencode(data(m.options))) < page_size


def overlay(lowers: Sequence[str], upper: str, work: str, target: str, cwd: str = "",
            volatile: bool = False) -> Mount:
    """A writable overlay: `lowers` nearest first; writes copy up into `upper`. Relative
    lowers are resolved from `cwd`.

    `volatile` (Linux 5.10; the caller knows from features.probe whether the kernel takes
    it): the overlay omits every sync of its upper (fsync(2), syncfs(2) and sync(2) inside
    it, and the one at unmount), and leaves `work/work/incompat/volatile` behind, by which
    the kernel refuses to mount that upper and work dir ever again: it cannot know whether
    their contents reached the disk. For an upper that is discarded when it is unmounted,
    and never mounted again (after a crash start-up forgets the publication and deletes its
    state), that costs nothing and spares the pod's syncs and the unmount their flushes.

    `metacopy` and `index` are not asked for (the module's defaults stand; off unless a
    distribution changed them). metacopy=on would make a chown/chmod of a lower file copy up
    a data-less file that points into the lowers by xattrs; the kernel's documentation says
    not to use it with untrusted lowers, and image layers are untrusted (unpack strips their
    trusted.overlay.* xattrs: one guard, where the kernel wants none to be needed); it also
    turns redirect_dir on, which changes what a pod's renames leave in its upper. index=on
    keeps hard links whole across copy-up (without it, writing one name of a hard-linked
    lower file leaves its other names showing the old contents), but makes every mount fail
    with EOPNOTSUPP where the store's filesystem cannot encode file handles or has no UUID,
    and verifies the lowers against an upper that strata never mounts twice.
    """
    if not lowers:
        raise ValueError("an overlay needs at least one lower layer")
    return Mount(
        type="overlay",
        source="overlay",
        target=target,
        options=(f"lowerdir={':'.join(lowers)}", f"upperdir={upper}", f"workdir={work}",
                 *(("volatile",) if volatile else ())),
        cwd=cwd,
    )


def view(lowers: Sequence[str], target: str, cwd: str = "") -> Mount:
    """A read-only view of a layer stack (nearest first). Relative lowers are resolved
    from `cwd`."""
    if not lowers:
        raise ValueError("a view needs at least one layer")
    if len(lowers) == 1:
        return Mount(type="bind", source=lowers[0], target=target, options=("rbind", "ro"),
                     cwd=cwd)
    return Mount(
        type="overlay", source="overlay", target=target,
        options=(f"lowerdir={':'.join(lowers)}", "ro"), cwd=cwd,
    )


def holder_probe(upper: str) -> Mount:
    """A plan that asks the kernel whether a live overlay still uses `upper` as its upper
    dir, without building anything: the executor only tries it (Mounter.in_use).

    An overlay marks its upper dir in use from the moment it is built until its superblock
    is destroyed, which happens only when the last thing holding it goes: a mount in any
    namespace, an open file, a working directory, a mapping. With `index=on` a second overlay
    on a marked upper fails with EBUSY, and the kernel checks that mark first; this plan
    names `upper` as its workdir too, which the kernel refuses (EINVAL, "workdir and
    upperdir must be separate subtrees") right after that check, before it writes anything.
    So EBUSY means held, EINVAL means free, and nothing changes either way."""
    return Mount(type="overlay", source="overlay", target=upper,
                 options=(f"lowerdir={upper}", f"upperdir={upper}", f"workdir={upper}",
                          "index=on"))
