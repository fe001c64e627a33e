"""Proves the registry test infrastructure (tests/registry.py, tests/faultproxy.py) against
real components: docker-registry (distribution 2.8), skopeo, openssl and htpasswd.

Standard library only on the client side (urllib, http.client, ssl)."""

import hashlib
import http.client
import json
import os
import random
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request

import pytest

from csi.image.build import LayerBuilder, write_image
from tests.faultproxy import FaultProxy
from tests.registry import (
    Registry,
    get_token,
    parse_challenge,
    push,
    registry_get,
)

TOOLS = ("docker-registry", "skopeo", "openssl", "htpasswd")
MISSING = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING) and not os.environ.get("CI"),
    reason=f"missing {', '.join(MISSING)} (apt-get install docker-registry skopeo openssl "
    "apache2-utils; .ci/run does)")

ALICE = ("alice", "secret")
REPO = "library/app"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """An OCI layout with tag v1 (two gzip layers); returns (layout, manifest digest,
    manifest dict)."""
    layout = str(tmp_path_factory.mktemp("layout") / "oci")
    big = random.Random(0).randbytes(100_000)  # incompressible: cuts and ranges land mid-body
    digest = write_image(layout, "v1", [
        LayerBuilder().dir("etc").file("etc/motd", "hello\n"),
        LayerBuilder().file("data/blob.bin", big),
    ])
    with open(os.path.join(layout, "blobs", "sha256", digest[7:]), "rb") as f:
        manifest = json.load(f)
    return layout, digest, manifest


def layout_blob(layout: str, digest: str) -> bytes:
    with open(os.path.join(layout, "blobs", "sha256", digest.split(":")[1]), "rb") as f:
        return f.read()


@pytest.fixture
def registry():
    with Registry() as reg:
        yield reg


@pytest.fixture
def pushed(registry, image):
    """A plain registry holding `image` as library/app:v1; returns (registry, image)."""
    layout, digest, _ = image
    assert push(layout, "v1", registry, REPO, "v1") == digest
    return registry, image


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.host) as p:
        yield p


# -- the registry itself -------------------------------------------------------------------
def test_plain_registry_push_get_by_tag_and_digest(pushed):
    reg, (layout, digest, manifest) = pushed
    assert reg.url == f"http://{reg.host}" and reg.host.startswith("127.0.0.1:")
    status, headers, body = registry_get(reg, "/v2/")
    assert status == 200 and headers["docker-distribution-api-version"] == "registry/2.0"

    status, headers, by_tag = registry_get(reg, f"/v2/{REPO}/manifests/v1")
    assert status == 200
    assert headers["docker-content-digest"] == digest
    assert headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
    # skopeo kept the manifest byte for byte: the pushed digest is the layout's.
    assert "sha256:" + hashlib.sha256(by_tag).hexdigest() == digest
    status, _, by_digest = registry_get(reg, f"/v2/{REPO}/manifests/{digest}")
    assert status == 200 and by_digest == by_tag

    # ... and so were the gzip layer blobs and the config.
    for desc in [manifest["config"], *manifest["layers"]]:
        status, headers, blob = registry_get(reg, f"/v2/{REPO}/blobs/{desc['digest']}")
        assert status == 200 and blob == layout_blob(layout, desc["digest"])
        assert headers["docker-content-digest"] == desc["digest"]

    status, _, _ = registry_get(reg, f"/v2/{REPO}/manifests/nope")
    assert status == 404
    # distribution 2.8 quirk: an OCI manifest is "unknown" (404) to a client whose Accept
    # header lists neither OCI type (even */*); with no Accept header at all it is served.
    docker_only = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    status, _, body = registry_get(reg, f"/v2/{REPO}/manifests/v1", headers=docker_only)
    assert status == 404 and b"MANIFEST_UNKNOWN" in body
    status, _, body = registry_get(reg, f"/v2/{REPO}/tags/list")
    assert status == 200 and json.loads(body)["tags"] == ["v1"]


def test_v2s2_push_converts_manifest_but_keeps_layers(registry, image):
    layout, digest, manifest = image
    d2 = push(layout, "v1", registry, "other/app", "v1", format="v2s2")
    assert d2 != digest
    status, headers, body = registry_get(registry, f"/v2/other/app/manifests/{d2}")
    assert status == 200
    assert headers["content-type"] == "application/vnd.docker.distribution.manifest.v2+json"
    converted = json.loads(body)
    assert [x["digest"] for x in converted["layers"]] == \
        [x["digest"] for x in manifest["layers"]]


