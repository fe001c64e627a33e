"""csi/mount/btrfs.py on a real loop-mounted btrfs: each ioctl, the errors a caller must
tell apart, snapshot isolation, read-only subvolumes and qgroup limits. Quotas are turned
on only on a btrfs of this module's own (they change the whole filesystem)."""

import errno
import os
import shutil
import uuid

import pytest

from csi.mount import btrfs
from tests.storefs import btrfs_with_quotas, store_fs


@pytest.fixture
def base(store_filesystems):
    """A fresh directory on the session's btrfs; anything left in it is deleted after."""
    root = os.path.join(store_fs(store_filesystems, "btrfs").root, f"ioctl-{uuid.uuid4().hex}")
    os.mkdir(root)
    try:
        yield root
    finally:
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if btrfs.is_subvolume(path):
                btrfs.delete(path)
        shutil.rmtree(root)


@pytest.fixture(scope="module")
def quota_fs(tmp_path_factory):
    """A btrfs of its own with quotas on: qgroups slow every commit of the shared one."""
    with btrfs_with_quotas(tmp_path_factory.mktemp("btrfs-quota")) as root:
        yield root


def write(path, data=b"x"):
    with open(path, "wb") as f:
        f.write(data)


def test_the_ioctl_numbers_are_the_headers():
    # The values linux/btrfs.h gives them (gcc on x86_64 and arm64: the layouts have no
    # padding that differs between the two).
    assert btrfs.SUBVOL_CREATE == 0x5000940E
    assert btrfs.SNAP_CREATE_V2 == 0x50009417
    assert btrfs.SNAP_DESTROY == 0x5000940F
    assert btrfs.SUBVOL_GETFLAGS == 0x80089419
    assert btrfs.SUBVOL_SETFLAGS == 0x4008941A
    assert btrfs.QUOTA_CTL == 0xC0109428
    assert btrfs.QGROUP_LIMIT == 0x8030942B
    assert btrfs.INO_LOOKUP == 0xD0009412
    assert btrfs.FS_INFO == 0x8400941F
    assert btrfs.QUOTA_RESCAN_WAIT == 0x942E


def test_create_snapshot_and_delete(base):
    a, b = os.path.join(base, "a"), os.path.join(base, "b")
    btrfs.create(a)
    assert btrfs.is_subvolume(a) and os.listdir(a) == []
    write(os.path.join(a, "f"), b"base")
    os.mkdir(os.path.join(a, "d"))
    assert not btrfs.is_subvolume(os.path.join(a, "d"))
    btrfs.snapshot(a, b)
    assert btrfs.is_subvolume(b) and not btrfs.readonly(b)
    assert btrfs.subvolume_id(a) != btrfs.subvolume_id(b)
    # A snapshot keeps inode numbers: what the btrfs backend's diff relies on.
    assert os.lstat(os.path.join(a, "f")).st_ino == os.lstat(os.path.join(b, "f")).st_ino
    write(os.path.join(b, "f"), b"changed")
    write(os.path.join(b, "new"))
    with open(os.path.join(a, "f"), "rb") as f:
        assert f.read() == b"base", "a write to the snapshot leaves its origin alone"
    assert sorted(os.listdir(a)) == ["d", "f"]
    btrfs.delete(b)
    assert not os.path.exists(b)
    btrfs.delete(a)
    assert os.listdir(base) == []


def test_readonly_snapshots_refuse_writes_and_the_flag_flips(base):
    a, ro = os.path.join(base, "a"), os.path.join(base, "ro")
    btrfs.create(a)
    write(os.path.join(a, "f"))
    btrfs.snapshot(a, ro, readonly=True)
    assert btrfs.readonly(ro) and not btrfs.readonly(a)
    with pytest.raises(OSError) as e:
        write(os.path.join(ro, "g"))
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.unlink(os.path.join(ro, "f"))
    assert e.value.errno == errno.EROFS
    btrfs.set_readonly(a)
    assert btrfs.readonly(a)
    with pytest.raises(OSError):
        write(os.path.join(a, "f"))
    btrfs.set_readonly(a, False)
    write(os.path.join(a, "f"), b"again")
    btrfs.delete(ro)  # root may delete a read-only subvolume
    assert not os.path.exists(ro)


