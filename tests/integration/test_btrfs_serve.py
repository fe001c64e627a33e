"""`strata serve --backend btrfs` with its store on the session's loop-mounted btrfs: real
publishes through gRPC, and the operator tools (`ls`, `df`, `diff`) on that store giving
what they give for overlay."""

import os
import signal
import uuid

import pytest

from csi import compose
from csi.config import Config
from csi.mount import btrfs
from tests.conftest import StrataProcess, free_port, scrape, unmount_all_under
from tests.integration.test_diff_cli import CHANGES, POD, cmd
from tests.integration.test_inspect import rename_dir
from tests.integration.test_quota_publish import record
from tests.storefs import delete_subvolumes, store_fs


@pytest.fixture(scope="module")
def served(store_filesystems, tmp_path_factory):
    root = os.path.join(store_fs(store_filesystems, "btrfs").root, f"serve-{uuid.uuid4().hex}")
    base = str(tmp_path_factory.mktemp("strata-btrfs"))
    proc = StrataProcess(base, root=root, metrics_port=free_port(),
                         extra_args=("--backend", "btrfs")).start()
    try:
        yield proc
    finally:
        proc.stop()
        unmount_all_under(base)
        delete_subvolumes(root)


def test_publish_write_diff_and_unpublish(served, images, tmp_path):
    a, ro = tmp_path / "writer", tmp_path / "ro"
    served.csi.publish("b-writer", a, images.app, **POD)
    try:
        served.csi.publish("b-ro", ro, images.app, readonly=True)
        try:
            (a / "etc/new.conf").write_text("new\n")
            with open(a / "etc/motd", "a") as f:
                f.write("appended\n")
            os.chmod(a / "usr/bin/tool", 0o700)
            os.unlink(a / "etc/passwd")
            rename_dir(str(a / "srv"), str(a / "srv2"))
            assert (ro / "etc/passwd").exists(), "the read-only view is the image's"
            with pytest.raises(OSError):
                (ro / "x").write_text("x")
            out = cmd("diff", str(a), root=served.root, check=0).stdout
            # overlay's answer, and the other name of the hard-linked tool: a snapshot is
            # a real filesystem, where a chmod changes the inode under both names (overlay
            # without index=on copies up one name and breaks the link).
            assert out.splitlines() == CHANGES + ["C /usr/bin/tool-hard"]
            ls = cmd("ls", root=served.root, check=0).stdout
            assert "Backend: btrfs; layers shared by chain (ChainID" in ls
            row = next(line for line in ls.splitlines() if line.endswith(str(a)))
            assert row.split()[4:7] == ["3", "2", "2"], row  # created, copied, deleted
            df = cmd("df", root=served.root, check=0).stdout
            assert "Backend: btrfs" in df and "page cache per publication" in df
        finally:
            served.csi.unpublish("b-ro", ro)
    finally:
        served.csi.unpublish("b-writer", a)
    parts = compose.reader(Config(root=served.root))
    try:
        assert parts.backend.name == "btrfs"
        assert parts.backend.keys() == set(), "unpublish deleted the snapshot"
    finally:
        parts.close()


def test_metrics_name_the_backend_and_claim_no_page_cache_it_does_not_share(served, images,
                                                                            tmp_path):
    """Two pods of one image on btrfs read the same file: each snapshot caches it in its own
    inode, so no page cache is saved, and the metrics say so instead of counting the
    layer's pages (which no pod reads) as shared."""
    pods = [tmp_path / "pc0", tmp_path / "pc1"]
    for i, pod in enumerate(pods):
        served.csi.publish(f"b-pc{i}", pod, images.app)
    try:
        for pod in pods:
            (pod / "etc/motd").read_bytes()
        m = scrape(served.metrics_port)
        assert m['strata_backend_info{backend="btrfs",shared_by="chain",'
                 'shares_page_cache="false"}'] == 1
        assert m["strata_page_cache_saved_bytes"] == 0
        assert m["strata_layer_page_cache_bytes"] == 0
    finally:
        for i, pod in enumerate(pods):
            served.csi.unpublish(f"b-pc{i}", pod)


