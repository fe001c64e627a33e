"""Cross-cutting RPC concerns: logging with secrets redacted, status mapping, latency.

This interceptor is the one place a domain error becomes a gRPC status: StrataError →
its code; NotImplementedError (the generated servicer's default) → UNIMPLEMENTED; anything
else → a logged INTERNAL. No Python exception ever reaches a client as UNKNOWN.

It also knows which handlers run: gRPC's stop cancels calls but cannot stop their threads,
and the server must not let go of the store while one may still mount or unmount
(`wait_idle`).
"""

import itertools
import logging
import threading
import time

import grpc
from google.protobuf import text_format

from csi.errors import StrataError
from csi.metrics import Metrics
from csi.proto import csi_pb2

log = logging.getLogger("csi.rpc")

STRIPPED = "***stripped***"


def redact(msg) -> str:
    """The message as one line, with every field the spec marks `csi_secret` stripped."""
    copy = None
    for field in msg.DESCRIPTOR.fields:
        if field.GetOptions().Extensions[csi_pb2.csi_secret] and getattr(msg, field.name):
            if copy is None:
                copy = type(msg)()
                copy.CopyFrom(msg)
            values = getattr(copy, field.name)
            for key in list(values):
                values[key] = STRIPPED
    return text_format.MessageToString(copy or msg, as_one_line=True)


class RpcInterceptor(grpc.ServerInterceptor):
    """One instance may serve several gRPC servers (node and controller sockets): then
    `wait_idle` covers the handlers of all of them."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        self._idle = threading.Condition()
        self._running: dict[int, tuple[str, float]] = {}  # call -> (method, started)
        self._ids = itertools.count()

    def running(self) -> list[str]:
        """The handlers still running, oldest first, as "Method (for 3.2s)"."""
        now = time.monotonic()
        with self._idle:
            calls = sorted(self._running.values(), key=lambda c: c[1])
        return [f"{method} (for {now - started:.1f}s)" for method, started in calls]

    def wait_idle(self, timeout: float) -> list[str]:
        """Wait up to `timeout` seconds until no handler runs; what still runs then."""
        with self._idle:
            self._idle.wait_for(lambda: not self._running, timeout=max(0.0, timeout))
        return self.running()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        behavior = handler.unary_unary
        level = logging.DEBUG if method == "Probe" else logging.INFO

        def wrapped(request, context):
            call = next(self._ids)
            with self._idle:
                self._running[call] = (method, time.monotonic())
            try:
                return handle(request, context)
            finally:
                with self._idle:
                    del self._running[call]
                    if not self._running:
                        self._idle.notify_all()

        def handle(request, context):
            started = time.monotonic()
            log.log(level, "%s: %s", method, redact(request))
            try:
                response = behavior(request, context)
            except StrataError as e:
                code, message = e.code, str(e)
                log.log(logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.WARNING,
                        "%s failed: %s: %s", method, code.name, message)
            except NotImplementedError:
                code, message = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented"
                log.info("%s: not implemented", method)
            except Exception as e:
                code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
                log.exception("%s failed with an unexpected error", method)
            else:
                self._observe(method, grpc.StatusCode.OK, started)
                log.log(level, "%s ok: %s", method, text_format.MessageToString(
                    response, as_one_line=True))
                return response
            self._observe(method, code, started)
            context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _observe(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self._metrics.rpc_seconds.labels(method, code.name).observe(time.monotonic() - started)
