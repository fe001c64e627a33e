"""QuotaBound (csi/backend/quotabound.py) on a real loop-mounted XFS: project IDs allocated
from what the disk says, PROJINHERIT on the part so that the overlay's upper and work and
every file made later join the project, and release and repair reading the IDs back.

Only the limit-setting step is not the kernel's: `RecordingQuotas` records the calls of
`ProjectQuotas.set_limits` instead of making them. Why: this kernel cannot enforce project
quotas (no XFS quota support, no ext4 quota format; test_quota.py says which), so
quotactl(Q_SETQUOTA) fails here whatever strata does. Everything else is real: XFS stores a
directory's project ID and PROJINHERIT without quotas, and these tests read them back with
FS_IOC_FSGETXATTR. Where the kernel has quotas, test_quota_publish.py runs the whole path,
limits included, through the real server.
"""

import dataclasses
import errno
import fcntl
import io
import os
import tempfile
import threading

import pytest

from csi.backend import quota
from csi.backend.bound import Bounds
from csi.backend.loopfs import LoopBound
from csi.backend.overlay import OverlayBackend
from csi.backend.quota import DEFAULT_IDS, ProjectQuotas, project_of, read_fsxattr
from csi.backend.quotabound import PART, QuotaBound
from csi.image.build import LayerBuilder
from csi.mount.features import probe
from csi.mount.mountinfo import MountTable
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.store.unpack import apply
from csi.tree import remove_tree
from tests.conftest import ROOT_REASON, unmount_all_under
from tests.integration.quotafs import quota_fs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

KiB, MiB = 1 << 10, 1 << 20
FIRST = DEFAULT_IDS.start


class RecordingQuotas(ProjectQuotas):
    """The store filesystem's project quotas with `set_limits` recorded, not asked of the
    kernel (see the module docstring for why); `assign` and `release` go through it."""

    def __init__(self, path: str):
        super().__init__(path, "xfs")
        self.calls: list[tuple[int, int, int]] = []
        self._calls_lock = threading.Lock()

    def set_limits(self, project_id: int, size_bytes: int, inodes: int) -> None:
        with self._calls_lock:
            self.calls.append((project_id, size_bytes, inodes))

    def cleared(self) -> list[int]:
        return [pid for pid, size, inodes in self.calls if (size, inodes) == (0, 0)]


@pytest.fixture
def store(quota_filesystems):
    """A store on the XFS without quotas, of this test's own; removed (and anything mounted
    in it unmounted) after the test. Its path is kept short: the kernel takes at most 256
    bytes for one fsconfig(2) string, and the overlay probe passes `lowerdir=A:B`."""
    fs = quota_fs(quota_filesystems, "plain-xfs")
    root = tempfile.mkdtemp(prefix="s-", dir=fs.root)
    paths = StorePaths(root).make()
    try:
        yield paths
    finally:
        unmount_all_under(root)
        remove_tree(root)


def made(paths: StorePaths, bound: QuotaBound, key: str, size: int) -> str:
    """What the backend does around `make`: `volumes/KEY` first, then the bound's part."""
    os.mkdir(paths.volume(key), 0o700)
    bound.make(key, size)
    return bound.home(key)


