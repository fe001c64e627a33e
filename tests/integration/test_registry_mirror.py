"""Pulling through a registry mirror, as a node does with an in-cluster cache: the origin is a
real docker-registry holding the images, the mirror a second one configured as its
pull-through cache (`proxy.remoteurl`) and served under a path prefix (`http.prefix`),
named with `--registry-mirror ORIGIN=http://MIRROR/cache`. Every pull is a NodePublish over
the socket of a real `strata serve`.

The mirror's access log says what strata asked it (path under the prefix, `?ns=ORIGIN`);
the origin's says strata asked it nothing; the mirror's storage then holds the blobs."""

import base64
import json
import os
import time
import urllib.parse

import pytest

from csi.image.build import LayerBuilder, write_image
from tests.conftest import (
    ROOT_REASON,
    app_layer,
    base_layer,
    free_port,
    needs_tools,
    strata_servers,
)
from tests.faultproxy import FaultProxy
from tests.registry import SERVICE, Registry, push, registry_get

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
    needs_tools("docker-registry", "skopeo"),
]
AGENT = "strata-csi"  # transport.USER_AGENT: strata's requests, not the proxy's own
BIG = 3 << 20


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    layout = str(tmp_path_factory.mktemp("mirror-images") / "layout")
    write_image(layout, "app", [base_layer(), app_layer()])
    big = LayerBuilder().file("data/big.bin", os.urandom(BIG))  # fresh bytes: a cold pull
    write_image(layout, "big", [base_layer(), big])
    with Registry() as reg:
        push(layout, "app", reg, "team/app", "1.0")
        push(layout, "big", reg, "team/big", "1.0")
        yield reg


@pytest.fixture(scope="module")
def mirror(origin):
    """A pull-through cache of `origin` at /cache/v2/."""
    with Registry(proxy=origin.url, prefix="/cache/") as reg:
        yield reg


@pytest.fixture
def plugin(tmp_path):
    with strata_servers(tmp_path) as start:
        yield start


