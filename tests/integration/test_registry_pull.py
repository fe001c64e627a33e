"""Pulling from a real registry (Debian's docker-registry on 127.0.0.1), as the kubelet
would: references, policies, pull secrets, TLS, token auth, mirrors, and faults injected by
a proxy of our own in front of the registry."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from csi.image.build import LayerBuilder, write_image
from csi.mount.mountinfo import MountTable
from csi.store.state import State
from tests.conftest import (
    ROOT_REASON,
    StrataProcess,
    app_layer,
    base_layer,
    free_port,
    needs_tools,
    scrape,
    strata_servers,
    unmount_all_under,
)
from tests.faultproxy import FaultProxy
from tests.registry import Registry, TokenServer, push, put_manifest, registry_get, upload_blob

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
    needs_tools("docker-registry", "skopeo", "htpasswd"),
]
ALICE = ("alice", "secret")


def dockerconfig(host: str, user: str, password: str) -> dict[str, str]:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {".dockerconfigjson": json.dumps({"auths": {host: {"auth": auth}}})}


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("reg-images") / "layout")
    write_image(path, "app", [base_layer(), app_layer()])
    big = LayerBuilder().file("data/big.bin", os.urandom(3 << 20))  # fresh bytes: a cold pull
    write_image(path, "big", [base_layer(), big])
    return path


@pytest.fixture(scope="module")
def plain(layout):
    with Registry() as reg:
        reg.digests = {"app": push(layout, "app", reg, "team/app", "1.0"),
                       "big": push(layout, "big", reg, "team/big", "1.0")}
        push(layout, "app", reg, "team/app-v2s2", "1.0", format="v2s2")
        yield reg


@pytest.fixture(scope="module")
def secure(layout):
    """TLS with its own CA, and htpasswd basic auth."""
    with Registry(tls=True, auth="htpasswd") as reg:
        push(layout, "app", reg, "team/app", "1.0", creds=ALICE)
        yield reg


@pytest.fixture(scope="module")
def tokens(layout):
    """The Docker token flow, with a token server of the tests' own."""
    with Registry(auth="token") as reg:
        push(layout, "app", reg, "team/app", "1.0", creds=ALICE)
        yield reg


@pytest.fixture(scope="module")
def anon(layout):
    """Token auth that lets anyone pull (Artifact Registry's public repositories behind
    registry.k8s.io do this), its realm reached through a proxy (`anon.realm_proxy`).
    `prod/team/app` holds app as 1.0 and big as 2.0."""
    with TokenServer(dict([ALICE]), anonymous_pull=True) as ts, \
            FaultProxy(ts.host) as realm_proxy, \
            Registry(auth="token", token_server=ts, realm=realm_proxy.url + "/token") as reg:
        push(layout, "app", reg, "prod/team/app", "1.0", creds=ALICE)
        push(layout, "big", reg, "prod/team/app", "2.0", creds=ALICE)
        reg.realm_proxy = realm_proxy
        yield reg


@pytest.fixture
def plugin(tmp_path):
    with strata_servers(tmp_path) as start:
        yield lambda *args: start(*args, metrics_port=free_port())


def published(p, target, image, vid="v", **kw) -> str:
    p.csi.publish(vid, target, image, **kw)
    try:
        return (target / "etc/motd").read_text()
    finally:
        p.csi.unpublish(vid, target)


def store_is_clean(p) -> None:
    """No blob, partial download or layer that state.db does not account for."""
    assert [n for n in os.listdir(os.path.join(p.root, "tmp"))
            if not n.endswith(".partial")] == []
    st = State(os.path.join(p.root, "state.db"))
    try:
        with st.transaction() as tx:
            recorded = {x.id for x in tx.layers()}
    finally:
        st.close()
    assert set(os.listdir(os.path.join(p.root, "layers"))) == recorded


# -- references and formats ------------------------------------------------------------------
def test_pull_by_tag_digest_and_tag_at_digest(plugin, plain, tmp_path):
    p = plugin("--insecure-registry", plain.host)
    d = plain.digests["app"]
    for i, ref in enumerate([f"{plain.host}/team/app:1.0", f"{plain.host}/team/app@{d}",
                             f"{plain.host}/team/app:1.0@{d}"]):
        assert published(p, tmp_path / f"t{i}", ref, vid=f"v{i}") == "app motd\n"
    m = scrape(p.metrics_port)
    assert m['strata_pulls_total{result="pulled"}'] >= 1
    assert m["strata_blob_fetches_total"] == 2, "each layer blob downloaded once"
    assert m["strata_layer_unpacks_total"] == 2
    store_is_clean(p)
    assert os.listdir(os.path.join(p.root, "blobs", "sha256")) == [], "unpacked blobs pruned"


