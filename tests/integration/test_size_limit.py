"""`sizeLimit` by the loop mechanism, through the real server and gRPC: each limited
publication's upper lives on a sparse ext4 image of the limit's size (csi/backend/loopfs.py).

The store sits on a filesystem of its own (an ext4 image, `store_fs`), so that what the
store grows by is measured without the machine's other writers. Figures the tests measure
(the byte where a write fails, against the limit) are printed; run with -s to see them.

"Nothing left" means: no loop device whose backing file is in the store, no mount under the
store, nothing in volumes/ (`leftovers`)."""

import errno
import hashlib
import os
import random
import signal
import threading
import time

import grpc
import pytest

from csi.backend.loopfs import MOUNT_OPTIONS, mkfs
from csi.image.build import LayerBuilder, write_image
from csi.mount.loop import LoopControl
from csi.mount.mountinfo import MountTable
from csi.mount.spec import Mount
from csi.mount.syscalls import Mounter
from csi.proto import csi_pb2
from tests.conftest import ROOT_REASON, StrataProcess, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

KiB, MiB = 1 << 10, 1 << 20
LIMIT = 32 * MiB
# A pod may write at least this share of its limit: the rest is the filesystem's overhead
# (inode tables, 1.6%, and ext4's reserve for delayed allocation, 2% up to 16 MiB).
TOLERANCE = 0.90
CHUNK = 64 * KiB


def make_store_fs(base: str, size: int) -> str:
    """An ext4 filesystem of `size` bytes mounted at BASE/fs (itself a loop image): the
    store's own disk. Taken down by unmount_all_under(base)."""
    img, mnt = os.path.join(base, "store-fs.img"), os.path.join(base, "fs")
    os.makedirs(mnt)
    with open(img, "wb") as f:
        f.truncate(size)
    mkfs(img)
    with LoopControl().attach(img) as held:
        Mounter().mount(Mount("ext4", held.device, mnt, MOUNT_OPTIONS))
    return mnt


def leftovers(root: str) -> list[str]:
    root = os.path.realpath(root)
    loops = [f"{d.device} backed by {d.backing_file}" for d in LoopControl().attached()
             if d.backing_file.startswith(root + os.sep)]
    mounts = [f"mount {m.mount_point}" for m in MountTable().under(root)]
    files = [f"volumes/{n}" for n in os.listdir(os.path.join(root, "volumes"))]
    return loops + mounts + files


def used_bytes(path: str) -> int:
    fs = os.statvfs(path)
    return (fs.f_blocks - fs.f_bfree) * fs.f_frsize


def fill(path: str) -> tuple[int, int]:
    """Write to `path` until the filesystem refuses: (bytes written and kept, errno)."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        chunk = random.Random(1).randbytes(CHUNK)  # incompressible, not that ext4 cares
        while True:
            try:
                n = os.write(fd, chunk)
            except OSError as e:
                return written, e.errno
            written += n
            if n < len(chunk):  # a short write: the next one says why
                continue
    finally:
        try:
            os.fsync(fd)
        except OSError:
            pass
        os.close(fd)


def stats(csi, volume_id: str, target) -> dict[str, tuple[int, int, int]]:
    r = csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume_id, volume_path=str(target)), timeout=30)
    unit = csi_pb2.VolumeUsage.Unit
    return {unit.Name(u.unit): (u.total, u.used, u.available) for u in r.usage}


def tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(f"{p} {st.st_mode} {st.st_size} {st.st_mtime_ns}".encode())
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(tmp_path_factory, images):
    """A server whose store is on a 256 MiB ext4 filesystem of its own."""
    base = str(tmp_path_factory.mktemp("limited"))
    fs = make_store_fs(base, 256 * MiB)
    proc = StrataProcess(base, root=os.path.join(fs, "store"))
    try:
        proc.start()
        # Layers on the node first: what the store grows by later is the publications'.
        proc.csi.publish("warm", os.path.join(base, "warm"), images.app)
        proc.csi.unpublish("warm", os.path.join(base, "warm"))
        yield proc
    finally:
        proc.stop()
        unmount_all_under(base)


@pytest.fixture
def server(tmp_path):
    """A server of the test's own, for tests that kill it."""
    proc = StrataProcess(str(tmp_path))
    try:
        yield proc
    finally:
        proc.stop()
        unmount_all_under(str(tmp_path))


@pytest.fixture(scope="module")
def big_file_image(tmp_path_factory) -> str:
    """A layer holding a 4 MiB file, bigger than a 2 MiB limit."""
    layout = str(tmp_path_factory.mktemp("bigfile"))
    body = random.Random(4).randbytes(4 * MiB)
    write_image(layout, "big", [LayerBuilder().dir("data").file("data/big", body)
                                .file("data/small", "small\n")])
    return f"oci:{layout}:big"


