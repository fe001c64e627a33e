"""The small controller: image-backed persistent volumes."""

import grpc
import pytest

from csi.proto import csi_pb2
from tests.conftest import mount_cap


def create(csi, name, image, required=0, **params):
    return csi.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=required),
        parameters={"image": image, **params}), timeout=30).volume


def test_create_is_idempotent_and_carries_parameters(csi, images):
    v1 = create(csi, "pvc-1", images.app, 1 << 30, pullPolicy="IfNotPresent")
    v2 = create(csi, "pvc-1", images.app, 1 << 30, pullPolicy="IfNotPresent")
    assert v1.volume_id == v2.volume_id
    assert dict(v1.volume_context) == {"image": images.app, "pullPolicy": "IfNotPresent"}
    assert v1.capacity_bytes == 1 << 30
    for kwargs in ({"required": 2 << 30}, {"required": 1 << 30, "pullPolicy": "Always"}):
        with pytest.raises(grpc.RpcError) as e:
            create(csi, "pvc-1", images.app, **kwargs)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v1.volume_id), timeout=10)
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v1.volume_id), timeout=10)


def test_create_validates_the_image(csi, images):
    with pytest.raises(grpc.RpcError) as e:
        create(csi, "pvc-bad", "")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        create(csi, "pvc-missing", images.app.rsplit(":", 1)[0] + ":nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_validate_volume_capabilities(csi, images):
    vol = create(csi, "pvc-caps", images.app)
    try:
        r = csi.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[mount_cap()]), timeout=10)
        assert r.HasField("confirmed")
        block = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                         access_mode=mount_cap().access_mode)
        r = csi.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[block]), timeout=10)
        assert not r.HasField("confirmed") and "block" in r.message
        with pytest.raises(grpc.RpcError) as e:
            csi.controller.ValidateVolumeCapabilities(
                csi_pb2.ValidateVolumeCapabilitiesRequest(
                    volume_id="no-such-volume", volume_capabilities=[mount_cap()]), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id),
                                    timeout=10)


def test_persistent_volume_end_to_end(csi, pods, images):
    vol = create(csi, "pvc-e2e", images.app)
    staging = pods / "staging"
    staging.mkdir()
    node = csi.node
    node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(staging),
        volume_capability=mount_cap(), volume_context=vol.volume_context), timeout=60)
    try:
        node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging),
            target_path=str(pods / "pod"), volume_capability=mount_cap(),
            volume_context=vol.volume_context), timeout=60)
        assert (pods / "pod" / "srv/index.html").read_text() == "<h1>hello</h1>\n"
        csi.unpublish(vol.volume_id, pods / "pod")
    finally:
        csi.unstage(vol.volume_id, staging)
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id),
                                    timeout=10)
