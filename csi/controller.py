"""The CSI Controller service: image-backed persistent volumes (CreateVolume/DeleteVolume)."""

from csi import validate
from csi.errors import InvalidArgument
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.provision import Provisioner

RPC = csi_pb2.ControllerServiceCapability.RPC


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, provisioner: Provisioner):
        self._provisioner = provisioner

    def CreateVolume(self, request, context):
        vol = self._provisioner.create(validate.create(request))
        return csi_pb2.CreateVolumeResponse(volume=csi_pb2.Volume(
            volume_id=vol.volume_id, capacity_bytes=vol.capacity,
            volume_context=vol.parameters))

    def DeleteVolume(self, request, context):
        self._provisioner.delete(validate.volume_id(request.volume_id))
        return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(self, request, context):
        vol = self._provisioner.get(validate.validate_capabilities(request))
        try:
            for i, cap in enumerate(request.volume_capabilities):
                validate.capability(cap, f"volume_capabilities[{i}]")
        except InvalidArgument as e:
            # An unsupported capability is an answer, not an error: no `confirmed`.
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=str(e))
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context or vol.parameters,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters))

    def ControllerGetCapabilities(self, request, context):
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=RPC(type=RPC.CREATE_DELETE_VOLUME))])
