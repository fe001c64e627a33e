"""The token flow against a small HTTP registry on loopback: what exactly is sent where."""

import http.server
import json
import threading
import urllib.parse

import pytest

from csi.image.auth import Credentials
from csi.image.reference import parse
from csi.image.registry import Options, RegistryClient

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def registry():
    """A registry that wants a bearer token from a realm carrying its own query string
    (as some registries put a tenant there), and answers HEAD without the optional
    Docker-Content-Digest header."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status, body=b"", headers=()):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self):
            seen.append(("HEAD", self.path, self.headers.get("Authorization"), b""))
            if self.headers.get("Authorization") != "Bearer good":
                realm = f"http://{self.headers['Host']}/token?tenant=t1"
                return self._send(401, headers=[(
                    "WWW-Authenticate", f'Bearer realm="{realm}",service="reg"')])
            self._send(200, headers=[("Content-Type",
                                      "application/vnd.oci.image.manifest.v1+json")])

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(("POST", self.path, self.headers.get("Authorization"), body))
            form = urllib.parse.parse_qs(body.decode())
            ok = self.path == "/token?tenant=t1" and form["refresh_token"] == ["rt"]
            self._send(200 if ok else 401, json.dumps({"access_token": "good"}).encode())

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    try:
        yield host, seen
    finally:
        server.shutdown()
        server.server_close()


def test_an_identity_token_is_posted_to_the_realm_with_its_query(registry):
    host, seen = registry
    client = RegistryClient(Options(insecure=frozenset({host}), retries=0))
    ref = parse(f"{host}/team/app@{DIGEST}")
    creds = Credentials("00000000-0000-0000-0000-000000000000", "", "rt")
    assert client.head_digest(ref, lambda registry, repo: creds) == DIGEST, \
        "by digest, a 200 without Docker-Content-Digest still confirms it"
    [post] = [s for s in seen if s[0] == "POST"]
    assert post[1] == "/token?tenant=t1" and post[2] is None
    form = urllib.parse.parse_qs(post[3].decode())
    assert form["grant_type"] == ["refresh_token"] and form["service"] == ["reg"]
    assert form["scope"] == ["repository:team/app:pull"]
    assert seen[-1][2] == "Bearer good"
