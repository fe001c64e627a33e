"""Pure parts of the registry client: challenges, Retry-After, backoff, endpoints."""

import email.utils
import time

import pytest

from csi.image.reference import parse
from csi.image.registry import Endpoint, RegistryClient
from csi.image.tokens import parse_challenge
from csi.image.transport import Options, Reply, Transport, registry_error


def test_parse_bearer_and_basic_challenges():
    assert parse_challenge('Bearer realm="https://auth.io/token",service="reg",'
                           'scope="repository:a/b:pull"') == (
        "bearer", {"realm": "https://auth.io/token", "service": "reg",
                   "scope": "repository:a/b:pull"})
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic",
                                                               {"realm": "Registry Realm"})


def test_retry_after_seconds_and_http_date():
    from csi.image.transport import _retry_after

    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after(future) <= 31
    assert _retry_after("soon") is None


def test_backoff_is_exponential_with_jitter_and_capped():
    lo = Transport(Options(backoff=1, backoff_max=8), rng=lambda: 0.0)
    hi = Transport(Options(backoff=1, backoff_max=8), rng=lambda: 1.0)
    assert [lo._backoff(a, None) for a in range(5)] == [0.5, 1, 2, 4, 4]
    assert [hi._backoff(a, None) for a in range(5)] == [1.5, 3, 6, 12, 12]
    assert lo._backoff(0, 7.0) == 7.0  # Retry-After wins over the schedule


def test_endpoints_mirrors_first_then_origin():
    c = RegistryClient(Options(mirrors=(("docker.io", "https://mirror.local"),
                                        ("docker.io", "http://127.0.0.1:5001"),
                                        ("quay.io", "https://q.mirror")),
                               insecure=frozenset({"127.0.0.1:5000"})))
    eps = c.endpoints(parse("nginx"))
    assert [(e.scheme, e.host, e.mirror) for e in eps] == [
        ("https", "mirror.local", True), ("http", "127.0.0.1:5001", True),
        ("https", "registry-1.docker.io", False)]
    assert [str(e) for e in c.endpoints(parse("127.0.0.1:5000/a:1"))] == [
        "http://127.0.0.1:5000"]


@pytest.mark.parametrize("body,expected", [
    (b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}',
     "MANIFEST_UNKNOWN: manifest unknown"),
    (b"plain text", "plain text"),
    (b'{"errors":[]}', '{"errors":[]}'),
])
def test_registry_error_text(body, expected):
    assert registry_error(body) == expected


def test_the_token_cache_is_safe_for_concurrent_pulls(monkeypatch):
    """Pull threads share the token cache; pruning it (past 256 entries) while others
    insert must neither crash ("dictionary changed size during iteration") nor lose their
    tokens. The registry is a stub: a 401 challenge, then a token per repository."""
    import json
    import sys
    import threading

    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image."
                           "manifest.v1+json", "config": {}, "layers": []}).encode()
    tokens_issued = []

    def call(scheme, host, method, target, headers, what, body=None):
        if target.startswith("/token"):
            tokens_issued.append(target)
            return Reply(200, {}, b'{"token": "t", "expires_in": 3600}')
        if "Authorization" not in headers:
            return Reply(401, {"WWW-Authenticate": 'Bearer realm="http://auth.test/token"'},
                         b"")
        return Reply(200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
                     manifest)

    client = RegistryClient(Options(retries=0))
    monkeypatch.setattr(client.transport, "call", call)
    ep = Endpoint("https", "r.test")
    threads, per_thread, errors = 8, 150, []

    def pull(t):
        try:
            for i in range(per_thread):
                client.manifest(ep, parse(f"r.test/t{t}/repo{i}:1"), "1", None)
        except Exception as e:  # reported below: a thread's exception is otherwise lost
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        workers = [threading.Thread(target=pull, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert len(tokens_issued) == threads * per_thread
    for t in range(threads):  # every token is still cached: no new token request
        for i in range(per_thread):
            client.manifest(ep, parse(f"r.test/t{t}/repo{i}:1"), "1", None)
    assert len(tokens_issued) == threads * per_thread


@pytest.mark.parametrize("path,repo", [
    ("/v2/k8s-artifacts-prod/images/pause/manifests/3.9", "k8s-artifacts-prod/images/pause"),
    ("/v2/a/blobs/sha256:abc?X-Amz-Signature=1", "a"),
    ("/v2/a/manifests/b/manifests/latest", "a/manifests/b"),
    ("/storage/sha256/abc", ""),
    ("/v2/", ""),
])
def test_the_repository_a_redirect_names(path, repo):
    from csi.image.tokens import _repository_in

    assert _repository_in(path) == repo


@pytest.mark.parametrize("header,offset,ok", [
    ("bytes 100-199/200", 100, True),
    ("bytes 0-199/200", 100, False),
    ("bytes 100-199/*", 100, True),
    ("", 100, False),
    ("items 100-199/200", 100, False),
])
def test_a_content_range_must_start_where_we_asked(header, offset, ok):
    from csi.image.registry import _range_starts_at

    assert _range_starts_at(header, offset) == ok


def test_a_token_covers_the_scope_the_challenge_names_too(monkeypatch):
    """A registry we were redirected to may name the repository differently: its challenge's
    pull scope is asked for beside ours (as containerd does); nothing beyond pull."""
    import urllib.parse

    token_queries = []

    def call(scheme, host, method, target, headers, what, body=None):
        if target.startswith("/token"):
            token_queries.append(urllib.parse.parse_qs(urllib.parse.urlsplit(target).query))
            return Reply(200, {}, b'{"token": "t"}')
        if "Authorization" not in headers:
            return Reply(401, {"WWW-Authenticate": 'Bearer realm="https://auth.test/token",'
                               'service="reg",scope="repository:prod/app:pull '
                               'repository:prod/app:push repository:team/app:pull"'}, b"")
        return Reply(200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
                     b'{"schemaVersion": 2}')

    client = RegistryClient(Options(retries=0))
    monkeypatch.setattr(client.transport, "call", call)
    client.manifest(Endpoint("https", "r.test"), parse("r.test/team/app:1"), "1", None)
    assert token_queries == [{"scope": ["repository:team/app:pull", "repository:prod/app:pull"],
                              "service": ["reg"]}]
