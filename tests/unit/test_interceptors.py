"""csi/interceptors.py: secret redaction in logs, the one place errors become statuses, and
which handlers still run."""

import collections
import contextlib
import errno
import logging
import sqlite3
import threading

import grpc
import pytest
from prometheus_client import CollectorRegistry

from csi.errors import (
    AlreadyExists,
    DataLoss,
    Internal,
    InvalidArgument,
    NotFound,
    is_no_space,
)
from csi.interceptors import STRIPPED, RpcInterceptor, redact
from csi.metrics import Metrics
from csi.proto import csi_pb2

SECRET = "hunter2"


def test_redact_strips_secret_values_keeps_keys():
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id="vol-1", target_path="/pods/x", readonly=True,
        secrets={"password": SECRET, "token": "t0ps3cret"},
        volume_context={"image": "oci:/l:app"})
    line = redact(req)
    assert SECRET not in line and "t0ps3cret" not in line
    assert line.count(STRIPPED) == 2
    assert '"password"' in line and '"token"' in line  # which secrets came is still visible
    assert 'volume_id: "vol-1"' in line
    assert 'target_path: "/pods/x"' in line
    assert "readonly: true" in line
    assert "oci:/l:app" in line
    assert "\n" not in line


def test_redact_leaves_the_original_message_untouched():
    req = csi_pb2.NodeStageVolumeRequest(volume_id="v", secrets={"password": SECRET})
    before = req.SerializeToString()
    redact(req)
    assert req.secrets["password"] == SECRET
    assert req.SerializeToString() == before


@pytest.mark.parametrize("req", [
    csi_pb2.NodeStageVolumeRequest(volume_id="v", secrets={"k": SECRET}),
    csi_pb2.CreateVolumeRequest(name="n", secrets={"k": SECRET}, parameters={"image": "i"}),
    csi_pb2.DeleteVolumeRequest(volume_id="v", secrets={"k": SECRET}),
    csi_pb2.ControllerExpandVolumeRequest(volume_id="v", secrets={"k": SECRET}),
    csi_pb2.NodeExpandVolumeRequest(volume_id="v", secrets={"k": SECRET}),
])
def test_redact_every_request_with_secrets(req):
    line = redact(req)
    assert SECRET not in line
    assert STRIPPED in line


def test_redact_without_secrets_is_plain_text_format():
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id="v", target_path="/t")
    assert redact(req) == 'volume_id: "v" target_path: "/t"'
    assert redact(csi_pb2.NodePublishVolumeRequest(volume_id="v")) == 'volume_id: "v"'


def test_redact_does_not_strip_non_secret_maps():
    req = csi_pb2.NodePublishVolumeRequest(volume_context={"password": "visible"},
                                           publish_context={"k": "v"})
    line = redact(req)
    assert "visible" in line and STRIPPED not in line


# -- the interceptor -----------------------------------------------------------------------
Details = collections.namedtuple("Details", "method invocation_metadata")


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self):
        self.code = self.details = None

    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted()


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry())


def call(metrics, method, behavior, request=None):
    handler = grpc.unary_unary_rpc_method_handler(behavior)
    wrapped = RpcInterceptor(metrics).intercept_service(
        lambda d: handler, Details(f"/csi.v1.Node/{method}", ()))
    ctx = FakeContext()
    request = request or csi_pb2.NodePublishVolumeRequest(volume_id="v",
                                                          secrets={"p": SECRET})
    try:
        response = wrapped.unary_unary(request, ctx)
    except Aborted:
        response = None
    return response, ctx


def count(metrics, method, code):
    return metrics.registry.get_sample_value(
        "strata_rpc_duration_seconds_count", {"method": method, "code": code})


def test_success_passes_response_and_records_ok(metrics):
    resp = csi_pb2.NodePublishVolumeResponse()
    got, ctx = call(metrics, "NodePublishVolume", lambda req, ctx: resp)
    assert got is resp and ctx.code is None
    assert count(metrics, "NodePublishVolume", "OK") == 1


