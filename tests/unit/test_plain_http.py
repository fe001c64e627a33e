"""A TLS handshake answered in plain HTTP (a registry that needs --insecure-registry) fails
at the first attempt, saying what to do; other TLS failures are still retried. A real
plain-HTTP server on 127.0.0.1 answers the handshake, so the error is OpenSSL's own."""

import http.server
import ssl
import threading

import pytest

from csi.errors import Unavailable
from csi.image.transport import Options, Transport


@pytest.fixture
def plain_http():
    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_plain_http_registry_is_refused_at_once_with_the_fix(plain_http):
    slept = []
    t = Transport(Options(retries=4), sleep=slept.append)
    with pytest.raises(Unavailable) as e:
        t.call("https", plain_http, "GET", "/v2/", {}, "image x: manifest 1 from https://h")
    assert slept == [], "not retried"
    assert str(e.value).startswith(
        f"image x: manifest 1 from https://h: registry {plain_http} answered plain HTTP to "
        "HTTPS (")
    assert (f"add --insecure-registry {plain_http} (or STRATA_INSECURE_REGISTRY, or "
            "insecure-registry in the config file)") in str(e.value)


@pytest.mark.parametrize("reason, text", [
    ("WRONG_VERSION_NUMBER", "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
    ("RECORD_LAYER_FAILURE", "[SSL] record layer failure (_ssl.c:1000)"),
    (None, "[SSL] record layer failure (_ssl.c:1000)"),
])
def test_each_openssl_wording(reason, text):
    def handshake():
        e = ssl.SSLError(1, text)
        e.reason = reason
        raise e

    slept = []
    with pytest.raises(Unavailable, match="answered plain HTTP to HTTPS"):
        Transport(Options(retries=4), sleep=slept.append).retrying(handshake, "x")
    assert slept == []


def test_other_tls_failures_are_retried():
    def handshake():
        e = ssl.SSLError(1, "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF")
        e.reason = "UNEXPECTED_EOF_WHILE_READING"
        raise e

    slept = []
    with pytest.raises(Unavailable, match=r"\(after 3 attempts\)"):
        Transport(Options(retries=2), sleep=slept.append, rng=lambda: 0.5).retrying(
            handshake, "x")
    assert len(slept) == 2
