"""`--registry-mirror REGISTRY=URL` read as containerd reads a hosts.toml `[host."URL"]`: the
API root is the URL's path + /v2 (a path ending in /v2 as it is), and requests carry
`?ns=REGISTRY` except where the mirror is the registry's own host. Pure URL building: the
real pull through a prefixed docker-registry proxy is tests/integration/test_registry_mirror.py.
"""

import pytest

from csi.config import Config
from csi.errors import InvalidArgument
from csi.image.reference import parse
from csi.image.registry import Endpoint, RegistryClient, mirror_endpoint
from csi.image.transport import Options

BLOB = "/v2/team/app/blobs/sha256:" + "a" * 64


@pytest.mark.parametrize("url,scheme,host,root", [
    ("http://127.0.0.1:30020", "http", "127.0.0.1:30020", "/v2"),
    ("http://127.0.0.1:30020/", "http", "127.0.0.1:30020", "/v2"),
    ("mirror.local:5000", "https", "mirror.local:5000", "/v2"),
    ("mirror.local/cache", "https", "mirror.local", "/cache/v2"),
    ("https://m/cache/", "https", "m", "/cache/v2"),
    ("https://m/a/b", "https", "m", "/a/b/v2"),
    ("https://m/cache/v2", "https", "m", "/cache/v2"),  # already the API root: as it is
    ("https://m/cache/v2/", "https", "m", "/cache/v2"),
    ("https://m/v2", "https", "m", "/v2"),
    ("https://m//cache/./x/../y//", "https", "m", "/cache/y/v2"),  # Go's path.Clean
    ("https://m/cache/v2x", "https", "m", "/cache/v2x/v2"),
    ("http://[::1]:5000/p", "http", "[::1]:5000", "/p/v2"),
])
def test_the_api_root_is_the_path_plus_v2(url, scheme, host, root):
    ep = mirror_endpoint("docker.io", url)
    assert (ep.scheme, ep.host, ep.root, ep.mirror) == (scheme, host, root, True)


def test_requests_move_under_the_root_and_name_the_origin_registry():
    ep = mirror_endpoint("127.0.0.1:5000", "http://127.0.0.1:6000/cache")
    # containerd's url.Values.Encode escapes the colon too; Spegel and Dragonfly decode it.
    assert ep.target(BLOB) == f"/cache{BLOB}?ns=127.0.0.1%3A5000"
    assert ep.target("/v2/team/app/manifests/1.0") == \
        "/cache/v2/team/app/manifests/1.0?ns=127.0.0.1%3A5000"
    assert ep.target("/v2/") == "/cache/v2/?ns=127.0.0.1%3A5000"
    assert str(ep) == "http://127.0.0.1:6000/cache"


def test_ns_joins_a_query_the_path_already_has():
    ep = mirror_endpoint("ghcr.io", "https://m/p")
    assert ep.target("/v2/a/tags/list?n=10&last=b") == "/p/v2/a/tags/list?n=10&last=b&ns=ghcr.io"


def test_docker_hub_is_named_docker_io_as_containerd_names_it():
    ep = mirror_endpoint("docker.io", "http://127.0.0.1:30020")
    assert ep.target("/v2/library/nginx/manifests/1.27") == \
        "/v2/library/nginx/manifests/1.27?ns=docker.io"


@pytest.mark.parametrize("registry,url", [
    ("docker.io", "https://registry-1.docker.io"),  # Docker Hub's own API host
    ("quay.io", "https://quay.io/prefix"),  # the registry itself, under another path
])
def test_no_ns_where_the_mirror_is_the_registrys_own_host(registry, url):
    ep = mirror_endpoint(registry, url)
    assert ep.ns == ""
    assert "ns=" not in ep.target(BLOB)


def test_the_origin_keeps_v2_and_no_query():
    ep = Endpoint("https", "r.test")
    assert ep.target(BLOB) == BLOB
    assert str(ep) == "https://r.test"
    with pytest.raises(ValueError, match="not a Distribution API path"):
        ep.target("/v2x/a")


@pytest.mark.parametrize("url,why", [
    ("ftp://m", "scheme must be http or https"),
    ("https://m:99999", "out of range"),
    ("https://m:port", "Port could not be cast"),
    ("https://", "no host"),
    ("https://user:pw@m", "no user, query or fragment"),
    ("https://m/p?x=1", "no user, query or fragment"),
    ("https://m/p?", "no user, query or fragment"),
    ("https://m/p#frag", "no user, query or fragment"),
    ("https://m/my prefix", "whitespace"),
    ("https://m/v2/project", "/v2 inside the path"),  # containerd's override_path form
    ("https://m/a/v2/b/", "/v2 inside the path"),
])
def test_refused_urls_say_why(url, why):
    with pytest.raises(ValueError, match=why):
        mirror_endpoint("docker.io", url)


def test_endpoints_are_the_registrys_mirrors_in_order_then_the_origin():
    c = RegistryClient(Options(mirrors=(("docker.io", "http://127.0.0.1:30020"),
                                        ("quay.io", "https://q.mirror/quay"),
                                        ("docker.io", "https://cache.local/hub/")),
                               insecure=frozenset({"127.0.0.1:5000"})))
    assert [(str(e), e.root, e.ns) for e in c.endpoints(parse("nginx:1.27"))] == [
        ("http://127.0.0.1:30020", "/v2", "docker.io"),
        ("https://cache.local/hub", "/hub/v2", "docker.io"),
        ("https://registry-1.docker.io", "/v2", "")]
    assert [str(e) for e in c.endpoints(parse("quay.io/a/b:1"))] == [
        "https://q.mirror/quay", "https://quay.io"]


def _config(*mirrors: str) -> Config:
    return Config(node_id="n", root="/var/lib/strata", registry_mirrors=mirrors)


def test_the_flag_takes_a_path_and_passes_the_url_on():
    opts = _config("docker.io=http://127.0.0.1:30020/", "ghcr.io=mirror.local/ghcr/v2").registry
    assert opts.mirrors == (("docker.io", "http://127.0.0.1:30020/"),
                            ("ghcr.io", "mirror.local/ghcr/v2"))


@pytest.mark.parametrize("flag,message", [
    ("docker.io=https://m/v2/project", r"^--registry-mirror must be REGISTRY=URL, .* \(/v2 "
     r"inside the path: the API root is the path \+ /v2 .*\), got 'docker.io=https://m/v2/"),
    ("docker.io=https://m?ns=x", r"^--registry-mirror must be REGISTRY=URL, .* \(a mirror URL "
     r"has no user, query or fragment\), got"),
    ("docker.io", r"^--registry-mirror must be REGISTRY=URL, the URL "
     r"\[http\(s\)://\]HOST\[:PORT\]\[/PATH\], got 'docker.io'$"),
])
def test_the_flag_says_why_a_url_is_refused(flag, message):
    with pytest.raises(InvalidArgument, match=message):
        _config(flag).validate()
