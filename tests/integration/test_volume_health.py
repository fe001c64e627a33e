"""Volume health through NodeGetVolumeStats' VolumeCondition, with real mounts and a real
`strata serve`: what goes wrong behind the server's back is abnormal, with a message that
names the problem."""

import os
import shutil
import signal
import sqlite3
import subprocess
import time

import pytest

from csi.mount.syscalls import Mounter
from csi.proto import csi_pb2
from csi.store.state import State
from tests.conftest import ROOT_REASON, StrataProcess, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)


@pytest.fixture
def server(tmp_path):
    proc = StrataProcess(str(tmp_path))
    try:
        yield proc.start()
    finally:
        proc.stop(signal.SIGKILL)
        unmount_all_under(str(tmp_path))


def condition(p: StrataProcess, volume_id: str, path) -> csi_pb2.VolumeCondition:
    return p.csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume_id, volume_path=str(path)), timeout=10).volume_condition


def layers_of(p: StrataProcess, target) -> tuple[str, list[str]]:
    """(the publication's key, its image's layer directories, base first)."""
    st = State(os.path.join(p.root, "state.db"), migrate=False)
    try:
        with st.read() as tx:
            pub = tx.publication(str(target))
            ids = tx.image(pub.manifest_digest).layer_ids
    finally:
        st.close()
    return pub.key, [os.path.join(p.root, "layers", lid) for lid in ids]


def test_a_mount_lost_behind_the_server_s_back(server, images, tmp_path):
    target = tmp_path / "pod"
    server.csi.publish("lost-mount", target, images.app)
    assert not condition(server, "lost-mount", target).abnormal
    Mounter().unmount(str(target))
    c = condition(server, "lost-mount", target)
    assert c.abnormal
    assert c.message.startswith(f"{target} is not mounted any more")
    server.csi.unpublish("lost-mount", target)
    assert os.listdir(os.path.join(server.root, "volumes")) == []


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_a_layer_directory_gone_behind_the_server_s_back(server, images, tmp_path, how):
    target, staging = tmp_path / "pod", tmp_path / "staging"
    server.csi.publish("layer-gone", target, images.app)
    server.csi.stage("layer-gone-pv", staging, images.app)
    _, [base, top] = layers_of(server, target)
    moved = top + ".moved"
    if how == "removed":
        shutil.rmtree(top)
    else:
        os.rename(top, moved)
    for volume_id, path in (("layer-gone", target), ("layer-gone-pv", staging)):
        c = condition(server, volume_id, path)
        assert c.abnormal, path
        assert f"1 of 2 layers of image {images.app} is missing: " \
               f"{os.path.basename(top)} ({top}/fs)" in c.message
        assert os.path.basename(base) not in c.message
    if how == "renamed":
        os.rename(moved, top)
        assert condition(server, "layer-gone", target).message == "mounted"
        assert condition(server, "layer-gone-pv", staging).message == "staged"
    server.csi.unpublish("layer-gone", target)
    server.csi.unstage("layer-gone-pv", staging)


def test_a_layer_directory_replaced_by_a_copy(server, images, tmp_path):
    """A copy has every file, but it is not what strata unpacked and verified: its top
    directory changed after the layer's record."""
    target = tmp_path / "pod"
    server.csi.publish("layer-copied", target, images.app)
    _, [_, top] = layers_of(server, target)
    assert not condition(server, "layer-copied", target).abnormal
    db = sqlite3.connect(os.path.join(server.root, "state.db"))
    [(recorded,)] = db.execute("SELECT created FROM layers WHERE id=?",
                               (os.path.basename(top),)).fetchall()
    db.close()
    while time.time() < recorded + 0.05:  # a copy made later than the record, surely
        time.sleep(0.01)
    subprocess.run(["cp", "-a", top + "/fs", top + "/fs.copy"], check=True)  # whiteouts too
    shutil.rmtree(top + "/fs")
    os.rename(top + "/fs.copy", top + "/fs")
    c = condition(server, "layer-copied", target)
    assert c.abnormal
    assert f"layer {os.path.basename(top)} of image {images.app} was changed after it was " \
           f"unpacked ({top}/fs changed" in c.message
    server.csi.unpublish("layer-copied", target)


def test_a_writable_layer_deleted_behind_the_server_s_back(server, images, tmp_path):
    target = tmp_path / "pod"
    server.csi.publish("upper-gone", target, images.app)
    key, _ = layers_of(server, target)
    shutil.rmtree(os.path.join(server.root, "volumes", key, "upper"))
    c = condition(server, "upper-gone", target)
    assert c.abnormal
    assert f"the writable layer {server.root}/volumes/{key} is gone" in c.message
    server.csi.unpublish("upper-gone", target)


def test_a_read_only_view_is_healthy(server, images, tmp_path):
    for image, name in ((images.app, "ro-overlay"), (images.base, "ro-bind")):
        target = tmp_path / name
        server.csi.publish(name, target, image, readonly=True)
        assert condition(server, name, target).message == "mounted"
        server.csi.unpublish(name, target)


def test_a_relabelled_layer_is_still_healthy(server, images, tmp_path):
    """An SELinux relabel, an xattr or a chmod of a layer's directory changes its ctime, not
    a byte the pod reads: no alarm."""
    target = tmp_path / "pod"
    server.csi.publish("layer-relabelled", target, images.app)
    try:
        _, layers = layers_of(server, target)
        time.sleep(0.05)
        for layer in layers:
            os.setxattr(layer + "/fs", "user.backup", b"1")
            os.chmod(layer + "/fs", os.stat(layer + "/fs").st_mode & 0o7777)
        c = condition(server, "layer-relabelled", target)
        assert not c.abnormal, c.message
    finally:
        server.csi.unpublish("layer-relabelled", target)
