"""A full disk during unpack: RESOURCE_EXHAUSTED, tmp/ cleaned, earlier layers intact."""

import os
import random
import signal
import subprocess

import grpc
import pytest

from csi.image.build import LayerBuilder, write_image
from tests.conftest import ROOT_REASON, StrataProcess, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)


@pytest.fixture
def small_store(tmp_path):
    """An 8 MiB tmpfs as the store root."""
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "strata-test", str(root)],
                   check=True)
    try:
        yield str(root)
    finally:
        unmount_all_under(str(tmp_path))


def test_enospc_during_unpack(small_store, tmp_path):
    layout = str(tmp_path / "layout")
    base = LayerBuilder().dir("etc").file("etc/motd", "small base\n")
    write_image(layout, "small", [base])
    rng = random.Random(1)
    big = LayerBuilder().file("big1", rng.randbytes(6 << 20)).file("big2", rng.randbytes(6 << 20))
    write_image(layout, "big", [base, big])
    p = StrataProcess(str(tmp_path / "run"), root=os.path.join(small_store, "store"))
    os.makedirs(p.base)
    p.start()
    try:
        p.csi.publish("small", tmp_path / "small-pod", f"oci:{layout}:small")
        with pytest.raises(grpc.RpcError) as e:
            p.csi.publish("big", tmp_path / "big-pod", f"oci:{layout}:big")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert "no space" in e.value.details()
        assert os.listdir(os.path.join(p.root, "tmp")) == []
        assert not (tmp_path / "big-pod").exists()
        assert len(os.listdir(os.path.join(p.root, "layers"))) == 1
        assert (tmp_path / "small-pod/etc/motd").read_text() == "small base\n"
        p.csi.unpublish("small", tmp_path / "small-pod")
        # Once space is back, the same request succeeds: nothing half-done stood in the way.
        p.csi.publish("small2", tmp_path / "small-pod2", f"oci:{layout}:small")
        p.csi.unpublish("small2", tmp_path / "small-pod2")
    finally:
        p.stop(signal.SIGTERM)
