"""Edge cases a node meets in practice: deep images, symlinked paths, repeated layers,
interrupted publishes."""

import os
import shutil
import signal
import subprocess
import sys

import grpc
import pytest

from csi.image.build import LayerBuilder, write_image
from csi.mount.mountinfo import MountTable
from csi.store.state import State
from tests.conftest import ROOT_REASON, StrataProcess, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)


@pytest.fixture(scope="module")
def deep_image(tmp_path_factory) -> str:
    """128 layers, each adding a file and overriding /etc/layer (containerd's 128-layer
    case): far more lowerdirs than fit in one page of mount(2) options."""
    layout = str(tmp_path_factory.mktemp("deep") / "layout")
    layers = [LayerBuilder().dir("etc").file(f"f{i:03d}", f"{i}\n").file("etc/layer", f"{i}\n")
              for i in range(128)]
    write_image(layout, "deep", layers, compression="none")
    return f"oci:{layout}:deep"


# The tests that take `served` or `new_server` run on every backend (their IDs name it);
# the others check the layer store, the CSI checks or overlay's lowerdirs, on the default.


@pytest.mark.parametrize("readonly", [False, True])
def test_128_layer_image(served, pods, deep_image, readonly):
    csi = served.csi
    t = pods / "deep"
    csi.publish(f"deep-{readonly}", t, deep_image, readonly=readonly)
    try:
        assert len([n for n in os.listdir(t) if n.startswith("f")]) == 128
        assert (t / "etc/layer").read_text() == "127\n", "the topmost layer wins"
        if not readonly:
            (t / "etc/layer").write_text("mine\n")
            assert (t / "etc/layer").read_text() == "mine\n"
    finally:
        csi.unpublish(f"deep-{readonly}", t)
    assert not t.exists()


def test_target_behind_a_symlink(served, pods, images):
    csi = served.csi
    real = pods / "real"
    real.mkdir()
    (pods / "link").symlink_to(real)
    t = pods / "link" / "vol"
    csi.publish("symlinked", t, images.app)
    (t / "data.txt").write_text("kept")
    csi.publish("symlinked", t, images.app)  # identical repeat: nothing remounted
    assert len(MountTable().at(str(real / "vol"))) == 1
    assert (t / "data.txt").read_text() == "kept"
    csi.unpublish("symlinked", t)
    assert not MountTable().under(str(pods))
    assert not (real / "vol").exists()


def test_image_listing_a_layer_twice(served, pods, tmp_path):
    csi = served.csi
    layout = str(tmp_path / "layout")
    a = LayerBuilder().file("a", "from a\n").file("shared", "a\n")
    b = LayerBuilder().file("b", "from b\n").file("shared", "b\n")
    write_image(layout, "aba", [a, b, a])
    t = pods / "aba"
    csi.publish("aba", t, f"oci:{layout}:aba")
    try:
        assert (t / "shared").read_text() == "a\n", "the topmost copy of the layer wins"
        assert (t / "b").read_text() == "from b\n"
    finally:
        csi.unpublish("aba", t)


def test_a_target_that_is_itself_a_symlink_is_refused(csi, pods, images):
    """mount(2) follows a symlinked target but the mount table and umount2(NOFOLLOW) do
    not: the record and the kernel would disagree, and repeats would stack overlays."""
    real = pods / "real"
    real.mkdir()
    (pods / "vol").symlink_to(real)
    with pytest.raises(grpc.RpcError) as e:
        csi.publish("symlink-target", pods / "vol", images.app)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "symbolic link" in e.value.details()
    assert not MountTable().under(str(pods))
    assert os.listdir(real) == []