@pytest.mark.parametrize("error, code", [
    (InvalidArgument("volume_id is required"), grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound("no such volume"), grpc.StatusCode.NOT_FOUND),
    (AlreadyExists("different args"), grpc.StatusCode.ALREADY_EXISTS),
    (DataLoss("digest mismatch"), grpc.StatusCode.DATA_LOSS),
    (Internal("broken"), grpc.StatusCode.INTERNAL),
])
def test_strata_errors_map_to_their_code(metrics, error, code):
    def behavior(req, ctx):
        raise error

    got, ctx = call(metrics, "NodePublishVolume", behavior)
    assert got is None
    assert ctx.code == code and ctx.details == str(error)
    assert count(metrics, "NodePublishVolume", code.name) == 1


def test_not_implemented_is_unimplemented(metrics):
    def behavior(req, ctx):
        raise NotImplementedError

    _, ctx = call(metrics, "NodeExpandVolume", behavior)
    assert ctx.code == grpc.StatusCode.UNIMPLEMENTED
    assert "NodeExpandVolume" in ctx.details


def test_unexpected_exception_is_internal_never_unknown(metrics, caplog):
    def behavior(req, ctx):
        raise KeyError("oops")

    with caplog.at_level(logging.ERROR, logger="csi.rpc"):
        _, ctx = call(metrics, "NodeStageVolume", behavior)
    assert ctx.code == grpc.StatusCode.INTERNAL
    assert "KeyError" in ctx.details
    assert any(r.exc_info for r in caplog.records)  # logged with its traceback


def full_database(tmp_path) -> Exception:
    """The error a real SQLite write into a full database raises (SQLITE_FULL), as
    state.db's when the store's filesystem fills up."""
    db = sqlite3.connect(str(tmp_path / "full.db"))
    try:
        db.execute("CREATE TABLE t (x BLOB)")
        db.execute("PRAGMA max_page_count=4")
        with pytest.raises(sqlite3.OperationalError) as e:
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 65536,))
        return e.value
    finally:
        db.close()


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EDQUOT, "Disk quota exceeded"),
                                   "sqlite"])
def test_a_full_disk_anywhere_is_resource_exhausted(metrics, tmp_path, error):
    """A full disk met where no handler expected it (a SQLite write beside a download that
    filled the store) reads as every other full disk does, not as INTERNAL."""
    error = full_database(tmp_path) if error == "sqlite" else error

    def behavior(req, ctx):
        raise error

    _, ctx = call(metrics, "NodePublishVolume", behavior)
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no space left on the store" in ctx.details
    assert not is_no_space(sqlite3.OperationalError("no such table: t"))


def test_request_log_is_redacted(metrics, caplog):
    with caplog.at_level(logging.DEBUG, logger="csi.rpc"):
        call(metrics, "NodePublishVolume", lambda req, ctx: csi_pb2.NodePublishVolumeResponse())
    text = "\n".join(r.getMessage() + str(vars(r)) for r in caplog.records)
    assert "NodePublishVolume" in text and STRIPPED in text  # the DEBUG payload
    assert SECRET not in text


def rpc_lines(caplog):
    return [r for r in caplog.records if r.name == "csi.rpc"]


def test_probe_logs_at_debug_others_at_info(metrics, caplog):
    with caplog.at_level(logging.DEBUG, logger="csi.rpc"):
        call(metrics, "Probe", lambda req, ctx: csi_pb2.ProbeResponse(),
             csi_pb2.ProbeRequest())
        call(metrics, "NodeGetInfo", lambda req, ctx: csi_pb2.NodeGetInfoResponse(),
             csi_pb2.NodeGetInfoRequest())
    levels = {r.method: r.levelno for r in rpc_lines(caplog)}
    assert levels == {"Probe": logging.DEBUG, "NodeGetInfo": logging.INFO}


POD = {"csi.storage.k8s.io/pod.namespace": "team", "csi.storage.k8s.io/pod.name": "web-0",
       "csi.storage.k8s.io/ephemeral": "true", "image": "registry:5000/app:1"}


def test_one_line_per_rpc_with_its_fields(metrics, caplog):
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id="vol-1", target_path="/pods/x", staging_target_path="/staging/x",
        secrets={"password": SECRET}, volume_context=POD)
    with caplog.at_level(logging.INFO, logger="csi.rpc"):
        call(metrics, "NodePublishVolume",
             lambda req, ctx: csi_pb2.NodePublishVolumeResponse(), request)
    [line] = rpc_lines(caplog)
    assert line.levelno == logging.INFO
    assert (line.method, line.volume_id, line.target, line.pod, line.image, line.code) == (
        "NodePublishVolume", "vol-1", "/pods/x", "team/web-0", "registry:5000/app:1", "OK")
    assert isinstance(line.duration_seconds, float) and line.duration_seconds >= 0
    assert line.getMessage() == "NodePublishVolume ok"
    assert SECRET not in str(vars(line))