def test_stop_is_idempotent_and_kills_the_process():
    reg = Registry().start()
    proc, workdir = reg.proc, reg.workdir
    assert proc is not None and proc.poll() is None
    reg.stop()
    assert proc.poll() is not None and not os.path.exists(workdir)
    reg.stop()
    assert reg.proc is None


def test_start_failure_reports_the_log_tail_and_cleans_up():
    class Broken(Registry):
        def _write_config(self):
            with open(os.path.join(self.workdir, "config.yml"), "w") as f:
                f.write("version: 0.1\nstorage:\n  nosuchdriver: {}\nhttp:\n"
                        f"  addr: 127.0.0.1:{self.port}\n")

    reg = Broken(ready_timeout=5)
    with pytest.raises(RuntimeError, match="(?s)exited.*log tail:.*nosuchdriver"):
        reg.start()
    assert reg.proc is None and reg.workdir is None


def test_tls_registry_verified_with_generated_ca(image):
    layout, digest, _ = image
    with Registry(tls=True) as reg:
        assert reg.url.startswith("https://127.0.0.1:") and os.path.exists(reg.ca_file)
        ctx = ssl.create_default_context(cafile=reg.ca_file)
        with urllib.request.urlopen(reg.url + "/v2/", context=ctx, timeout=10) as resp:
            assert resp.status == 200
        # localhost is in the certificate too
        with urllib.request.urlopen(f"https://localhost:{reg.port}/v2/", context=ctx,
                                    timeout=10) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.URLError) as e:
            urllib.request.urlopen(reg.url + "/v2/", context=ssl.create_default_context(),
                                   timeout=10)
        assert isinstance(e.value.reason, ssl.SSLCertVerificationError)
        # skopeo verifies with --dest-cert-dir holding the CA
        assert push(layout, "v1", reg, REPO, "v1") == digest
        status, headers, _ = registry_get(reg, f"/v2/{REPO}/manifests/v1")
        assert status == 200 and headers["docker-content-digest"] == digest


def test_htpasswd_registry(image):
    layout, digest, _ = image
    with Registry(auth="htpasswd", users={"alice": "secret"}) as reg:  # no TLS needed in 2.8
        status, headers, _ = registry_get(reg, "/v2/")
        assert status == 401
        assert parse_challenge(headers["www-authenticate"]) == ("basic",
                                                                {"realm": "strata-test"})
        assert registry_get(reg, "/v2/", creds=("alice", "wrong"))[0] == 401
        assert registry_get(reg, "/v2/", creds=ALICE)[0] == 200
        with pytest.raises(RuntimeError, match="skopeo copy failed"):
            push(layout, "v1", reg, REPO, "v1")
        assert push(layout, "v1", reg, REPO, "v1", creds=ALICE) == digest
        assert registry_get(reg, f"/v2/{REPO}/manifests/v1")[0] == 401
        status, headers, _ = registry_get(reg, f"/v2/{REPO}/manifests/v1", creds=ALICE)
        assert status == 200 and headers["docker-content-digest"] == digest


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_token_registry_flow(image, tls):
    layout, digest, _ = image
    with Registry(auth="token", tls=tls, users={"alice": "secret"}) as reg:
        assert push(layout, "v1", reg, REPO, "v1", creds=ALICE) == digest
        assert any(r.user == "alice" and r.status == 200 for r in reg.token_requests)
        reg.token_server.requests.clear()

        path = f"/v2/{REPO}/manifests/v1"
        status, headers, _ = registry_get(reg, path)
        assert status == 401
        scheme, params = parse_challenge(headers["www-authenticate"])
        assert scheme == "bearer"
        assert params == {"realm": reg.realm, "service": reg.service,
                          "scope": f"repository:{REPO}:pull"}
        assert params["realm"].startswith("https://" if tls else "http://")

        # anonymous: refused (anonymous_pull is off); bad password: refused
        with pytest.raises(RuntimeError, match="401"):
            get_token(reg, [params["scope"]], realm=params["realm"])
        with pytest.raises(RuntimeError, match="401"):
            get_token(reg, [params["scope"]], ("alice", "nope"), realm=params["realm"])
        reg.token_server.fail_next.append(500)  # injected token-server failure, once
        with pytest.raises(RuntimeError, match="500"):
            get_token(reg, [params["scope"]], ALICE, realm=params["realm"])
        token = get_token(reg, [params["scope"]], ALICE, realm=params["realm"])
        status, headers, _ = registry_get(reg, path, token=token)
        assert status == 200 and headers["docker-content-digest"] == digest

        reqs = reg.token_requests
        assert [(r.user, r.status) for r in reqs] == [(None, 401), (None, 401),
                                                      ("alice", 500), ("alice", 200)]
        assert reqs[-1].scopes == [f"repository:{REPO}:pull"]
        assert reqs[-1].service == reg.service
        assert reqs[-1].granted == [{"type": "repository", "name": REPO, "actions": ["pull"]}]

        # a token is only good for its scope, issuer, audience and lifetime
        other = get_token(reg, ["repository:other/app:pull"], ALICE)
        assert registry_get(reg, path, token=other)[0] == 401
        ts = reg.token_server
        access = ts.grant("alice", [f"repository:{REPO}:pull"])
        assert registry_get(reg, path, token=ts.issue(access, issuer="evil"))[0] == 401
        assert registry_get(reg, path, token=ts.issue(access, audience="elsewhere"))[0] == 401
        expired = ts.issue(access, now=time.time() - 3600)
        assert registry_get(reg, path, token=expired)[0] == 401
        assert registry_get(reg, path, token=ts.issue(access))[0] == 200