def wait_for(check, what: str, timeout: float = 60.0):
    """check()'s first true value. For what a registry does after it answers (its access
    line, the cache's store); the bound only ends a test that would otherwise hang."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {timeout:.0f}s: {what}")
        time.sleep(0.05)
    return value


def layers(reg: Registry, repo: str) -> list[str]:
    """The config and layer digests of `repo`:1.0."""
    status, _, body = registry_get(reg, f"/v2/{repo}/manifests/1.0")
    assert status == 200
    doc = json.loads(body)
    return [doc["config"]["digest"]] + [d["digest"] for d in doc["layers"]]


def ours(reg: Registry, since: int = 0):
    """strata's requests in `reg`'s access log, from line `since` on."""
    return [a for a in reg.access_log()[since:] if a.agent == AGENT]


def published(p, target, image, vid="v") -> str:
    p.csi.publish(vid, target, image)
    try:
        return (target / "etc/motd").read_text()
    finally:
        p.csi.unpublish(vid, target)


def ns(reg: Registry) -> str:
    return "ns=" + urllib.parse.quote(reg.host, safe="")


def test_publish_pulls_through_a_prefixed_pull_through_cache(plugin, origin, mirror, tmp_path):
    digests = layers(origin, "team/app")
    before, mirror_before = len(origin.access_log()), len(mirror.access_log())
    p = plugin("--insecure-registry", origin.host,
               "--registry-mirror", f"{origin.host}=http://{mirror.host}/cache")
    assert published(p, tmp_path / "t", f"{origin.host}/team/app:1.0") == "app motd\n"

    # Every manifest and blob strata fetched, it fetched from the mirror, under the prefix
    # and naming the origin as containerd does.
    wanted = {f"/cache/v2/team/app/manifests/1.0?{ns(origin)}"} | {
        f"/cache/v2/team/app/blobs/{d}?{ns(origin)}" for d in digests}

    def fetched():
        log = ours(mirror, mirror_before)
        return log if wanted <= {a.target for a in log if a.status == 200} else None

    got = wait_for(fetched, "strata's requests in the mirror's log")
    assert all(a.target.startswith("/cache/v2/") and a.target.endswith(ns(origin))
               for a in got), got
    # ... and none from the origin: the bytes came through the mirror, which fetched them
    # and keeps them.
    assert ours(origin, before) == []
    for d in digests[1:]:
        wait_for(lambda d=d: mirror.holds_blob("team/app", d), f"the mirror stores {d}")


@pytest.mark.parametrize("where", ["nothing listening", "a wrong prefix"])
def test_a_mirror_that_fails_falls_back_to_the_origin(plugin, origin, mirror, tmp_path, where):
    url = (f"http://127.0.0.1:{free_port()}/cache" if where == "nothing listening"
           else f"http://{mirror.host}/elsewhere")
    before, mirror_before = len(origin.access_log()), len(mirror.access_log())
    p = plugin("--insecure-registry", origin.host, "--registry-retries", "0",
               "--registry-mirror", f"{origin.host}={url}")
    assert published(p, tmp_path / "t", f"{origin.host}/team/app:1.0") == "app motd\n"
    assert f"mirror {url} failed for {origin.host}/team/app:1.0" in p.read_log()
    # The origin is asked as itself: its own /v2 root, no ns.
    got = wait_for(lambda: ours(origin, before), "strata's requests in the origin's log")
    assert "/v2/team/app/manifests/1.0" in [a.target for a in got]
    assert not [a for a in got if "ns=" in a.target], got
    if where == "a wrong prefix":  # the mirror was asked under the path given, and said 404
        asked = wait_for(lambda: ours(mirror, mirror_before), "the mirror's 404")
        assert [(a.target, a.status) for a in asked] == [
            (f"/elsewhere/v2/team/app/manifests/1.0?{ns(origin)}", 404)]


@pytest.mark.parametrize("dead", ["dropped connections", "nothing behind its front"])
def test_a_dead_mirror_is_tried_once_then_the_origin(plugin, origin, tmp_path, dead):
    """With the default retries: a mirror gets one attempt per request and the pull falls
    back to the origin at once, as containerd moves to the next host (the origin's retries
    and backoff held every pull some 7.5 s, a minute if its packets were dropped). The
    fault proxy counts what reached the mirror: a front that drops every connection after
    the request, or one with nothing listening behind it (502, a retryable status)."""
    upstream = origin.host if dead == "dropped connections" else f"127.0.0.1:{free_port()}"
    with FaultProxy(upstream) as front:
        if dead == "dropped connections":
            front.hang(0, times=None)
        before = len(origin.access_log())
        p = plugin("--insecure-registry", origin.host,
                   "--registry-mirror", f"{origin.host}=http://{front.host}/cache")
        assert published(p, tmp_path / "t", f"{origin.host}/team/app:1.0") == "app motd\n"
        assert [(e.method, e.path) for e in front.log] == [
            ("GET", f"/cache/v2/team/app/manifests/1.0?{ns(origin)}")]
        url = f"http://{front.host}/cache"
    log = p.read_log()
    assert f"mirror {url} failed for {origin.host}/team/app:1.0" in log
    assert "(after 1 attempt)" in log
    wait_for(lambda: ours(origin, before), "strata's requests in the origin's log")


def test_nothing_listening_at_a_mirror_is_one_attempt(plugin, origin, tmp_path):
    """Connection refused: one attempt (the log says so), no retry, then the origin."""
    url = f"http://127.0.0.1:{free_port()}/cache"
    p = plugin("--insecure-registry", origin.host, "--registry-mirror", f"{origin.host}={url}")
    assert published(p, tmp_path / "t", f"{origin.host}/team/app:1.0") == "app motd\n"
    log = p.read_log()
    assert f"mirror {url} failed" in log and "ConnectionRefusedError" in log
    assert "(after 1 attempt)" in log
    assert "retrying in" not in log


def test_range_resume_through_the_prefix(plugin, origin, mirror, tmp_path):
    """A download cut short resumes at the mirror, under its prefix, with a Range."""
    top = layers(origin, "team/big")[-1]
    blob = f"/cache/v2/team/big/blobs/{top}"
    # Warm the cache, so the mirror answers a Range itself (a proxy relaying from upstream
    # sends the whole blob, which strata also takes, but that would not show the 206).
    assert registry_get(mirror, f"/v2/team/big/blobs/{top}", base_url=mirror.api_url)[0] == 200
    wait_for(lambda: mirror.holds_blob("team/big", top), "the mirror stores the big layer")
    with FaultProxy(mirror.host) as front:
        front.cut_after(1 << 20, path="^" + blob)
        p = plugin("--insecure-registry", origin.host,
                   "--registry-mirror", f"{origin.host}=http://{front.host}/cache")
        p.csi.publish("v", tmp_path / "t", f"{origin.host}/team/big:1.0")
        assert (tmp_path / "t/data/big.bin").stat().st_size == BIG
        p.csi.unpublish("v", tmp_path / "t")
        asked = front.requests_to("^" + blob)
    assert [(a.path, a.headers.get("Range"), a.status, a.fault) for a in asked] == [
        (f"{blob}?{ns(origin)}", None, 200, "cut"),
        (f"{blob}?{ns(origin)}", f"bytes={1 << 20}-", 206, None)]


def test_blob_redirects_from_the_prefix_are_followed(plugin, origin, mirror, tmp_path):
    """A mirror that hands blobs out from elsewhere (object storage, a peer): strata follows
    its redirect as it would the origin's."""
    digests = layers(origin, "team/app")
    before = len(origin.access_log())
    with FaultProxy(mirror.host) as front:
        front.redirect_to(origin.url, path=r"^/cache/v2/team/app/blobs/",
                          rewrite=(r"^/cache/v2/", "/v2/"))
        p = plugin("--insecure-registry", origin.host,
                   "--registry-mirror", f"{origin.host}=http://{front.host}/cache")
        assert published(p, tmp_path / "t", f"{origin.host}/team/app:1.0") == "app motd\n"
        assert {a.status for a in front.requests_to("/blobs/")} == {307}
        assert [a.path for a in front.requests_to("/manifests/")] == [
            f"/cache/v2/team/app/manifests/1.0?{ns(origin)}"]
    # Where the redirects went, the blobs came from: the Location as given, query and all.
    wanted = {f"/v2/team/app/blobs/{d}?{ns(origin)}" for d in digests}
    wait_for(lambda: wanted <= {a.target for a in ours(origin, before) if a.status == 200},
             "the redirected blob requests in the origin's log")


