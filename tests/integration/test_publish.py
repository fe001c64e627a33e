"""NodePublish/NodeUnpublish over the real socket with real overlay mounts."""

import errno
import os
import stat

import grpc
import pytest

from csi import compose
from csi.config import Config
from csi.mount.mountinfo import MountTable
from csi.store.state import Publication
from tests.conftest import Mode
from tests.integration.test_diff_cli import cmd

# Every test here that publishes runs on each backend (its ID names it), unless it is
# marked overlay_only: they prove copy-on-write behaviour a backend must give.


@pytest.fixture
def csi(served):
    return served.csi


def overlay_opts(target) -> dict[str, str]:
    (m,) = MountTable().at(str(target))
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in m.super_options.split(","))


def read(path) -> str:
    with open(path) as f:
        return f.read()


def code_of(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


def publication(root: str, target) -> tuple[Publication, list[str]]:
    """The publication recorded at `target` and the image's directories no pod may change:
    what its view reads through (the backend's `lowers`, nearest first: overlay's layer
    dirs, btrfs's chain subvolume), then the layer store's dirs of its layers, top first."""
    parts = compose.reader(Config(root=root))
    try:
        with parts.state.read() as tx:
            pub = tx.publication(str(target))
            chain = tx.image(pub.manifest_digest).layer_ids
        store = [parts.paths.layer_fs(lid) for lid in reversed(chain)]
        return pub, list(dict.fromkeys(parts.backend.lowers(chain) + store))
    finally:
        parts.close()


def test_two_pods_are_isolated_and_layers_untouched(served, csi, pods, images):
    a, b = pods / "a", pods / "b"
    csi.publish("iso-a", a, images.app)
    csi.publish("iso-b", b, images.app)
    try:
        assert read(a / "etc/motd") == "app motd\n"
        # pod a: modify a lower file (copy-up), add a file, delete a lower file (whiteout)
        with open(a / "etc/motd", "a") as f:
            f.write("changed by a\n")
        (a / "srv/new.txt").write_text("only in a\n")
        os.unlink(a / "usr/lib/python3/json/decoder.py")

        assert read(b / "etc/motd") == "app motd\n"
        assert not (b / "srv/new.txt").exists()
        assert (b / "usr/lib/python3/json/decoder.py").exists()
        assert read(a / "etc/motd") == "app motd\nchanged by a\n"
        assert not (a / "usr/lib/python3/json/decoder.py").exists()

        pub_a, image_dirs = publication(served.root, a)
        pub_b, _ = publication(served.root, b)
        # the image's own files still hold the image's bytes
        assert read(os.path.join(image_dirs[0], "etc/motd")) == "app motd\n"
        assert {read(os.path.join(d, "etc/motd")) for d in image_dirs
                if os.path.exists(os.path.join(d, "etc/motd"))} == {"app motd\n",
                                                                    "base motd\n"}
        assert any(os.path.exists(os.path.join(d, "usr/lib/python3/json/decoder.py"))
                   for d in image_dirs)
        assert not any(os.path.exists(os.path.join(d, "srv/new.txt")) for d in image_dirs)
        # what each pod changed, as `strata diff` reads it from the backend
        assert cmd("diff", str(a), root=served.root, check=0).stdout.splitlines() == [
            "C /etc", "C /etc/motd", "C /srv", "A /srv/new.txt", "C /usr", "C /usr/lib",
            "C /usr/lib/python3", "C /usr/lib/python3/json",
            "D /usr/lib/python3/json/decoder.py"]
        assert cmd("diff", str(b), root=served.root, check=0).stdout == ""
    finally:
        csi.unpublish("iso-a", a)
        csi.unpublish("iso-b", b)
    assert not a.exists() and not b.exists()
    for pub in (pub_a, pub_b):
        assert not os.path.exists(os.path.join(served.root, "volumes", pub.key)), \
            "the ephemeral writable layer must be deleted"
    assert not MountTable().under(str(pods))


@pytest.mark.overlay_only("overlay's lowerdir/upperdir options and its whiteout devices; "
                          "a snapshot has neither (btrfs: test_btrfs_backend.py)")
def test_overlay_pods_share_lowerdirs_and_copy_up_into_their_own_upper(csi, pods, images):
    a, b = pods / "a", pods / "b"
    csi.publish("ovl-a", a, images.app)
    csi.publish("ovl-b", b, images.app)
    try:
        with open(a / "etc/motd", "a") as f:
            f.write("changed by a\n")
        os.unlink(a / "usr/lib/python3/json/decoder.py")
        opts_a, opts_b = overlay_opts(a), overlay_opts(b)
        assert opts_a["lowerdir"] == opts_b["lowerdir"], "both pods must share the layers"
        assert opts_a["upperdir"] != opts_b["upperdir"]
        # copy-up went to a's upper; the deletion is a whiteout there
        upper = opts_a["upperdir"]
        assert read(os.path.join(upper, "etc/motd")) == "app motd\nchanged by a\n"
        wh = os.lstat(os.path.join(upper, "usr/lib/python3/json/decoder.py"))
        assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    finally:
        csi.unpublish("ovl-a", a)
        csi.unpublish("ovl-b", b)
    assert not os.path.exists(opts_a["upperdir"])


def test_image_content_is_faithful(csi, pods, images):
    t = pods / "t"
    csi.publish("faithful", t, images.app)
    try:
        assert not (t / "usr/lib/python3/json/tool.py").exists(), "whiteout hides lower file"
        assert sorted(os.listdir(t / "var/cache")) == ["new"], "opaque dir hides lower entries"
        with open(os.path.join(os.path.dirname(os.__file__), "json/__init__.py"), "rb") as f:
            assert (t / "usr/lib/python3/json/__init__.py").read_bytes() == f.read()
        tool = os.lstat(t / "usr/bin/tool")
        assert (tool.st_uid, tool.st_gid, stat.S_IMODE(tool.st_mode)) == (1000, 1000, 0o755)
        assert os.readlink(t / "usr/bin/tool-link") == "tool"
        assert os.lstat(t / "usr/bin/tool-hard").st_ino == tool.st_ino
        assert stat.S_IMODE(os.lstat(t / "usr/bin/su").st_mode) == 0o4755
        assert os.getxattr(t / "data/tagged", "user.strata") == b"hello"
        assert read(t / "srv/index.html") == "<h1>hello</h1>\n"
    finally:
        csi.unpublish("faithful", t)


def test_readonly_publish_rejects_writes(csi, pods, images):
    t = pods / "ro"
    csi.publish("ro-vol", t, images.app, readonly=True)
    try:
        with pytest.raises(OSError) as e:
            (t / "etc/motd").write_text("nope")
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            (t / "newfile").write_text("nope")
        assert e.value.errno == errno.EROFS
        assert read(t / "etc/motd") == "app motd\n"
    finally:
        csi.unpublish("ro-vol", t)
    assert not t.exists()


def test_readonly_single_layer_image_is_a_readonly_bind(csi, pods, images):
    t = pods / "ro1"
    csi.publish("ro-single", t, images.base, mode=Mode.SINGLE_NODE_READER_ONLY)
    try:
        (m,) = MountTable().at(str(t))
        assert "ro" in m.options.split(",")
        with pytest.raises(OSError) as e:
            (t / "x").write_text("nope")
        assert e.value.errno == errno.EROFS
        assert read(t / "etc/motd") == "base motd\n"
    finally:
        csi.unpublish("ro-single", t)


def test_publish_is_idempotent_and_conflicts_are_already_exists(csi, pods, images):
    t = pods / "idem"
    csi.publish("idem-vol", t, images.app)
    try:
        (t / "keep.txt").write_text("still here")
        csi.publish("idem-vol", t, images.app)  # identical repeat: OK, nothing changes
        assert len(MountTable().at(str(t))) == 1
        assert read(t / "keep.txt") == "still here"
        with pytest.raises(grpc.RpcError) as e:
            csi.publish("other-vol", t, images.app)
        assert code_of(e) == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as e:
            csi.publish("idem-vol", t, images.other)
        assert code_of(e) == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as e:
            csi.publish("idem-vol", t, images.app, readonly=True)
        assert code_of(e) == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as e:  # another access mode
            csi.publish("idem-vol", t, images.app, mode=Mode.SINGLE_NODE_MULTI_WRITER)
        assert code_of(e) == grpc.StatusCode.ALREADY_EXISTS
        assert len(MountTable().at(str(t))) == 1
    finally:
        csi.unpublish("idem-vol", t)
    csi.unpublish("idem-vol", t)  # repeat of unpublish: OK
    csi.unpublish("never-published", pods / "nowhere")  # unknown: OK
    assert not t.exists()


def test_staged_volume_publishes_to_several_pods(csi, pods, images):
    staging = pods / "staging"
    staging.mkdir()
    a, b = pods / "a", pods / "b"
    csi.stage("pv-1", staging, images.app)
    csi.stage("pv-1", staging, images.app)  # idempotent
    try:
        with pytest.raises(grpc.RpcError) as e:
            csi.stage("pv-1", staging, images.other)
        assert code_of(e) == grpc.StatusCode.ALREADY_EXISTS
        csi.publish("pv-1", a, staging=staging, mode=Mode.SINGLE_NODE_MULTI_WRITER)
        csi.publish("pv-1", b, staging=staging, mode=Mode.SINGLE_NODE_MULTI_WRITER)
        (a / "a.txt").write_text("a")
        assert not (b / "a.txt").exists()
        with pytest.raises(grpc.RpcError) as e:
            csi.unstage("pv-1", staging)
        assert code_of(e) == grpc.StatusCode.FAILED_PRECONDITION
        # CSI: not staged at *this* path -> OK, and the real stage is left alone.
        csi.unstage("pv-1", pods / "elsewhere")
        csi.publish("pv-1", pods / "c2", staging=staging, mode=Mode.SINGLE_NODE_MULTI_WRITER)
        csi.unpublish("pv-1", pods / "c2")
        with pytest.raises(grpc.RpcError) as e:
            csi.publish("pv-2", pods / "c", staging=staging)
        assert code_of(e) == grpc.StatusCode.FAILED_PRECONDITION
        assert not (pods / "c").exists()
    finally:
        csi.unpublish("pv-1", a)
        csi.unpublish("pv-1", b)
        csi.unstage("pv-1", staging)
    csi.unstage("pv-1", staging)  # repeat: OK
    assert staging.exists(), "the kubelet owns the staging dir"


def test_single_writer_volume_cannot_publish_twice(csi, pods, images):
    staging = pods / "staging"
    staging.mkdir()
    csi.stage("sw", staging, images.app, mode=Mode.SINGLE_NODE_SINGLE_WRITER)
    try:
        csi.publish("sw", pods / "a", staging=staging, mode=Mode.SINGLE_NODE_SINGLE_WRITER)
        with pytest.raises(grpc.RpcError) as e:
            csi.publish("sw", pods / "b", staging=staging, mode=Mode.SINGLE_NODE_SINGLE_WRITER)
        assert code_of(e) == grpc.StatusCode.FAILED_PRECONDITION
        assert not (pods / "b").exists()
    finally:
        csi.unpublish("sw", pods / "a")
        csi.unstage("sw", staging)


def test_volume_stats_report_upper_usage(backend, csi, pods, images):
    from csi.proto import csi_pb2

    t = pods / "stats"
    csi.publish("stats-vol", t, images.app)
    try:
        def stats():
            r = csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
                volume_id="stats-vol", volume_path=str(t)), timeout=10)
            return {u.unit: u for u in r.usage}, r.volume_condition

        before, cond = stats()
        assert not cond.abnormal
        (t / "blob.bin").write_bytes(os.urandom(1 << 20))
        os.sync()
        after, _ = stats()
        Unit = csi_pb2.VolumeUsage
        assert after[Unit.BYTES].used - before[Unit.BYTES].used >= 1 << 20
        assert after[Unit.INODES].used == before[Unit.INODES].used + 1
        assert after[Unit.BYTES].total > after[Unit.BYTES].used
        with pytest.raises(grpc.RpcError) as e:
            csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
                volume_id="stats-vol", volume_path=str(pods / "elsewhere")), timeout=10)
        assert code_of(e) == grpc.StatusCode.NOT_FOUND
    finally:
        csi.unpublish("stats-vol", t)