def test_a_subpath_bind_of_a_live_publication_survives_a_restart(new_server, tmp_path,
                                                                  images):
    """The kubelet bind-mounts subPath volumes out of the published target; such a bind
    shares the view's superblock (or subvolume) but is not a leftover to unmount at
    start-up."""
    p = new_server().start()
    target, sub = tmp_path / "pod" / "vol", tmp_path / "volume-subpaths" / "c0"
    target.parent.mkdir()
    sub.mkdir(parents=True)
    try:
        for readonly in (False, True):
            p.csi.publish("subpath", target, images.app, readonly=readonly)
            subprocess.run(["mount", "--bind", str(target / "etc"), str(sub)], check=True)
            p.stop()
            p.start()
            assert MountTable().is_mountpoint(str(sub)), "the subPath bind was unmounted"
            assert (sub / "motd").read_text() == "app motd\n"
            subprocess.run(["umount", str(sub)], check=True)
            p.csi.unpublish("subpath", target)
        assert not MountTable().under(str(tmp_path))
    finally:
        p.stop()
        unmount_all_under(str(tmp_path))


def test_a_lost_layer_directory_is_pulled_again_and_restarts_stay_clean(new_server, tmp_path,
                                                                        images):
    """Start-up forgets a layer whose directory vanished, and the images containing it; a
    stage that pinned it is repaired by the next publish (the kubelet stages only once),
    and later restarts do not trip over the forgotten layer."""
    p = new_server().start()
    staging, target = tmp_path / "staging", tmp_path / "pod"
    try:
        p.csi.stage("lost", staging, images.app)
        p.stop()
        layers = os.path.join(p.root, "layers")
        lost = sorted(os.listdir(layers))[0]
        shutil.rmtree(os.path.join(layers, lost))
        p.start()
        p.csi.publish("lost", target, staging=staging)
        assert (target / "etc/motd").read_text() == "app motd\n"
        assert os.path.isdir(os.path.join(layers, lost, "fs")), "pulled again"
        p.stop()
        p.start()  # nothing left that points at a layer which is not there
        st = State(os.path.join(p.root, "state.db"))
        with st.transaction() as tx:
            [stage] = tx.stages()
            assert set(tx.image(stage.manifest_digest).layer_ids) == {
                lid for lid, n in tx.refcounts().items() if n == 2}
        st.close()
        p.csi.unpublish("lost", target)
        p.csi.unstage("lost", staging)
    finally:
        p.stop()
        unmount_all_under(str(tmp_path))


def test_publish_interrupted_before_its_record(new_server, tmp_path, images):
    """A crash between mount(2) and the record leaves a mount nobody knows; the next start
    must clear it so that the kubelet's retry succeeds."""
    p = new_server().start()
    target = tmp_path / "pod"
    try:
        p.csi.publish("interrupted", target, images.app)
        p.stop(signal.SIGKILL)
        st = State(os.path.join(p.root, "state.db"))  # forget the record, as if never written
        with st.transaction() as tx:
            tx.forget_publication(str(target), 0)
        st.close()
        assert MountTable().is_mountpoint(str(target))
        p.start()
        assert not MountTable().is_mountpoint(str(target))
        assert os.listdir(os.path.join(p.root, "volumes")) == []
        p.csi.publish("interrupted", target, images.app)  # the kubelet's retry
        assert (target / "etc/motd").read_text() == "app motd\n"
        p.csi.unpublish("interrupted", target)
    finally:
        p.stop()
        unmount_all_under(str(tmp_path))


def test_layer_shared_at_different_positions(csi, pods, tmp_path):
    layout = str(tmp_path / "layout")
    common = LayerBuilder().file("common", "same bytes\n")
    write_image(layout, "bottom", [common, LayerBuilder().file("top", "x\n")])
    write_image(layout, "top", [LayerBuilder().file("base", "y\n"), common])
    a, b = pods / "a", pods / "b"
    csi.publish("pos-a", a, f"oci:{layout}:bottom")
    csi.publish("pos-b", b, f"oci:{layout}:top")
    try:
        def lowers(t):
            (m,) = MountTable().at(str(t))
            opts = dict(o.split("=", 1) for o in m.super_options.split(",") if "=" in o)
            return opts["lowerdir"].split(":")
        assert lowers(a)[-1] == lowers(b)[0], "one directory, base of one image, top of other"
    finally:
        csi.unpublish("pos-a", a)
        csi.unpublish("pos-b", b)


