"""The plugin process: identity, sockets, signals, restarts, metrics."""

import os
import signal
import socket
import time

import pytest

from csi.image.build import LayerBuilder, write_image
from csi.mount.mountinfo import MountTable
from csi.proto import csi_pb2
from tests.conftest import ROOT_REASON, StrataProcess, free_port, scrape, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)


@pytest.fixture
def plugin(tmp_path):
    proc = StrataProcess(str(tmp_path), metrics_port=free_port())
    try:
        yield proc
    finally:
        proc.stop(signal.SIGKILL)
        unmount_all_under(str(tmp_path))


def test_identity(csi):
    info = csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
    assert info.name == "strata.csi.dev" and info.vendor_version
    caps = csi.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), timeout=10)
    assert [c.service.type for c in caps.capabilities] == [
        csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE]
    assert csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value is True
    node = csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
    assert node.node_id == "test-node"


def test_stale_socket_is_replaced_and_sigterm_removes_it(plugin):
    # A socket file left by a crashed run must not stop the next start.
    s = socket.socket(socket.AF_UNIX)
    s.bind(plugin.node_sock)
    s.close()
    plugin.start()
    assert plugin.csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
    assert plugin.stop(signal.SIGTERM) == 0
    assert not os.path.exists(plugin.node_sock)
    assert not os.path.exists(plugin.ctrl_sock)
    assert "stopped" in plugin.read_log()


def test_restart_keeps_publications_and_forgets_lost_mounts(plugin, images, tmp_path):
    plugin.start()
    kept, lost = tmp_path / "kept", tmp_path / "lost"
    plugin.csi.publish("kept", kept, images.app)
    plugin.csi.publish("lost", lost, images.app)
    (kept / "data.txt").write_text("survives a plugin restart")
    plugin.stop(signal.SIGKILL)  # a crash: nothing is cleaned up
    unmount_all_under(str(lost))  # e.g. a node reboot lost this mount
    plugin.start()
    try:
        assert (kept / "data.txt").read_text() == "survives a plugin restart"
        plugin.csi.publish("kept", kept, images.app)  # kubelet retry after restart: OK
        assert len(MountTable().at(str(kept))) == 1
        plugin.csi.unpublish("kept", kept)
        plugin.csi.unpublish("lost", lost)
        assert not kept.exists()
        assert os.listdir(os.path.join(plugin.root, "volumes")) == []
        assert os.listdir(os.path.join(plugin.root, "tmp")) == []
    finally:
        plugin.stop()


def test_metrics_endpoint(plugin, images, tmp_path):
    plugin.start()
    try:
        t = tmp_path / "m"
        plugin.csi.publish("metrics-a", t, images.app)
        plugin.csi.publish("metrics-b", tmp_path / "m2", images.app)
        values = scrape(plugin.metrics_port)
        assert values["strata_layers"] == 2
        assert values["strata_publications"] == 2
        assert values["strata_layer_unpacks_total"] == 2
        assert values["strata_sharing_saved_bytes"] > 0
        assert values["strata_store_logical_bytes"] == 2 * values["strata_store_physical_bytes"]
        assert values['strata_rpc_duration_seconds_count{code="OK",method="NodePublishVolume"}'] \
            == 2
        plugin.csi.unpublish("metrics-a", t)
        plugin.csi.unpublish("metrics-b", tmp_path / "m2")
    finally:
        plugin.stop()


def test_probe_reports_a_broken_store(plugin):
    plugin.start()
    probe = lambda: plugin.csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value  # noqa: E731
    assert probe() is True
    layers = os.path.join(plugin.root, "layers")
    os.rename(layers, layers + ".gone")
    try:
        assert probe() is False
    finally:
        os.rename(layers + ".gone", layers)
    assert probe() is True


def test_page_cache_metrics_count_one_cached_copy_for_every_pod(plugin, tmp_path):
    """Three pods share a layer; one pod reads a 4 MiB file through its overlay. The page
    cache holds the lower file once, and a copy per pod would have held it three times."""
    from csi.store.pagecache import Meter

    layout = str(tmp_path / "layout")
    big = os.urandom(4 << 20)
    write_image(layout, "pc", [LayerBuilder().file("data/big", big)])
    plugin.start()
    pods = [tmp_path / f"pod{i}" for i in range(3)]
    try:
        for i, pod in enumerate(pods):
            plugin.csi.publish(f"pc-{i}", pod, f"oci:{layout}:pc")
        [lid] = os.listdir(os.path.join(plugin.root, "layers"))
        lower = os.path.join(plugin.root, "layers", lid, "fs", "data", "big")
        with open(lower, "rb") as f:  # start cold (unpack wrote it through the cache)
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        on_tmpfs = Meter().file(lower) == len(big)  # tmpfs cannot drop its pages
        assert (pods[0] / "data/big").read_bytes() == big  # read through one overlay
        assert Meter().file(lower) == len(big), "the overlay read cached the lower file"
        deadline = time.monotonic() + 20
        while (m := scrape(plugin.metrics_port))["strata_layer_page_cache_bytes"] < len(big):
            assert time.monotonic() < deadline, "no page-cache sample"
            time.sleep(0.05)
        assert m["strata_layer_page_cache_bytes"] < 2 * len(big) or on_tmpfs
        assert m["strata_page_cache_saved_bytes"] >= 2 * len(big)
        assert m["strata_page_cache_saved_bytes"] == 2 * m["strata_layer_page_cache_bytes"]
        assert m['strata_backend_info{backend="overlay",shared_by="layer",'
                 'shares_page_cache="true"}'] == 1
    finally:
        for i, pod in enumerate(pods):
            plugin.csi.unpublish(f"pc-{i}", pod)


def test_node_and_controller_on_one_socket(tmp_path):
    """What the DaemonSet does: the per-node csi-provisioner needs NodeGetInfo and the
    Controller service on the socket it is given."""
    from tests.conftest import Csi

    proc = StrataProcess(str(tmp_path))
    proc.ctrl_sock = proc.node_sock
    proc.start()
    try:
        csi = Csi(proc.node_sock, proc.node_sock)
        caps = csi.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(),
                                                  timeout=10)
        assert [c.service.type for c in caps.capabilities] == [
            csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE]
        assert csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10).node_id
        rpcs = csi.controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=10).capabilities
        assert [c.rpc.type for c in rpcs] == [
            csi_pb2.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME]
        csi.close()
    finally:
        proc.stop()


def test_a_taken_metrics_port_is_a_clear_error_and_leaves_no_socket(tmp_path):
    """The port is bound only after the sockets are served: a failure there must still say
    which flag, exit 1 without a traceback, and take the sockets down with it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = StrataProcess(str(tmp_path), metrics_port=taken.getsockname()[1]).launch()
        try:
            assert proc.proc.wait(timeout=60) == 1
        finally:
            proc.stop(signal.SIGKILL)
            unmount_all_under(str(tmp_path))
    log = proc.read_log()
    assert "strata serve: --metrics-address 127.0.0.1:" in log and "cannot listen" in log
    assert "Traceback" not in log
    assert not os.path.exists(proc.node_sock) and not os.path.exists(proc.ctrl_sock)
