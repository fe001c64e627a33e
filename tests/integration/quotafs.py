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

import pytest

from tests.storefs import Fs, kernel_config
from tests.storefs import make_fs as _make_fs

# The kernel options without which a quota mount fails, for the skip reason.
NEEDS = {"xfs": ("CONFIG_XFS_QUOTA",), "ext4": ("CONFIG_QUOTA", "CONFIG_QFMT_V2")}
WHAT = {"xfs": "XFS quota support", "ext4": "ext4 quota format"}


def make_fs(base, kind: str, name: str, features: tuple[str, ...] = (),
            options: tuple[str, ...] = ()) -> Fs:
    """tests/storefs.make_fs, with the skip reason a quota test wants: which kernel option
    is missing."""
    fs = _make_fs(base, kind, name, features, options)
    if fs.skip.startswith("this kernel refuses"):
        config = kernel_config(NEEDS[kind])
        fs.skip = (f"this kernel has no {WHAT[kind]}: it refuses to mount "
                   f"{kind}{' -O ' + ','.join(features) if features else ''} with "
                   f"-o {','.join(options)}" + (f" ({config})" if config else ""))
    return fs


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
