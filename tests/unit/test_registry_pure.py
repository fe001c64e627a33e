"""Pure parts of the registry client: challenges, Retry-After, backoff, endpoints."""

import email.utils
import time

import pytest

from csi.image.reference import parse
from csi.image.registry import Options, RegistryClient, _registry_error, parse_challenge


def test_parse_bearer_and_basic_challenges():
    assert parse_challenge('Bearer realm="https://auth.io/token",service="reg",'
                           'scope="repository:a/b:pull"') == (
        "bearer", {"realm": "https://auth.io/token", "service": "reg",
                   "scope": "repository:a/b:pull"})
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic",
                                                               {"realm": "Registry Realm"})


def test_retry_after_seconds_and_http_date():
    from csi.image.registry import _retry_after

    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after(future) <= 31
    assert _retry_after("soon") is None


def test_backoff_is_exponential_with_jitter_and_capped():
    lo = RegistryClient(Options(backoff=1, backoff_max=8), rng=lambda: 0.0)
    hi = RegistryClient(Options(backoff=1, backoff_max=8), rng=lambda: 1.0)
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
    assert _registry_error(body) == expected
