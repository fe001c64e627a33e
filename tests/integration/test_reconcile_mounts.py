"""Start-up's judgement of mounts it finds, against real mounts arranged the ways nodes
arrange them: shared propagation (a kubelet root reachable at two paths, on every backend),
a store on a stacked mount, and a layer lost twice over restarts."""

import os
import shutil
import subprocess

import pytest

from csi.backend.btrfs import BtrfsBackend
from csi.backend.overlay import OverlayBackend
from csi.image.manifest import Image
from csi.mount.mountinfo import MountTable
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.reconcile import _unmount_unrecorded, reconcile
from csi.store.layers import LayerStore
from csi.store.state import Layer, Publication, State
from tests.conftest import ROOT_REASON, unmount_all_under

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


CLASSES = {"overlay": OverlayBackend, "btrfs": BtrfsBackend}


def unmount_unrecorded(root, recorded: set[str], name: str = "overlay") -> None:
    paths = StorePaths(str(root))
    _unmount_unrecorded(paths, recorded, Mounter(), CLASSES[name](paths))


@pytest.fixture
def store_root(backend, work):
    """A store root for this test's backend: in `work` for overlay, a fresh directory on
    the session's btrfs for btrfs; its mounts in `work` are taken down before it is wiped."""
    root = backend.root(str(work))
    try:
        yield root
    finally:
        unmount_all_under(str(work))
        backend.wipe(root)


def backend_view(name: str, root, lid: str, dst, kind: str = "view") -> None:
    """A view of a one-layer image as the backend makes it, read-only ("view": overlay's is
    a bind of the layer, btrfs's a bind of its chain subvolume) or writable ("prepare":
    an overlay of its own, or a bind of a snapshot), its key named after `dst`."""
    os.makedirs(dst, exist_ok=True)
    b = CLASSES[name](StorePaths(str(root)))
    key = os.path.basename(dst)
    plan = b.view(key, [lid], str(dst)) if kind == "view" else b.prepare(key, [lid], str(dst))
    Mounter().mount(plan)


def view(src, dst):
    """A read-only view of a one-layer image, as strata makes it: a bind of the layer."""
    os.makedirs(dst, exist_ok=True)
    sh("mount", "--bind", str(src), str(dst))
    sh("mount", "-o", "remount,bind,ro", str(dst))


@pytest.mark.parametrize("kind", ["view", "prepare"])
def test_a_propagated_copy_of_a_live_view_stays(backend, work, store_root, kind):
    """With the kubelet root reachable at two shared paths, a live view has a copy in the
    same peer group; unmounting the copy would unmount the live view with it. A view that
    has no superblock of its own (a bind of the store's filesystem: overlay's one-layer
    read-only view, every btrfs view) is told from a leftover by its peer group."""
    root = store_root
    store(root, "L1")
    kube, alias = work / "kube", work / "alias"
    kube.mkdir()
    alias.mkdir()
    sh("mount", "--bind", str(kube), str(kube))
    sh("mount", "--make-shared", str(kube))
    sh("mount", "--bind", str(kube), str(alias))
    live, leftover = kube / "podA", kube / "podB"
    backend_view(backend.name, root, "L1", live, kind)
    backend_view(backend.name, root, "L1", leftover, kind)  # on its own: its own group
    assert mounted(alias / "podA") and mounted(alias / "podB")
    unmount_unrecorded(root, {str(live)}, backend.name)
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