def test_each_key_gets_a_project_of_its_own_that_everything_below_inherits(store):
    q = RecordingQuotas(store.root)
    bound = QuotaBound(store, q)
    a = made(store, bound, "a", 4 * MiB)
    b = made(store, bound, "b", 1 * MiB)
    assert a == store.volume_part("a", PART)
    assert (project_of(a), project_of(b)) == (FIRST, FIRST + 1)
    assert read_fsxattr(a).inherits and read_fsxattr(b).inherits
    # Limits for each ID, set before the directory joined it; inodes one per 16 KiB.
    assert q.calls == [(FIRST, 4 * MiB, 256), (FIRST + 1, 1 * MiB, 64)]
    assert (bound.project_id("a"), bound.project_id("b")) == (FIRST, FIRST + 1)
    # What the backend makes inside, and what a pod writes later, joins the project.
    for d in ("upper", "work", "upper/sub"):
        os.mkdir(os.path.join(a, d))
    with open(os.path.join(a, "upper/sub/f"), "w") as f:
        f.write("x")
    for p in ("upper", "work", "upper/sub", "upper/sub/f"):
        assert project_of(os.path.join(a, p)) == FIRST, p
    assert read_fsxattr(os.path.join(a, "upper")).inherits
    # The volume's own directory is not in it: only the part is bounded. And XFS refuses
    # to move a file of another project in (why upper and work must share one project).
    assert project_of(store.volume("a")) == 0
    outside = store.volume_part("a", "outside")
    with open(outside, "w"):
        pass
    with pytest.raises(OSError) as e:
        os.rename(outside, os.path.join(a, "upper", "moved"))
    assert e.value.errno == errno.EXDEV


def test_allocation_reads_the_ids_in_use_from_the_disk(store):
    """After a restart (a new instance, no memory) and a crash that left a key with its ID
    but no record, the next ID is one that no directory carries."""
    made(store, QuotaBound(store, RecordingQuotas(store.root)), "a", 1 * MiB)
    # Killed after assign, before anything was recorded: the directory has its ID.
    crashed = store.volume_part("crashed", PART)
    os.makedirs(crashed)
    quota.set_project(crashed, FIRST + 1)
    # Things that are not projects of ours: a loop-bounded key, a stray file, a symlink
    # in place of a part, and a project ID outside strata's range.
    os.makedirs(store.volume_part("loop", "fs"))
    with open(store.volume("stray"), "w"):
        pass
    os.mkdir(store.volume("link"))
    os.symlink(crashed, store.volume_part("link", PART))
    os.makedirs(store.volume_part("foreign", PART))
    quota.set_project(store.volume_part("foreign", PART), 7)

    q = RecordingQuotas(store.root)
    restarted = QuotaBound(store, q)
    assert restarted.in_use() == {FIRST, FIRST + 1}
    assert restarted.project_id("link") == restarted.project_id("foreign") == 0
    made(store, restarted, "b", 2 * MiB)
    assert project_of(restarted.home("b")) == FIRST + 2
    assert q.calls == [(FIRST + 2, 2 * MiB, 128)]


def test_release_reads_the_id_back_and_the_id_is_reused_with_new_limits(store):
    q = RecordingQuotas(store.root)
    bound = QuotaBound(store, q)
    made(store, bound, "a", 4 * MiB)
    made(store, bound, "b", 4 * MiB)
    restarted = QuotaBound(store, q)  # nothing kept in memory: the ID is read back
    restarted.release("a")
    assert q.cleared() == [FIRST]
    # Until its directory is gone, the ID is still taken.
    assert FIRST in restarted.in_use()
    remove_tree(store.volume("a"))
    restarted.release("a")  # a key with nothing left: nothing to clear
    assert q.cleared() == [FIRST]
    # The lowest free ID again, with the new publication's limits set before it is used.
    made(store, restarted, "c", 2 * MiB)
    assert project_of(restarted.home("c")) == FIRST
    assert q.calls[-1] == (FIRST, 2 * MiB, 128)
    # A key without a part (read-only, or bounded otherwise) has nothing to release.
    os.mkdir(store.volume("ro"))
    restarted.release("ro")
    restarted.release("never-made")
    assert q.cleared() == [FIRST]


def test_repair_releases_the_ids_of_unrecorded_keys_only(store):
    q = RecordingQuotas(store.root)
    bound = QuotaBound(store, q)
    for key in ("live", "lost1", "lost2"):
        made(store, bound, key, 1 * MiB)
    os.mkdir(store.volume("unbounded"))
    QuotaBound(store, q).repair({"live"})
    assert sorted(q.cleared()) == [FIRST + 1, FIRST + 2]
    assert project_of(bound.home("live")) == FIRST  # untouched


