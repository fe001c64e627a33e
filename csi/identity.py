"""The CSI Identity service: who we are, what we serve, whether we are ready."""

from google.protobuf import wrappers_pb2

import csi
from csi.proto import csi_pb2, csi_pb2_grpc

Service = csi_pb2.PluginCapability.Service


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, controller: bool, ready=lambda: True):
        self._controller = controller
        self._ready = ready

    def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=csi.DRIVER_NAME,
                                             vendor_version=csi.__version__)

    def GetPluginCapabilities(self, request, context):
        caps = []
        if self._controller:
            caps.append(csi_pb2.PluginCapability(
                service=Service(type=Service.CONTROLLER_SERVICE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request, context):
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self._ready()))
