"""Real filesystems made for tests on sparse images, loop-mounted: the store on ext4 (where
overlay's copy-up copies whole files), on XFS with reflink and on btrfs (where the kernel's
copy-up clones extents, and where the btrfs backend makes subvolume snapshots). A
filesystem the node cannot make comes with the precise reason instead (`Fs.skip`).

`make_fs` is shared with the quota tests (tests/integration/quotafs.py); the session
fixture `store_filesystems` (tests/conftest.py) makes one of each kind of STORES, and a
test takes one with `store_fs(store_filesystems, NAME)`, which skips it with that reason.
"""

import contextlib
import dataclasses
import errno
import gzip
import os
import shutil
import subprocess

import pytest

MKFS = {
    # mkfs.xfs refuses images under 300 MB; the file is sparse, so this costs nothing.
    "xfs": ["mkfs.xfs", "-q", "-f"],
    # 256-byte inodes: the project feature keeps the ID in the larger inode, and mke2fs's
    # "small" filesystem type would otherwise pick 128.
    "ext4": ["mkfs.ext4", "-q", "-F", "-I", "256", "-E", "lazy_itable_init=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
PACKAGE = {"xfs": "xfsprogs", "ext4": "e2fsprogs", "btrfs": "btrfs-progs"}
SIZE = {"xfs": "320M", "ext4": "64M", "btrfs": "320M"}


@dataclasses.dataclass
class Fs:
    """A loop-mounted filesystem, or why there is none."""

    kind: str
    root: str = ""
    skip: str = ""


def kernel_config(names) -> str:
    """What /proc/config.gz says of `names` ("CONFIG_X is not set, ..."), or ""."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    said = []
    for name in names:
        line = next((ln for ln in lines if ln.startswith((f"{name}=", f"# {name} is not"))), "")
        said.append(line.lstrip("# ") if line else f"{name} absent")
    return ", ".join(said)


def make_fs(base, kind: str, name: str, features: tuple[str, ...] = (),
            options: tuple[str, ...] = (), size: str = "", args: tuple[str, ...] = (),
            why_refused=None) -> Fs:
    """mkfs `kind` (with `-O` `features` and extra `args`) on a sparse image of `size` and
    loop-mount it with `options`; an Fs with a skip reason when the tool is missing or the
    kernel refuses the mount (`why_refused()` says why, if given)."""
    if shutil.which(MKFS[kind][0]) is None:
        return Fs(kind, skip=f"{MKFS[kind][0]} is not installed ({PACKAGE[kind]}; "
                             "scripts/system-deps.sh)")
    image, root = base / f"{name}.img", base / name
    root.mkdir()
    subprocess.run(["truncate", "-s", size or SIZE[kind], str(image)], check=True)
    mkfs = MKFS[kind] + [a for f in features for a in ("-O", f)] + list(args) + [str(image)]
    made = subprocess.run(mkfs, capture_output=True, text=True)
    if made.returncode != 0:
        return Fs(kind, skip=f"{' '.join(mkfs[:-1])} failed: {made.stderr.strip()}")
    # mount(8) attaches the loop device with autoclear: it goes with the last unmount.
    opts = ",".join(("loop",) + options)
    mounted = subprocess.run(["mount", "-t", kind, "-o", opts, str(image), str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        why = why_refused() if why_refused else mounted.stderr.strip()
        return Fs(kind, skip=f"this kernel refuses to mount {kind}"
                             f"{' -O ' + ','.join(features) if features else ''} with "
                             f"-o {opts}: {why}")
    return Fs(kind, root=str(root))


# The store's filesystems: what overlay's copy-up costs depends on them (docs/reflink.md).
STORES = {
    "ext4": dict(kind="ext4", size="512M"),
    "xfs-reflink": dict(kind="xfs", args=("-m", "reflink=1")),
    "btrfs": dict(kind="btrfs"),
}


def make_stores(base) -> dict[str, Fs]:
    return {name: make_fs(base, name=name, **how) for name, how in STORES.items()}


def store_fs(store_filesystems, name: str) -> Fs:
    """The named filesystem; the test skips, saying why, where there is none."""
    fs = store_filesystems[name]
    if fs.skip:
        pytest.skip(fs.skip)
    return fs


def delete_subvolumes(root: str) -> None:
    """Delete every btrfs subvolume under `root` (a test's store on the session btrfs):
    rmtree cannot, and the session's filesystem outlives the test."""
    from csi.mount import btrfs

    for top, dirs, _ in os.walk(root):
        for d in list(dirs):
            if btrfs.is_subvolume(os.path.join(top, d)):
                btrfs.delete(os.path.join(top, d))
                dirs.remove(d)


@contextlib.contextmanager
def btrfs_with_quotas(base, name: str = "q", simple: bool = False):
    """A loop-mounted btrfs of the caller's own under `base`, quotas enabled (they change
    the whole filesystem, so never the session's shared one): full qgroups, or `simple`
    quotas; its root, unmounted at the end whatever happened. Skips, saying why, where it
    cannot be made."""
    from csi.mount import btrfs
    from tests.conftest import unmount_all_under

    if os.geteuid() != 0:
        pytest.skip("needs root: a loop-mounted btrfs")
    try:
        fs = make_fs(base, "btrfs", name)
        if fs.skip:
            pytest.skip(fs.skip)
        try:
            btrfs.enable_quota(fs.root, simple=simple)
        except OSError as e:
            if simple and e.errno == errno.EINVAL:
                pytest.skip("this kernel has no btrfs simple quotas (Linux 6.7)")
            raise
        assert btrfs.quota_mode(fs.root) == ("squota" if simple else "qgroup")
        yield fs.root
    finally:
        unmount_all_under(str(base))
