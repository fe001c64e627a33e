"""Reflink-aware copy-up: a real `strata serve` with its store on a loop-mounted ext4, XFS
(reflink=1) and btrfs (tests/storefs.py), an image whose layer holds a 50 MB file, and a pod
that appends one line to it through its overlay.

On ext4 overlayfs copies the whole file up: the upper allocates what the file is long. On
XFS (reflink) and btrfs the copy-up clones the file's extents: the upper shares them with
the layer and allocates about one block of its own. The metrics say both figures (logical,
allocated), the start-up probe says which kind of store it is, and the layer's file and
the other pod's view are untouched either way.
"""

import hashlib
import os
import random
import shutil

import pytest

from csi.extents import NOT_SHARED, clone, shared_bytes
from csi.image.build import LayerBuilder, write_image
from csi.mount.reflink import probe
from tests.conftest import ROOT_REASON, StrataProcess, free_port, unmount_all_under
from tests.integration.test_metrics import metrics, per_pod, pod_context, pod_labels, wait_for
from tests.storefs import store_fs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

SIZE = 50 << 20
LINE = b"one more line\n"
# The store's filesystem: (mountinfo's name for it, whether copy-up clones extents).
STORES = {"ext4": ("ext4", False), "xfs-reflink": ("xfs", True), "btrfs": ("btrfs", True)}


@pytest.fixture(scope="module")
def big_image(tmp_path_factory):
    """An OCI layout holding one image: a 50 MB file of incompressible bytes (no filesystem
    may store it sparse or compressed) and a small one; (layout root, ref, the file's
    sha256)."""
    root = tmp_path_factory.mktemp("layouts")
    data = random.Random(12).randbytes(SIZE)
    layer = LayerBuilder().file("data/big.bin", data).file("etc/hostname", "pod\n")
    write_image(str(root / "big"), "1", [layer], compression="none")
    return str(root), f"oci:{root}/big:1", hashlib.sha256(data).hexdigest()


@pytest.fixture
def store_root(store_filesystems, request, tmp_path):
    """A store root of this test's own on the filesystem named by the test's parameter,
    removed after it (the session's filesystem is small and shared)."""
    fs = store_fs(store_filesystems, request.param)
    root = os.path.join(fs.root, f"store-{tmp_path.name}")
    try:
        yield root
    finally:
        unmount_all_under(str(tmp_path))
        unmount_all_under(root)
        shutil.rmtree(root, ignore_errors=True)


def _layer_file(root: str) -> str:
    [lid] = os.listdir(os.path.join(root, "layers"))
    return os.path.join(root, "layers", lid, "fs", "data", "big.bin")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("store_root", list(STORES), indirect=True)
def test_probe_says_whether_the_store_clones_extents(store_root, request):
    fstype, clones = STORES[request.node.callspec.params["store_root"]]
    os.makedirs(os.path.join(store_root, "tmp"))
    got = probe(os.path.join(store_root, "tmp"))
    assert (got.filesystem, got.clones) == (fstype, clones)
    assert os.listdir(os.path.join(store_root, "tmp")) == [], "the probe leaves nothing"


@pytest.mark.parametrize("store_root", list(STORES), indirect=True)
def test_appending_a_line_to_a_big_lower_file(store_root, big_image, tmp_path, request):
    fstype, clones = STORES[request.node.callspec.params["store_root"]]
    layouts, ref, digest = big_image
    p = StrataProcess(str(tmp_path), metrics_port=free_port(), root=store_root,
                      extra_args=("--oci-layout-root", layouts,
                                  "--metrics-refresh-seconds", "0.2"))
    a, b = tmp_path / "pod-a", tmp_path / "pod-b"
    try:
        p.start()
        p.csi.publish("vol-a", a, ref, **pod_context("team", "writer"))
        p.csi.publish("vol-b", b, ref, **pod_context("team", "reader"))
        with open(a / "data/big.bin", "ab") as f:
            f.write(LINE)
        la, lb = pod_labels("vol-a", "team", "writer"), pod_labels("vol-b", "team", "reader")
        m = wait_for(p.metrics_port,
                     lambda m: per_pod(m, la).get("copied_up_logical_bytes") == SIZE + len(LINE),
                     "pod a's copy-up")
        got = per_pod(m, la)
        allocated = got["copied_up_bytes"]
        if clones:
            assert allocated < 1 << 20, f"a clone on {fstype} allocates a block or so"
        else:
            assert SIZE <= allocated < SIZE + (1 << 20), "ext4 copies the whole file"
        assert got["upper_bytes"] >= allocated
        assert got["upper_bytes"] < allocated + (1 << 20)
        assert m[("strata_copy_up_logical_bytes_total", ())] == SIZE + len(LINE)
        assert m[("strata_copy_up_bytes_total", ())] == allocated
        assert m[("strata_store_reflink", (("filesystem", fstype),))] == int(clones)
        said = "copy-up clones extents (reflink)" if clones else "copy-up copies whole files"
        assert f"store {store_root} on {fstype}: {said}" in p.read_log()
        # The layer and the other pod are untouched.
        assert _sha256(_layer_file(store_root)) == digest
        assert _sha256(b / "data/big.bin") == digest
        other = per_pod(m, lb)
        assert (other["copied_up_bytes"], other["copied_up_logical_bytes"]) == (0, 0)
        assert os.path.getsize(a / "data/big.bin") == SIZE + len(LINE)
        p.csi.unpublish("vol-a", a)
        p.csi.unpublish("vol-b", b)
        m = metrics(p.metrics_port)
        assert m[("strata_copy_up_logical_bytes_total", ())] == SIZE + len(LINE), \
            "the counter keeps it after unpublish"
    finally:
        p.stop()


@pytest.mark.parametrize("store_root", list(STORES), indirect=True)
def test_fiemap_counts_the_extents_a_clone_shares(store_root, request):
    """A file of 300 separate extents (a block written every other block: more than one
    FIEMAP call's worth), cloned, then one block of the clone overwritten: the clone shares
    all but that block where the filesystem clones, nothing where it cannot."""
    _, clones = STORES[request.node.callspec.params["store_root"]]
    os.makedirs(store_root)
    src, dst = os.path.join(store_root, "src"), os.path.join(store_root, "dst")
    block = 4096
    with open(src, "wb") as f:
        for i in range(300):
            f.seek(2 * i * block)
            f.write(bytes([i % 256 or 1]) * block)
        f.flush()
        os.fsync(f.fileno())
    with open(src, "rb") as s, open(dst, "wb") as d:
        if clones:
            clone(s.fileno(), d.fileno())
        else:
            with pytest.raises(OSError) as e:
                clone(s.fileno(), d.fileno())
            assert e.value.errno in NOT_SHARED
            shutil.copyfileobj(s, d)
    with open(dst, "r+b") as f:
        f.seek(2 * 7 * block)
        f.write(b"x" * block)
        f.flush()
        os.fsync(f.fileno())
        assert shared_bytes(f.fileno()) == (299 * block if clones else 0)
    with open(src, "rb") as f:
        assert shared_bytes(f.fileno()) == (299 * block if clones else 0)
