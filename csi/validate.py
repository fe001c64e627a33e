"""Request checks shared by the CSI handlers: CSI messages in, domain specs out.

Argument errors are decided here, before any lookup (csi-sanity sends well-formed unknown
IDs to negative specs, and expects INVALID_ARGUMENT only for what is malformed).
"""

import os

from csi import pulls, quantity
from csi.errors import InvalidArgument
from csi.proto import csi_pb2
from csi.provision import CreateSpec
from csi.volumes import TOKENS_KEY, Pod, PublishSpec, StageSpec, service_account_tokens

Mode = csi_pb2.VolumeCapability.AccessMode.Mode

SUPPORTED_MODES = {
    Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY,
    Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER,
}
READER_MODES = {Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY}
# The volume attributes (and StorageClass parameters) strata reads; docs/configuration.md
# has a row for each (tests/unit/test_docs_configuration.py compares).
IMAGE_KEY = "image"
PULL_POLICY_KEY = "pullPolicy"
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
SIZE_LIMIT_KEY = "sizeLimit"
# What the kubelet adds to volume_context when the CSIDriver has podInfoOnMount: true.
POD_KEYS = {"namespace": "csi.storage.k8s.io/pod.namespace",
            "name": "csi.storage.k8s.io/pod.name",
            "uid": "csi.storage.k8s.io/pod.uid",
            "service_account": "csi.storage.k8s.io/serviceAccount.name"}
ATTRIBUTES = (IMAGE_KEY, PULL_POLICY_KEY, SIZE_LIMIT_KEY, EPHEMERAL_KEY, *POD_KEYS.values(),
              TOKENS_KEY)
MIN_SIZE_LIMIT = 1 << 20  # smaller cannot hold a filesystem's own metadata
# A loop filesystem has one inode per 16 KiB and ext4 at most 2^32 inodes: 64 TiB would
# be one too many. No pod's writable layer needs half of that.
MAX_SIZE_LIMIT = 1 << 45
MAX_ID = 128  # CSI: identifiers SHOULD be at most 128 bytes


