"""csi/validate.py: CSI requests in, domain specs out; INVALID_ARGUMENT names the field."""

import pytest

from csi import validate
from csi.errors import InvalidArgument
from csi.proto import csi_pb2
from csi.provision import CreateSpec
from csi.volumes import PublishSpec, StageSpec

Mode = csi_pb2.VolumeCapability.AccessMode.Mode
IMAGE = "oci:/layouts/demo:app"
EPHEMERAL = {"csi.storage.k8s.io/ephemeral": "true"}


def cap(mode=Mode.SINGLE_NODE_WRITER, access="mount") -> csi_pb2.VolumeCapability:
    c = csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))
    if access == "mount":
        c.mount.SetInParent()
    elif access == "block":
        c.block.SetInParent()
    return c


def publish_req(**over) -> csi_pb2.NodePublishVolumeRequest:
    fields = dict(volume_id="vol-1", target_path="/pods/p/volumes/v/mount",
                  volume_capability=cap(), volume_context={"image": IMAGE, **EPHEMERAL})
    fields.update(over)
    return csi_pb2.NodePublishVolumeRequest(**fields)


def stage_req(**over) -> csi_pb2.NodeStageVolumeRequest:
    fields = dict(volume_id="vol-1", staging_target_path="/staging/vol-1",
                  volume_capability=cap(), volume_context={"image": IMAGE})
    fields.update(over)
    return csi_pb2.NodeStageVolumeRequest(**fields)


def create_req(**over) -> csi_pb2.CreateVolumeRequest:
    fields = dict(name="pvc-1", volume_capabilities=[cap()], parameters={"image": IMAGE})
    fields.update(over)
    return csi_pb2.CreateVolumeRequest(**fields)


def refused(fn, req, *fragments):
    with pytest.raises(InvalidArgument) as e:
        fn(req)
    for f in fragments:
        assert f in str(e.value)
    return str(e.value)


