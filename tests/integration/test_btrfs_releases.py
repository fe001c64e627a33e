"""A btrfs publication's snapshot while another mount namespace still binds it: the kernel
would delete the subvolume from under that bind (which then shows an empty dead
directory), so releases.py keeps it until the namespace is gone. mountinfo shows such a
bind by the filesystem's superblock device and the snapshot's path inside it, never by
the subvolume's own device."""

import os
import shutil
import uuid

import pytest

from csi.backend.btrfs import BtrfsBackend
from csi.mount.users import device_of
from csi.releases import Releases
from csi.store.state import Publication, State
from tests.conftest import ROOT_REASON, unmount_all_under
from tests.integration.test_btrfs_backend import Store, image_layers, wipe
from tests.integration.test_releases import Pod
from tests.storefs import store_fs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)


@pytest.fixture
def store(store_filesystems, tmp_path):
    root = os.path.join(store_fs(store_filesystems, "btrfs").root, f"r-{uuid.uuid4().hex}")
    s = state = None
    try:
        s = Store(root, BtrfsBackend, str(tmp_path / "mnt"))
        state = State(s.paths.state_db)
        yield s, state
    finally:
        try:
            unmount_all_under(str(tmp_path))
            if state is not None:
                state.close()
            if s is not None:
                for key in s.backend.keys():
                    s.backend.remove_or_log(key)
        finally:
            wipe(root)
            shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("ask", ["end", "sweep"])
def test_a_snapshot_bound_in_another_namespace_waits_for_it(store, tmp_path, ask):
    s, state = store
    chain = [s.layer(x) for x in image_layers()]
    target = s.target("pod")
    plan = s.backend.prepare("k", chain, target)
    os.makedirs(target)
    s.mounter.mount(plan)
    fs = s.paths.volume_part("k", "fs")
    with open(os.path.join(target, "written"), "w") as f:
        f.write("the pod's\n")
    pub = Publication(target, "v", "k", "img", "sha256:" + "0" * 64, False, "", 1, 0)
    with state.transaction() as tx:
        tx.record_publication(pub, (), 0)
    releases = Releases(s.paths, state, s.backend, s.mounter)
    # Its working directory elsewhere: only its copy of the mount holds the snapshot.
    pod = Pod(tmp_path, namespace=True)
    try:
        device = device_of(target)
        s.mounter.unmount(target)
        if ask == "end":
            assert releases.end(pub, device), "kept: another namespace binds it"
        else:
            with state.transaction() as tx:
                tx.release_publication(target, device, 0)
            assert releases.sweep() == 1, "still held"
        assert os.path.isfile(os.path.join(fs, "written")), "the snapshot is not deleted"
        assert pod.ask(f"read {target}/written") == "the pod's\n"
        pod.kill()
        assert releases.sweep() == 0, "the namespace is gone: released"
        assert not os.path.exists(fs)
        with state.read() as r:
            assert r.releases() == [] and r.publications() == []
    finally:
        pod.kill()
        releases.stop()  # end() wakes its thread


def test_a_limited_key_cut_short_before_its_upper_is_not_held(store):
    """A crash after a loop-limited key's filesystem is mounted at `volumes/KEY/fs` but
    before the overlay's upper is made in it: that mount point has a device of its own,
    yet it is no snapshot a view binds, and nothing can hold what has no overlay yet, so
    start-up removes it all (it was once mistaken for a held snapshot and kept for ever)."""
    s, state = store
    chain = [s.layer(x) for x in image_layers()]
    s.backend.prepare("k", chain, s.target("pod"), 8 << 20)
    fs = s.paths.volume_part("k", "fs")
    for part in ("upper", "work"):
        shutil.rmtree(os.path.join(fs, part))
    assert s.mounter.table.is_mountpoint(fs)
    assert s.backend.snapshot("k") is None
    releases = Releases(s.paths, state, s.backend, s.mounter, starting=True)
    try:
        assert not releases.held("k")
        releases.remove_unless_held("k", "unrecorded publication k")
        assert not os.path.exists(s.paths.volume("k"))
        assert not s.mounter.table.is_mountpoint(fs)
        with state.read() as r:
            assert r.releases() == []
    finally:
        releases.stop()