def require(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


def volume_id(value: str) -> str:
    require(value, "volume_id")
    if len(value.encode()) > MAX_ID or "/" in value or "\x00" in value:
        raise InvalidArgument(f"volume_id {value[:40]!r} is malformed")
    return value


def path(value: str, field: str) -> str:
    require(value, field)
    if not os.path.isabs(value) or "\x00" in value:
        raise InvalidArgument(f"{field} must be an absolute path, got {value!r}")
    return os.path.normpath(value)


def capability(cap: csi_pb2.VolumeCapability, field: str = "volume_capability") -> int:
    """Check one capability; returns its access mode."""
    if not cap.ByteSize():
        raise InvalidArgument(f"{field} is required")
    kind = cap.WhichOneof("access_type")
    if kind == "block":
        raise InvalidArgument(f"{field}: block access is not supported; strata volumes are "
                              "filesystems")
    if kind != "mount":
        raise InvalidArgument(f"{field}: access_type (mount) is required")
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        raise InvalidArgument(f"{field}: access_mode is required")
    if cap.access_mode.mode not in SUPPORTED_MODES:
        raise InvalidArgument(f"{field}: access mode {Mode.Name(cap.access_mode.mode)} is not "
                              "supported: each publication has a private writable layer, so "
                              "writes are never shared between nodes")
    return cap.access_mode.mode


def image(context, field: str = "volume_context") -> str:
    value = context.get(IMAGE_KEY, "")
    if not value:
        raise InvalidArgument(f"{field}[{IMAGE_KEY!r}] is required: the image to mount")
    return value


def pull_policy(context) -> str:
    try:
        return pulls.policy(context.get(PULL_POLICY_KEY))
    except InvalidArgument as e:
        raise InvalidArgument(f"volume_context[{PULL_POLICY_KEY!r}]: {e}") from None


def size_limit(value: str, field: str) -> int:
    """A `sizeLimit` in the Kubernetes quantity syntax, as bytes; "" is no limit (0)."""
    if not value:
        return 0
    try:
        n = quantity.bytes_of(value)
    except ValueError as e:
        raise InvalidArgument(f"{field}: {e}") from None
    if not MIN_SIZE_LIMIT <= n <= MAX_SIZE_LIMIT:
        raise InvalidArgument(f"{field}: {value!r} is {n} bytes; a size limit must be between "
                              f"{quantity.human(MIN_SIZE_LIMIT)} and "
                              f"{quantity.human(MAX_SIZE_LIMIT)}")
    return n


def pod(context) -> Pod:
    """Who the volume is for, as the kubelet says (podInfoOnMount); empty where it does not."""
    return Pod(**{k: context.get(key, "") for k, key in POD_KEYS.items()})


def stage(req: csi_pb2.NodeStageVolumeRequest, wait: float | None = None) -> StageSpec:
    vid = volume_id(req.volume_id)
    staging = path(req.staging_target_path, "staging_target_path")
    mode = capability(req.volume_capability)
    return StageSpec(vid, staging, image(req.volume_context), mode, dict(req.secrets),
                     pull_policy(req.volume_context), wait)


def unstage(req: csi_pb2.NodeUnstageVolumeRequest) -> tuple[str, str]:
    return volume_id(req.volume_id), path(req.staging_target_path, "staging_target_path")


def publish(req: csi_pb2.NodePublishVolumeRequest, wait: float | None = None) -> PublishSpec:
    vid = volume_id(req.volume_id)
    target = path(req.target_path, "target_path")
    mode = capability(req.volume_capability)
    staging = path(req.staging_target_path, "staging_target_path") \
        if req.staging_target_path else ""
    ephemeral = req.volume_context.get(EPHEMERAL_KEY, "false").lower() == "true"
    if ephemeral and staging:
        raise InvalidArgument("an inline ephemeral volume is never staged, yet "
                              "staging_target_path is set")
    img = req.volume_context.get(IMAGE_KEY, "") if staging else image(req.volume_context)
    readonly = req.readonly or mode in READER_MODES
    policy = pull_policy(req.volume_context) if not staging else ""
    limit = size_limit(req.volume_context.get(SIZE_LIMIT_KEY, ""),
                       f"volume_context[{SIZE_LIMIT_KEY!r}]")
    return PublishSpec(vid, target, img, readonly, mode, staging, dict(req.secrets), policy,
                       wait, size_limit=limit, pod=pod(req.volume_context),
                       tokens=service_account_tokens(req.volume_context, req.secrets))


def unpublish(req: csi_pb2.NodeUnpublishVolumeRequest) -> tuple[str, str]:
    return volume_id(req.volume_id), path(req.target_path, "target_path")


def stats(req: csi_pb2.NodeGetVolumeStatsRequest) -> tuple[str, str]:
    # volume_path is not required to be absolute here: an unknown relative path is
    # NOT_FOUND, as csi-sanity expects.
    return volume_id(req.volume_id), require(req.volume_path, "volume_path")


def create(req: csi_pb2.CreateVolumeRequest) -> CreateSpec:
    name = require(req.name, "name")
    if not req.volume_capabilities:
        raise InvalidArgument("volume_capabilities is required")
    for i, cap in enumerate(req.volume_capabilities):
        capability(cap, f"volume_capabilities[{i}]")
    if req.HasField("volume_content_source"):
        raise InvalidArgument("volume_content_source is not supported: the image is the "
                              "content")
    required, limit = req.capacity_range.required_bytes, req.capacity_range.limit_bytes
    if required < 0 or limit < 0 or (limit and required > limit):
        raise InvalidArgument(f"capacity_range is invalid (required {required}, limit {limit})")
    image(req.parameters, "parameters")
    size_limit(req.parameters.get(SIZE_LIMIT_KEY, ""), f"parameters[{SIZE_LIMIT_KEY!r}]")
    return CreateSpec(name, required, limit, dict(req.parameters))


def validate_capabilities(req: csi_pb2.ValidateVolumeCapabilitiesRequest) -> str:
    vid = volume_id(req.volume_id)
    if not req.volume_capabilities:
        raise InvalidArgument("volume_capabilities is required")
    return vid