# -- volume ids and paths ------------------------------------------------------------------
@pytest.mark.parametrize("vid, fragment", [
    ("", "volume_id is required"),
    ("a/b", "malformed"),
    ("../x", "malformed"),
    ("a\x00b", "malformed"),
    ("x" * 129, "malformed"),
    ("é" * 65, "malformed"),  # 130 bytes: the limit is bytes, not characters
])
def test_bad_volume_ids(vid, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        validate.volume_id(vid)


@pytest.mark.parametrize("vid", ["v", "x" * 128, "strata-0123abcd", "pvc-1.2_3:4"])
def test_good_volume_ids(vid):
    assert validate.volume_id(vid) == vid


@pytest.mark.parametrize("value, fragment", [
    ("", "target_path is required"),
    ("relative/path", "must be an absolute path"),
    ("./x", "must be an absolute path"),
    ("/a\x00b", "must be an absolute path"),
])
def test_bad_paths(value, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        validate.path(value, "target_path")


def test_path_is_normalised():
    assert validate.path("/a//b/./c/", "p") == "/a/b/c"
    assert validate.path("/a/b/../c", "p") == "/a/c"


# -- capabilities --------------------------------------------------------------------------
def test_capability_returns_mode():
    assert validate.capability(cap(Mode.SINGLE_NODE_READER_ONLY)) == Mode.SINGLE_NODE_READER_ONLY


@pytest.mark.parametrize("c, fragment", [
    (csi_pb2.VolumeCapability(), "volume_capability is required"),
    (cap(access="block"), "block access is not supported"),
    (cap(access=None), "access_type (mount) is required"),
    (csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume()),
     "access_mode is required"),
    (cap(Mode.UNKNOWN), "access_mode is required"),
    (cap(Mode.MULTI_NODE_MULTI_WRITER), "MULTI_NODE_MULTI_WRITER is not supported"),
    (cap(Mode.MULTI_NODE_SINGLE_WRITER), "MULTI_NODE_SINGLE_WRITER is not supported"),
])
def test_bad_capabilities(c, fragment):
    msg = refused(validate.capability, c, fragment)
    assert msg.startswith("volume_capability")


def test_mount_with_only_fs_type_still_counts_as_given():
    c = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"))
    with pytest.raises(InvalidArgument, match="access_mode is required"):
        validate.capability(c)


@pytest.mark.parametrize("mode", sorted(validate.SUPPORTED_MODES))
def test_supported_modes(mode):
    assert validate.capability(cap(mode)) == mode


# -- NodePublishVolume ---------------------------------------------------------------------
def test_publish_ephemeral_spec():
    spec = validate.publish(publish_req(secrets={"password": "x"}))
    assert spec == PublishSpec("vol-1", "/pods/p/volumes/v/mount", IMAGE, False,
                               Mode.SINGLE_NODE_WRITER, "", pull_policy="IfNotPresent")
    assert spec.secrets == {"password": "x"}


@pytest.mark.parametrize("field, value, fragment", [
    ("volume_id", "", "volume_id is required"),
    ("target_path", "", "target_path is required"),
    ("target_path", "pods/relative", "target_path must be an absolute path"),
    ("staging_target_path", "relative", "staging_target_path must be an absolute path"),
])
def test_publish_field_errors(field, value, fragment):
    ctx = {"image": IMAGE}  # not ephemeral, so a staging path is allowed
    refused(validate.publish, publish_req(**{field: value}, volume_context=ctx), fragment)


def test_publish_missing_capability():
    req = publish_req()
    req.ClearField("volume_capability")
    refused(validate.publish, req, "volume_capability is required")


def test_publish_block_refused():
    refused(validate.publish, publish_req(volume_capability=cap(access="block")), "block")


def test_publish_volume_id_checked_before_paths():
    # csi-sanity sends requests with several fields missing; the first is reported.
    req = csi_pb2.NodePublishVolumeRequest()
    refused(validate.publish, req, "volume_id is required")


@pytest.mark.parametrize("mode, readonly_flag, expected", [
    (Mode.SINGLE_NODE_WRITER, False, False),
    (Mode.SINGLE_NODE_WRITER, True, True),
    (Mode.SINGLE_NODE_READER_ONLY, False, True),
    (Mode.MULTI_NODE_READER_ONLY, False, True),
    (Mode.SINGLE_NODE_SINGLE_WRITER, False, False),
    (Mode.SINGLE_NODE_MULTI_WRITER, False, False),
])
def test_publish_readonly_derived_from_reader_modes(mode, readonly_flag, expected):
    spec = validate.publish(publish_req(volume_capability=cap(mode), readonly=readonly_flag))
    assert spec.readonly is expected
    assert spec.access_mode == mode


@pytest.mark.parametrize("value", ["true", "True", "TRUE"])
def test_ephemeral_with_staging_path_refused(value):
    req = publish_req(staging_target_path="/staging/x",
                      volume_context={"image": IMAGE, "csi.storage.k8s.io/ephemeral": value})
    refused(validate.publish, req, "ephemeral", "staging_target_path")


def test_publish_without_staging_requires_image():
    for ctx in ({}, EPHEMERAL, {"image": ""}):
        refused(validate.publish, publish_req(volume_context=ctx),
                "volume_context['image'] is required")


def test_publish_staged_image_is_optional():
    spec = validate.publish(publish_req(staging_target_path="/staging/x/", volume_context={}))
    assert spec.staging_path == "/staging/x"
    assert spec.image == ""
    spec = validate.publish(publish_req(staging_target_path="/staging/x",
                                        volume_context={"image": IMAGE}))
    assert spec.image == IMAGE


def test_publish_ephemeral_false_with_staging_ok():
    req = publish_req(staging_target_path="/s",
                      volume_context={"csi.storage.k8s.io/ephemeral": "false"})
    assert validate.publish(req).staging_path == "/s"


def test_publish_target_normalised():
    assert validate.publish(publish_req(target_path="/pods//p/./mount/")).target == "/pods/p/mount"


# -- NodeStageVolume -----------------------------------------------------------------------
def test_stage_spec():
    spec = validate.stage(stage_req(staging_target_path="/staging/vol-1/",
                                    secrets={"k": "v"}))
    assert spec == StageSpec("vol-1", "/staging/vol-1", IMAGE, Mode.SINGLE_NODE_WRITER,
                             pull_policy="IfNotPresent")
    assert spec.secrets == {"k": "v"}


@pytest.mark.parametrize("over, fragment", [
    ({"volume_id": ""}, "volume_id is required"),
    ({"staging_target_path": ""}, "staging_target_path is required"),
    ({"staging_target_path": "rel"}, "staging_target_path must be an absolute path"),
    ({"volume_capability": cap(access="block")}, "block access"),
    ({"volume_capability": cap(Mode.UNKNOWN)}, "access_mode is required"),
    ({"volume_context": {}}, "volume_context['image'] is required"),
])
def test_stage_errors(over, fragment):
    refused(validate.stage, stage_req(**over), fragment)


def test_stage_missing_capability():
    req = stage_req()
    req.ClearField("volume_capability")
    refused(validate.stage, req, "volume_capability is required")


# -- unstage / unpublish / stats -----------------------------------------------------------
def test_unstage_and_unpublish():
    assert validate.unstage(csi_pb2.NodeUnstageVolumeRequest(
        volume_id="v", staging_target_path="/s/")) == ("v", "/s")
    assert validate.unpublish(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="v", target_path="/t//x")) == ("v", "/t/x")


