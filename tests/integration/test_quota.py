"""Project quotas on real filesystems: sparse images made with mkfs.xfs and mkfs.ext4,
loop-mounted once per session (quotafs.py, the `quota_filesystems` fixture).

Without quotas (XFS mounted without them, ext4 without the quota feature) the probe says
no, with the reason, and XFS still stores a directory's project ID. With them (XFS mounted
`prjquota`, ext4 made `-O quota,project` and mounted `prjquota`) a directory assigned a
4 MiB limit fails a write past it, and release and usage do what they say. A kernel without
XFS quota support or the ext4 quota format refuses those mounts; the enforcement tests then
skip, saying which, and run wherever the kernel has them.
"""

import errno
import logging
import os

import pytest

from csi.backend import quota
from csi.backend.quota import ProjectQuotas
from csi.tree import remove_tree
from tests.conftest import ROOT_REASON
from tests.integration.quotafs import Fs, quota_fs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

MiB = 1 << 20
LIMIT = 4 * MiB
INODES = 64


@pytest.fixture
def workdir(request):
    """A fresh directory on the named filesystem, removed after the test."""
    made = []

    def make(fs: Fs, name: str) -> str:
        d = os.path.join(fs.root, f"{request.node.name}-{name}")
        os.mkdir(d)
        made.append(d)
        return d

    yield make
    for d in made:
        remove_tree(d)


# --- (a) XFS without quotas: no project quotas, but project IDs are stored.

def test_probe_refuses_xfs_mounted_without_quota(quota_filesystems, caplog):
    fs = quota_fs(quota_filesystems, "plain-xfs")
    with caplog.at_level(logging.INFO, logger="csi.backend.quota"):
        assert ProjectQuotas.probe(fs.root) is None
    said = [r.getMessage() for r in caplog.records if r.name == "csi.backend.quota"]
    assert len(said) == 1, said
    # Which reason depends on the kernel: without XFS quota support, or mounted without it.
    assert f"xfs at {fs.root}" in said[0]
    assert "CONFIG_XFS_QUOTA" in said[0] or "without project quotas" in said[0], said[0]


def test_probe_through_quotactl_on_the_block_device(quota_filesystems):
    """The way of kernels before 5.14: quotactl(2) on the device the mount table names."""
    fs = quota_fs(quota_filesystems, "plain-xfs")
    fd_said = ProjectQuotas.check(fs.root, quotactl_fd=True)
    dev_said = ProjectQuotas.check(fs.root, quotactl_fd=False)
    assert dev_said == fd_said and dev_said[0] is None


def test_xfs_stores_project_ids_without_quotas(quota_filesystems, workdir):
    fs = quota_fs(quota_filesystems, "plain-xfs")
    d = workdir(fs, "vol")
    assert quota.project_of(d) == 0
    quota.set_project(d, 1234)
    assert quota.project_of(d) == 1234
    assert quota.read_fsxattr(d).inherits
    # What is made below it afterwards joins the project: why upper and work are made
    # inside the assigned directory.
    os.mkdir(os.path.join(d, "upper"))
    with open(os.path.join(d, "upper", "f"), "w") as f:
        f.write("x")
    assert quota.project_of(os.path.join(d, "upper")) == 1234
    assert quota.read_fsxattr(os.path.join(d, "upper")).inherits
    assert quota.project_of(os.path.join(d, "upper", "f")) == 1234
    # Setting it again changes nothing; another ID replaces it.
    quota.set_project(d, 1234)
    quota.set_project(d, 77)
    assert quota.project_of(d) == 77 and quota.read_fsxattr(d).inherits


def test_assign_without_quotas_fails_and_leaves_the_directory_alone(quota_filesystems,
                                                                     workdir):
    """Limits are set before the directory joins the project: when they cannot be, the
    directory is left as it was."""
    fs = quota_fs(quota_filesystems, "plain-xfs")
    d = workdir(fs, "vol")
    q = ProjectQuotas(fs.root, "xfs")
    with pytest.raises(OSError) as e:
        q.assign(d, 4321, LIMIT, INODES)
    assert e.value.errno in (errno.ENOSYS, errno.ESRCH), e.value
    assert quota.project_of(d) == 0 and not quota.read_fsxattr(d).inherits
    with pytest.raises(OSError):
        q.usage(4321)