def test_a_snapshot_publication_is_healthy_until_its_snapshot_is_deleted(served, images,
                                                                          tmp_path):
    """Volume health asks the backend whether a publication's writable state is there (a
    snapshot has no upper dir) and checks the layer store's own directories (not chains)."""
    from csi.proto import csi_pb2

    target = tmp_path / "health"
    served.csi.publish("b-health", target, images.app)
    try:
        def condition():
            return served.csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
                volume_id="b-health", volume_path=str(target))).volume_condition

        assert not condition().abnormal, condition().message
        pub = record(served.root, target)
        snapshot = os.path.join(served.root, "volumes", pub.key, "fs")
        btrfs.delete(snapshot)  # behind the server's back (the kernel lets it go, bind or not)
        assert condition().abnormal and "writable layer" in condition().message
    finally:
        served.csi.unpublish("b-health", target)


def test_serve_refuses_btrfs_off_btrfs(tmp_path):
    proc = StrataProcess(str(tmp_path), extra_args=("--backend", "btrfs"))
    with pytest.raises(RuntimeError, match=r"--backend btrfs, but the store root .* \(--root\) "
                                           r"is not on a btrfs filesystem"):
        proc.start()
    proc.stop()


def test_a_kill_9_and_restart_keeps_publications_and_removes_half_made_chains(
        store_filesystems, images, tmp_path):
    root = os.path.join(store_fs(store_filesystems, "btrfs").root, f"crash-{uuid.uuid4().hex}")
    proc = StrataProcess(str(tmp_path), root=root, extra_args=("--backend", "btrfs")).start()
    target, ro = tmp_path / "pod", tmp_path / "ro"
    try:
        proc.csi.publish("crash-rw", target, images.app)
        proc.csi.publish("crash-ro", ro, images.app, readonly=True)
        (target / "mine").write_text("kept\n")
        proc.stop(signal.SIGKILL)
        half = os.path.join(root, "tmp", "chain-feedface")
        btrfs.create(half)  # as a crash while applying a layer leaves it
        with open(os.path.join(half, "partial"), "w"):
            pass
        proc.start()
        assert not os.path.exists(half), "start-up removed the half-made chain"
        assert (target / "mine").read_text() == "kept\n", "the publication is still mounted"
        assert (ro / "etc/passwd").exists()
        proc.csi.publish("crash-rw", target, images.app)  # idempotent after the restart
        proc.csi.unpublish("crash-rw", target)
        proc.csi.unpublish("crash-ro", ro)
        assert not os.listdir(os.path.join(root, "volumes"))
    finally:
        proc.stop()
        unmount_all_under(str(tmp_path))
        delete_subvolumes(root)


def test_gc_of_the_image_s_layers_deletes_its_chains(served, images, tmp_path):
    target = tmp_path / "gc"
    served.csi.publish("b-gc", target, images.app)
    served.csi.unpublish("b-gc", target)
    chains = os.path.join(served.root, "chains")
    assert any(btrfs.is_subvolume(os.path.join(chains, c)) for c in os.listdir(chains))
    cmd("gc", "--gc-policy", "immediate", "--gc-min-age", "0", root=served.root, check=0)
    assert os.listdir(chains) == [], "every chain held a collected layer"


def test_a_store_that_leaves_btrfs_drops_its_chains(store_filesystems, images, tmp_path):
    """Switching back to overlay once no btrfs publication is left: the chains go with the
    backend that made them (no other backend reads or collects them)."""
    root = os.path.join(store_fs(store_filesystems, "btrfs").root, f"leave-{uuid.uuid4().hex}")
    proc = StrataProcess(str(tmp_path), root=root, extra_args=("--backend", "btrfs")).start()
    target = tmp_path / "pod"
    try:
        proc.csi.publish("leave", target, images.app)
        proc.csi.unpublish("leave", target)
        chains = os.path.join(root, "chains")
        assert any(btrfs.is_subvolume(os.path.join(chains, c)) for c in os.listdir(chains))
        proc.stop()
        proc.extra_args = []  # the default backend, overlay
        proc.start()
        assert not os.path.exists(chains)
        proc.csi.publish("leave", target, images.app)  # the layers serve overlay as before
        assert (target / "etc/passwd").exists()
        proc.csi.unpublish("leave", target)
    finally:
        proc.stop()
        unmount_all_under(str(tmp_path))
        delete_subvolumes(root)