@pytest.mark.overlay_only("one lowerdir per layer is overlay's sharing; btrfs shares by "
                          "chain (test_btrfs_backend.py)")
def test_layers_are_shared_between_images(csi, pods, images):
    a, b = pods / "a", pods / "b"
    csi.publish("share-a", a, images.app)
    csi.publish("share-b", b, images.other)
    try:
        la, lb = overlay_opts(a)["lowerdir"].split(":"), overlay_opts(b)["lowerdir"].split(":")
        assert la[-1] == lb[-1], "the common base layer is one directory"
        assert read(b / "opt/other.txt").startswith("another image")
        assert read(b / "etc/motd") == "base motd\n"
    finally:
        csi.unpublish("share-a", a)
        csi.unpublish("share-b", b)


@pytest.mark.parametrize("kind", ["plain", "zstd"])
def test_other_layer_media_types(served, csi, pods, images, kind):
    t, ref = pods / kind, pods / "app-ref"
    csi.publish(f"{kind}-vol", t, getattr(images, kind))
    csi.publish(f"{kind}-ref", ref, images.app)
    try:
        assert read(t / "etc/motd") == "app motd\n"
        assert not (t / "usr/lib/python3/json/tool.py").exists()
        # the same DiffIDs whatever the compression: the view reads the gzip image's layers
        assert publication(served.root, t)[1] == publication(served.root, ref)[1]
    finally:
        csi.unpublish(f"{kind}-vol", t)
        csi.unpublish(f"{kind}-ref", ref)


def test_a_layer_labelled_gzip_that_is_plain_tar_is_unpacked(csi, pods, tmp_path):
    """Some build tools label uncompressed layers tar+gzip; containerd reads the blob's
    magic bytes, and so does strata (the DiffID still vouches for the content)."""
    import hashlib
    import json

    from csi.image.build import LayerBuilder, write_image

    layout = tmp_path / "mislabelled"
    write_image(str(layout), "v1", [LayerBuilder().file("etc/motd", "plain tar\n")],
                compression="none")
    index = json.loads((layout / "index.json").read_text())
    old = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / old.split(":")[1]).read_bytes())
    for desc in manifest["layers"]:
        desc["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
    body = json.dumps(manifest).encode()
    new = "sha256:" + hashlib.sha256(body).hexdigest()
    (layout / "blobs" / "sha256" / new.split(":")[1]).write_bytes(body)
    index["manifests"][0].update(digest=new, size=len(body))
    (layout / "index.json").write_text(json.dumps(index))
    t = pods / "mislabelled"
    csi.publish("mislabelled", t, f"oci:{layout}:v1")
    try:
        assert (t / "etc/motd").read_text() == "plain tar\n"
    finally:
        csi.unpublish("mislabelled", t)