def test_concurrent_makes_never_take_the_same_id(store):
    q = RecordingQuotas(store.root)
    bound = QuotaBound(store, q)
    keys = [f"k{i}" for i in range(24)]
    start = threading.Barrier(len(keys))
    errors = []

    def publish(key):
        try:
            start.wait()
            made(store, bound, key, 1 * MiB)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = [project_of(bound.home(k)) for k in keys]
    assert sorted(ids) == list(range(FIRST, FIRST + len(keys)))
    assert sorted(pid for pid, _, _ in q.calls) == sorted(ids)


def test_make_without_quotas_is_refused_and_finds_the_keys_it_made(store):
    q = RecordingQuotas(store.root)
    made(store, QuotaBound(store, q), "a", 1 * MiB)
    without = QuotaBound(store)  # the store's filesystem enforces no quotas (now)
    os.mkdir(store.volume("b"))
    with pytest.raises(Exception, match="need a store filesystem that enforces them"):
        without.make("b", 1 * MiB)
    assert without.holds("a") and without.project_id("a") == FIRST
    without.release("a")  # cannot clear anything; says so, does not fail
    assert without.space("a") is None and without.usage("a") is None


# -- through the overlay backend ------------------------------------------------------------
def layer(paths: StorePaths) -> str:
    """One layer unpacked the way the layer store does, holding a file to copy up."""
    lid = "0" * 16
    work = tempfile.mkdtemp(prefix="unpack-", dir=paths.tmp)
    os.mkdir(os.path.join(work, "fs"), 0o755)
    builder = LayerBuilder().dir("etc").file("etc/motd", "layer motd\n")
    apply(io.BytesIO(builder.tar_bytes()), os.path.join(work, "fs"))
    os.rename(work, paths.layer(lid))
    return lid


def test_a_limited_overlay_writes_and_copies_up_inside_its_project(store):
    """overlayfs renames a copied-up file from work into upper, which XFS refuses (EXDEV)
    across PROJINHERIT directories of different projects: upper and work share one."""
    features = probe(store.tmp)
    mounter = Mounter(features=features)
    q = RecordingQuotas(store.root)
    backend = OverlayBackend(store, features, Bounds(QuotaBound(store, q),
                                                     LoopBound(store, mounter)))
    lid = layer(store)
    target = os.path.join(store.root, "..", os.path.basename(store.root) + "-target")
    os.makedirs(target)
    try:
        mounter.mount(backend.prepare("k", [lid], target, size_limit=8 * MiB))
        try:
            with open(os.path.join(target, "etc/motd"), "a") as f:  # copy-up
                f.write("appended\n")
            with open(os.path.join(target, "new"), "wb") as f:
                f.write(os.urandom(64 * KiB))
            os.mkdir(os.path.join(target, "dir"))
            dirs = backend.dirs("k")
            assert dirs.upper == store.volume_part("k", PART, "upper")
            assert dirs.work == store.volume_part("k", PART, "work")
            pid = backend.project_id("k")
            assert pid == FIRST and q.calls == [(FIRST, 8 * MiB, 512)]
            for name in ("etc", "etc/motd", "new", "dir"):
                assert project_of(os.path.join(dirs.upper, name)) == pid, name
            with open(os.path.join(target, "etc/motd")) as f:
                assert f.read() == "layer motd\nappended\n"
        finally:
            mounter.unmount(target)
        backend.remove("k")
        assert q.cleared() == [FIRST]
        assert not os.path.exists(store.volume("k"))
    finally:
        unmount_all_under(target)
        os.rmdir(target)