def test_delete_takes_nested_subvolumes_first(base):
    top = os.path.join(base, "top")
    btrfs.create(top)
    os.makedirs(os.path.join(top, "x", "y"))
    btrfs.create(os.path.join(top, "x", "y", "inner"))
    btrfs.create(os.path.join(top, "x", "y", "inner", "innermost"))
    btrfs.create(os.path.join(top, "side"))
    assert sorted(btrfs.nested(top)) == [os.path.join(top, "side"),
                                         os.path.join(top, "x", "y", "inner")]
    btrfs.delete(top)
    assert not os.path.exists(top)


def test_errors_are_the_kernels_or_name_the_path(base, tmp_path):
    a = os.path.join(base, "a")
    btrfs.create(a)
    with pytest.raises(FileExistsError):
        btrfs.create(a)
    os.mkdir(os.path.join(base, "plain"))
    write(os.path.join(base, "plain", "f"))
    with pytest.raises(FileExistsError):
        btrfs.snapshot(a, os.path.join(base, "plain"))
    with pytest.raises(btrfs.NotSubvolume, match="plain is a directory, not a btrfs"):
        btrfs.delete(os.path.join(base, "plain"))
    with pytest.raises(btrfs.NotSubvolume):
        btrfs.snapshot(os.path.join(base, "plain"), os.path.join(base, "s"))
    with pytest.raises(FileNotFoundError):
        btrfs.snapshot(os.path.join(base, "missing"), os.path.join(base, "s"))
    # tmp_path is not on btrfs (the session's temp dir): a clear refusal, not ENOTTY.
    assert not btrfs.is_btrfs(str(tmp_path)) and btrfs.is_btrfs(base)
    assert not btrfs.is_subvolume(str(tmp_path))
    with pytest.raises(btrfs.NotBtrfs, match="is not on btrfs"):
        btrfs.create(str(tmp_path / "sv"))
    with pytest.raises(btrfs.NotBtrfs):
        btrfs.snapshot(a, str(tmp_path / "sv"))
    with pytest.raises(btrfs.NotBtrfs):
        btrfs.readonly(str(tmp_path))
    with pytest.raises(OSError) as e:
        btrfs.create(os.path.join(base, "x" * 256))
    assert e.value.errno == errno.EINVAL


def test_qgroup_limit_refuses_writes_past_it(quota_fs):
    root = os.path.join(quota_fs, f"q-{uuid.uuid4().hex}")
    clone = root + "-snap"
    btrfs.create(root)
    try:
        assert btrfs.quota_enabled(root)
        write(os.path.join(root, "shared"), os.urandom(4 << 20))
        btrfs.snapshot(root, clone)
        btrfs.limit(clone, 2 << 20)
        os.sync()
        u = btrfs.usage(clone)
        assert u.max_exclusive == 2 << 20
        assert u.referenced >= 4 << 20, "the snapshot references its origin's data"
        assert u.exclusive < 1 << 20, "but holds almost none of it alone"
        # Rewriting shared data makes it exclusive: the limit counts what the snapshot adds.
        with pytest.raises(OSError) as e:
            with open(os.path.join(clone, "new"), "wb") as f:
                for _ in range(16):
                    f.write(os.urandom(1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
        assert e.value.errno == errno.EDQUOT
        btrfs.limit(clone, 0)  # lifted
        os.sync()
        assert btrfs.usage(clone).max_exclusive == 0
        write(os.path.join(clone, "more"), os.urandom(3 << 20))
    finally:
        for sv in (clone, root):
            if btrfs.is_subvolume(sv):
                btrfs.delete(sv)