def test_token_anonymous_pull_is_pull_only(image):
    layout, digest, _ = image
    with Registry(auth="token", anonymous_pull=True) as reg:
        push(layout, "v1", reg, REPO, "v1", creds=ALICE)
        token = get_token(reg, [f"repository:{REPO}:pull,push"])
        assert reg.token_requests[-1].granted == [
            {"type": "repository", "name": REPO, "actions": ["pull"]}]
        status, headers, _ = registry_get(reg, f"/v2/{REPO}/manifests/v1", token=token)
        assert status == 200 and headers["docker-content-digest"] == digest
        status, _, _ = registry_get(reg, f"/v2/{REPO}/blobs/uploads/", token=token,
                                    method="POST", data=b"")
        assert status == 401
        # creds helper: fetches a pull,push token and starts an upload
        status, headers, _ = registry_get(reg, f"/v2/{REPO}/blobs/uploads/", creds=ALICE,
                                          method="POST", data=b"")
        assert status == 202 and "location" in headers


# -- the fault proxy -----------------------------------------------------------------------
def big_layer(image) -> tuple[str, bytes]:
    layout, _, manifest = image
    desc = max(manifest["layers"], key=lambda d: d["size"])
    return desc["digest"], layout_blob(layout, desc["digest"])


def via(proxy, reg, path, **kw):
    return registry_get(reg, path, base_url=proxy.url, **kw)


def test_proxy_relays_and_counts(pushed, proxy):
    reg, image = pushed
    _, digest, _ = image
    path = f"/v2/{REPO}/manifests/v1"
    status, headers, body = via(proxy, reg, path)
    assert status == 200 and headers["docker-content-digest"] == digest
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    assert via(proxy, reg, path, method="HEAD")[0] == 200
    assert proxy.counts[path] == 2
    assert [(e.method, e.status, e.fault) for e in proxy.log] == [("GET", 200, None),
                                                                   ("HEAD", 200, None)]


