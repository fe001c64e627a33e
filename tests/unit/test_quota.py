"""csi/backend/quota.py without quotas: the ioctl numbers and struct layouts the kernel
expects, the verdicts `judge` draws from what the kernel says, and project ID allocation.
Reading a directory's project ID runs unprivileged where the filesystem answers."""

import ctypes
import errno
import os
import struct

import pytest

from csi.backend import quota
from csi.backend.quota import DqBlk, Facts, FsXattr, judge
from csi.errors import ResourceExhausted

MiB = 1 << 20


# --- what the kernel headers define (linux/fs.h, linux/quota.h, linux/dqblk_xfs.h).

def test_ioctl_numbers_match_the_kernel_headers():
    assert quota.FS_IOC_FSGETXATTR == 0x801C581F  # _IOR('X', 31, struct fsxattr)
    assert quota.FS_IOC_FSSETXATTR == 0x401C5820  # _IOW('X', 32, struct fsxattr)


@pytest.mark.parametrize("cmd, value", [
    (quota.Q_GETINFO, 0x80000502),
    (quota.Q_GETQUOTA, 0x80000702),
    (quota.Q_SETQUOTA, 0x80000802),
    (quota.Q_XGETQSTATV, 0x580802),
])
def test_qcmd_for_project_quotas(cmd, value):
    assert quota.qcmd(cmd, quota.PRJQUOTA) == value


def test_qcmd_masks_the_type_to_a_byte():
    assert quota.qcmd(quota.Q_GETQUOTA, 0x102) == quota.qcmd(quota.Q_GETQUOTA, 2)


def test_fsxattr_layout():
    assert quota.FSXATTR.size == 28
    x = FsXattr(xflags=0x200, extsize=1, nextents=2, projid=0xDEADBEEF, cowextsize=3)
    raw = x.pack()
    assert len(raw) == 28 and raw[20:] == bytes(8)
    assert struct.unpack_from("=I", raw, 12)[0] == 0xDEADBEEF  # fsx_projid's offset
    assert FsXattr.unpack(raw) == x
    assert x.inherits and not FsXattr(xflags=0x80000000).inherits


def test_if_dqblk_layout():
    assert quota.IF_DQBLK.size == 72  # eight u64s and a u32, padded to 8 bytes
    q = DqBlk(bhardlimit=1, bsoftlimit=2, curspace=3, ihardlimit=4, isoftlimit=5,
              curinodes=6, btime=7, itime=8, valid=9)
    raw = q.pack()
    assert struct.unpack_from("=Q", raw, 16)[0] == 3  # dqb_curspace
    assert struct.unpack_from("=I", raw, 64)[0] == 9  # dqb_valid
    assert DqBlk.unpack(raw) == q


@pytest.mark.parametrize("size, kib", [(4 * MiB, 4096), (1, 1), (1024, 1), (1025, 2), (0, 0)])
def test_limits_round_bytes_up_to_whole_kib(size, kib):
    q = quota.limits(size, 100)
    assert (q.bhardlimit, q.ihardlimit, q.valid) == (kib, 100, quota.QIF_LIMITS)
    assert q.bsoftlimit == q.isoftlimit == 0
    assert q.curspace == q.curinodes == 0


def test_zero_limits_clear():
    q = quota.limits(0, 0)
    assert (q.bhardlimit, q.ihardlimit, q.valid) == (0, 0, quota.QIF_BLIMITS | quota.QIF_ILIMITS)


def test_negative_limits_are_refused():
    with pytest.raises(ValueError, match="negative"):
        quota.limits(-1, 0)
    with pytest.raises(ValueError, match="negative"):
        quota.limits(0, -5)


def test_statv_request_and_flags():
    buf = quota.statv_request()
    assert len(buf.raw) == 160 and buf.raw[0] == quota.FS_QSTATV_VERSION1
    ctypes.memmove(buf, struct.pack("=bBHI", 1, 0, 0x30, 7), 8)
    assert quota.statv_flags(buf.raw) == quota.FS_QUOTA_PDQ_ACCT | quota.FS_QUOTA_PDQ_ENFD


# --- the verdicts, from what the kernel said.

XFS = Facts(fstype="xfs", mount_point="/var/lib/strata")
EXT4 = Facts(fstype="ext4", mount_point="/var/lib/strata", super_options="rw")
BOTH = quota.FS_QUOTA_PDQ_ACCT | quota.FS_QUOTA_PDQ_ENFD