@pytest.fixture(scope="module")
def guarded(origin):
    """A pull-through cache of `origin` at /hub/v2/ that wants a token (alice's) from its
    own token server; the origin itself lets anyone pull."""
    with Registry(auth="token", users={"alice": "secret"}, proxy=origin.url,
                  prefix="/hub/") as reg:
        yield reg


def registry_config(tmp_path, host: str) -> str:
    path = tmp_path / "config.json"
    auth = base64.b64encode(b"alice:secret").decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return str(path)


def test_token_auth_at_a_mirror_uses_its_realm_and_its_hosts_credentials(
        plugin, origin, guarded, tmp_path):
    before = len(origin.access_log())
    seen = len(guarded.token_requests)
    p = plugin("--insecure-registry", origin.host,
               "--registry-config", registry_config(tmp_path, guarded.host),
               "--registry-mirror", f"{origin.host}=http://{guarded.host}/hub")
    assert published(p, tmp_path / "t", f"{origin.host}/team/app:1.0") == "app motd\n"
    # The token came from the realm the mirror's 401 named, for alice, whose credentials
    # the node has for the mirror's host.
    tokens = guarded.token_requests[seen:]
    assert tokens and {(t.user, t.service, t.status) for t in tokens} == {
        ("alice", SERVICE, 200)}
    assert "repository:team/app:pull" in tokens[0].scopes
    got = wait_for(lambda: [a for a in ours(guarded) if a.status == 200],
                   "strata's requests in the mirror's log")
    assert all(a.target.startswith("/hub/v2/team/app/") and a.target.endswith(ns(origin))
               for a in got), got
    assert ours(origin, before) == []


def test_a_mirror_gets_no_credentials_of_the_origins(plugin, origin, guarded, tmp_path):
    """Credentials are looked up by the mirror's own host: those the node has for the origin
    are not sent to it. Refused there, the pull falls back to the origin."""
    seen = len(guarded.token_requests)
    p = plugin("--insecure-registry", origin.host, "--registry-retries", "0",
               "--registry-config", registry_config(tmp_path, origin.host),
               "--registry-mirror", f"{origin.host}=http://{guarded.host}/hub")
    assert published(p, tmp_path / "t", f"{origin.host}/team/app:1.0") == "app motd\n"
    tokens = guarded.token_requests[seen:]
    assert tokens and {(t.user, t.status) for t in tokens} == {(None, 401)}
    assert f"mirror http://{guarded.host}/hub failed" in p.read_log()