# -- the limit ------------------------------------------------------------------------------
def test_a_write_past_the_limit_fails_with_enospc_near_the_limit(limited, pods, images):
    csi, root = limited.csi, limited.root
    before = used_bytes(root)
    t = pods / "pod"
    csi.publish("lim-fill", t, images.app, sizeLimit="32Mi")
    try:
        written, err = fill(str(t / "fill"))
        print(f"\nsizeLimit {LIMIT} bytes: the write failed after {written} bytes "
              f"({written / LIMIT:.1%} of the limit)")
        assert err == errno.ENOSPC
        assert TOLERANCE * LIMIT <= written < LIMIT
        grown = used_bytes(root) - before
        print(f"the store's filesystem grew by {grown} bytes ({grown / LIMIT:.1%} of the limit)")
        assert grown <= LIMIT
        # The pod's image content is still there, and smaller writes fit nowhere either.
        assert (t / "etc/motd").read_text() == "app motd\n"
        with pytest.raises(OSError) as e:
            (t / "more").write_bytes(os.urandom(256 * KiB))
        assert e.value.errno == errno.ENOSPC
        # What is left, NodeGetVolumeStats says: total is the limit, available nearly none.
        total, used, available = stats(csi, "lim-fill", t)["BYTES"]
        assert total == LIMIT and available < 1 * MiB and used >= written
    finally:
        csi.unpublish("lim-fill", t)
    assert leftovers(root) == []
    assert used_bytes(root) - before < 1 * MiB, "the image's blocks went back to the store"


def test_a_second_pod_on_the_same_image_writes_freely(limited, pods, images):
    csi, root = limited.csi, limited.root
    layers = os.path.join(root, "layers")
    before = tree_digest(layers)
    full, free = pods / "full", pods / "free"
    csi.publish("lim-full", full, images.app, sizeLimit="8Mi")
    csi.publish("lim-free", free, images.app)
    try:
        assert fill(str(full / "fill"))[1] == errno.ENOSPC
        body = os.urandom(16 * MiB)  # twice the first pod's limit
        (free / "blob").write_bytes(body)
        (free / "etc/motd").write_text("changed by the second pod\n")
        assert (free / "blob").read_bytes() == body
        assert (full / "etc/motd").read_text() == "app motd\n"
        assert not (full / "blob").exists() and not (free / "fill").exists()
        assert stats(csi, "lim-free", free)["BYTES"][0] > 8 * MiB  # the store's room
    finally:
        csi.unpublish("lim-full", full)
        csi.unpublish("lim-free", free)
    assert tree_digest(layers) == before, "no layer changed"
    assert leftovers(root) == []


def test_running_out_of_inodes_is_enospc(limited, pods, images):
    csi = limited.csi
    t = pods / "pod"
    csi.publish("lim-inodes", t, images.app, sizeLimit="4Mi")
    try:
        inodes_total, _, inodes_free = stats(csi, "lim-inodes", t)["INODES"]
        assert inodes_total == 4 * MiB // 16384  # one inode per 16 KiB of limit
        made, err = 0, 0
        os.mkdir(t / "many")
        while True:
            try:
                os.close(os.open(t / "many" / str(made), os.O_CREAT | os.O_WRONLY, 0o644))
            except OSError as e:
                err = e.errno
                break
            made += 1
        print(f"\n{inodes_total} inodes: {made} empty files made before {errno.errorcode[err]}")
        assert err in (errno.ENOSPC, errno.EDQUOT)
        assert inodes_free - 2 <= made <= inodes_free  # the `many` directory took one
        assert stats(csi, "lim-inodes", t)["INODES"][2] == 0
    finally:
        csi.unpublish("lim-inodes", t)
    assert leftovers(limited.root) == []


def test_copy_up_of_a_file_bigger_than_the_limit_fails_and_the_layer_stays(
        limited, pods, big_file_image):
    csi, root = limited.csi, limited.root
    t = pods / "pod"
    csi.publish("lim-copyup", t, big_file_image, sizeLimit="2Mi")
    try:
        layers = os.path.join(root, "layers")
        before = tree_digest(layers)
        original = (t / "data/big").read_bytes()
        with pytest.raises(OSError) as e:
            with open(t / "data/big", "r+b") as f:  # copy-up happens at open for writing
                f.write(b"x")
        assert e.value.errno == errno.ENOSPC
        assert (t / "data/big").read_bytes() == original
        with open(t / "data/small", "a") as f:  # a small file still copies up
            f.write("appended\n")
        assert (t / "data/small").read_text() == "small\nappended\n"
        assert tree_digest(layers) == before
    finally:
        csi.unpublish("lim-copyup", t)
    assert leftovers(root) == []