def test_diff_id_mismatch_is_data_loss_and_leaves_nothing(csi, strata, pods, tmp_path):
    import json

    import grpc

    layout = str(tmp_path / "layout")
    write_image(layout, "lie", [LayerBuilder().file("f", "unique to this test\n")])
    # Rewrite the config so it promises another DiffID, keeping every blob digest valid.
    from csi.image.build import _write_blob

    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    mdesc = index["manifests"][0]
    with open(os.path.join(layout, "blobs/sha256", mdesc["digest"][7:])) as f:
        manifest = json.load(f)
    with open(os.path.join(layout, "blobs/sha256", manifest["config"]["digest"][7:])) as f:
        config = json.load(f)
    config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    manifest["config"]["digest"], manifest["config"]["size"] = _write_blob(
        layout, json.dumps(config).encode())
    mdesc["digest"], mdesc["size"] = _write_blob(layout, json.dumps(manifest).encode())
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    layers_before = set(os.listdir(os.path.join(strata.root, "layers")))
    with pytest.raises(grpc.RpcError) as e:
        csi.publish("lie", pods / "t", f"oci:{layout}:lie")
    assert e.value.code() == grpc.StatusCode.DATA_LOSS
    assert "DiffID" in e.value.details()
    assert set(os.listdir(os.path.join(strata.root, "layers"))) == layers_before
    assert os.listdir(os.path.join(strata.root, "tmp")) == []
    assert not (pods / "t").exists()


def test_references_are_recomputed_after_a_crash(tmp_path, images):
    p = StrataProcess(str(tmp_path)).start()
    try:
        p.csi.publish("refs", tmp_path / "pod", images.app)
        p.stop(signal.SIGKILL)
        st = State(os.path.join(p.root, "state.db"))
        with st.transaction() as tx:  # corrupt the references behind the domain's back:
            good = tx.refcounts()
            tx._c.execute("DELETE FROM refs")  # lost ones would let GC take a mounted layer…
            tx._c.executemany("INSERT INTO refs VALUES (?, 'pub:/no/such/target')",
                              [(lid,) for lid in good])  # …and stale ones pin forever
        st.close()
        p.start()
        st = State(os.path.join(p.root, "state.db"))
        with st.transaction() as tx:
            assert tx.refcounts() == good
            assert {h for _, h in tx.holders()} == {f"pub:{tmp_path / 'pod'}"}
        st.close()
        p.csi.unpublish("refs", tmp_path / "pod")
    finally:
        p.stop()
        unmount_all_under(str(tmp_path))


def test_oci_layout_roots_confine_local_images(tmp_path):
    import grpc

    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    write_image(str(allowed / "ok"), "x", [LayerBuilder().file("f", "ok\n")])
    write_image(str(elsewhere), "x", [LayerBuilder().file("f", "x\n")])
    (allowed / "sneaky").symlink_to(elsewhere)  # inside by name, outside in fact
    p = StrataProcess(str(tmp_path / "p"), extra_args=("--oci-layout-root", str(allowed)))
    os.makedirs(p.base)
    p.start()
    try:
        p.csi.publish("in", tmp_path / "in", f"oci:{allowed}/ok:x")
        assert (tmp_path / "in" / "f").read_text() == "ok\n"
        p.csi.unpublish("in", tmp_path / "in")
        for ref in (f"oci:{elsewhere}:x", f"oci:{allowed}/sneaky:x"):
            with pytest.raises(grpc.RpcError) as e:
                p.csi.publish("out", tmp_path / "out", ref)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "--oci-layout-root" in e.value.details()
            assert not (tmp_path / "out").exists()
    finally:
        p.stop()
        unmount_all_under(str(tmp_path))


