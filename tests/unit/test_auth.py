"""Pull-secret parsing and the kubelet's credential matching."""

import base64
import json

import pytest

from csi.errors import InvalidArgument
from csi.image.auth import Credentials, Keyring, parse_config


def cfg(auths: dict) -> str:
    return json.dumps({"auths": auths})


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_dockerconfigjson_auth_and_username_password_forms():
    entries = parse_config(cfg({
        "https://index.docker.io/v1/": {"auth": b64("hub:pw")},
        "registry.example:5000": {"username": "u", "password": "p:with:colons"},
    }), "secret")
    assert entries == [("docker.io", "", Credentials("hub", "pw")),
                       ("registry.example:5000", "", Credentials("u", "p:with:colons"))]


def test_legacy_dockercfg_without_auths_wrapper():
    data = json.dumps({"quay.io": {"auth": b64("q:w")}})
    assert Keyring.from_secrets({".dockercfg": data}).lookup("quay.io", "x") == \
        Credentials("q", "w")


@pytest.mark.parametrize("data", ["not json", "[]", json.dumps({"auths": []}),
                                  cfg({"h": {"auth": "!!!notbase64"}})])
def test_malformed_secrets_are_invalid_argument(data):
    with pytest.raises(InvalidArgument):
        parse_config(data, "pull secret")


def test_lookup_rules():
    ring = Keyring.from_secrets({".dockerconfigjson": cfg({
        "docker.io": {"auth": b64("hub:1")},
        "*.example.com": {"auth": b64("glob:2")},
        "reg.example.com/team": {"auth": b64("team:3")},
        "reg.example.com/team/app": {"auth": b64("app:4")},
        "localhost:5000": {"auth": b64("local:5")},
    })})
    assert ring.lookup("registry-1.docker.io", "library/nginx").username == "hub"
    assert ring.lookup("index.docker.io", "library/nginx").username == "hub"
    assert ring.lookup("reg.example.com", "other/x").username == "glob"
    assert ring.lookup("reg.example.com", "team/x").username == "team"
    assert ring.lookup("reg.example.com", "team/app").username == "app"  # longest prefix
    assert ring.lookup("reg.example.com", "teammate/x").username == "glob"  # not a prefix
    assert ring.lookup("localhost:5000", "a").username == "local"
    assert ring.lookup("localhost:5001", "a") is None
    assert ring.lookup("example.com", "a") is None  # *.example.com needs a subdomain


def test_pod_secret_wins_over_node_config():
    node = Keyring(parse_config(cfg({"r.io": {"auth": b64("node:1")}}), "node"))
    ring = Keyring.from_secrets({".dockerconfigjson": cfg({"r.io": {"auth": b64("pod:2")}})},
                                base=node)
    assert ring.lookup("r.io", "x").username == "pod"
    assert Keyring.from_secrets({}, base=node).lookup("r.io", "x").username == "node"


def test_an_exact_host_beats_a_glob_whatever_the_order():
    for order in ([("reg.example.com", "exact:1"), ("*.example.com", "glob:2")],
                  [("*.example.com", "glob:2"), ("reg.example.com", "exact:1")]):
        ring = Keyring.from_secrets({".dockerconfigjson": cfg(
            {key: {"auth": b64(auth)} for key, auth in order})})
        assert ring.lookup("reg.example.com", "x").username == "exact"
        assert ring.lookup("other.example.com", "x").username == "glob"
    # a node's exact host still loses to nothing less than a pod's exact host
    node = Keyring(parse_config(cfg({"reg.example.com": {"auth": b64("node:1")}}), "node"))
    pod = {".dockerconfigjson": cfg({"*.example.com": {"auth": b64("pod:2")}})}
    assert Keyring.from_secrets(pod, base=node).lookup("reg.example.com", "x").username == \
        "node"


def test_credentials_never_print_their_password():
    assert "pw" not in repr(Credentials("u", "pw"))


@pytest.mark.parametrize("key,registry,matches", [
    # IPv6 literals: brackets are not a glob character class, the port is compared apart
    ("[::1]:5000", "[::1]:5000", True),
    ("[::1]:5000", "[::1]:5001", False),
    ("[::1]", "[::1]", True),
    ("[::1]", "[::1]:5000", False),
    ("[fd00::1]:5000", "[::1]:5000", False),
    ("http://[::1]:5000/v2/", "[::1]:5000", True),
    # `*` globs one dot-separated part, never across a dot
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "example.com", False),
    ("*.*.example.com", "a.b.example.com", True),
    ("registry-*.example.com", "registry-eu.example.com", True),
    ("*.example.com", "a.example.com:5000", False),  # ports must be equal
    ("*.example.com:5000", "a.example.com:5000", True),
    ("*", "localhost", True),
    ("*", "a.b", False),
    ("10.0.0.*:5000", "10.0.0.7:5000", True),
])
def test_hosts_match_like_the_kubelet_keyring(key, registry, matches):
    ring = Keyring.from_secrets({".dockerconfigjson": cfg({key: {"auth": b64("u:p")}})})
    assert (ring.lookup(registry, "team/app") is not None) == matches


def test_v1_and_v2_path_prefixes_mean_the_whole_registry():
    ring = Keyring.from_secrets({".dockerconfigjson": cfg({
        "https://r.io/v2/": {"auth": b64("all:1")},
        "https://r.io/v1/team": {"auth": b64("team:2")},
    })})
    assert ring.lookup("r.io", "other/x").username == "all"
    assert ring.lookup("r.io", "team/x").username == "team"


@pytest.mark.parametrize("entry", [
    {},  # what `docker login` writes beside "credsStore"
    {"auth": ""},
    {"auth": b64(":")},
    {"username": "", "password": "", "email": "x@example.com"},
])
def test_entries_without_credentials_are_skipped(entry):
    data = json.dumps({"auths": {"r.io": entry}, "credsStore": "desktop"})
    assert parse_config(data, "secret") == []
    assert Keyring.from_secrets({".dockerconfigjson": data}).lookup("r.io", "a") is None
    # ... so a less specific entry that has credentials still applies
    node = Keyring(parse_config(cfg({"*.io": {"auth": b64("node:1")}}), "node"))
    assert Keyring.from_secrets({".dockerconfigjson": data}, base=node).lookup(
        "r.io", "a").username == "node"


def test_an_identity_token_alone_is_credentials():
    [(_, _, creds)] = parse_config(cfg({"r.io": {"identitytoken": "rt"}}), "secret")
    assert creds == Credentials("", "", "rt")