@pytest.mark.parametrize("facts, says", [
    (Facts("xfs", "/s", statv_errno=errno.ENOSYS), "xfs at /s: this kernel has no XFS quota"),
    (Facts("xfs", "/s", statv_flags=0), "xfs at /s is mounted without project quotas"),
    (Facts("xfs", "/s", statv_flags=quota.FS_QUOTA_PDQ_ACCT), "does not enforce them"),
    (Facts("xfs", "/s", statv_errno=errno.EPERM), "Q_XGETQSTATV failed"),
    (Facts("ext4", "/s", info_errno=errno.ESRCH), "mkfs.ext4 -O quota,project"),
    (Facts("ext4", "/s", info_errno=errno.ENOSYS), "no quota support for ext4"),
    (Facts("ext4", "/s", statv_flags=quota.FS_QUOTA_PDQ_ACCT), "does not enforce them"),
    (Facts("ext4", "/s", statv_errno=errno.EINVAL, super_options="rw,usrquota"),
     "mount it with -o prjquota"),
    (Facts("btrfs", "/s", info_errno=errno.ENOSYS, statv_errno=errno.ENOSYS),
     "btrfs at /s: this kernel has no quota support for btrfs"),
    (Facts("ext4", "/s", unreachable="no quotactl_fd(2) in this kernel, and ..."),
     "ext4 at /s: no quotactl_fd(2)"),
])
def test_judge_says_why_not(facts, says):
    reason = judge(facts)
    assert reason is not None and says in reason, reason


@pytest.mark.parametrize("facts", [
    Facts("xfs", "/s", statv_flags=BOTH),
    Facts("ext4", "/s", statv_flags=BOTH),
    # The generic layer did not answer Q_XGETQSTATV: the mount option says it is enforced.
    Facts("ext4", "/s", statv_errno=errno.EINVAL, super_options="rw,relatime,prjquota"),
])
def test_judge_accepts_enforced_project_quotas(facts):
    assert judge(facts) is None


# --- project IDs.

def test_allocate_takes_the_lowest_free_id():
    ids = range(100, 110)
    assert quota.allocate([], ids) == 100
    assert quota.allocate([100, 101, 103], ids) == 102
    assert quota.allocate(iter([101, 100]), ids) == 102  # any iterable, once


def test_allocate_ignores_ids_outside_its_range():
    assert quota.allocate([0, 1, 5, 99, 110], range(100, 110)) == 100


def test_allocate_reuses_a_freed_id():
    ids = range(100, 103)
    assert quota.allocate([100, 102], ids) == 101


def test_allocate_when_every_id_is_taken():
    with pytest.raises(ResourceExhausted, match="all 3 of 100-102 are in use"):
        quota.allocate([100, 101, 102, 7], range(100, 103))


def test_default_ids_are_valid_and_clear_of_kubelets():
    assert quota.check_ids(quota.DEFAULT_IDS) is quota.DEFAULT_IDS
    assert quota.DEFAULT_IDS.start > 1048577 + 1_000_000


@pytest.mark.parametrize("text, ids", [("10-20", range(10, 21)), (" 1 - 1 ", range(1, 2)),
                                       (f"5-{quota.MAX_ID}", range(5, quota.MAX_ID + 1))])
def test_parse_ids(text, ids):
    assert quota.parse_ids(text) == ids


@pytest.mark.parametrize("text", ["", "10", "a-b", "0-10", "20-10",
                                  f"1-{quota.MAX_ID + 1}", "-1-5"])
def test_parse_ids_refuses(text):
    with pytest.raises(ValueError, match="project IDs"):
        quota.parse_ids(text)


# --- what runs unprivileged against the real kernel.

def test_project_of_a_fresh_directory_is_none(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    try:
        assert quota.project_of(str(d)) == 0
    except OSError as e:  # a filesystem without FS_IOC_FSGETXATTR (tmpfs before 6.6, ...)
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            pytest.skip(f"{tmp_path} cannot report project IDs: {e}")
        raise


def test_project_of_refuses_a_symlink(tmp_path):
    (tmp_path / "d").mkdir()
    os.symlink("d", tmp_path / "link")
    with pytest.raises(OSError) as e:
        quota.project_of(str(tmp_path / "link"))
    assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_assign_refuses_bad_arguments_before_touching_anything(tmp_path):
    q = quota.ProjectQuotas(str(tmp_path), "ext4")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="positive size"):
        q.assign(str(tmp_path / "d"), 5, 0, 10)
    with pytest.raises(ValueError, match="outside"):
        q.assign(str(tmp_path / "d"), 0, 4 * MiB, 10)
    with pytest.raises(ValueError, match="outside"):
        q.assign(str(tmp_path / "d"), quota.MAX_ID + 1, 4 * MiB, 10)


def test_assign_refuses_a_directory_on_another_filesystem(tmp_path):
    if os.stat("/proc").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/proc and the temporary directory share a filesystem")
    q = quota.ProjectQuotas(str(tmp_path), "ext4")
    with pytest.raises(ValueError, match="not on the filesystem"):
        q.assign("/proc", 5, 4 * MiB, 10)