def test_stage_names_the_staging_path_and_no_pod(metrics, caplog):
    request = csi_pb2.NodeStageVolumeRequest(volume_id="v", staging_target_path="/stg",
                                             secrets={"k": SECRET})
    with caplog.at_level(logging.INFO, logger="csi.rpc"):
        call(metrics, "NodeStageVolume", lambda req, ctx: csi_pb2.NodeStageVolumeResponse(),
             request)
    [line] = rpc_lines(caplog)
    assert line.target == "/stg" and not hasattr(line, "pod") and not hasattr(line, "image")


@pytest.mark.parametrize("error, level", [
    (NotFound("no such volume"), logging.WARNING),
    (InvalidArgument("volume_id is required"), logging.WARNING),
    (Internal("broken"), logging.ERROR),
    (NotImplementedError(), logging.INFO),  # an optional RPC's normal answer
])
def test_failures_log_one_line_at_their_level(metrics, caplog, error, level):
    def behavior(req, ctx):
        raise error

    with caplog.at_level(logging.DEBUG, logger="csi.rpc"):
        _, ctx = call(metrics, "NodeUnpublishVolume", behavior)
    [line] = rpc_lines(caplog)
    assert line.levelno == level and line.code == ctx.code.name
    assert line.volume_id == "v"
    assert line.getMessage().startswith(f"NodeUnpublishVolume failed: {ctx.code.name}: ")
    assert line.exc_info is None, "an expected failure has no traceback"


def test_an_unexpected_exception_is_one_error_line_with_its_traceback(metrics, caplog):
    def behavior(req, ctx):
        raise KeyError("oops")

    with caplog.at_level(logging.DEBUG, logger="csi.rpc"):
        call(metrics, "NodeStageVolume", behavior)
    [line] = rpc_lines(caplog)
    assert line.levelno == logging.ERROR and line.code == "INTERNAL"
    assert line.exc_info[0] is KeyError
    assert "KeyError" in line.getMessage()


def test_create_volume_names_its_image_and_no_secret(metrics, caplog):
    request = csi_pb2.CreateVolumeRequest(name="pvc-1", secrets={"k": SECRET},
                                          parameters={"image": "app:1"})
    with caplog.at_level(logging.DEBUG, logger="csi.rpc"):
        call(metrics, "CreateVolume", lambda req, ctx: csi_pb2.CreateVolumeResponse(), request)
    [line] = rpc_lines(caplog)
    assert line.image == "app:1" and not hasattr(line, "volume_id")
    assert SECRET not in caplog.text


def test_streaming_handlers_pass_through(metrics):
    handler = grpc.unary_stream_rpc_method_handler(lambda req, ctx: iter(()))
    got = RpcInterceptor(metrics).intercept_service(lambda d: handler, Details("/x/Y", ()))
    assert got is handler
    assert RpcInterceptor(metrics).intercept_service(lambda d: None, Details("/x/Y", ())) \
        is None


def test_running_handlers_are_known_until_they_return_or_fail(metrics):
    """What Plugin.stop waits on: a handler counts from its start until it has returned,
    failed or aborted, whatever happened to its call."""
    interceptor = RpcInterceptor(metrics)
    entered, go = threading.Event(), threading.Event()

    def slow(req, ctx):
        entered.set()
        go.wait()
        raise NotFound("gone meanwhile")  # aborts: it must still stop counting

    handler = grpc.unary_unary_rpc_method_handler(slow)
    wrapped = interceptor.intercept_service(
        lambda d: handler, Details("/csi.v1.Node/NodePublishVolume", ()))
    assert interceptor.running() == [] and interceptor.wait_idle(0) == []

    def run():
        with contextlib.suppress(Aborted):
            wrapped.unary_unary(csi_pb2.NodePublishVolumeRequest(volume_id="v"), FakeContext())

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert entered.wait(10)
        [still] = interceptor.wait_idle(0)
        assert still.startswith("NodePublishVolume (for ")
    finally:
        go.set()
    assert interceptor.wait_idle(30) == []
    thread.join()
    assert count(metrics, "NodePublishVolume", "NOT_FOUND") == 1