def test_start_up_leaves_tmp_alone_while_another_process_uses_the_store(tmp_path):
    """`strata pull` beside a (re)starting server: its half-unpacked layer in tmp/ and the
    layer directory it is about to record are not crash leftovers."""
    p = StrataProcess(str(tmp_path)).start()
    p.stop()
    work = os.path.join(p.root, "tmp", "unpack-abc-123")
    renamed = os.path.join(p.root, "layers", "abc")
    os.makedirs(os.path.join(work, "fs"))
    os.makedirs(os.path.join(renamed, "fs"))
    holder = subprocess.Popen(  # holds the store the way `strata pull` does
        [sys.executable, "-c", "import sys, time\nfrom csi.locks import StoreUsers\n"
         "StoreUsers(sys.argv[1] + '/store.lock').share()\nprint('held', flush=True)\n"
         "time.sleep(60)",
         p.root], stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(
             os.path.dirname(os.path.abspath(__file__)))))
    try:
        assert holder.stdout.readline().strip() == "held"
        p.start()
        assert os.path.isdir(work) and os.path.isdir(renamed)
        assert "another strata process uses" in p.read_log()
        p.stop()
        holder.kill()
        holder.wait()
        p.start()  # alone now: both are leftovers
        assert not os.path.exists(work) and not os.path.exists(renamed)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        p.stop()
        unmount_all_under(str(tmp_path))


def test_a_lost_layer_leaves_the_other_layers_of_live_pods_referenced(new_server, tmp_path,
                                                                      images):
    """The image record goes with its lost layer, but the pod's view still uses the
    image's other layers: GC must not take them."""
    p = new_server("", "--gc-policy", "immediate", "--gc-min-age", "0").start()
    target = tmp_path / "pod"
    try:
        p.csi.publish("v", target, images.app)
        p.stop()
        st = State(os.path.join(p.root, "state.db"))
        with st.transaction() as tx:
            [image] = tx.images()
        st.close()
        base, top = image.layer_ids
        shutil.rmtree(os.path.join(p.root, "layers", top))
        p.start()
        st = State(os.path.join(p.root, "state.db"))
        with st.transaction() as tx:
            assert tx.refcounts() == {base: 1}
        st.close()
        assert os.path.isdir(os.path.join(p.root, "layers", base, "fs"))
        assert MountTable().is_mountpoint(str(target))
        p.csi.unpublish("v", target)
    finally:
        p.stop()
        unmount_all_under(str(tmp_path))


def test_one_layer_views_interrupted_or_not_and_another_store_s(new_server, tmp_path, images):
    """Read-only views of a one-layer image are bind mounts of the layer (btrfs: of its
    chain), all alike: a leftover beside a live view is still unmounted at start-up, and
    another strata with its own root (same layer ID) leaves both alone."""
    p = new_server("one").start()
    other = new_server("two")
    a, b = tmp_path / "podA", tmp_path / "podB"
    try:
        p.csi.publish("a", a, images.base, readonly=True)
        p.csi.publish("b", b, images.base, readonly=True)
        other.start()  # its start-up must not touch the first store's mounts
        assert MountTable().is_mountpoint(str(a)) and MountTable().is_mountpoint(str(b))
        p.stop(signal.SIGKILL)
        st = State(os.path.join(p.root, "state.db"))
        with st.transaction() as tx:
            tx.forget_publication(str(b), 0)  # as if it crashed between mount(2) and record
        st.close()
        p.start()
        assert MountTable().is_mountpoint(str(a))
        assert not MountTable().is_mountpoint(str(b))
        p.csi.publish("b", b, images.base, readonly=True)  # the kubelet's retry
        for vid, t in (("a", a), ("b", b)):
            p.csi.unpublish(vid, t)
    finally:
        other.stop()
        p.stop()
        unmount_all_under(str(tmp_path))
