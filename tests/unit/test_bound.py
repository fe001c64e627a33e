"""The size-limit seam without a kernel: `Bounds` sends each key to the mechanism whose part
it holds on disk (a temporary directory stands for `volumes/`), a project's room as the pod
sees it (`quotabound.room`), the inode budget both mechanisms give, and what `strata ls`
says bounds a publication."""

import os

import pytest

from csi.backend import Space, Usage
from csi.backend.bound import BYTES_PER_INODE, Bound, Bounds, inodes_for
from csi.backend.quota import ProjectUsage
from csi.backend.quotabound import room
from csi.store.state import Publication
from csi.store_cli import bounded_by

MiB = 1 << 20


class Recorder(Bound):
    """A mechanism that makes its part and records what it was asked (pure bookkeeping)."""

    def __init__(self, volumes: str, name: str):
        self.volumes, self.name, self.part = volumes, name, name
        self.asked: list[tuple[str, str]] = []

    def home(self, key):
        return os.path.join(self.volumes, key, self.part)

    def make(self, key, size):
        self.asked.append(("make", key))
        os.makedirs(self.home(key))

    def release(self, key):
        self.asked.append(("release", key))

    def space(self, key):
        self.asked.append(("space", key))
        return Space(1, 0, 1, 1, 0, 1)

    def usage(self, key):
        return Usage(7, 1) if self.name == "loop" else None

    def project_id(self, key):
        return 42 if self.name == "quota" else 0

    def repair(self, live):
        self.asked.append(("repair", ",".join(sorted(live))))


@pytest.fixture
def mechanisms(tmp_path):
    volumes = str(tmp_path)
    return Recorder(volumes, "quota"), Recorder(volumes, "loop")


def test_new_keys_go_to_the_first_and_old_keys_to_the_one_that_made_them(mechanisms):
    quota, loop = mechanisms
    Bounds(loop, quota).make("old", MiB)  # before: loop filesystems
    after = Bounds(quota, loop)  # a restart that chose quotas
    assert (after.name, after.part, after.parts) == ("quota", "quota", ("quota", "loop"))
    after.make("new", MiB)
    assert quota.asked == [("make", "new")] and loop.asked == [("make", "old")]
    assert after.of("old") is loop and after.of("new") is quota and after.of("none") is None
    assert after.home("old").endswith("/old/loop") and after.home("none").endswith("/quota")
    for key in ("old", "new", "none"):
        after.release(key)
        after.space(key)
    assert quota.asked[1:] == [("release", "new"), ("space", "new")]
    assert loop.asked[1:] == [("release", "old"), ("space", "old")]
    assert after.space("none") is None and after.usage("none") is None
    assert (after.usage("old"), after.usage("new")) == (Usage(7, 1), None)
    assert (after.project_id("old"), after.project_id("new"), after.project_id("none")) == \
        (0, 42, 0)
    assert after.holds("old") and not after.holds("none")


def test_repair_asks_every_mechanism(mechanisms):
    quota, loop = mechanisms
    Bounds(quota, loop).repair({"a", "b"})
    assert quota.asked == loop.asked == [("repair", "a,b")]


def test_two_mechanisms_cannot_share_a_part(tmp_path):
    with pytest.raises(ValueError, match="part of its own"):
        Bounds(Recorder(str(tmp_path), "x"), Recorder(str(tmp_path), "x"))


def test_inodes_in_proportion_to_the_limit():
    assert BYTES_PER_INODE == 16384
    assert inodes_for(MiB) == 64 and inodes_for(1 << 30) == 65536
    assert inodes_for(8 * MiB) == 512 and inodes_for(1) == 1


class Fs:
    """The fields of os.statvfs_result that `room` reads."""

    def __init__(self, bavail, frsize=4096, files=1000, favail=900):
        self.f_bavail, self.f_frsize, self.f_files, self.f_favail = bavail, frsize, files, favail


def test_room_is_the_limit_less_what_the_project_holds():
    s = room(ProjectUsage(bytes=3 * MiB, inodes=10, byte_limit=8 * MiB, inode_limit=512),
             Fs(bavail=1 << 20))
    assert s == Space(bytes_total=8 * MiB, bytes_used=3 * MiB, bytes_available=5 * MiB,
                      inodes_total=512, inodes_used=10, inodes_free=502)


def test_room_never_promises_more_than_the_store_has_free():
    s = room(ProjectUsage(bytes=MiB, inodes=10, byte_limit=8 * MiB, inode_limit=512),
             Fs(bavail=256, favail=100))  # 1 MiB and 100 inodes free on the store
    assert (s.bytes_total, s.bytes_available) == (8 * MiB, MiB)
    assert (s.inodes_total, s.inodes_free) == (512, 100)


def test_room_of_a_project_over_its_limit_is_none_left():
    # ext4 and XFS let root-owned writes (and delayed allocation) run a little over.
    s = room(ProjectUsage(bytes=9 * MiB, inodes=600, byte_limit=8 * MiB, inode_limit=512),
             Fs(bavail=1 << 20))
    assert s.bytes_available == 0 and s.inodes_free == 0


def test_room_without_an_inode_limit_is_the_filesystem_s():
    s = room(ProjectUsage(bytes=0, inodes=3, byte_limit=8 * MiB, inode_limit=0),
             Fs(bavail=1 << 20, files=1000, favail=900))
    assert (s.inodes_total, s.inodes_used, s.inodes_free) == (1000, 3, 900)


def pub(size_limit: int = 0, project_id: int = 0) -> Publication:
    return Publication("/t", "v", "k", "img", "sha256:0", False, "", 1, 0.0,
                       size_limit=size_limit, project_id=project_id)


def test_ls_says_what_bounds_a_publication():
    assert bounded_by(pub()) == "-"
    assert bounded_by(pub(size_limit=MiB)) == "loop"
    assert bounded_by(pub(size_limit=MiB, project_id=1073741824)) == "project 1073741824"


def test_ls_names_the_backend_s_own_bound():
    """A btrfs qgroup (no project ID in the record) is named by the backend, not "loop"."""
    class Qgroups:
        def limit_kind(self, key):
            return "qgroup"

    assert bounded_by(pub(size_limit=MiB), Qgroups()) == "qgroup"
    assert bounded_by(pub(), Qgroups()) == "-"
