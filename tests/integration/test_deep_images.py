"""Images deeper than one page of mount options, through the whole node: the volume
manager, the overlay backend, the executor and start-up, with the kernel's `lowerdir+` both
used and (forced) absent, as on Ubuntu 22.04, RHEL 9, Bottlerocket and COS.

The 200-layer image is built once per session. With the fallback, a publication's lowerdirs
are relative (`volumes/KEY/lower/N` links), so only the mount source says whose a read-only
view is: start-up after a crash between mount(2) and its record must still find and clear
it, and leave the other store's and the live publications' mounts alone."""

import dataclasses
import os

import pytest

from csi import compose
from csi.config import Config
from csi.image.build import LayerBuilder, write_image
from csi.mount import features as kernel
from csi.mount.mountinfo import MountTable
from csi.volumes import PublishSpec
from tests.conftest import needs_root, unmount_all_under

pytestmark = needs_root

DEPTH = 200


@pytest.fixture(scope="session")
def deep_image(tmp_path_factory) -> str:
    layout = str(tmp_path_factory.mktemp("deep") / "layout")
    layers = [LayerBuilder().file(f"layer{i:03d}", f"{i}\n").file("top", f"from {i}\n")
              for i in range(DEPTH)]
    write_image(layout, "deep", layers, compression="none")
    return f"oci:{layout}:deep"


@pytest.fixture(params=["lowerdir+", "relative"])
def node(request, tmp_path):
    probed = kernel.probe(str(tmp_path))
    features = probed if request.param == "lowerdir+" else \
        dataclasses.replace(probed, lowerdir_plus=False)
    config = Config(root=str(tmp_path / "store"), node_id="t")
    opened = []

    def start():
        parts = compose.node(config, features=features)
        opened.append(parts)
        return parts

    try:
        yield request.param, start
    finally:
        unmount_all_under(str(tmp_path))
        for parts in opened:
            parts.close()


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def check_view(target: str) -> None:
    assert read(os.path.join(target, "top")) == f"from {DEPTH - 1}\n", "nearest wins"
    for i in (0, 99, DEPTH - 1):
        assert read(os.path.join(target, f"layer{i:03d}")) == f"{i}\n"


def test_deep_images_publish_and_unpublish(node, deep_image, tmp_path):
    mode, start = node
    parts = start()
    rw, ro = str(tmp_path / "rw"), str(tmp_path / "ro")
    parts.volumes.publish(PublishSpec("rw", rw, deep_image, False, 1))
    parts.volumes.publish(PublishSpec("ro", ro, deep_image, True, 1))
    for target in (rw, ro):
        check_view(target)
        (mi,) = MountTable().at(target)
        assert mi.source == f"strata:{parts.paths.root}"
        if mode == "relative":
            assert "lowerdir=199:198:" in mi.super_options
        else:
            assert f"lowerdir+={parts.paths.layers}/" in mi.super_options
    with open(os.path.join(rw, "layer000"), "a") as f:
        f.write("written\n")
    with pytest.raises(OSError):
        os.close(os.open(os.path.join(ro, "new"), os.O_WRONLY | os.O_CREAT))
    parts.volumes.unpublish("rw", rw)
    parts.volumes.unpublish("ro", ro)
    assert not os.path.exists(rw) and not os.path.exists(ro)
    assert os.listdir(parts.paths.volumes) == []


def test_a_deep_view_left_unrecorded_by_a_crash_is_cleared_at_start(node, deep_image,
                                                                   tmp_path):
    _, start = node
    parts = start()
    live, lost = str(tmp_path / "live"), str(tmp_path / "lost")
    parts.volumes.publish(PublishSpec("live", live, deep_image, True, 1))
    parts.volumes.publish(PublishSpec("lost", lost, deep_image, True, 1))
    with parts.state.transaction() as tx:
        tx.forget_publication(lost, 0)  # as if the record had never been written
    parts.close()

    other = compose.node(Config(root=str(tmp_path / "other"), node_id="t"))
    other.close()  # another store's start-up leaves our mounts alone
    assert MountTable().is_mountpoint(live) and MountTable().is_mountpoint(lost)

    parts = start()  # the restart
    assert MountTable().is_mountpoint(live), "a recorded publication stays"
    check_view(live)
    assert not MountTable().is_mountpoint(lost), "the unrecorded view is unmounted"
    with parts.state.read() as tx:
        (pub,) = tx.publications()
    assert os.listdir(parts.paths.volumes) in ([], [pub.key]), "its links are gone"
    parts.volumes.publish(PublishSpec("lost", lost, deep_image, True, 1))  # kubelet retry
    check_view(lost)
    for vid, target in (("live", live), ("lost", lost)):
        parts.volumes.unpublish(vid, target)
    assert os.listdir(parts.paths.volumes) == []