def test_a_restart_with_the_other_mechanism_still_removes_the_keys_of_the_first(store):
    """An upgrade from a version with loop filesystems only, on a store whose filesystem
    enforces quotas, makes new keys with quotas; the live keys of the loop mechanism must
    still unmount and go, and the other way round."""
    features = probe(store.tmp)
    mounter = Mounter(features=features)
    q = RecordingQuotas(store.root)
    lid = layer(store)

    def backend(*order):
        bounds = {"loop": LoopBound(store, mounter), "quota": QuotaBound(store, q)}
        return OverlayBackend(store, features, Bounds(*(bounds[n] for n in order)))

    before = backend("loop", "quota")
    before.prepare("by-loop", [lid], "/unused", size_limit=4 * MiB)
    assert MountTable().is_mountpoint(store.volume_part("by-loop", "fs"))
    after = backend("quota", "loop")
    after.prepare("by-quota", [lid], "/unused", size_limit=4 * MiB)
    assert after.project_id("by-loop") == 0 and after.project_id("by-quota") == FIRST
    assert after.dirs("by-loop").upper == store.volume_part("by-loop", "fs", "upper")
    assert after.space("by-loop").bytes_total == 4 * MiB
    # The tools' backend (no bound given: `strata diff`) finds both kinds of upper.
    tools = OverlayBackend(store)
    assert tools.dirs("by-loop").upper == store.volume_part("by-loop", "fs", "upper")
    assert tools.dirs("by-quota").upper == store.volume_part("by-quota", PART, "upper")
    after.remove("by-loop")
    assert not os.path.exists(store.volume("by-loop"))
    assert not MountTable().is_mountpoint(store.volume_part("by-loop", "fs"))
    # And back: a loop-first backend still releases the quota key's project.
    backend("loop", "quota").remove("by-quota")
    assert q.cleared() == [FIRST] and not os.path.exists(store.volume("by-quota"))


def test_a_pod_can_move_a_file_it_owns_out_of_its_project(store):
    """A bound of the mechanism, documented in docs/size-limits.md: the kernel lets a file's
    owner change its project ID from the initial user namespace, and overlayfs passes
    FS_IOC_FSSETXATTR to the upper. A process of uid 1000 without capabilities takes its
    file out of the publication's project (and so out of its quota). If this ever fails,
    the kernel closed the hole: say so in the docs."""
    features = probe(store.tmp)
    mounter = Mounter(features=features)
    q = RecordingQuotas(store.root)
    backend = OverlayBackend(store, features, QuotaBound(store, q))
    lid = layer(store)
    target = tempfile.mkdtemp(prefix="t-", dir=os.path.dirname(store.root))
    try:
        plan = backend.prepare("k", [lid], target, size_limit=8 * MiB)
        os.chmod(backend.dirs("k").upper, 0o777)  # a pod's user may write at its root
        mounter.mount(plan)
        # The pod's root, opened here: the test's directories above it are root's alone.
        root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        said_r, said_w = os.pipe()
        try:
            pid = os.fork()
            if pid == 0:  # the pod's process
                said = "nothing"
                try:
                    os.setgroups([])
                    os.setgid(1000)
                    os.setuid(1000)
                    fd = os.open("mine", os.O_RDWR | os.O_CREAT, 0o644, dir_fd=root_fd)
                    os.write(fd, b"x")
                    now = quota._get_fsxattr(fd)
                    fcntl.ioctl(fd, quota.FS_IOC_FSSETXATTR,
                                dataclasses.replace(now, projid=0).pack())
                    said = f"moved out of project {now.projid}"
                except BaseException as e:  # noqa: BLE001 - reported to the parent
                    said = repr(e)
                finally:
                    os.write(said_w, said.encode())
                    os._exit(0)
            os.close(said_w)
            os.waitpid(pid, 0)
            assert os.read(said_r, 4096).decode() == f"moved out of project {FIRST}"
            mine = os.path.join(backend.dirs("k").upper, "mine")
            assert os.stat(mine).st_uid == 1000
            assert project_of(mine) == 0 and project_of(backend.dirs("k").upper) == FIRST
        finally:
            os.close(root_fd)
            os.close(said_r)
            mounter.unmount(target)
        backend.remove("k")
    finally:
        unmount_all_under(target)
        os.rmdir(target)
