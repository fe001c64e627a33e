"""What this kernel's overlayfs can do, found out once by asking it.

Kernel versions lie (distributions backport, vendors patch), so `probe` decides each
feature by having the kernel build an overlay with it, or reads it from the module's
parameters where those say it. The mount executor reads `Features.lowerdir_plus` to choose
how to pass more than a page of options; backends read the rest to choose mount options.
`Features(...)` with explicit values stands in for a kernel in tests.
"""

import dataclasses
import errno
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

SYSFS = "/sys/module/overlay/parameters"


def _page_size() -> int:
    return os.sysconf("SC_PAGESIZE")


@dataclasses.dataclass(frozen=True)
class Features:
    """Each flag says the kernel accepted the option on the probe's filesystem. A `*_default`
    is the module parameter's value (what a mount gets when it does not say), or None where
    /sys/module/overlay/parameters does not have it (the kernel predates the option)."""

    page_size: int = dataclasses.field(default_factory=_page_size)
    lowerdir_plus: bool = False
    redirect_dir: bool = False
    redirect_dir_default: bool | None = None
    metacopy: bool = False
    metacopy_default: bool | None = None
    index: bool = False
    index_default: bool | None = None
    volatile: bool = False
    userxattr: bool = False


def parse_param(text: str) -> bool | None:
    """A boolean module parameter as sysfs prints it ("Y"/"N"); None for anything else."""
    return {"Y": True, "N": False}.get(text.strip())


def read_param(sysfs: str, name: str) -> bool | None:
    try:
        with open(os.path.join(sysfs, name)) as f:
            return parse_param(f.read())
    except FileNotFoundError:
        return None


# attempt(options, target, fsconfig_only): build an overlay from `options` ("key=value" or
# a flag) and drop it at once, raising the kernel's OSError. `target` is an empty directory
# it may mount on briefly (kernels without fsopen) unless `fsconfig_only`, in which case it
# raises ENOSYS there. syscalls.trial_overlay is the real one.
Attempt = Callable[[Sequence[str], str, bool], None]


def probe(scratch_dir: str, *, sysfs: str = SYSFS) -> Features:
    """Ask the kernel what overlayfs can do, with layers made in a private directory under
    `scratch_dir` (which should be on the filesystem that will hold the uppers: whether an
    option is accepted can depend on it). Nothing is left in `scratch_dir` and nothing stays
    mounted, whatever fails. Raises OSError when the kernel will not build a plain overlay
    at all (no overlayfs, or not permitted): then no answer would be honest."""
    # syscalls is the only caller of mount(2) and imports this module for `Features`.
    from csi.mount.syscalls import in_dir, trial_overlay

    def attempt(options: Sequence[str], target: str, fsconfig_only: bool) -> None:
        # The options name their directories relative to the target's: run from there.
        here, name = os.path.split(target)
        in_dir(here, lambda: trial_overlay(options, name, fsconfig_only))

    return _probe(scratch_dir, attempt, sysfs)


def _probe(scratch_dir: str, attempt: Attempt, sysfs: str) -> Features:
    start = time.monotonic()
    root = tempfile.mkdtemp(prefix=".overlay-probe-", dir=scratch_dir)
    try:
        counter = itertools.count()

        def accepted(*options: str, upper: bool = True, fsconfig_only: bool = False) -> bool:
            # Fresh directories for every attempt: an overlay marks its workdir (index=on
            # ties the upper to its lowers, volatile leaves work/incompat/volatile behind),
            # and one attempt's marks must not decide the next one's answer.
            d = os.path.join(root, str(next(counter)))
            names = ("l0", "l1", "u", "w", "t") if upper else ("l0", "l1", "t")
            for name in names:
                os.makedirs(os.path.join(d, name))
            # Paths relative to `d` (the attempt runs there): the kernel takes at most 256
            # bytes per fsconfig(2) string, which `lowerdir=A:B` of two absolute paths under
            # a long --root would pass, and every attempt would be refused for that alone.
            opts = [o.format(l0="l0", l1="l1") for o in options]
            if upper:
                opts += ["upperdir=u", "workdir=w"]
            if not any(o.startswith(("lowerdir=", "lowerdir+=")) for o in opts):
                opts.insert(0, "lowerdir=l0:l1")
            try:
                attempt(opts, os.path.join(d, "t"), fsconfig_only)
            except OSError as e:
                if e.errno != errno.EINVAL and not (fsconfig_only and e.errno == errno.ENOSYS):
                    raise
                log.debug("overlay refused %s: %s", options or "a plain mount", e)
                return False
            return True

        # Two lowers and no upper: the plainest overlay there is, and one that any
        # filesystem can be the lower of. If even this is refused, nothing below would mean
        # anything.
        if not accepted(upper=False):
            raise OSError(errno.EINVAL, f"overlayfs refuses a plain two-layer mount of "
                                        f"directories in {scratch_dir}")
        # Each lowerdir in its own fsconfig call (6.8): the only way to pass an image's
        # layers when their absolute paths do not fit in the one page mount(2) copies.
        # Asked with no upper, so that the answer cannot depend on the scratch filesystem,
        # and of fsconfig only: in mount(2)'s data it would still be limited to one page.
        lowerdir_plus = accepted("lowerdir+={l0}", "lowerdir+={l1}", upper=False,
                                 fsconfig_only=True)
        # Every other option matters only for a writable overlay, and a filesystem that
        # cannot hold an upper at all (overlayfs itself, say) is no place to ask about them.
        writable = accepted()
        if not writable:
            log.warning("overlayfs will not take an upper directory on the filesystem of "
                        "%s; features of writable overlays are reported absent", scratch_dir)

        def with_upper(option: str) -> bool:
            return writable and accepted(option)

        features = Features(
            lowerdir_plus=lowerdir_plus,
            # Renaming a directory that came from a lower layer: without redirects rename(2)
            # fails with EXDEV; with them the upper holds a redirect xattr instead of a copy,
            # which whatever reads an upper (strata diff, copy-up metrics) must follow. The
            # default decides which a publication gets unless strata says.
            redirect_dir=with_upper("redirect_dir=on"),
            redirect_dir_default=read_param(sysfs, "redirect_dir"),
            # chown/chmod of a lower file copies up metadata only: cheap for big files, but
            # the upper then holds a data-less file whose contents live in a lower layer.
            metacopy=with_upper("metacopy=on"),
            metacopy_default=read_param(sysfs, "metacopy"),
            # Keeps hard links whole across copy-up, and ties the upper to its exact lowers
            # (a later mount of it over other layers fails), so it decides whether an upper
            # can be remounted over a rebuilt chain.
            index=with_upper("index=on"),
            index_default=read_param(sysfs, "index"),
            # No syncfs at unmount or on sync(2) (5.10): an ephemeral volume's writes die
            # with the pod, and flushing them only stalls unpublish.
            volatile=with_upper("volatile"),
            # user.overlay.* instead of trusted.overlay.* xattrs (5.11): what an overlay in a
            # user namespace needs, and what a reader without CAP_SYS_ADMIN can see.
            userxattr=with_upper("userxattr"),
        )
    finally:
        shutil.rmtree(root)
    log.info("probed overlayfs in %.1f ms: %s", (time.monotonic() - start) * 1e3, features)
    return features
