"""Bad input gets a clear error with the right code and leaves nothing behind."""

import os

import grpc
import pytest

from csi.mount.mountinfo import MountTable
from csi.proto import csi_pb2
from csi.store.state import State
from tests.conftest import mount_cap


def store_snapshot(strata) -> dict:
    """What a failed request must not change: tmp/, volumes/, layers/ and recorded rows."""
    st = State(os.path.join(strata.root, "state.db"))
    try:
        with st.transaction() as tx:
            rows = (len(tx.layers()), len(tx.publications()), len(tx.stages()),
                    sum(tx.refcounts().values()))
    finally:
        st.close()
    return {
        "tmp": sorted(os.listdir(os.path.join(strata.root, "tmp"))),
        "volumes": sorted(os.listdir(os.path.join(strata.root, "volumes"))),
        "layers": sorted(os.listdir(os.path.join(strata.root, "layers"))),
        "rows": rows,
    }


def publish_req(**kw) -> csi_pb2.NodePublishVolumeRequest:
    req = dict(volume_id="bad-vol", target_path="/tmp/strata-never/target",
               volume_capability=mount_cap(),
               volume_context={"image": "oci:/nonexistent:1",
                               "csi.storage.k8s.io/ephemeral": "true"})
    req.update(kw)
    return csi_pb2.NodePublishVolumeRequest(**req)


@pytest.mark.parametrize("field,req,needle", [
    ("volume_id", publish_req(volume_id=""), "volume_id"),
    ("target_path", publish_req(target_path=""), "target_path"),
    ("relative target", publish_req(target_path="rel/target"), "target_path"),
    ("capability", publish_req(volume_capability=None), "volume_capability"),
    ("block", publish_req(volume_capability=csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=mount_cap().access_mode)), "block"),
    ("access mode", publish_req(volume_capability=csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume())), "access_mode"),
    ("image", publish_req(volume_context={"csi.storage.k8s.io/ephemeral": "true"}), "image"),
])
def test_missing_fields_are_invalid_argument(csi, field, req, needle):
    with pytest.raises(grpc.RpcError) as e:
        csi.node.NodePublishVolume(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
    assert needle in e.value.details()


@pytest.mark.parametrize("image,code,needle", [
    ("Nginx:1.27", grpc.StatusCode.INVALID_ARGUMENT, "must be lowercase"),
    ("oci:relative/path:1", grpc.StatusCode.INVALID_ARGUMENT, "absolute"),
    ("oci:/x:bad tag", grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    ("oci:/no/such/layout:1", grpc.StatusCode.NOT_FOUND, "no OCI image layout"),
])
def test_bad_image_references(csi, strata, pods, image, code, needle):
    before = store_snapshot(strata)
    target = pods / "t"
    with pytest.raises(grpc.RpcError) as e:
        csi.publish("bad-image", target, image)
    assert e.value.code() == code
    assert needle in e.value.details()
    assert not target.exists()
    assert store_snapshot(strata) == before


def test_unknown_tag_is_not_found(csi, strata, pods, images):
    layout = images.app.rsplit(":", 1)[0]
    with pytest.raises(grpc.RpcError) as e:
        csi.publish("bad-tag", pods / "t", f"{layout}:no-such-tag")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-tag" in e.value.details()
    assert not (pods / "t").exists()


def test_corrupt_blob_is_data_loss_and_leaves_nothing(csi, strata, pods, images):
    before = store_snapshot(strata)
    target = pods / "t"
    with pytest.raises(grpc.RpcError) as e:
        csi.publish("corrupt", target, images.corrupt)
    assert e.value.code() == grpc.StatusCode.DATA_LOSS, e.value.details()
    assert "digest" in e.value.details() or "size" in e.value.details()
    assert not target.exists()
    assert not MountTable().under(str(pods))
    after = store_snapshot(strata)
    # The intact base layer may have been unpacked and kept (it is shared and valid);
    # the corrupt layer must not be recorded and nothing else may change.
    assert after["tmp"] == [] and after["volumes"] == before["volumes"]
    assert after["rows"][1:] == before["rows"][1:]
    assert len(after["layers"]) - len(before["layers"]) == after["rows"][0] - before["rows"][0]
    assert after["rows"][0] - before["rows"][0] <= 1


def test_stage_with_missing_fields(csi):
    cases = [
        (csi_pb2.NodeStageVolumeRequest(staging_target_path="/s", volume_capability=mount_cap(),
                                        volume_context={"image": "oci:/x:1"}), "volume_id"),
        (csi_pb2.NodeStageVolumeRequest(volume_id="v", volume_capability=mount_cap(),
                                        volume_context={"image": "oci:/x:1"}),
         "staging_target_path"),
        (csi_pb2.NodeStageVolumeRequest(volume_id="v", staging_target_path="/s",
                                        volume_context={"image": "oci:/x:1"}),
         "volume_capability"),
        (csi_pb2.NodeStageVolumeRequest(volume_id="v", staging_target_path="/s",
                                        volume_capability=mount_cap()), "image"),
    ]
    for req, needle in cases:
        with pytest.raises(grpc.RpcError) as e:
            csi.node.NodeStageVolume(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in e.value.details()


def test_unimplemented_rpcs_say_so(csi):
    with pytest.raises(grpc.RpcError) as e:
        csi.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(volume_id="v"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as e:
        csi.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