def test_proxy_503_burst_then_success(pushed, proxy):
    reg, _ = pushed
    path = f"/v2/{REPO}/manifests/v1"
    rule = proxy.fail(503, times=2, path=r"/manifests/")
    assert via(proxy, reg, "/v2/")[0] == 200  # does not match the rule
    statuses = [via(proxy, reg, path)[0] for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert rule.hits == 2 and rule.times == 0
    assert proxy.counts[path] == 3
    assert [e.fault for e in proxy.requests_to("/manifests/")] == ["fail", "fail", None]


def test_proxy_429_with_retry_after(pushed, proxy):
    reg, _ = pushed
    proxy.fail(429, headers={"Retry-After": "2"}, method="GET", path=r"/blobs/")
    digest, _ = big_layer(pushed[1])
    status, headers, body = via(proxy, reg, f"/v2/{REPO}/blobs/{digest}")
    assert status == 429 and headers["retry-after"] == "2"
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert via(proxy, reg, f"/v2/{REPO}/blobs/{digest}")[0] == 200


def test_proxy_cut_body_is_shorter_than_content_length(pushed, proxy):
    reg, image = pushed
    digest, blob = big_layer(image)
    proxy.cut_after(1000, path=r"/blobs/")
    conn = http.client.HTTPConnection(proxy.host, timeout=10)
    try:
        conn.request("GET", f"/v2/{REPO}/blobs/{digest}")
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(blob)
        with pytest.raises(http.client.IncompleteRead) as e:
            resp.read()
        assert e.value.partial == blob[:1000]
    finally:
        conn.close()
    # spent: the next request gets it all
    status, _, body = via(proxy, reg, f"/v2/{REPO}/blobs/{digest}")
    assert status == 200 and body == blob


def test_proxy_corrupt_keeps_length_changes_bytes(pushed, proxy):
    reg, image = pushed
    digest, blob = big_layer(image)
    proxy.corrupt(path=r"/blobs/")
    status, headers, body = via(proxy, reg, f"/v2/{REPO}/blobs/{digest}")
    assert status == 200 and len(body) == len(blob) == int(headers["content-length"])
    assert body != blob and "sha256:" + hashlib.sha256(body).hexdigest() != digest
    assert sum(a != b for a, b in zip(body, blob, strict=True)) == 1


def test_proxy_passes_range_through(pushed, proxy):
    reg, image = pushed
    digest, blob = big_layer(image)
    status, headers, body = via(proxy, reg, f"/v2/{REPO}/blobs/{digest}",
                                headers={"Range": "bytes=100-1099"})
    assert status == 206 and body == blob[100:1100]
    assert headers["content-range"] == f"bytes 100-1099/{len(blob)}"
    assert proxy.log[-1].headers["Range"] == "bytes=100-1099"


def test_proxy_hang_says_nothing_and_stop_is_prompt(pushed):
    """A hanging request gets no answer at all, and stop() ends it and an idle keep-alive
    connection at once. Here neither would ever end by itself (the hang and the idle
    timeout are unbounded), so stop() returning at all is the proof. The bounds on the
    waits below measure nothing: they only turn a broken proxy into a failure instead of a
    suite that never ends."""
    reg, _ = pushed
    proxy = FaultProxy(reg.host, idle_timeout=None).start()
    hanging = socket.create_connection(("127.0.0.1", proxy.port))
    idle = http.client.HTTPConnection(proxy.host)
    try:
        rule = proxy.hang(threading.TIMEOUT_MAX, path=r"/manifests/")
        hanging.sendall(f"GET /v2/{REPO}/manifests/v1 HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n"
                        .encode())
        idle.request("GET", "/v2/")
        assert idle.getresponse().read() is not None
        assert rule.fired.wait(60), "the request never reached the proxy"
        hanging.setblocking(False)
        with pytest.raises(BlockingIOError):
            hanging.recv(1)  # not a byte of an answer
        [hung] = proxy.requests_to("/manifests/")
        assert hung.fault == "hang" and hung.status is None

        stopper = threading.Thread(target=proxy.stop, daemon=True)
        stopper.start()
        stopper.join(60)
        assert not stopper.is_alive(), "stop() waited on the hang or the idle connection"
        hanging.settimeout(60)
        idle.sock.settimeout(60)
        assert hanging.recv(1) == b"", "the hanging request was closed, still unanswered"
        assert idle.sock.recv(1) == b"", "the idle connection was closed"
    finally:
        hanging.close()
        idle.close()
        proxy._stopping.set()  # had stop() failed to, its handlers would outlive the suite
        proxy.stop()


def test_proxy_hang_zero_drops_connection(pushed, proxy):
    reg, _ = pushed
    proxy.hang(0)
    conn = http.client.HTTPConnection(proxy.host, timeout=5)
    try:
        conn.request("GET", "/v2/")
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            conn.getresponse()
    finally:
        conn.close()


def test_proxy_redirects_blobs(pushed, proxy):
    reg, image = pushed
    digest, blob = big_layer(image)
    path = f"/v2/{REPO}/blobs/{digest}"
    proxy.redirect_blobs_to(reg.url)
    status, headers, _ = via(proxy, reg, path, follow_redirects=False)
    assert status == 307 and headers["location"] == reg.url + path
    status, _, body = via(proxy, reg, path)  # urllib follows it to the registry itself
    assert status == 200 and body == blob
    assert via(proxy, reg, f"/v2/{REPO}/manifests/v1")[0] == 200  # manifests untouched


def test_proxy_concurrent_requests(pushed, proxy):
    reg, image = pushed
    digest, blob = big_layer(image)
    results = []

    def fetch():
        results.append(via(proxy, reg, f"/v2/{REPO}/blobs/{digest}")[2] == blob)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True] * 8


def test_proxy_in_front_of_token_registry(image):
    layout, digest, _ = image
    with Registry(auth="token") as reg, FaultProxy(reg.host) as proxy:
        push(layout, "v1", reg, REPO, "v1", creds=ALICE)
        path = f"/v2/{REPO}/manifests/v1"
        status, headers, _ = via(proxy, reg, path)
        assert status == 401
        scheme, params = parse_challenge(headers["www-authenticate"])
        assert scheme == "bearer" and params["realm"] == reg.realm
        token = get_token(reg, [params["scope"]], ALICE)
        proxy.fail(503, times=1)
        assert via(proxy, reg, path, token=token)[0] == 503
        status, headers, _ = via(proxy, reg, path, token=token)
        assert status == 200 and headers["docker-content-digest"] == digest
        assert proxy.log[-1].headers["Authorization"] == "Bearer " + token
