"""Filesystems for project-quota tests: sparse images made with mkfs.xfs and mkfs.ext4 and
loop-mounted, with or without project quotas, and the precise reason when the kernel (or
the node) cannot make one. The session fixture that makes them is `quota_filesystems`
(tests/integration/conftest.py); a test takes one with `quota_fs(quota_filesystems, NAME)`,
which skips it with that reason.

- `plain-xfs`: XFS without quotas. It stores a directory's project ID and PROJINHERIT all
  the same, so everything but the limits themselves can run on it on any kernel.
- `plain-ext4`: ext4 without the quota and project features.
- `quota-xfs`: XFS mounted `prjquota` (needs CONFIG_XFS_QUOTA).
- `quota-ext4`: ext4 made `-O quota,project`, mounted `prjquota` (needs CONFIG_QUOTA and
  CONFIG_QFMT_V2).
"""

import dataclasses
import gzip
import shutil
import subprocess

import pytest

MKFS = {
    # mkfs.xfs refuses images under 300 MB; the file is sparse, so this costs nothing.
    "xfs": ["mkfs.xfs", "-q", "-f"],
    # 256-byte inodes: the project feature keeps the ID in the larger inode, and mke2fs's
    # "small" filesystem type would otherwise pick 128.
    "ext4": ["mkfs.ext4", "-q", "-F", "-I", "256", "-E", "lazy_itable_init=1"],
}
SIZE = {"xfs": "320M", "ext4": "64M"}
# The kernel options without which a quota mount fails, for the skip reason.
NEEDS = {"xfs": ("CONFIG_XFS_QUOTA",), "ext4": ("CONFIG_QUOTA", "CONFIG_QFMT_V2")}
WHAT = {"xfs": "XFS quota support", "ext4": "ext4 quota format"}


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
            options: tuple[str, ...] = ()) -> Fs:
    """mkfs `kind` on a sparse image and loop-mount it with `options`; an Fs with a skip
    reason when the tool is missing or the kernel refuses the mount."""
    if shutil.which(MKFS[kind][0]) is None:
        pkg = "xfsprogs" if kind == "xfs" else "e2fsprogs"
        return Fs(kind, skip=f"{MKFS[kind][0]} is not installed ({pkg}; scripts/system-deps.sh)")
    image, root = base / f"{name}.img", base / name
    root.mkdir()
    subprocess.run(["truncate", "-s", SIZE[kind], str(image)], check=True)
    mkfs = MKFS[kind] + [a for f in features for a in ("-O", f)] + [str(image)]
    made = subprocess.run(mkfs, capture_output=True, text=True)
    if made.returncode != 0:
        return Fs(kind, skip=f"{' '.join(mkfs[:-1])} failed: {made.stderr.strip()}")
    # mount(8) attaches the loop device with autoclear: it goes with the last unmount.
    opts = ",".join(("loop",) + options)
    mounted = subprocess.run(["mount", "-t", kind, "-o", opts, str(image), str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        config = kernel_config(NEEDS[kind])
        return Fs(kind, skip=(f"this kernel has no {WHAT[kind]}: it refuses to mount "
                              f"{kind}{' -O ' + ','.join(features) if features else ''} with "
                              f"-o {','.join(options)}" + (f" ({config})" if config else "")))
    return Fs(kind, root=str(root))


def make_all(base) -> dict[str, Fs]:
    return {
        "plain-xfs": make_fs(base, "xfs", "plain-xfs"),
        "plain-ext4": make_fs(base, "ext4", "plain-ext4"),
        "quota-xfs": make_fs(base, "xfs", "quota-xfs", options=("prjquota",)),
        "quota-ext4": make_fs(base, "ext4", "quota-ext4", features=("quota", "project"),
                              options=("prjquota",)),
    }


def quota_fs(quota_filesystems, name: str) -> Fs:
    """The named filesystem; the test skips, saying why, where there is none."""
    fs = quota_filesystems[name]
    if fs.skip:
        pytest.skip(fs.skip)
    return fs
