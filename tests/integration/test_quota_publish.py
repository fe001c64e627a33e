"""`sizeLimit` by project quotas, through the real server and gRPC, and the choice of the
mechanism at start-up (`--size-limit-mechanism auto|loop|quota`).

The store sits on a loop-mounted filesystem of the test session's (quotafs.py): XFS mounted
`prjquota` or ext4 made `-O quota,project` and mounted `prjquota` for the quota tests, which
skip with the kernel's reason where it refuses those mounts (this machine's kernel has
neither XFS quota support nor the ext4 quota format); XFS and ext4 without quotas for the
start-up tests, which run everywhere.
"""

import errno
import os
import signal
import subprocess
import sys
import tempfile

import pytest

from csi.backend.quota import DEFAULT_IDS, ProjectQuotas, project_of
from csi.backend.quotabound import PART
from csi.store.state import Publication, State
from csi.volumes import canonical
from tests.conftest import ROOT_REASON, StrataProcess, unmount_all_under
from tests.integration.quotafs import quota_fs
from tests.integration.test_size_limit import fill, leftovers, stats

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

KiB, MiB = 1 << 10, 1 << 20
LIMIT = 8 * MiB
INODES = LIMIT // 16384
QUOTA = ("--size-limit-mechanism", "quota")


@pytest.fixture
def server(quota_filesystems, tmp_path, request):
    """`make(fs_name, *args)`: a server (started) whose store is on that filesystem, of
    this test's own; stopped, unmounted and its store removed after the test."""
    made = []

    def make(name: str, *args: str, start: bool = True) -> StrataProcess:
        fs = quota_fs(quota_filesystems, name)
        # Short: one fsconfig(2) string holds at most 256 bytes (overlay's lowerdir=A:B).
        root = tempfile.mkdtemp(prefix="s", dir=fs.root)
        p = StrataProcess(str(tmp_path / f"proc{len(made)}"), root=root, extra_args=args)
        os.makedirs(p.base)
        made.append(p)
        return p.start() if start else p

    try:
        yield make
    finally:
        for p in made:
            p.stop()
        unmount_all_under(str(tmp_path))
        for p in made:
            unmount_all_under(p.root)
            subprocess.run(["rm", "-rf", p.root], check=False)


def record(root: str, target) -> Publication:
    """The publication state.db records at `target`, read as `strata ls` reads it."""
    state = State(os.path.join(root, "state.db"), migrate=False)
    try:
        with state.read() as tx:
            return tx.publication(canonical(str(target)))
    finally:
        state.close()


def strata_ls(root: str) -> str:
    return subprocess.run([sys.executable, "-m", "csi", "ls", "--root", root], check=True,
                          capture_output=True, text=True).stdout


# -- start-up -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["plain-xfs", "plain-ext4"])
def test_quota_mechanism_without_quotas_stops_the_start_with_the_reason(server, name):
    p = server(name, *QUOTA, start=False).launch()
    rc = p.proc.wait(timeout=60)
    said = p.read_log()
    assert rc == 1, said
    kind = name.split("-")[1]
    assert "strata serve: --size-limit-mechanism quota, but the store's filesystem does " \
           f"not enforce project quotas: {kind} at " in said, said
    assert "Traceback" not in said, said
    assert not os.path.exists(p.node_sock)  # it never served


def test_auto_without_quotas_bounds_with_loop_filesystems(server, pods, images):
    p = server("plain-xfs")
    said = p.read_log()
    assert "size limits: a filesystem image per volume on a loop device (no project " \
           "quotas: xfs at " in said, said
    t = pods / "pod"
    p.csi.publish("auto-loop", t, images.app, sizeLimit="8Mi")
    try:
        pub = record(p.root, t)
        assert pub.size_limit == LIMIT and pub.project_id == 0
        assert os.path.ismount(os.path.join(p.root, "volumes", pub.key, "fs"))
        assert stats(p.csi, "auto-loop", t)["BYTES"][0] == LIMIT
        assert " 8Mi loop " in strata_ls(p.root)
    finally:
        p.csi.unpublish("auto-loop", t)
    assert leftovers(p.root) == []