def test_stats_report_the_limit_as_total(limited, pods, images):
    csi = limited.csi
    t = pods / "pod"
    csi.publish("lim-stats", t, images.app, sizeLimit="16Mi")
    try:
        total, used, available = stats(csi, "lim-stats", t)["BYTES"]
        assert total == 16 * MiB
        assert 0.9 * total <= available < total
        (t / "blob").write_bytes(os.urandom(4 * MiB))
        os.sync()
        total2, used2, available2 = stats(csi, "lim-stats", t)["BYTES"]
        assert total2 == total
        assert 4 * MiB <= used2 - used <= 4 * MiB + 64 * KiB
        assert 4 * MiB <= available - available2 <= 4 * MiB + 64 * KiB
    finally:
        csi.unpublish("lim-stats", t)


def test_a_read_only_publication_has_no_limit_to_enforce(limited, pods, images):
    csi = limited.csi
    t = pods / "pod"
    csi.publish("lim-ro", t, images.app, readonly=True, sizeLimit="16Mi")
    try:
        assert (t / "etc/motd").read_text() == "app motd\n"
        assert [x for x in leftovers(limited.root) if "backed by" in x] == []
    finally:
        csi.unpublish("lim-ro", t)
    assert leftovers(limited.root) == []


def test_the_default_size_limit_bounds_volumes_that_name_none(tmp_path, images):
    p = StrataProcess(str(tmp_path), extra_args=("--default-size-limit", "8Mi"))
    try:
        p.start()
        own, default = tmp_path / "own", tmp_path / "default"
        p.csi.publish("lim-own", own, images.app, sizeLimit="16Mi")
        p.csi.publish("lim-default", default, images.app)
        assert stats(p.csi, "lim-own", own)["BYTES"][0] == 16 * MiB
        assert stats(p.csi, "lim-default", default)["BYTES"][0] == 8 * MiB
        assert fill(str(default / "fill"))[1] == errno.ENOSPC
        p.csi.unpublish("lim-own", own)
        p.csi.unpublish("lim-default", default)
        assert leftovers(p.root) == []
    finally:
        p.stop()
        unmount_all_under(str(tmp_path))


def test_repeats_naming_no_limit_match_whatever_default_the_publication_got(tmp_path, images):
    """A kubelet repeats NodePublish (after its own restart, say) with the same request.
    Published under one --default-size-limit (or none), the repeat answers OK under another;
    a repeat naming a different sizeLimit is still ALREADY_EXISTS."""
    t = tmp_path / "pod"
    p = StrataProcess(str(tmp_path))
    try:
        p.start()
        p.csi.publish("lim-repeat", t, images.app)
        p.stop()
        p = StrataProcess(str(tmp_path), extra_args=("--default-size-limit", "8Mi"))
        p.start()
        p.csi.publish("lim-repeat", t, images.app)  # OK: nothing changes
        assert stats(p.csi, "lim-repeat", t)["BYTES"][0] != 8 * MiB, "still unbounded"
        with pytest.raises(grpc.RpcError) as e:
            p.csi.publish("lim-repeat", t, images.app, sizeLimit="16Mi")
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        p.csi.unpublish("lim-repeat", t)
        assert leftovers(p.root) == []
    finally:
        p.stop()
        unmount_all_under(str(tmp_path))


# -- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["-1", "10Qi", "lots", "512", "2Ei"])
def test_bad_size_limits_are_invalid_argument(limited, pods, images, value):
    with pytest.raises(grpc.RpcError) as e:
        limited.csi.publish("lim-bad", pods / "pod", images.app, sizeLimit=value)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "sizeLimit" in e.value.details()
    assert not (pods / "pod").exists()
    assert leftovers(limited.root) == []


def test_a_limit_larger_than_the_store_s_free_space_is_resource_exhausted(
        limited, pods, images):
    with pytest.raises(grpc.RpcError) as e:
        limited.csi.publish("lim-huge", pods / "pod", images.app, sizeLimit="1Gi")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "sizeLimit 1Gi" in e.value.details() and "free" in e.value.details()
    assert not (pods / "pod").exists()
    assert leftovers(limited.root) == []


def test_a_publish_failing_after_its_filesystem_is_mounted_leaves_nothing(
        limited, pods, images):
    """The target's parent is missing: refused once the limited upper was made."""
    with pytest.raises(grpc.RpcError) as e:
        limited.csi.publish("lim-noparent", pods / "absent" / "pod", images.app,
                            sizeLimit="8Mi")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    assert leftovers(limited.root) == []


