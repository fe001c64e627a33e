"""Cross-cutting RPC concerns: logging with secrets redacted, status mapping, latency.

Each RPC logs one line when it ends, on `csi.rpc`: method, volume_id, target, pod, image,
code and duration_seconds as structured fields (docs/logging.md). Probe at DEBUG, others
at INFO, failures at WARNING and INTERNAL at ERROR (with the traceback of an unexpected
exception). The whole request and response, secrets stripped, go to `csi.rpc.payload` at
DEBUG. The pod's service-account tokens are stripped too: the kubelet puts them in
`volume_context`, which the spec does not mark secret (CVE-2023-2878 and CVE-2024-3744 were
drivers that logged them).

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

from csi.errors import StrataError, is_no_space, no_space
from csi.image.credprovider import TOKENS_KEY
from csi.metrics import Metrics
from csi.proto import csi_pb2
from csi.validate import POD_KEYS

log = logging.getLogger("csi.rpc")
# The whole request and response (secrets stripped), apart from the one line per RPC.
payload = logging.getLogger("csi.rpc.payload")

STRIPPED = "***stripped***"


def redact(msg) -> str:
    """The message as one line, with every field the spec marks `csi_secret` stripped, and
    the service-account tokens in `volume_context`."""
    copy = None
    for field in msg.DESCRIPTOR.fields:
        secret = field.GetOptions().Extensions[csi_pb2.csi_secret]
        if not (secret or field.name == "volume_context") or not getattr(msg, field.name):
            continue
        if not secret and TOKENS_KEY not in getattr(msg, field.name):
            continue
        if copy is None:
            copy = type(msg)()
            copy.CopyFrom(msg)
        values = getattr(copy, field.name)
        for key in list(values) if secret else [TOKENS_KEY]:
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
            if payload.isEnabledFor(logging.DEBUG):  # redact() formats the whole message
                payload.debug("%s: %s", method, redact(request))
            try:
                response = behavior(request, context)
            except StrataError as e:
                code, message, unexpected = e.code, str(e), None
            except NotImplementedError:
                code, message, unexpected = (grpc.StatusCode.UNIMPLEMENTED,
                                             f"{method} is not implemented", None)
            except Exception as e:
                if is_no_space(e):  # wherever the disk filled up: the one way it reads
                    code, message, unexpected = (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                 str(no_space(method)), None)
                else:
                    code, message, unexpected = (grpc.StatusCode.INTERNAL,
                                                 f"{type(e).__name__}: {e}", e)
            else:
                self._finish(method, request, grpc.StatusCode.OK, started, level)
                if payload.isEnabledFor(logging.DEBUG):
                    payload.debug("%s response: %s", method, redact(response))
                return response
            self._finish(method, request, code, started, level, message, unexpected)
            context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _finish(self, method: str, request, code: grpc.StatusCode, started: float,
                level: int, message: str = "",
                unexpected: BaseException | None = None) -> None:
        """The RPC's one log line (with the traceback of an unexpected exception), and its
        latency."""
        seconds = time.monotonic() - started
        self._metrics.rpc_seconds.labels(method, code.name).observe(seconds)
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED):
            level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.WARNING
        fields = {"method": method, **request_fields(request), "code": code.name,
                  "duration_seconds": round(seconds, 6)}
        text = f"{method} ok" if code == grpc.StatusCode.OK else \
            f"{method} failed: {code.name}: {message}"
        log.log(level, "%s", text, extra=fields, exc_info=unexpected)


def request_fields(request) -> dict[str, str]:
    """What a request is about, for its log line: volume_id, target (the target path, else
    the staging path), pod (namespace/name, from the kubelet's podInfoOnMount attributes)
    and image, each only when the request has it. Never secrets: only these fields of the
    request are read."""
    out = {}
    names = {f.name for f in request.DESCRIPTOR.fields}
    if "volume_id" in names and request.volume_id:
        out["volume_id"] = request.volume_id
    for name in ("target_path", "staging_target_path"):
        if name in names and getattr(request, name):
            out["target"] = getattr(request, name)
            break
    context = {}
    for name in ("volume_context", "parameters"):  # a node request's, CreateVolume's
        if name in names:
            context = getattr(request, name)
            break
    pod = [context.get(POD_KEYS["namespace"], ""), context.get(POD_KEYS["name"], "")]
    if any(pod):
        out["pod"] = "/".join(pod)
    if context.get("image"):
        out["image"] = context["image"]
    return out