def test_loop_mechanism_is_used_when_asked(server):
    p = server("plain-xfs", "--size-limit-mechanism", "loop")
    assert "size limits: a filesystem image per volume on a loop device " \
           "(--size-limit-mechanism loop)" in p.read_log()


# -- project quotas, where the kernel has them ------------------------------------------------
@pytest.mark.parametrize("name", ["quota-xfs", "quota-ext4"])
def test_a_publication_is_bounded_by_a_project_quota(server, pods, images, name):
    p = server(name, *QUOTA)
    assert "size limits: project quotas" in p.read_log()
    quotas, reason = ProjectQuotas.check(p.root)
    assert quotas is not None, reason
    full, free = pods / "full", pods / "free"
    p.csi.publish("q-full", full, images.app, sizeLimit="8Mi")
    p.csi.publish("q-free", free, images.app)
    try:
        pub = record(p.root, full)
        pid = pub.project_id
        assert pid in DEFAULT_IDS
        home = os.path.join(p.root, "volumes", pub.key, PART)
        assert project_of(home) == pid and project_of(os.path.join(home, "upper")) == pid
        assert not os.path.ismount(home)  # nothing mounted, nothing attached
        used = quotas.usage(pid)
        assert (used.byte_limit, used.inode_limit) == (LIMIT, INODES)
        assert f" 8Mi project {pid} " in strata_ls(p.root)

        total, _, available = stats(p.csi, "q-full", full)["BYTES"]
        assert total == LIMIT and 0 < available <= LIMIT
        assert stats(p.csi, "q-full", full)["INODES"][0] == INODES

        written, err = fill(str(full / "fill"))
        print(f"\n{name}: sizeLimit {LIMIT} bytes by project {pid}: the write failed "
              f"after {written} bytes ({written / LIMIT:.1%} of the limit) with "
              f"{errno.errorcode[err]}")
        assert err in (errno.EDQUOT, errno.ENOSPC)
        assert LIMIT - 512 * KiB <= written <= LIMIT
        total, used_bytes, available = stats(p.csi, "q-full", full)["BYTES"]
        assert total == LIMIT and available < 512 * KiB and used_bytes >= written
        # The other pod, on the same image and filesystem, is not bound by it.
        (free / "blob").write_bytes(os.urandom(2 * LIMIT))
        assert (full / "etc/motd").read_text() == "app motd\n"
    finally:
        p.csi.unpublish("q-full", full)
        p.csi.unpublish("q-free", free)
    # Unpublished: the ID's limits are cleared and its directory is gone.
    released = quotas.usage(pid)
    assert (released.byte_limit, released.inode_limit) == (0, 0)
    assert leftovers(p.root) == []


@pytest.mark.parametrize("name", ["quota-xfs", "quota-ext4"])
def test_quota_keys_survive_a_kill_and_a_change_of_mechanism(server, pods, images, name):
    """A loop-bounded publication from before (an upgrade from a version without quotas),
    a quota-bounded one, SIGKILL, a restart with quotas: both unpublish cleanly, and the
    ID is released."""
    before = server(name, "--size-limit-mechanism", "loop")
    quotas = ProjectQuotas.check(before.root)[0]
    assert quotas is not None
    by_loop, by_quota = pods / "by-loop", pods / "by-quota"
    before.csi.publish("q-loop", by_loop, images.app, sizeLimit="8Mi")
    before.stop(signal.SIGKILL)
    after = StrataProcess(before.base, root=before.root, extra_args=QUOTA).start()
    try:
        after.csi.publish("q-quota", by_quota, images.app, sizeLimit="8Mi")
        pid = record(after.root, by_quota).project_id
        assert record(after.root, by_loop).project_id == 0 and pid in DEFAULT_IDS
        after.stop(signal.SIGKILL)
        after.start()
        assert (by_quota / "etc/motd").read_text() == "app motd\n"
        assert quotas.usage(pid).byte_limit == LIMIT
        after.csi.unpublish("q-loop", by_loop)
        after.csi.unpublish("q-quota", by_quota)
    finally:
        after.stop()
    assert quotas.usage(pid).byte_limit == 0
    assert leftovers(after.root) == []

