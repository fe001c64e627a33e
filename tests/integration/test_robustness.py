"""Edge cases a node meets in practice: deep images, symlinked paths, repeated layers,
interrupted publishes."""

import os
import signal

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


@pytest.mark.parametrize("readonly", [False, True])
def test_128_layer_image(csi, pods, deep_image, readonly):
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


def test_target_behind_a_symlink(csi, pods, images):
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


def test_image_listing_a_layer_twice(csi, pods, tmp_path):
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


def test_publish_interrupted_before_its_record(tmp_path, images):
    """A crash between mount(2) and the record leaves a mount nobody knows; the next start
    must clear it so that the kubelet's retry succeeds."""
    p = StrataProcess(str(tmp_path)).start()
    target = tmp_path / "pod"
    try:
        p.csi.publish("interrupted", target, images.app)
        p.stop(signal.SIGKILL)
        st = State(os.path.join(p.root, "state.db"))  # forget the record, as if never written
        with st.transaction() as tx:
            tx.delete_publication(str(target))
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
