"""Writable publications are `volatile` overlays where the kernel takes the option (5.10+):
their uppers are discarded at unpublish and never mounted again, so overlay's syncs buy
nothing. The mark the kernel leaves in the work dir (`work/incompat/volatile`, which makes
it refuse to mount that upper again) must not stop removal, a restart, or a new publish on
the same target."""

import os
import signal

import pytest

from csi.mount.features import probe
from csi.mount.mountinfo import MountTable
from tests.conftest import ROOT_REASON, StrataProcess, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)


def super_options(target) -> list[str]:
    (m,) = MountTable().at(str(target))
    return m.super_options.split(",")


def volatile(target) -> bool:
    # 5.10 shows the option as asked; newer kernels as their fsync= mode (6.18: fsync=volatile)
    return bool({"volatile", "fsync=volatile"} & set(super_options(target)))


def option(target, key: str) -> str:
    return next(o.split("=", 1)[1] for o in super_options(target) if o.startswith(key + "="))


@pytest.fixture(scope="module")
def volatile_kernel(tmp_path_factory):
    if not probe(str(tmp_path_factory.mktemp("probe"))).volatile:
        pytest.skip("this kernel's overlayfs refuses `volatile` (Linux < 5.10)")


def test_a_writable_publication_is_volatile_and_its_state_goes(volatile_kernel, csi, pods,
                                                               images):
    target, view = pods / "pod", pods / "view"
    csi.publish("vol-rw", target, images.app)
    csi.publish("vol-ro", view, images.app, readonly=True)
    try:
        assert volatile(target)
        assert not volatile(view)  # no upper: nothing to sync
        work = option(target, "workdir")
        assert os.path.isdir(os.path.join(work, "work", "incompat", "volatile"))
        with open(target / "written", "wb") as f:  # a pod's fsync: answered, not flushed
            f.write(b"x" * 4096)
            os.fsync(f.fileno())
        assert (target / "written").read_bytes() == b"x" * 4096
    finally:
        csi.unpublish("vol-rw", target)
        csi.unpublish("vol-ro", view)
    assert not os.path.exists(os.path.dirname(work)), "the volatile upper's state must go"
    assert not MountTable().under(str(pods))


def test_a_volatile_upper_is_discarded_after_an_unclean_stop(volatile_kernel, tmp_path,
                                                             images):
    proc = StrataProcess(str(tmp_path)).start()
    target = tmp_path / "pod"
    try:
        proc.csi.publish("vol-crash", target, images.app)
        (target / "written").write_text("lost with the mount\n")
        volume = os.path.dirname(option(target, "upperdir"))
        proc.stop(signal.SIGKILL)
        unmount_all_under(str(target))  # a node reboot: the mount is gone, the dirs stay
        assert os.path.isdir(os.path.join(volume, "work", "work", "incompat", "volatile"))
        proc.start()
        volumes = os.path.join(proc.root, "volumes")
        assert os.listdir(volumes) == [], "start-up removes the lost publication's state"
        proc.csi.publish("vol-crash", target, images.app)  # the kubelet's retry
        assert not (target / "written").exists(), "a fresh upper, never the old one"
        assert volatile(target)
        assert [os.path.join(volumes, k) for k in os.listdir(volumes)] != [volume]
        proc.csi.unpublish("vol-crash", target)
        assert os.listdir(volumes) == []
    finally:
        proc.stop()
        unmount_all_under(str(tmp_path))