@pytest.mark.parametrize("fn, req, fragment", [
    (validate.unstage, csi_pb2.NodeUnstageVolumeRequest(staging_target_path="/s"),
     "volume_id is required"),
    (validate.unstage, csi_pb2.NodeUnstageVolumeRequest(volume_id="v"),
     "staging_target_path is required"),
    (validate.unpublish, csi_pb2.NodeUnpublishVolumeRequest(target_path="/t"),
     "volume_id is required"),
    (validate.unpublish, csi_pb2.NodeUnpublishVolumeRequest(volume_id="v"),
     "target_path is required"),
    (validate.stats, csi_pb2.NodeGetVolumeStatsRequest(volume_path="/p"),
     "volume_id is required"),
    (validate.stats, csi_pb2.NodeGetVolumeStatsRequest(volume_id="v"),
     "volume_path is required"),
])
def test_teardown_and_stats_errors(fn, req, fragment):
    refused(fn, req, fragment)


def test_stats_accepts_relative_path_unchanged():
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id="v", volume_path="some/relative/path")
    assert validate.stats(req) == ("v", "some/relative/path")


# -- CreateVolume --------------------------------------------------------------------------
def test_create_spec():
    req = create_req(capacity_range=csi_pb2.CapacityRange(required_bytes=10, limit_bytes=20),
                     parameters={"image": IMAGE, "pullPolicy": "Never"})
    assert validate.create(req) == CreateSpec("pvc-1", 10, 20,
                                              {"image": IMAGE, "pullPolicy": "Never"})


def test_create_without_capacity_range():
    assert validate.create(create_req()) == CreateSpec("pvc-1", 0, 0, {"image": IMAGE})


@pytest.mark.parametrize("over, fragment", [
    ({"name": ""}, "name is required"),
    ({"volume_capabilities": []}, "volume_capabilities is required"),
    ({"volume_capabilities": [cap(), cap(access="block")]},
     "volume_capabilities[1]: block access"),
    ({"volume_capabilities": [cap(Mode.MULTI_NODE_MULTI_WRITER)]},
     "volume_capabilities[0]: access mode MULTI_NODE_MULTI_WRITER"),
    ({"volume_capabilities": [csi_pb2.VolumeCapability()]}, "volume_capabilities[0] is required"),
    ({"capacity_range": csi_pb2.CapacityRange(required_bytes=-1)}, "capacity_range is invalid"),
    ({"capacity_range": csi_pb2.CapacityRange(limit_bytes=-1)}, "capacity_range is invalid"),
    ({"capacity_range": csi_pb2.CapacityRange(required_bytes=20, limit_bytes=10)},
     "capacity_range is invalid"),
    ({"parameters": {}}, "parameters['image'] is required"),
    ({"parameters": {"image": ""}}, "parameters['image'] is required"),
    ({"volume_content_source": csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="s"))},
     "volume_content_source is not supported"),
])
def test_create_errors(over, fragment):
    refused(validate.create, create_req(**over), fragment)


@pytest.mark.parametrize("required, limit", [(0, 10), (10, 0), (10, 10), (0, 0)])
def test_create_capacity_ranges_ok(required, limit):
    req = create_req(capacity_range=csi_pb2.CapacityRange(required_bytes=required,
                                                          limit_bytes=limit))
    spec = validate.create(req)
    assert (spec.required_bytes, spec.limit_bytes) == (required, limit)