# --- (b) ext4 without the quota feature.

def test_probe_refuses_ext4_without_the_quota_feature(quota_filesystems):
    fs = quota_fs(quota_filesystems, "plain-ext4")
    found, reason = ProjectQuotas.check(fs.root)
    assert found is None
    assert reason.startswith(f"ext4 at {fs.root}") and "-O quota,project" in reason, reason
    assert ProjectQuotas.probe(fs.root) is None


def test_ext4_without_the_project_feature_keeps_no_project_ids(quota_filesystems, workdir):
    fs = quota_fs(quota_filesystems, "plain-ext4")
    d = workdir(fs, "vol")
    with pytest.raises(OSError) as e:
        quota.set_project(d, 1234)
    assert e.value.errno == errno.EOPNOTSUPP
    assert quota.project_of(d) == 0


# --- (c) enforcement, where the kernel has it.

def _write_until_refused(path: str, most: int) -> tuple[int, OSError | None]:
    """Write `most` bytes of 64 KiB chunks to `path`; how many were taken, and what
    refused the rest (None: nothing did)."""
    chunk = os.urandom(64 * 1024)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while written < most:
            written += os.write(fd, chunk[:most - written])
        os.fsync(fd)
    except OSError as e:
        return written, e
    finally:
        os.close(fd)
    return written, None


@pytest.mark.parametrize("name", ["quota-xfs", "quota-ext4"])
def test_project_quota_is_enforced(quota_filesystems, workdir, name, record_property):
    fs = quota_fs(quota_filesystems, name)
    q = ProjectQuotas.probe(fs.root)
    assert q is not None, ProjectQuotas.check(fs.root)[1]
    vol, free = workdir(fs, "vol"), workdir(fs, "free")
    pid = quota.allocate([], range(100_000, 100_010))
    q.assign(vol, pid, LIMIT, INODES)
    assert quota.project_of(vol) == pid and quota.read_fsxattr(vol).inherits
    upper = os.path.join(vol, "upper")
    os.mkdir(upper)
    assert quota.project_of(upper) == pid

    # Bytes: the write past the limit fails (XFS says ENOSPC for a project, ext4 EDQUOT).
    written, refused = _write_until_refused(os.path.join(upper, "big"), 2 * LIMIT)
    record_property("bytes_written_before_refusal", written)
    assert refused is not None and refused.errno in (errno.EDQUOT, errno.ENOSPC), refused
    # The directories themselves take a few blocks of the project's bytes.
    assert LIMIT - 512 * 1024 <= written <= LIMIT, written
    used = q.usage(pid)
    assert (used.byte_limit, used.inode_limit) == (LIMIT, INODES)
    assert written <= used.bytes <= LIMIT and used.inodes >= 3  # vol, upper, big

    # The same filesystem outside the project is not limited.
    assert _write_until_refused(os.path.join(free, "big"), 2 * LIMIT) == (2 * LIMIT, None)

    # Inodes: files past the inode limit are refused. The bytes go first: the directory
    # grows as files are made. (XFS frees an unlinked inode's blocks in the background;
    # a quota report waits for that, so the usage read below also makes sure of it.)
    os.unlink(os.path.join(upper, "big"))
    assert q.usage(pid).bytes < LIMIT // 2
    made, refused = 0, None
    try:
        for i in range(2 * INODES):
            os.close(os.open(os.path.join(upper, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
            made += 1
    except OSError as e:
        refused = e
    assert refused is not None and refused.errno in (errno.EDQUOT, errno.ENOSPC), refused
    assert q.usage(pid).inodes <= INODES
    assert INODES - 8 <= made <= INODES - 2, made  # vol and upper are two of the inodes

    # Released: no limits, and the directory writes past the old one.
    q.release(pid)
    used = q.usage(pid)
    assert (used.byte_limit, used.inode_limit) == (0, 0)
    assert _write_until_refused(os.path.join(upper, "big"), 2 * LIMIT) == (2 * LIMIT, None)
    remove_tree(vol)
    assert q.usage(pid).bytes == 0
