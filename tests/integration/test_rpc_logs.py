"""The log of a real `strata serve --log-format=json`: one JSON object per line, exactly one
line per RPC carrying what the RPC was about, pull progress, and no secret anywhere (the
server runs at DEBUG, so the redacted payloads are in the log too)."""

import json

import pytest

from csi.proto import csi_pb2
from tests.conftest import ROOT_REASON, StrataProcess, mount_cap, unmount_all_under

SECRET = "hunter2-very-secret"
POD = {"csi.storage.k8s.io/pod.namespace": "team", "csi.storage.k8s.io/pod.name": "web-0",
       "csi.storage.k8s.io/pod.uid": "0f9e", "csi.storage.k8s.io/ephemeral": "true"}


@pytest.fixture
def server(tmp_path):
    import os

    if os.geteuid() != 0:
        pytest.skip(ROOT_REASON)
    proc = StrataProcess(str(tmp_path), extra_args=("--log-format", "json"))
    try:
        yield proc.start()
    finally:
        proc.stop()
        unmount_all_under(str(tmp_path))


def test_one_json_line_per_rpc_with_pod_and_no_secret(server, images, pods):
    target = pods / "web-0"
    node = server.csi.node
    node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id="vol-logs", target_path=str(target), volume_capability=mount_cap(),
        volume_context={"image": images.app, **POD},
        secrets={"password": SECRET, ".dockerconfigjson": SECRET}), timeout=60)
    node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="vol-logs", target_path=str(target)), timeout=60)
    assert server.stop() == 0
    text = server.read_log()

    assert SECRET not in text
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one object
    for obj in lines:
        assert list(obj)[:4] == ["ts", "level", "logger", "msg"], obj

    rpcs = [o for o in lines if o["logger"] == "csi.rpc"]
    assert [o["method"] for o in rpcs] == ["NodePublishVolume", "NodeUnpublishVolume"]
    publish, unpublish = rpcs
    assert publish["level"] == unpublish["level"] == "INFO"
    assert {k: publish[k] for k in ("volume_id", "target", "pod", "image", "code")} == {
        "volume_id": "vol-logs", "target": str(target), "pod": "team/web-0",
        "image": images.app, "code": "OK"}
    assert {k: unpublish[k] for k in ("volume_id", "target", "code")} == {
        "volume_id": "vol-logs", "target": str(target), "code": "OK"}
    assert "pod" not in unpublish  # the kubelet sends no volume_context at unpublish
    for o in rpcs:
        assert isinstance(o["duration_seconds"], float) and o["duration_seconds"] >= 0

    # The store was empty: the publish pulled, and said so at INFO.
    pulls = [o for o in lines if o["logger"] == "csi.pulls" and o["level"] == "INFO"]
    assert [o["image"] for o in pulls] == [images.app, images.app]
    assert pulls[0]["layers"] == 2 and pulls[0]["bytes"] > 0
    assert pulls[1]["digest"].startswith("sha256:") and pulls[1]["seconds"] >= 0
    unpacked = [o for o in lines if o["logger"] == "csi.store.layers" and "layer" in o]
    assert len(unpacked) == 2 and all(o["bytes"] > 0 for o in unpacked)


def test_a_failed_rpc_is_one_warning_line(server, pods):
    node = server.csi.node
    with pytest.raises(Exception) as e:
        node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id="vol-bad", target_path=str(pods / "t"), volume_capability=mount_cap(),
            volume_context={"image": "", **POD}, secrets={"token": SECRET}), timeout=60)
    assert e.value.code().name == "INVALID_ARGUMENT"
    assert server.stop() == 0
    text = server.read_log()
    assert SECRET not in text
    [line] = [o for o in map(json.loads, text.splitlines()) if o["logger"] == "csi.rpc"]
    assert (line["level"], line["code"], line["pod"]) == ("WARNING", "INVALID_ARGUMENT",
                                                          "team/web-0")
    assert "exc" not in line
