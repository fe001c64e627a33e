"""The CSI Node service: validate, delegate to the volume manager, translate the answer."""


from csi import validate
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.volumes import VolumeManager

RPC = csi_pb2.NodeServiceCapability.RPC
Usage = csi_pb2.VolumeUsage

PULL_DEADLINE_MARGIN = 5.0

CAPABILITIES = (RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.SINGLE_NODE_MULTI_WRITER,
                RPC.VOLUME_CONDITION)


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, volumes: VolumeManager, node_id: str, pull_wait: float = 100.0):
        self._volumes = volumes
        self._node_id = node_id
        self._max_wait = pull_wait

    def _pull_wait(self, context) -> float:
        """How long a pull may hold this RPC: --pull-wait, but always answering a few
        seconds before the caller's deadline (the kubelet's is about two minutes), so that
        its retry joins the pull that goes on in the background."""
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return self._max_wait
        return max(0.0, min(self._max_wait, remaining - PULL_DEADLINE_MARGIN))

    def NodeStageVolume(self, request, context):
        self._volumes.stage(validate.stage(request, self._pull_wait(context)))
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request, context):
        self._volumes.unstage(*validate.unstage(request))
        return csi_pb2.NodeUnstageVolumeResponse()

    def NodePublishVolume(self, request, context):
        self._volumes.publish(validate.publish(request, self._pull_wait(context)))
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request, context):
        self._volumes.unpublish(*validate.unpublish(request))
        return csi_pb2.NodeUnpublishVolumeResponse()

    def NodeGetVolumeStats(self, request, context):
        s = self._volumes.stats(*validate.stats(request))
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=[
                Usage(unit=Usage.BYTES, used=s.bytes_used, total=s.bytes_total,
                      available=s.bytes_available),
                Usage(unit=Usage.INODES, used=s.inodes_used, total=s.inodes_total,
                      available=s.inodes_free),
            ],
            volume_condition=csi_pb2.VolumeCondition(abnormal=s.abnormal, message=s.message),
        )

    def NodeGetCapabilities(self, request, context):
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES])

    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(node_id=self._node_id)