def test_validate_capabilities():
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="v", volume_capabilities=[cap()])
    assert validate.validate_capabilities(req) == "v"
    refused(validate.validate_capabilities,
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="v"),
            "volume_capabilities is required")
    refused(validate.validate_capabilities,
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_capabilities=[cap()]),
            "volume_id is required")


@pytest.mark.parametrize("policy", ["IfNotPresent", "Always", "Never"])
def test_pull_policy_is_carried(policy):
    req = publish_req()
    req.volume_context["pullPolicy"] = policy
    assert validate.publish(req, wait=7.5).pull_policy == policy
    assert validate.publish(req, wait=7.5).wait == 7.5


@pytest.mark.parametrize("policy", ["Sometimes", "", "always"])
def test_unknown_pull_policy_is_invalid(policy):
    req = publish_req()
    req.volume_context["pullPolicy"] = policy
    with pytest.raises(InvalidArgument, match="pullPolicy"):
        validate.publish(req)


def test_no_pull_policy_is_the_kubelet_s_default():
    assert validate.publish(publish_req()).pull_policy == "IfNotPresent"


# -- sizeLimit and pod identity ------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [
    ("512Mi", 512 << 20), ("2G", 2_000_000_000), ("1.5Gi", 3 << 29), ("1e9", 10 ** 9),
    ("0.1Gi", 107374183), ("1048576", 1 << 20), ("+4Mi", 4 << 20), ("1E7", 10 ** 7),
    ("2000000000m", 2_000_000), ("5.Mi", 5 << 20),
])
def test_size_limit_is_a_kubernetes_quantity(value, expected):
    spec = validate.publish(publish_req(volume_context={"image": IMAGE, "sizeLimit": value,
                                                       **EPHEMERAL}))
    assert spec.size_limit == expected


@pytest.mark.parametrize("value,fragment", [
    ("-1", "must be between"), ("10Qi", "not a Kubernetes quantity"), ("0", "must be between"),
    ("1Ki", "must be between"), ("12 Mi", "not a Kubernetes quantity"),
    ("Mi", "not a Kubernetes quantity"), (" 1Gi", "not a Kubernetes quantity"),
    ("1e999", "exponent out of range"),
    ("2Ei", "must be between"), ("1.2.3", "not a Kubernetes quantity"),
])
def test_bad_size_limits_are_invalid_argument(value, fragment):
    with pytest.raises(InvalidArgument, match=fragment) as e:
        validate.publish(publish_req(volume_context={"image": IMAGE, "sizeLimit": value,
                                                    **EPHEMERAL}))
    assert "sizeLimit" in str(e.value)


def test_size_limit_checked_in_storage_class_parameters():
    with pytest.raises(InvalidArgument, match=r"parameters\['sizeLimit'\]"):
        validate.create(create_req(parameters={"image": IMAGE, "sizeLimit": "lots"}))
    assert validate.create(create_req(parameters={"image": IMAGE, "sizeLimit": "1Gi"}))


def test_no_size_limit_is_zero():
    assert validate.publish(publish_req()).size_limit == 0


def test_pod_identity_from_pod_info_on_mount():
    ctx = {"image": IMAGE, **EPHEMERAL, "csi.storage.k8s.io/pod.name": "web-0",
           "csi.storage.k8s.io/pod.namespace": "shop", "csi.storage.k8s.io/pod.uid": "u-1",
           "csi.storage.k8s.io/serviceAccount.name": "default"}
    pod = validate.publish(publish_req(volume_context=ctx)).pod
    assert (pod.namespace, pod.name, pod.uid, pod.service_account) == \
        ("shop", "web-0", "u-1", "default")
    assert validate.publish(publish_req()).pod.name == ""


def test_the_largest_size_limit_fits_a_loop_filesystem_s_inode_count():
    """One inode per 16 KiB, at most 2^32 - 1 inodes in ext4: mkfs must never be asked for
    more (it would fail as INTERNAL, not as the caller's mistake)."""
    assert validate.MAX_SIZE_LIMIT // (16 << 10) < 2 ** 32
    assert validate.publish(publish_req(volume_context={
        "image": IMAGE, "sizeLimit": "32Ti", **EPHEMERAL})).size_limit == 32 << 40
    with pytest.raises(InvalidArgument, match="must be between"):
        validate.publish(publish_req(volume_context={"image": IMAGE, "sizeLimit": "33Ti",
                                                    **EPHEMERAL}))