MKFS = {
    "missing": None,
    "failing": "#!/bin/sh\necho 'mkfs.ext4: something went wrong' >&2\nexit 1\n",
    "making nothing": "#!/bin/sh\nexit 0\n",  # attach works, the mount of zeros fails
}


@pytest.mark.parametrize("mkfs_kind", MKFS)
def test_a_prepare_failing_at_each_step_of_its_filesystem_leaves_nothing(tmp_path, mkfs_kind):
    """The backend alone, with an mkfs.ext4 that is missing, fails, or makes nothing (so
    that attaching works and mounting fails): a clear error, and nothing left behind."""
    from csi.backend.loopfs import LoopBound, Templates
    from csi.backend.overlay import OverlayBackend
    from csi.errors import FailedPrecondition
    from csi.paths import StorePaths

    paths = StorePaths(str(tmp_path / "store")).make()
    os.makedirs(paths.layer_fs("0000000000000001"))
    mkfs_path = str(tmp_path / "mkfs")
    if MKFS[mkfs_kind] is not None:
        with open(mkfs_path, "w") as f:
            f.write(MKFS[mkfs_kind])
        os.chmod(mkfs_path, 0o755)
    mounter = Mounter()
    backend = OverlayBackend(paths, bound=LoopBound(paths, mounter, templates=Templates(mkfs_path)))
    try:
        with pytest.raises((OSError, FailedPrecondition)) as e:
            backend.prepare("k", ["0000000000000001"], str(tmp_path / "t"), size_limit=8 * MiB)
        print(f"\n{mkfs_kind}: {type(e.value).__name__}: {e.value}")
        if mkfs_kind == "missing":
            assert isinstance(e.value, FailedPrecondition) and "e2fsprogs" in str(e.value)
        elif mkfs_kind == "failing":
            assert "something went wrong" in str(e.value)
        else:
            assert "mount ext4" in str(e.value)
        assert leftovers(paths.root) == []
    finally:
        unmount_all_under(str(tmp_path))


# -- crashes --------------------------------------------------------------------------------
def test_a_kill_leaves_a_live_limited_publication_working(server, tmp_path, images):
    p = server.start()
    t = tmp_path / "pod"
    p.csi.publish("lim-live", t, images.app, sizeLimit="8Mi")
    (t / "kept").write_text("written before the kill\n")
    p.stop(signal.SIGKILL)
    p.start()
    assert (t / "kept").read_text() == "written before the kill\n"
    assert stats(p.csi, "lim-live", t)["BYTES"][0] == 8 * MiB
    assert fill(str(t / "fill"))[1] == errno.ENOSPC, "still bounded"
    p.csi.unpublish("lim-live", t)
    assert leftovers(p.root) == []


def test_a_publication_unrecorded_at_the_kill_is_cleared_at_start(server, tmp_path, images):
    """A crash between mounting and recording: the overlay, the key's filesystem and its
    loop device all go at the next start, and the kubelet's retry succeeds."""
    from csi.store.state import State

    p = server.start()
    t = tmp_path / "pod"
    p.csi.publish("lim-unrec", t, images.app, sizeLimit="8Mi")
    p.stop(signal.SIGKILL)
    st = State(os.path.join(p.root, "state.db"))
    with st.transaction() as tx:
        tx.forget_publication(str(t), 0)
    st.close()
    assert leftovers(p.root) != []
    p.start()
    assert leftovers(p.root) == []
    assert not MountTable().is_mountpoint(str(t))
    p.csi.publish("lim-unrec", t, images.app, sizeLimit="8Mi")
    p.csi.unpublish("lim-unrec", t)
    assert leftovers(p.root) == []


def test_after_a_reboot_lost_publications_and_their_images_go(server, tmp_path, images):
    """state.db kept, every mount gone (and with them the loop devices)."""
    p = server.start()
    t = tmp_path / "pod"
    p.csi.publish("lim-reboot", t, images.app, sizeLimit="8Mi")
    p.stop(signal.SIGKILL)
    unmount_all_under(str(tmp_path))  # the reboot: the pod's overlay and the key's fs
    assert [x for x in leftovers(p.root) if "loop" in x] == []
    assert any(x.startswith("volumes/") for x in leftovers(p.root))
    p.start()
    assert leftovers(p.root) == []
    p.csi.publish("lim-reboot", t, images.app, sizeLimit="8Mi")  # the kubelet's retry
    assert (t / "etc/motd").read_text() == "app motd\n"
    p.csi.unpublish("lim-reboot", t)
    assert leftovers(p.root) == []


