"""A gRPC server that does no work: `python -m bench._noop_server SOCKET`.

The generated Node service with NodeGetCapabilities answering an empty response, on a
unix socket, with the thread pool `strata serve` has and nothing else (no interceptor,
no logging, no other thread). A round trip to it is what any Python gRPC server costs on
this machine before it does anything; publish.py measures it in the same run as strata's
cycle (its "grpc floor"). Stops on SIGTERM.
"""

import os
import signal
import sys
from concurrent import futures

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from csi.proto import csi_pb2, csi_pb2_grpc  # noqa: E402


class Noop(csi_pb2_grpc.NodeServicer):
    def NodeGetCapabilities(self, request, context):
        return csi_pb2.NodeGetCapabilitiesResponse()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench._noop_server SOCKET")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))  # as strata serve
    csi_pb2_grpc.add_NodeServicer_to_server(Noop(), server)
    server.add_insecure_port("unix://" + sys.argv[1])
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
