"""Start-up's judgement of mounts it finds, against real mounts arranged the ways nodes
arrange them: shared propagation (a kubelet root reachable at two paths), a store on a
stacked mount, and a layer lost twice over restarts."""

import os
import shutil
import subprocess

import pytest

from csi.backend.overlay import OverlayBackend
from csi.image.manifest import Image
from csi.mount.mountinfo import MountTable
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.reconcile import _unmount_unrecorded, reconcile
from csi.store.layers import LayerStore
from csi.store.state import Layer, Publication, State
from tests.conftest import ROOT_REASON

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)


def sh(*args):
    subprocess.run(args, check=True)


def mounted(path) -> bool:
    return MountTable().is_mountpoint(str(path))


@pytest.fixture
def work(tmp_path):
    """A tmpfs of the test's own, taken down with everything below it, whatever happens."""
    w = tmp_path / "w"
    w.mkdir()
    sh("mount", "-t", "tmpfs", "strata-test", str(w))
    try:
        yield w
    finally:
        subprocess.run(["umount", "-R", "-l", str(w)], check=False)


def store(root, *lids):
    for d in [f"layers/{lid}/fs" for lid in lids] + ["volumes", "tmp"]:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for lid in lids:
        open(os.path.join(root, "layers", lid, "fs", "f"), "w").close()


def unmount_unrecorded(root, recorded: set[str]) -> None:
    paths = StorePaths(str(root))
    _unmount_unrecorded(paths, recorded, Mounter(), OverlayBackend(paths))


def view(src, dst):
    """A read-only view of a one-layer image, as strata makes it: a bind of the layer."""
    os.makedirs(dst, exist_ok=True)
    sh("mount", "--bind", str(src), str(dst))
    sh("mount", "-o", "remount,bind,ro", str(dst))


def test_a_propagated_copy_of_a_live_view_stays(work):
    """With the kubelet root reachable at two shared paths, a live view has a copy in the
    same peer group; unmounting the copy would unmount the live view with it."""
    root = work / "store"
    store(root, "L1")
    kube, alias = work / "kube", work / "alias"
    kube.mkdir()
    alias.mkdir()
    sh("mount", "--bind", str(kube), str(kube))
    sh("mount", "--make-shared", str(kube))
    sh("mount", "--bind", str(kube), str(alias))
    live, leftover = kube / "podA", kube / "podB"
    view(root / "layers/L1/fs", live)
    view(root / "layers/L1/fs", leftover)  # mounted on its own: its own peer group
    assert mounted(alias / "podA") and mounted(alias / "podB")
    unmount_unrecorded(root, {str(live)})
    assert mounted(live) and mounted(alias / "podA")
    assert not mounted(leftover) and not mounted(alias / "podB")


def test_a_store_on_a_stacked_mount_still_knows_its_views(work):
    s = work / "s"
    s.mkdir()
    sh("mount", "-t", "tmpfs", "lower", str(s))
    sh("mount", "-t", "tmpfs", "upper", str(s))  # stacked: this one holds the store
    store(s, "L1")
    leftover = work / "leftover"
    view(s / "layers/L1/fs", leftover)
    unmount_unrecorded(s, set())
    assert not mounted(leftover)


def test_a_lost_layer_s_siblings_stay_referenced_across_restarts(work):
    root = work / "store"
    store(root, "base", "top")
    target = work / "pod"
    target.mkdir()
    sh("mount", "-t", "tmpfs", "pod", str(target))  # stands in for the live overlay
    st = State(str(root / "state.db"))
    paths = StorePaths(str(root))
    try:
        with st.transaction() as tx:
            for lid in ("base", "top"):
                tx.record_layer(Layer(lid, "sha256:" + lid, 1, 0, 0))
            tx.record_image(Image("img", "sha256:m", "sha256:c", ()), ("base", "top"), 0)
            tx.record_publication(Publication(str(target), "v", "k", "img", "sha256:m", False,
                                              "", 1, 0), ["base", "top"], 0)
        shutil.rmtree(root / "layers/top")
        for _ in range(3):  # every later start too
            reconcile(paths, st, Mounter(), OverlayBackend(paths), LayerStore(paths, st))
            with st.read() as tx:
                assert tx.refcounts() == {"base": 1}
    finally:
        st.close()