def test_a_stray_loop_device_on_a_store_image_is_detached_at_start(server, tmp_path, images):
    """A device attached to an image of the store that no publication owns (here attached
    without autoclear, as an older or foreign tool might) is detached; a live one stays."""
    p = server.start()
    live = tmp_path / "live"
    p.csi.publish("lim-stray", live, images.app, sizeLimit="8Mi")
    stray = os.path.join(p.root, "volumes", "0123456789abcdef")
    os.mkdir(stray)
    image = os.path.join(stray, "fs.img")
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    with LoopControl().attach(image, autoclear=False) as held:
        pass
    p.stop(signal.SIGKILL)
    p.start()
    left = leftovers(p.root)
    assert not any(held.device + " " in x for x in left), left
    assert "volumes/0123456789abcdef" not in left
    assert (live / "etc/motd").read_text() == "app motd\n"
    assert stats(p.csi, "lim-stray", live)["BYTES"][0] == 8 * MiB
    p.csi.unpublish("lim-stray", live)
    assert leftovers(p.root) == []


def test_a_live_key_s_filesystem_lost_from_the_namespace_is_mounted_again(
        server, tmp_path, images):
    """A plugin container replaced by a new one loses its mount of the key's filesystem
    (a new mount namespace) while the pod's overlay keeps the filesystem alive; the start
    mounts the same device again, so stats and unpublish find the upper where it is."""
    p = server.start()
    t = tmp_path / "pod"
    p.csi.publish("lim-ns", t, images.app, sizeLimit="8Mi")
    (t / "kept").write_text("kept\n")
    p.stop(signal.SIGKILL)
    [fs] = [m.mount_point for m in MountTable().under(p.root)]
    Mounter().unmount(fs)  # what the old namespace's end does to it
    assert not MountTable().is_mountpoint(fs)
    p.start()
    assert MountTable().is_mountpoint(fs)
    with open(os.path.join(fs, "upper", "kept")) as f:
        assert f.read() == "kept\n"
    assert stats(p.csi, "lim-ns", t)["BYTES"][0] == 8 * MiB
    p.csi.unpublish("lim-ns", t)
    assert leftovers(p.root) == []


@pytest.mark.parametrize("delay_ms", [0, 8, 14, 20])
def test_a_kill_at_any_step_of_a_limited_publish_leaves_nothing(
        server, tmp_path, images, delay_ms):
    """kill -9 at a moment of a limited publish (counted from the key's directory showing
    up: then the image is made, mkfs runs for some 10 ms in a new process, the device is
    attached, the filesystem and the view mounted, the publication recorded), restart,
    retry as the kubelet does, unpublish: nothing left, whichever step the kill hit."""
    kill_during_a_limited_publish(server.start(), tmp_path, images, delay_ms)


def kill_during_a_limited_publish(p, tmp_path, images, delay_ms: int) -> None:
    """kill -9 `p` `delay_ms` after a limited publish's key shows up, restart it, retry as
    the kubelet does, unpublish: nothing left (the backends' kill loops share it)."""
    t = tmp_path / "pod"
    p.csi.publish("warm", tmp_path / "warm", images.app)  # layers (and a btrfs chain) in
    p.csi.unpublish("warm", tmp_path / "warm")            # place: the kill lands in the limit
    volumes = os.path.join(p.root, "volumes")
    done = threading.Event()

    def publish():
        try:
            p.csi.publish("lim-kill", t, images.app, sizeLimit="8Mi")
        except grpc.RpcError:
            pass
        finally:
            done.set()

    threading.Thread(target=publish, daemon=True).start()
    deadline = time.monotonic() + 30
    while not os.listdir(volumes) and not done.is_set():
        assert time.monotonic() < deadline, "the publish never started"
    time.sleep(delay_ms / 1000)
    p.proc.kill()
    p.stop()
    done.wait(30)
    print(f"\nkilled {delay_ms} ms in: {leftovers(p.root)}")
    p.start()
    assert [x for x in leftovers(p.root) if "backed by" in x or x.startswith("mount")] == [] \
        or MountTable().is_mountpoint(str(t)), "only a recorded publication keeps its parts"
    p.csi.publish("lim-kill", t, images.app, sizeLimit="8Mi")  # the kubelet's retry
    assert (t / "etc/motd").read_text() == "app motd\n"
    assert stats(p.csi, "lim-kill", t)["BYTES"][0] == 8 * MiB
    p.csi.unpublish("lim-kill", t)
    assert leftovers(p.root) == []