def test_docker_schema2_manifests(plugin, plain, tmp_path):
    p = plugin("--insecure-registry", plain.host)
    assert published(p, tmp_path / "t", f"{plain.host}/team/app-v2s2:1.0") == "app motd\n"


@pytest.mark.parametrize("ref,needle", [
    ("team/nope:1.0", "MANIFEST_UNKNOWN"),  # distribution 2.8 answers so for both
    ("team/app:nope", "MANIFEST_UNKNOWN"),
])
def test_unknown_repository_or_tag_is_not_found(plugin, plain, tmp_path, ref, needle):
    p = plugin("--insecure-registry", plain.host)
    with pytest.raises(grpc.RpcError) as e:
        p.csi.publish("v", tmp_path / "t", f"{plain.host}/{ref}")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert needle in e.value.details() and plain.host in e.value.details()
    assert not (tmp_path / "t").exists()


# -- pull policies ---------------------------------------------------------------------------
def test_pull_policies(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as proxy:
        p = plugin("--insecure-registry", proxy.host, "--tag-ttl", "3600")
        image = f"{proxy.host}/team/app:1.0"
        with pytest.raises(grpc.RpcError) as e:
            published(p, tmp_path / "n", image, pullPolicy="Never")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert sum(proxy.counts.values()) == 0, "Never must not touch the network"

        published(p, tmp_path / "a", image)  # IfNotPresent, cold
        after_first = sum(proxy.counts.values())
        published(p, tmp_path / "b", image)  # IfNotPresent, warm: no request at all
        published(p, tmp_path / "c", image, pullPolicy="Never")
        assert sum(proxy.counts.values()) == after_first

        heads = len(proxy.requests_to("/manifests/", method="HEAD"))
        blobs = len(proxy.requests_to("/blobs/"))
        published(p, tmp_path / "d", image, pullPolicy="Always")
        assert len(proxy.requests_to("/manifests/", method="HEAD")) == heads + 1, \
            "Always asks the registry where the tag points"
        assert len(proxy.requests_to("/blobs/")) == blobs, "an unchanged tag fetches nothing"
        layer_gets = [n for path, n in proxy.counts.items()
                      if "/blobs/" in path and path.split(":")[-1] in _layer_digests(plain)]
        assert layer_gets == [1, 1], "layers are reused, never downloaded again"
        m = scrape(p.metrics_port)
        assert m['strata_pulls_total{result="present"}'] >= 2
        assert m['strata_pulls_total{result="failed_precondition"}'] == 1


def test_a_moved_tag_is_pulled_again_reusing_shared_layers(plugin, plain, layout, tmp_path):
    with FaultProxy(plain.host) as proxy:
        p = plugin("--insecure-registry", proxy.host, "--tag-ttl", "0")
        image = f"{proxy.host}/team/moving:1"
        push(layout, "app", plain, "team/moving", "1")
        assert published(p, tmp_path / "a", image) == "app motd\n"
        push(layout, "big", plain, "team/moving", "1")  # the tag moves to another image
        p.csi.publish("b", tmp_path / "b", image)
        assert (tmp_path / "b/data/big.bin").exists()
        p.csi.unpublish("b", tmp_path / "b")
        base = _layer_digests(plain, "team/big")[0]
        assert proxy.counts[f"/v2/team/moving/blobs/sha256:{base}"] == 1, \
            "the shared base layer is not downloaded again"


def test_tag_ttl_rechecks_the_tag_but_reuses_layers(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as proxy:
        p = plugin("--insecure-registry", proxy.host, "--tag-ttl", "0")
        image = f"{proxy.host}/team/app:1.0"
        published(p, tmp_path / "a", image)
        blobs = len([r for r in proxy.log if "/blobs/" in r.path])
        published(p, tmp_path / "b", image)
        assert [r.method for r in proxy.log if "/manifests/" in r.path] == ["GET", "HEAD"]
        assert len([r for r in proxy.log if "/blobs/" in r.path]) == blobs


# -- auth and transport ----------------------------------------------------------------------
def test_tls_and_basic_auth_with_a_pull_secret(plugin, secure, tmp_path):
    image = f"{secure.host}/team/app:1.0"
    p = plugin("--registry-ca", secure.ca_file)
    secret = dockerconfig(secure.host, *ALICE)
    p.csi.node.NodePublishVolume(_req("ok", tmp_path / "ok", image, secret), timeout=60)
    assert (tmp_path / "ok/etc/motd").read_text() == "app motd\n"
    p.csi.unpublish("ok", tmp_path / "ok")
    for name, secrets in (("none", {}), ("wrong", dockerconfig(secure.host, "alice", "no"))):
        with pytest.raises(grpc.RpcError) as e:
            p.csi.node.NodePublishVolume(_req(name, tmp_path / name, f"{image}x", secrets),
                                         timeout=60)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
    log = p.read_log()
    assert base64.b64encode(b"alice:secret").decode() not in log, "credentials never logged"
    assert "***stripped***" in log


def test_tls_without_the_ca_is_unavailable(plugin, secure, tmp_path):
    p = plugin("--registry-retries", "0")
    with pytest.raises(grpc.RpcError) as e:
        p.csi.node.NodePublishVolume(_req("v", tmp_path / "t", f"{secure.host}/team/app:1.0",
                                          dockerconfig(secure.host, *ALICE)), timeout=60)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "TLS" in e.value.details()


def test_node_level_registry_config(plugin, secure, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(dockerconfig(secure.host, *ALICE)[".dockerconfigjson"])
    p = plugin("--registry-ca", secure.ca_file, "--registry-config", str(cfg))
    assert published(p, tmp_path / "t", f"{secure.host}/team/app:1.0") == "app motd\n"


def test_token_auth_tokens_are_scoped_and_cached(plugin, tokens, tmp_path):
    p = plugin("--insecure-registry", tokens.host)
    image = f"{tokens.host}/team/app:1.0"
    with pytest.raises(grpc.RpcError) as e:
        p.csi.publish("anon", tmp_path / "anon", image)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    before = len(tokens.token_requests)
    p.csi.node.NodePublishVolume(_req("v", tmp_path / "t", image,
                                      dockerconfig(tokens.host, *ALICE)), timeout=60)
    assert (tmp_path / "t/etc/motd").read_text() == "app motd\n"
    p.csi.unpublish("v", tmp_path / "t")
    granted = tokens.token_requests[before:]
    # manifest + config + 2 layers on one cached token, scoped to the repository
    assert len(granted) == 1, [r.scopes for r in granted]
    assert granted[0].user == "alice"
    assert granted[0].scopes == ["repository:team/app:pull"]


def test_identity_tokens_are_exchanged_as_oauth2_refresh_tokens(plugin, tokens, tmp_path):
    """`docker login` to an OAuth registry (ACR, for one) stores an `identitytoken` and a
    placeholder user instead of a password; the token is a refresh token to POST."""
    tokens.token_server.refresh_tokens["rt-alice"] = "alice"
    p = plugin("--insecure-registry", tokens.host)
    image = f"{tokens.host}/team/app:1.0"

    def secret(identity_token):
        entry = {"username": "00000000-0000-0000-0000-000000000000",
                 "identitytoken": identity_token}
        return {".dockerconfigjson": json.dumps({"auths": {tokens.host: entry}})}

    before = len(tokens.token_requests)
    p.csi.node.NodePublishVolume(_req("v", tmp_path / "t", image, secret("rt-alice")),
                                 timeout=60)
    assert (tmp_path / "t/etc/motd").read_text() == "app motd\n"
    p.csi.unpublish("v", tmp_path / "t")
    [req] = tokens.token_requests[before:]
    assert (req.method, req.user, req.status) == ("POST", "alice", 200)
    assert req.scopes == ["repository:team/app:pull"] and req.service == tokens.service
    assert "authorization" not in {k.lower() for k in req.headers}, "no password grant"

    with pytest.raises(grpc.RpcError) as e:  # Always: the image is on the node by now
        p.csi.node.NodePublishVolume(_req("w", tmp_path / "w", image, secret("revoked"),
                                          pullPolicy="Always"), timeout=60)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "refused our credentials" in e.value.details()
    assert not (tmp_path / "w").exists()


def test_always_checks_the_pods_own_access_even_to_a_digest_on_the_node(plugin, tokens,
                                                                         tmp_path):
    """A private image pulled by one pod stays on the node. IfNotPresent then serves it to
    anyone (as the kubelet does), but Always asks the registry with the pod's credentials,
    as the kubelet's pull would, even for a digest."""
    from tests.registry import registry_get

    p = plugin("--insecure-registry", tokens.host)
    status, hdrs, _ = registry_get(tokens, "/v2/team/app/manifests/1.0", creds=ALICE)
    assert status == 200
    image = f"{tokens.host}/team/app@{hdrs['docker-content-digest']}"
    secret = dockerconfig(tokens.host, *ALICE)
    assert _publish_with(p, tmp_path / "a", image, secret) == "app motd\n"
    before = len(tokens.token_requests)
    assert _publish_with(p, tmp_path / "b", image, secret, pullPolicy="Always") == \
        "app motd\n"
    assert [r.user for r in tokens.token_requests[before:]] in ([], ["alice"])
    assert _publish_with(p, tmp_path / "c", image, {}) == "app motd\n"  # IfNotPresent
    with pytest.raises(grpc.RpcError) as e:
        _publish_with(p, tmp_path / "d", image, {}, pullPolicy="Always")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not (tmp_path / "d").exists()


def test_a_cached_blob_that_rotted_is_evicted_and_fetched_again(plugin, plain, tmp_path):
    """A blob is verified when stored, but a crash before its data reached the disk can
    leave the right size with the wrong bytes. Reading it fails with DATA_LOSS and evicts
    it, so the kubelet's retry downloads it again instead of failing forever."""
    p = plugin("--insecure-registry", plain.host)
    from tests.registry import registry_get

    [_, top] = _layer_digests(plain)
    _, _, body = registry_get(plain, "/v2/team/app/manifests/1.0")
    size = json.loads(body)["layers"][1]["size"]
    cached = os.path.join(p.root, "blobs", "sha256", top)
    with open(cached, "wb") as f:
        f.write(b"\0" * size)
    image = f"{plain.host}/team/app:1.0"
    with pytest.raises(grpc.RpcError) as e:
        p.csi.publish("v", tmp_path / "t", image)
    assert e.value.code() == grpc.StatusCode.DATA_LOSS
    assert not os.path.exists(cached), "the corrupt blob stays no longer"
    assert published(p, tmp_path / "t", image) == "app motd\n"  # the retry
    store_is_clean(p)


def test_mirror_is_tried_first_and_falls_back_to_the_origin(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as mirror:
        mirror.fail(503, times=None)  # a mirror that is down
        p = plugin("--insecure-registry", plain.host, "--registry-retries", "0",
                   "--registry-mirror", f"{plain.host}=http://{mirror.host}")
        assert published(p, tmp_path / "t", f"{plain.host}/team/app:1.0") == "app motd\n"
        assert mirror.log, "the mirror was asked first"
    with FaultProxy(plain.host) as mirror:
        p = plugin("--insecure-registry", plain.host, "--registry-mirror",
                   f"{plain.host}=http://{mirror.host}")
        assert published(p, tmp_path / "u", f"{plain.host}/team/app:1.0") == "app motd\n"
        assert mirror.requests_to("/blobs/"), "a working mirror serves the blobs"


# -- faults ----------------------------------------------------------------------------------
def test_5xx_burst_and_429_retry_after_are_retried(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as proxy:
        proxy.fail(503, times=3, path="/manifests/")
        proxy.fail(429, times=1, headers={"Retry-After": "1"}, path="/blobs/")
        p = plugin("--insecure-registry", proxy.host)
        assert published(p, tmp_path / "t", f"{proxy.host}/team/app:1.0") == "app motd\n"
        assert [r.status for r in proxy.log[:4]] == [503, 503, 503, 200]
        store_is_clean(p)


def test_a_connection_cut_mid_blob_resumes_with_range(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as proxy:
        proxy.cut_after(1 << 20, times=1, path=_big_layer_digest(plain))
        p = plugin("--insecure-registry", proxy.host)
        image = f"{proxy.host}/team/big:1.0"
        p.csi.publish("v", tmp_path / "t", image)
        assert (tmp_path / "t/data/big.bin").stat().st_size == 3 << 20
        p.csi.unpublish("v", tmp_path / "t")
        ranged = [r for r in proxy.log if r.headers.get("Range", "").startswith("bytes=")]
        assert ranged and ranged[0].headers["Range"] != "bytes=0-", "resumed, not restarted"
        m = scrape(p.metrics_port)
        # about 3 MiB of incompressible layer plus the small ones: nothing fetched twice
        assert m["strata_blob_fetched_bytes_total"] < (3 << 20) + (512 << 10)
        store_is_clean(p)


def test_wrong_bytes_are_data_loss_and_nothing_is_kept(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as proxy:
        proxy.corrupt(times=None, path="/blobs/sha256:" + _big_layer_digest(plain))
        p = plugin("--insecure-registry", proxy.host, "--registry-retries", "1")
        with pytest.raises(grpc.RpcError) as e:
            p.csi.publish("v", tmp_path / "t", f"{proxy.host}/team/big:1.0")
        assert e.value.code() == grpc.StatusCode.DATA_LOSS
        assert "team/big" in e.value.details()
        big = _big_layer_digest(plain)
        kept = os.listdir(os.path.join(p.root, "blobs", "sha256"))
        assert big not in kept, "the corrupt blob is never kept"
        for name in kept:  # what is kept (the intact base layer) is verified
            with open(os.path.join(p.root, "blobs", "sha256", name), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == name
        assert [n for n in os.listdir(os.path.join(p.root, "tmp"))] == []
        store_is_clean(p)
        assert not (tmp_path / "t").exists()
        proxy.clear()
        p.csi.publish("v", tmp_path / "t", f"{proxy.host}/team/big:1.0")  # now it works
        p.csi.unpublish("v", tmp_path / "t")


def test_a_registry_that_never_answers_is_unavailable_then_recovers(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as proxy:
        proxy.hang(30, times=None)
        p = plugin("--insecure-registry", proxy.host, "--registry-read-timeout", "0.5",
                   "--registry-retries", "1")
        with pytest.raises(grpc.RpcError) as e:
            p.csi.publish("v", tmp_path / "t", f"{proxy.host}/team/app:1.0")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "timed out" in e.value.details()
        proxy.clear()
        assert published(p, tmp_path / "t", f"{proxy.host}/team/app:1.0") == "app motd\n"
        store_is_clean(p)


# -- the kubelet's deadline and racing pods --------------------------------------------------
def test_a_slow_pull_outlives_the_deadline_and_the_retry_joins_it(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as proxy:
        proxy.delay(3, times=1, path="/blobs/sha256:" + _big_layer_digest(plain))
        p = plugin("--insecure-registry", proxy.host, "--pull-wait", "0.5")
        image = f"{proxy.host}/team/big:1.0"
        with pytest.raises(grpc.RpcError) as e:
            p.csi.publish("v", tmp_path / "t", image)
        assert e.value.code() == grpc.StatusCode.ABORTED
        assert "still pulling" in e.value.details()
        assert not (tmp_path / "t").exists()
        for _ in range(40):  # the kubelet retries with backoff
            try:
                p.csi.publish("v", tmp_path / "t", image)
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.ABORTED
        assert (tmp_path / "t/data/big.bin").exists()
        p.csi.unpublish("v", tmp_path / "t")
        per_blob = [n for path, n in proxy.counts.items() if "/blobs/" in path]
        assert per_blob and max(per_blob) == 1, f"one download per blob: {proxy.counts}"


def test_32_racing_pods_download_each_blob_once(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as proxy:
        p = plugin("--insecure-registry", proxy.host)
        image = f"{proxy.host}/team/big:1.0"
        (tmp_path / "pods").mkdir()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda i: p.csi.publish(f"r{i}", tmp_path / "pods" / f"{i}", image),
                          range(32)))
        per_blob = [n for path, n in proxy.counts.items() if "/blobs/" in path]
        assert len(per_blob) == 3 and max(per_blob) == 1, proxy.counts
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda i: p.csi.unpublish(f"r{i}", tmp_path / "pods" / f"{i}"),
                          range(32)))
        assert not MountTable().under(str(tmp_path / "pods"))


def _req(vid, target, image, secrets, **attrs):
    from csi.proto import csi_pb2
    from tests.conftest import mount_cap

    return csi_pb2.NodePublishVolumeRequest(
        volume_id=vid, target_path=str(target), volume_capability=mount_cap(),
        volume_context={"image": image, "csi.storage.k8s.io/ephemeral": "true", **attrs},
        secrets=secrets)


def _layer_digests(reg, repo: str = "team/app") -> list[str]:
    from tests.registry import registry_get

    status, _, body = registry_get(reg, f"/v2/{repo}/manifests/1.0")
    assert status == 200
    return [x["digest"].split(":")[1] for x in json.loads(body)["layers"]]


def _big_layer_digest(reg) -> str:
    """The hex digest of team/big's own (top) layer blob."""
    from tests.registry import registry_get

    status, _, body = registry_get(reg, "/v2/team/big/manifests/1.0")
    assert status == 200
    return json.loads(body)["layers"][-1]["digest"].split(":")[1]


def test_blob_redirects_are_followed_without_our_credentials(plugin, tokens, plain, tmp_path):
    """A registry that hands blobs out from object storage: the redirect is followed, and the
    storage host never sees the registry's bearer token."""
    with FaultProxy(plain.host) as storage, FaultProxy(tokens.host) as front:
        front.redirect_blobs_to(storage.url)
        p = plugin("--insecure-registry", front.host)
        image = f"{front.host}/team/app:1.0"
        p.csi.node.NodePublishVolume(_req("v", tmp_path / "t", image,
                                          dockerconfig(front.host, *ALICE)), timeout=60)
        assert (tmp_path / "t/etc/motd").read_text() == "app motd\n"
        p.csi.unpublish("v", tmp_path / "t")
        assert len(storage.requests_to("/blobs/")) == 3  # config and two layers
        assert all("Authorization" not in e.headers for e in storage.log)
        assert all("Authorization" in e.headers for e in front.requests_to("/blobs/")
                   if e.status == 307)


def _push_multi_arch(reg, workdir, repo: str, tag: str) -> tuple[str, list[dict]]:
    """An index under `repo:tag` with an image for another architecture first, then one for
    the node's, each printing "built for ARCH" in /etc/motd; returns (index digest,
    entries)."""
    from csi.image.manifest import node_platform

    layout = str(workdir / "multi")
    os_, arch, variant = node_platform()
    other = "arm64" if arch != "arm64" else "amd64"
    entries = []
    for a in (other, arch):
        write_image(layout, a, [LayerBuilder().file("etc/motd", f"built for {a}\n")])
        digest = push(layout, a, reg, repo, a)
        status, _, body = registry_get(reg, f"/v2/{repo}/manifests/{digest}")
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": digest, "size": len(body),
                        "platform": {"os": "linux", "architecture": a,
                                     **({"variant": variant} if a == arch and variant else {})}})
    index_digest, _ = put_manifest(reg, repo, tag, {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries})
    return index_digest, entries


def test_an_index_is_narrowed_to_the_nodes_platform(plugin, plain, tmp_path):
    from csi.image.manifest import node_platform

    arch = node_platform()[1]
    index_digest, entries = _push_multi_arch(plain, tmp_path, "team/multi", "latest")
    p = plugin("--insecure-registry", plain.host)
    assert published(p, tmp_path / "t", f"{plain.host}/team/multi") == f"built for {arch}\n"
    # Known by the index's own digest and by the tag: no network needed any more.
    for ref in (f"{plain.host}/team/multi@{index_digest}", f"{plain.host}/team/multi"):
        assert published(p, tmp_path / "n", ref, pullPolicy="Never") == f"built for {arch}\n"
    # ... yet it is one image on the node, listed once under its platform manifest.
    ls = subprocess.run([sys.executable, "-m", "csi", "ls", "--root", p.root],
                        capture_output=True, text=True, check=True).stdout
    rows = [line for line in ls.splitlines() if "team/multi" in line]
    assert len(rows) == 1, ls
    assert entries[1]["digest"][7:19] in rows[0]



def test_if_not_present_uses_the_local_copy_when_the_registry_is_down(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as proxy:
        p = plugin("--insecure-registry", proxy.host, "--tag-ttl", "0",
                   "--registry-retries", "0")
        image = f"{proxy.host}/team/app:1.0"
        published(p, tmp_path / "a", image)
        proxy.fail(503, times=None)
        assert published(p, tmp_path / "b", image) == "app motd\n"  # like the kubelet
        with pytest.raises(grpc.RpcError) as e:
            published(p, tmp_path / "c", image, pullPolicy="Always")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_pull_that_fails_after_the_deadline_reports_its_error(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as proxy:
        proxy.delay(1.5, times=1, path="/manifests/")
        proxy.fail(503, times=None, path="/blobs/")
        p = plugin("--insecure-registry", proxy.host, "--pull-wait", "0.3",
                   "--registry-retries", "0")
        image = f"{proxy.host}/team/app:1.0"
        with pytest.raises(grpc.RpcError) as e:
            p.csi.publish("v", tmp_path / "t", image)
        assert e.value.code() == grpc.StatusCode.ABORTED
        # The kubelet retries; while the background pull still runs each retry is ABORTED
        # again, and once it has failed the next retry learns why.
        deadline = time.monotonic() + 30
        while True:
            with pytest.raises(grpc.RpcError) as e:
                p.csi.publish("v", tmp_path / "t", image)
            if e.value.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, "the retry learns why"
        assert "503" in e.value.details()


def test_blobs_fall_back_from_a_failing_mirror_to_the_origin(plugin, plain, tmp_path):
    with FaultProxy(plain.host) as mirror:
        mirror.fail(503, times=None, path="/blobs/sha256:" + _big_layer_digest(plain))
        p = plugin("--insecure-registry", plain.host, "--registry-retries", "0",
                   "--registry-mirror", f"{plain.host}=http://{mirror.host}")
        p.csi.publish("v", tmp_path / "t", f"{plain.host}/team/big:1.0")
        assert (tmp_path / "t/data/big.bin").stat().st_size == 3 << 20
        p.csi.unpublish("v", tmp_path / "t")


def test_a_full_disk_while_downloading_is_resource_exhausted(plain, tmp_path):
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "strata-test", str(root)],
                   check=True)
    p = StrataProcess(str(tmp_path / "run"), root=str(root / "store"),
                      extra_args=("--insecure-registry", plain.host))
    os.makedirs(p.base)
    try:
        p.start()
        with pytest.raises(grpc.RpcError) as e:
            p.csi.publish("v", tmp_path / "t", f"{plain.host}/team/big:1.0")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert os.listdir(root / "store" / "tmp") == [], "no partial download fills the disk"
    finally:
        p.stop()
        unmount_all_under(str(tmp_path))


# -- redirects of API calls, tags of multi-arch images, IfNotPresent, odd indexes, Range ------
def _publish_with(p, target, image, secrets, vid="v", **attrs) -> str:
    p.csi.node.NodePublishVolume(_req(vid, target, image, secrets, **attrs), timeout=60)
    try:
        return (target / "etc/motd").read_text()
    finally:
        p.csi.unpublish(vid, target)


def test_registry_api_redirects_are_followed_without_our_credentials(plugin, tokens, anon,
                                                                      tmp_path):
    """registry.k8s.io answers /v2/NAME/... with a redirect to the registry that holds the
    image, under another name (REGION-docker.pkg.dev/v2/k8s-artifacts-prod/images/NAME/...),
    which wants a token of its own. Manifests, HEADs and blobs follow the redirect; the other
    host gets an anonymous token for its repository, never our credentials or token."""
    with FaultProxy(tokens.host) as front, FaultProxy(anon.host) as other:
        p = plugin("--insecure-registry", front.host)
        secret = dockerconfig(front.host, *ALICE)
        before = len(anon.token_requests)
        assert _publish_with(p, tmp_path / "a", f"{front.host}/team/app:1.0", secret) == \
            "app motd\n"  # front itself, authenticated: its token is cached now
        front.redirect_to(other.url, path=r"^/v2/.+/(manifests|blobs)/",
                          rewrite=(r"^/v2/", "/v2/prod/"))
        seen = len(front.log)
        image = f"{front.host}/team/app:2.0"  # big, only in `anon`
        p.csi.node.NodePublishVolume(_req("b", tmp_path / "b", image, secret), timeout=60)
        assert (tmp_path / "b/data/big.bin").stat().st_size == 3 << 20
        p.csi.unpublish("b", tmp_path / "b")
        _publish_with(p, tmp_path / "c", image, secret, pullPolicy="Always")  # a HEAD

        assert [e.method for e in other.requests_to("/manifests/")] == ["GET", "GET", "HEAD"]
        assert other.requests_to("/blobs/"), "config and layer came from the other host"
        assert {e.status for e in front.log[seen:]} == {307}
        ours = {e.headers["Authorization"] for e in front.log if "Authorization" in e.headers}
        assert ours, "front was sent its bearer token"
        assert not ours & {e.headers.get("Authorization") for e in other.log}
        granted = anon.token_requests[before:]
        assert [(r.user, r.scopes) for r in granted] == [
            (None, ["repository:prod/team/app:pull"])], "one anonymous token, cached"
        assert "authorization" not in {k.lower() for k in granted[0].headers}


def test_a_token_service_that_redirects_is_followed_without_our_credentials(plugin, anon,
                                                                            tmp_path):
    """A realm that answers 307 to the real token service on another host: followed, but the
    pull secret's basic credentials stay behind (the anonymous token still pulls)."""
    realm = anon.realm_proxy
    realm.redirect_to(anon.token_server.url, path=r"^/token")
    try:
        before, seen = len(anon.token_requests), len(realm.log)
        p = plugin("--insecure-registry", anon.host)
        assert _publish_with(p, tmp_path / "t", f"{anon.host}/prod/team/app:1.0",
                             dockerconfig(anon.host, *ALICE)) == "app motd\n"
        assert [(e.status, "Authorization" in e.headers) for e in realm.log[seen:]] == [
            (307, True)], "the realm got the credentials it asked for, once"
        granted = anon.token_requests[before:]
        assert [(r.user, r.status) for r in granted] == [(None, 200)]
        assert "authorization" not in {k.lower() for k in granted[0].headers}
    finally:
        realm.clear()


def test_an_unchanged_multi_arch_tag_costs_one_head(plugin, plain, tmp_path):
    """The tag names the index; the HEAD answers with the index digest. Comparing that with
    the platform manifest would fetch index, manifest and config at every --tag-ttl (GETs
    that Docker Hub rate-limits)."""
    from csi.image.manifest import node_platform

    _push_multi_arch(plain, tmp_path, "team/multi-head", "1")
    with FaultProxy(plain.host) as proxy:
        p = plugin("--insecure-registry", proxy.host, "--tag-ttl", "0")
        image = f"{proxy.host}/team/multi-head:1"
        motd = f"built for {node_platform()[1]}\n"
        assert published(p, tmp_path / "a", image) == motd
        seen = len(proxy.log)
        assert published(p, tmp_path / "b", image) == motd
        assert published(p, tmp_path / "c", image, pullPolicy="Always") == motd
        assert [(e.method, e.path) for e in proxy.log[seen:]] == [
            ("HEAD", "/v2/team/multi-head/manifests/1")] * 2


@pytest.mark.parametrize("status,code", [
    (503, grpc.StatusCode.UNAVAILABLE),
    (403, grpc.StatusCode.PERMISSION_DENIED),  # an expired or revoked pull secret
    (404, grpc.StatusCode.NOT_FOUND),  # the tag (or repository) deleted upstream
])
def test_if_not_present_uses_the_local_copy_whatever_the_registry_says(plugin, plain,
                                                                       tmp_path, status,
                                                                       code):
    """The kubelet's IfNotPresent never asks the registry about an image the node has; the
    tag refresh after --tag-ttl must not make a present image fail. Always does fail."""
    with FaultProxy(plain.host) as proxy:
        p = plugin("--insecure-registry", proxy.host, "--tag-ttl", "0",
                   "--registry-retries", "0")
        image = f"{proxy.host}/team/app:1.0"
        published(p, tmp_path / "a", image)
        proxy.fail(status, times=None)
        assert published(p, tmp_path / "b", image) == "app motd\n"  # like the kubelet
        assert proxy.requests_to("/manifests/1.0"), "the refresh was tried"
        with pytest.raises(grpc.RpcError) as e:
            published(p, tmp_path / "c", image, pullPolicy="Always")
        assert e.value.code() == code


def test_if_not_present_survives_a_pull_secret_the_token_service_refuses(plugin, tokens,
                                                                         tmp_path):
    p = plugin("--insecure-registry", tokens.host, "--tag-ttl", "0")
    image = f"{tokens.host}/team/app:1.0"
    assert _publish_with(p, tmp_path / "a", image, dockerconfig(tokens.host, *ALICE)) == \
        "app motd\n"
    before = len(tokens.token_requests)
    expired = dockerconfig(tokens.host, "alice", "rotated")
    assert _publish_with(p, tmp_path / "b", image, expired) == "app motd\n"
    refused = [r.status for r in tokens.token_requests[before:]]
    assert refused and set(refused) == {401}, "the refresh was tried"
    with pytest.raises(grpc.RpcError) as e:
        _publish_with(p, tmp_path / "c", image, expired, pullPolicy="Always")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_index_entries_without_a_platform_rank_after_matching_ones(plugin, plain, layout,
                                                                    tmp_path):
    """containerd takes an index entry that names no platform when nothing names the node's,
    if the image's config says it is for the node's OS and architecture."""
    from csi.image.manifest import node_platform

    repo = "team/noplat"
    app = push(layout, "app", plain, repo, "app")
    big = push(layout, "big", plain, repo, "big")
    # big again, with a config saying it is for another architecture
    _, _, body = registry_get(plain, f"/v2/{repo}/manifests/{big}")
    foreign = json.loads(body)
    _, _, config = registry_get(plain, f"/v2/{repo}/blobs/{foreign['config']['digest']}")
    other = "arm64" if node_platform()[1] != "arm64" else "amd64"
    config = json.dumps({**json.loads(config), "architecture": other}).encode()
    foreign["config"] = {**foreign["config"], "digest": upload_blob(plain, repo, config),
                         "size": len(config)}
    foreign_digest, foreign_body = put_manifest(plain, repo, "foreign", foreign)

    def entry(digest, platform=None):
        _, _, body = registry_get(plain, f"/v2/{repo}/manifests/{digest}")
        return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                "size": len(body), **({"platform": platform} if platform else {})}

    def index(tag, *entries):
        put_manifest(plain, repo, tag, {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": list(entries)})

    os_, arch, variant = node_platform()
    mine = {"os": os_, "architecture": arch, **({"variant": variant} if variant else {})}
    index("unlabelled", entry(foreign_digest), entry(app))
    index("ranked", entry(app), entry(big, mine))
    p = plugin("--insecure-registry", plain.host)
    # the foreign one comes first but its config says otherwise: app
    p.csi.publish("u", tmp_path / "u", f"{plain.host}/{repo}:unlabelled")
    assert (tmp_path / "u/etc/motd").read_text() == "app motd\n"
    assert not (tmp_path / "u/data/big.bin").exists()
    p.csi.unpublish("u", tmp_path / "u")
    # an entry naming the node's platform beats an unlabelled one listed before it: big
    p.csi.publish("r", tmp_path / "r", f"{plain.host}/{repo}:ranked")
    assert (tmp_path / "r/data/big.bin").exists()
    p.csi.unpublish("r", tmp_path / "r")


def test_a_resume_answered_from_byte_zero_starts_over(plugin, plain, tmp_path):
    """A 206 whose Content-Range does not start at the offset asked for is not appended (it
    would duplicate the first bytes); the download starts again from zero."""
    big = _big_layer_digest(plain)
    with FaultProxy(plain.host) as proxy:
        proxy.cut_after(1 << 20, times=1, path=big)
        proxy.partial_from_zero(times=1, path=big)
        p = plugin("--insecure-registry", proxy.host, "--registry-retries", "1")
        p.csi.publish("v", tmp_path / "t", f"{proxy.host}/team/big:1.0")
        assert (tmp_path / "t/data/big.bin").stat().st_size == 3 << 20
        p.csi.unpublish("v", tmp_path / "t")
        got = [(e.fault, e.status, e.headers.get("Range")) for e in proxy.requests_to(big)]
        assert got[0] == ("cut", 200, None)
        assert got[1][:2] == ("partial0", 206) and got[1][2] != "bytes=0-"
        assert got[2:] == [(None, 200, None)], "asked again for the whole blob"
        store_is_clean(p)
