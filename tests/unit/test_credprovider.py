"""csi/image/credprovider.py: the kubelet's CredentialProviderConfig, matchImages globbing,
the exec protocol's answers, cache keys and caching, service-account tokens; the settings
that load it; the credential chain; and tokens kept out of the RPC payload log."""

import base64
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from csi.config import Config
from csi.errors import InvalidArgument, PermissionDenied
from csi.image.auth import CredentialChain, Credentials, Keyring, parse_config
from csi.image.credconfig import (
    ProviderSpec,
    TokenAttributes,
    load_config,
    match_image,
    parse_duration,
)
from csi.image.credconfig import parse_config as parse_provider_config
from csi.image.credprovider import (
    CredentialProviders,
    Provider,
    ProviderFailed,
    cache_key,
    parse_response,
    run_plugin,
)
from csi.image.podtokens import TOKENS_KEY, Identity, audience_token, service_account_key
from csi.image.registry import offers
from csi.interceptors import redact
from csi.proto import csi_pb2

V1 = "credentialprovider.kubelet.k8s.io/v1"


# -- matchImages ----------------------------------------------------------------------------
@pytest.mark.parametrize("pattern, image, matches", [
    # the examples of the kubelet's documentation (kubelet-credential-provider)
    ("*.kubernetes.io", "abcd.kubernetes.io", True),
    ("*.kubernetes.io", "kubernetes.io", False),
    ("*.*.kubernetes.io", "abc.def.kubernetes.io", True),
    ("*.*.kubernetes.io", "abc.kubernetes.io", False),
    ("prefix.*.io", "prefix.kubernetes.io", True),
    ("*-good.kubernetes.io", "something-good.kubernetes.io", True),
    ("*-good.kubernetes.io", "something-bad.kubernetes.io", False),
    ("*.io", "a.kubernetes.io", False),  # a glob matches one label only
    ("k8s.*", "k8s.io", True),
    # ports: equal, or neither names one
    ("registry.io:8080", "registry.io:8080/team/app", True),
    ("registry.io:8080", "registry.io/team/app", False),
    ("registry.io", "registry.io:8080/team/app", False),
    # the pattern's path is a string prefix of the image's, as the kubelet compares them
    ("registry.io", "registry.io/team/app", True),
    ("registry.io/team", "registry.io/team/app", True),
    ("registry.io/team", "registry.io/teammate/app", True),
    ("registry.io/team/", "registry.io/teammate/app", False),
    ("registry.io/other", "registry.io/team/app", False),
    # a scheme may be written
    ("https://*.registry.io", "eu.registry.io/app", True),
    # Go's filepath.Match classes: ^ negates, ! does not
    ("[ab].registry.io", "a.registry.io/x", True),
    ("[^ab].registry.io", "a.registry.io/x", False),
    ("[^ab].registry.io", "c.registry.io/x", True),
    ("[!a].registry.io", "!.registry.io/x", True),
    ("?.registry.io", "ab.registry.io/x", False),
    ("*.dkr.ecr.*.amazonaws.com", "123456789012.dkr.ecr.us-east-1.amazonaws.com/app", True),
    ("*.dkr.ecr.*.amazonaws.com", "123456789012.dkr.ecr.us-east-1.amazonaws.com.cn/a", False),
    ("localhost:5000", "localhost:5000/team/app", True),
    ("[::1]:5000", "[::1]:5000/team/app", True),
    ("docker.io", "docker.io/library/nginx", True),
])
def test_match_image(pattern, image, matches):
    assert match_image(pattern, image) is matches


@pytest.mark.parametrize("pattern", ["[a.io", "a\\", "[].io", "[z-a].io", ""])
def test_a_malformed_glob_is_refused(pattern):
    with pytest.raises(ValueError):
        match_image(pattern, "a.io")


# -- durations ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [
    ("0", 0), ("12h", 43200), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400), ("500ms", 0.5),
    ("-1s", -1), ("2h45m30.5s", 9930.5), ("1us", 1e-6), ("1µs", 1e-6),
])
def test_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "12", "h", "1d", "1h 30m", "one hour", "1.h.m"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# "1111a" * 13 + "!" took the old regex (`((?:\d+\.?\d*|\.\d+)[a-z…]+)+`) 23 s, four times
# longer with each "1111a" more: this one would take it longer than the universe has been.
ADVERSARIAL = "1111a" * 40 + "!"


def test_an_adversarial_duration_is_refused_in_one_pass():
    with pytest.raises(ValueError, match="unknown unit 'a'"):
        parse_duration(ADVERSARIAL)
    with pytest.raises(ValueError, match="unit"):
        parse_duration("1" * 100_000 + "!")
    # A provider's answer is where such a string would come from.
    with pytest.raises(ProviderFailed, match="cacheDuration") as e:
        parse_response(answer(duration=ADVERSARIAL), V1)
    assert len(str(e.value)) < 300, "the string is not quoted whole"


@pytest.mark.parametrize("text", ["1h.", "1.h.m", "+", "-", ".s", "1e3s", "1_000s", "１s",
                                  "1" * 400 + "h"])
def test_more_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text, seconds", [(".5s", 0.5), ("5.s", 5), ("+1m", 60),
                                           ("1h1h", 7200), ("1.0000000001s", 1.0000000001)])
def test_more_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


# -- the configuration ----------------------------------------------------------------------
GOOD = """\
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages: ["*.dkr.ecr.*.amazonaws.com", "*.dkr.ecr.*.amazonaws.com.cn"]
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials]
    env:
      - {name: AWS_PROFILE, value: temp}
  - name: acr-credential-provider
    matchImages: ["*.azurecr.io"]
    defaultCacheDuration: "10m"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    tokenAttributes:
      serviceAccountTokenAudience: api://AzureADTokenExchange
      requireServiceAccount: true
      cacheType: ServiceAccount
      optionalServiceAccountAnnotationKeys: [azure.workload.identity/client-id]
"""


def test_a_good_config_in_yaml_and_in_json():
    import yaml

    specs = parse_provider_config(GOOD, "cfg.yaml")
    assert specs == parse_provider_config(json.dumps(yaml.safe_load(GOOD)), "cfg.json")
    ecr, acr = specs
    assert (ecr.name, ecr.default_cache_duration, ecr.args, ecr.env, ecr.tokens) == (
        "ecr-credential-provider", 43200, ("get-credentials",), (("AWS_PROFILE", "temp"),),
        None)
    assert acr.tokens == TokenAttributes("api://AzureADTokenExchange", True, "ServiceAccount",
                                         (), ("azure.workload.identity/client-id",))


def _bad(path_in_doc, value):
    """GOOD with one field of its second provider changed (None: removed)."""
    import yaml

    doc = yaml.safe_load(GOOD)
    node = doc
    *parents, last = path_in_doc
    for p in parents:
        node = node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return json.dumps(doc)


@pytest.mark.parametrize("change, fragment", [
    ((["kind"], "KubeletConfiguration"), "cfg.yaml: kind: must be CredentialProviderConfig"),
    ((["apiVersion"], "v1"), "cfg.yaml: apiVersion: 'v1' is not one of"),
    ((["providers"], []), "cfg.yaml: providers: needs at least one provider"),
    ((["extra"], 1), "cfg.yaml: extra: unknown field"),
    ((["providers", 1, "name"], "a/b"), "providers[1].name: 'a/b' must name a file"),
    ((["providers", 1, "name"], ".."), "providers[1].name"),
    ((["providers", 1, "matchImages"], []), "providers[1].matchImages: needs at least one"),
    ((["providers", 1, "matchImages"], ["[bad"]), "providers[1].matchImages[0]: '[bad'"),
    ((["providers", 1, "defaultCacheDuration"], None),
     "providers[1].defaultCacheDuration: is required"),
    ((["providers", 1, "defaultCacheDuration"], "-1m"),
     "providers[1].defaultCacheDuration: must not be negative"),
    ((["providers", 1, "defaultCacheDuration"], 0),
     "providers[1].defaultCacheDuration: must be a duration string such as \"12h\" or "
     "\"0s\", got 0"),
    ((["providers", 1, "defaultCacheDuration"], "a day"),
     "providers[1].defaultCacheDuration: 'a day' is not a duration"),
    ((["providers", 1, "apiVersion"], "credentialprovider.kubelet.k8s.io/v2"),
     "providers[1].apiVersion"),
    ((["providers", 1, "apiVersion"], "credentialprovider.kubelet.k8s.io/v1beta1"),
     "providers[1].tokenAttributes: is only supported with apiVersion "
     "credentialprovider.kubelet.k8s.io/v1"),
    ((["providers", 1, "args"], "get-credentials"), "providers[1].args: must be a list"),
    ((["providers", 1, "env"], [{"name": "A"}]), "providers[1].env[0].value: is required"),
    ((["providers", 1, "tokenAttributes", "cacheType"], "Pod"),
     "providers[1].tokenAttributes.cacheType: 'Pod' is not one of ServiceAccount, Token"),
    ((["providers", 1, "tokenAttributes", "cacheType"], None),
     "providers[1].tokenAttributes.cacheType: is required"),
    ((["providers", 1, "tokenAttributes", "requireServiceAccount"], None),
     "providers[1].tokenAttributes.requireServiceAccount: is required"),
    ((["providers", 1, "tokenAttributes", "requireServiceAccount"], "yes"),
     "providers[1].tokenAttributes.requireServiceAccount: must be true or false"),
    ((["providers", 1, "tokenAttributes", "serviceAccountTokenAudience"], ""),
     "providers[1].tokenAttributes.serviceAccountTokenAudience: must not be empty"),
    ((["providers", 1, "tokenAttributes", "optionalServiceAccountAnnotationKeys"],
      ["not a key"]), "providers[1].tokenAttributes.optionalServiceAccountAnnotationKeys: "
                      "'not a key' is not an annotation key"),
    ((["providers", 1, "tokenAttributes", "requiredServiceAccountAnnotationKeys"],
      ["azure.workload.identity/client-id"]), "cannot be both required and optional"),
    ((["providers", 1, "tokenAttributes", "audience"], "x"),
     "providers[1].tokenAttributes.audience: unknown field"),
])
def test_config_errors_name_the_file_and_the_field(change, fragment):
    with pytest.raises(InvalidArgument) as e:
        parse_provider_config(_bad(*change), "cfg.yaml")
    assert fragment in str(e.value)


def test_duplicate_names_and_required_keys_without_a_service_account(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text(_bad(["providers", 1, "name"], "ecr-credential-provider"))
    with pytest.raises(InvalidArgument, match=r"one.yaml: providers\[1\].name: 'ecr-"
                                              r"credential-provider' is already named in"):
        load_config(str(path))
    import yaml

    doc = yaml.safe_load(GOOD)
    doc["providers"][1]["tokenAttributes"].update(
        requireServiceAccount=False, optionalServiceAccountAnnotationKeys=[],
        requiredServiceAccountAnnotationKeys=["a.io/b"])
    with pytest.raises(InvalidArgument, match="requireServiceAccount cannot be false"):
        parse_provider_config(json.dumps(doc), "cfg.yaml")


def test_a_config_directory_is_read_in_name_order(tmp_path):
    (tmp_path / "b.yaml").write_text(GOOD)
    (tmp_path / "a.json").write_text(json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig",
        "providers": [{"name": "first", "matchImages": ["r.io"],
                       "defaultCacheDuration": "0", "apiVersion": V1}]}))
    (tmp_path / "ignored.txt").write_text("not a config")
    assert [s.name for s in load_config(str(tmp_path))] == [
        "first", "ecr-credential-provider", "acr-credential-provider"]
    (tmp_path / "c.yml").write_text(GOOD)
    with pytest.raises(InvalidArgument, match="c.yml: providers.0..name: 'ecr-credential-"
                                              "provider' is already named in .*b.yaml"):
        load_config(str(tmp_path))


def test_not_yaml_names_the_file(tmp_path):
    (tmp_path / "x.yaml").write_text("providers: [unclosed")
    with pytest.raises(InvalidArgument, match="x.yaml: not YAML or JSON"):
        load_config(str(tmp_path / "x.yaml"))


# -- the settings ---------------------------------------------------------------------------
def _bin(tmp_path, *names) -> str:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for n in names:
        (d / n).write_text("#!/bin/sh\nexit 1\n")
        (d / n).chmod(0o755)
    return str(d)


def _config(**kw) -> Config:
    return dataclasses.replace(Config(node_id="n"), **kw)


def test_settings_both_or_neither_and_checked_at_start(tmp_path):
    cfg = tmp_path / "providers.yaml"
    cfg.write_text(GOOD)
    with pytest.raises(InvalidArgument, match="go together: give both or neither"):
        _config(image_credential_provider_config=str(cfg)).validate()
    with pytest.raises(InvalidArgument, match="go together"):
        _config(image_credential_provider_bin_dir=str(tmp_path)).validate("pull")
    with pytest.raises(InvalidArgument, match=r"--image-credential-provider-bin-dir: .*bin/"
                                              r"ecr-credential-provider: no executable"):
        _config(image_credential_provider_config=str(cfg),
                image_credential_provider_bin_dir=_bin(tmp_path)).validate()
    with pytest.raises(InvalidArgument, match="--image-credential-provider-bin-dir: "
                                              ".*/nowhere does not exist"):
        _config(image_credential_provider_config=str(cfg),
                image_credential_provider_bin_dir=str(tmp_path / "nowhere")).validate()
    with pytest.raises(InvalidArgument, match="--image-credential-provider-config: .*/none"
                                              ".yaml does not exist"):
        _config(image_credential_provider_config=str(tmp_path / "none.yaml"),
                image_credential_provider_bin_dir=str(tmp_path)).validate()
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace('"10m"', '"ten minutes"'))
    with pytest.raises(InvalidArgument) as e:
        _config(image_credential_provider_config=str(bad),
                image_credential_provider_bin_dir=str(tmp_path)).validate()
    assert str(e.value).startswith(f"--image-credential-provider-config: {bad}: "
                                   "providers[1].defaultCacheDuration: 'ten minutes'")
    config = _config(image_credential_provider_config=str(cfg),
                     image_credential_provider_bin_dir=_bin(
                         tmp_path, "ecr-credential-provider", "acr-credential-provider"))
    providers = config.validate().registry.credential_providers
    assert [p.spec.name for p in providers.providers] == ["ecr-credential-provider",
                                                          "acr-credential-provider"]
    assert config.registry.credential_providers is providers, "read once per process"
    assert _config().validate().registry.credential_providers is None


def test_the_settings_are_flags_of_serve_and_pull(tmp_path, monkeypatch, capsys):
    from csi import cli

    cfg = tmp_path / "p.yaml"
    cfg.write_text(GOOD.replace('"10m"', "10m0x"))
    for command in (["serve", "--node-id", "n"], ["pull", "x"]):
        with pytest.raises(SystemExit) as e:
            cli.main([*command, "--image-credential-provider-config", str(cfg),
                      "--image-credential-provider-bin-dir", str(tmp_path)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"strata {command[0]}: error: --image-credential-provider-config: {cfg}: " \
               "providers[1].defaultCacheDuration" in err, err


# -- answers and their cache keys -----------------------------------------------------------
def answer(key_type="Image", duration=None, auth=None, api=V1, **extra) -> bytes:
    doc = {"apiVersion": api, "kind": "CredentialProviderResponse", "cacheKeyType": key_type,
           "auth": auth if auth is not None else {"r.io": {"username": "u",
                                                           "password": "p"}}, **extra}
    if duration is not None:
        doc["cacheDuration"] = duration
    return json.dumps(doc).encode()


def test_a_response_is_a_keyring():
    a = parse_response(answer("Registry", "1h", {
        "*.r.io": {"username": "glob", "password": "1"},
        "r.io/team": {"username": "team", "password": "2"}}), V1)
    assert (a.key_type, a.duration) == ("Registry", 3600)
    assert a.keyring.lookup("eu.r.io", "x") == Credentials("glob", "1")
    assert a.keyring.lookup("r.io", "team/app") == Credentials("team", "2")
    assert a.keyring.lookup("r.io", "other/app") is None


@pytest.mark.parametrize("data, fragment", [
    (b"Username: u\nPassword: hunter2", "not JSON"),
    (answer(api="credentialprovider.kubelet.k8s.io/v1beta1"), "apiVersion"),
    (answer(kind="CredentialProviderRequest"), "kind"),
    (answer(key_type="Pod"), "cacheKeyType"),
    (answer(key_type=None), "cacheKeyType"),
    (answer(duration="soon"), "cacheDuration"),
    (answer(auth={"r.io": {"username": "u", "password": 3}}), "auth['r.io']"),
    (answer(auth={"r.io": {"user": "u"}}), "auth['r.io']"),
    (answer(extra=1), "unknown fields"),
])
def test_bad_responses(data, fragment):
    with pytest.raises(ProviderFailed) as e:
        parse_response(data, V1)
    assert fragment in str(e.value)
    assert "hunter2" not in str(e.value)


def test_an_answer_nested_deeper_than_json_goes_is_not_json():
    """json.loads raises RecursionError, no ValueError, for it: that escaped as INTERNAL."""
    with pytest.raises(ProviderFailed, match="not JSON"):
        parse_response(b"[" * 200_000, V1)
    with pytest.raises(InvalidArgument, match="not JSON"):
        audience_token("[" * 200_000, "aud")


def test_the_token_itself_as_password_only_with_token_cache_type():
    data = answer(auth={"r.io": {"username": "u", "password": "the-token"}})
    with pytest.raises(ProviderFailed, match="needs tokenAttributes.cacheType Token"):
        parse_response(data, V1, "the-token", "ServiceAccount")
    assert parse_response(data, V1, "the-token", "Token").keyring.lookup("r.io", "x")


def jwt(claims: dict) -> str:
    def part(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def sa_token(ns="team", name="puller", uid="uid-1", pod="p1", nonce=""):
    return jwt({"sub": f"system:serviceaccount:{ns}:{name}", "aud": ["registry"],
                "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": name, "uid": uid},
                                  "pod": {"name": pod, "uid": f"{pod}-uid"}},
                "jti": nonce or pod})


def pod(ns="team", name="puller", pod="p1", tokens="") -> Identity:
    """What the kubelet says of the pod (podInfoOnMount) that sa_token(ns, name, pod=pod)
    is bound to."""
    return Identity(ns, pod, f"{pod}-uid", name, tokens)


def test_service_account_cache_keys():
    sa_type = TokenAttributes("registry", True, "ServiceAccount")
    token_type = TokenAttributes("registry", True, "Token")
    a, b = sa_token(pod="p1"), sa_token(pod="p2")
    # ServiceAccount: one key for every pod of the service account
    assert service_account_key(sa_type, a, pod(pod="p1")) == \
        service_account_key(sa_type, b, pod(pod="p2")) == ("team", "puller", "uid-1",
                                                           "annotations:0")
    # Token: one per token
    assert service_account_key(token_type, a, pod(pod="p1")) != \
        service_account_key(token_type, b, pod(pod="p2"))
    # another service account, or the same name made again (another UID)
    assert service_account_key(sa_type, sa_token(name="other"), pod(name="other")) != \
        service_account_key(sa_type, a, pod())
    assert service_account_key(sa_type, sa_token(uid="uid-2"), pod()) != \
        service_account_key(sa_type, a, pod())
    # no UID in the claims: the token always counts
    no_uid = jwt({"kubernetes.io": {"namespace": "team", "serviceaccount": {"name": "puller"},
                                    "pod": {"name": "p1", "uid": "p1-uid"}}})
    key = service_account_key(sa_type, no_uid, pod())
    assert key[:3] == ("team", "puller", "") and key[4:] == (
        "token", "sha256:" + __import__("hashlib").sha256(no_uid.encode()).hexdigest())


@pytest.mark.parametrize("token, identity, fragment", [
    # claims naming another namespace's service account, for this pod: a pod's own forgery
    (sa_token(ns="victim"), pod(), "claims kubernetes.io.namespace disagree"),
    (sa_token(name="admin"), pod(), "claims kubernetes.io.serviceaccount.name disagree"),
    (sa_token(pod="other-pod"), pod(), "claims kubernetes.io.pod.uid disagree"),
    (sa_token(ns="victim", name="admin"), pod(),
     "kubernetes.io.namespace, kubernetes.io.serviceaccount.name disagree"),
    # no claims to check: not a token the kubelet asked for this pod
    ("not-a-jwt", pod(), "lacks the claims kubernetes.io.namespace, kubernetes.io."
                         "serviceaccount.name, kubernetes.io.pod.uid"),
    (jwt({"sub": "system:serviceaccount:team:puller"}), pod(), "lacks the claims"),
    (jwt({"kubernetes.io": {"namespace": "team", "serviceaccount": {"name": "puller"}}}), pod(),
     "lacks the claims kubernetes.io.pod.uid"),
    (jwt({"kubernetes.io": {"namespace": ["team"], "serviceaccount": {"name": "puller"},
                            "pod": {"uid": "p1-uid"}}}), pod(), "kubernetes.io.namespace"),
    # no pod attributes (no podInfoOnMount): nothing to check the claims against
    (sa_token(), Identity(), "CSIDriver must set podInfoOnMount: true"),
    (sa_token(), Identity("team", "p1", "", "puller"), "podInfoOnMount"),
])
def test_a_token_that_is_not_the_pods_is_refused(token, identity, fragment):
    with pytest.raises(PermissionDenied) as e:
        service_account_key(TokenAttributes("registry", True, "ServiceAccount"), token,
                            identity)
    assert fragment in str(e.value)
    assert token not in str(e.value) and "victim" not in str(e.value)


def test_cache_keys_by_type():
    sa = ("team", "puller", "uid-1", "annotations:0")
    image = "r.io:5000/team/app"
    assert cache_key("Image", image, sa) == (image, sa)
    assert cache_key("Registry", image, sa) == ("r.io:5000", sa)
    assert cache_key("Global", image, ()) == ("<global>", ())


def test_tokens_by_audience():
    tokens = json.dumps({"registry": {"token": "T", "expirationTimestamp": "2030-01-01T00:00:00Z"},
                         "": {"token": "api"}})
    assert audience_token(tokens, "registry") == "T"
    assert audience_token(tokens, "other") == ""
    assert audience_token("", "registry") == ""
    for bad in ("{not json", "[]", json.dumps({"registry": {"tok": "T"}})):
        with pytest.raises(InvalidArgument) as e:
            audience_token(bad, "registry")
        assert "T" not in str(e.value).replace(TOKENS_KEY, "")


# -- caching and running --------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeRun:
    """subprocess.run for pure caching logic: answers `responses` in turn, counts calls and
    keeps the requests it was given."""

    def __init__(self, *responses: bytes):
        self.responses = list(responses)
        self.requests = []

    def __call__(self, argv, input, env, timeout):
        self.requests.append(json.loads(input))
        return subprocess.CompletedProcess(argv, 0, self.responses.pop(0), b"")


def provider(run, clock, default=0.0, tokens=None, match=("r.io", "*.r.io")) -> Provider:
    spec = ProviderSpec("p", tuple(match), default, V1, tokens=tokens)
    return Provider(spec, "/bin", clock, environ={}, run=run)


def test_answers_are_cached_by_their_key_type_until_they_expire():
    clock = Clock()
    run = FakeRun(answer("Registry", "10m"), answer("Image", "0"), answer("Image"))
    p = provider(run, clock, default=60)
    p.provide("r.io/a", "", ())
    p.provide("r.io/b", "", ())  # the same registry: cached
    assert len(run.requests) == 1
    clock.now += 600
    p.provide("r.io/b", "", ())  # expired; "0": not cached
    p.provide("r.io/b", "", ())  # no cacheDuration: the default (60s)
    assert len(run.requests) == 3
    clock.now += 59
    p.provide("r.io/b", "", ())
    assert len(run.requests) == 3
    assert [r["image"] for r in run.requests] == ["r.io/a", "r.io/b", "r.io/b"]
    assert all("serviceAccountToken" not in r for r in run.requests)


def test_no_default_and_no_duration_is_not_cached():
    run = FakeRun(answer("Global"), answer("Global"))
    p = provider(run, Clock(), default=0)
    p.provide("r.io/a", "", ())
    p.provide("eu.r.io/b", "", ())
    assert len(run.requests) == 2


def test_a_global_answer_serves_every_image_of_the_provider():
    run = FakeRun(answer("Global", "1h"))
    p = provider(run, Clock())
    assert p.provide("r.io/a", "", ()).lookup("r.io", "a") == Credentials("u", "p")
    p.provide("eu.r.io/b", "", ())
    assert len(run.requests) == 1


def test_identities_never_share_a_cached_answer():
    clock = Clock()
    attrs = TokenAttributes("registry", True, "ServiceAccount")
    run = FakeRun(*(answer("Registry", "1h", {"r.io": {"username": f"u{i}", "password": "p"}})
                    for i in range(3)))
    providers = CredentialProviders([provider(run, clock, tokens=attrs)])

    def pull(**claims):
        tokens = json.dumps({"registry": {"token": sa_token(**claims)}})
        out = providers.provide("r.io/app", pod(tokens=tokens, **{
            k: v for k, v in claims.items() if k in ("ns", "name", "pod")}))
        assert out.gated and not out.notes
        return out.keyrings[0].lookup("r.io", "app").username

    assert pull(pod="p1") == "u0"
    assert pull(pod="p2") == "u0", "same service account: cached"
    assert pull(name="other") == "u1", "another identity: its own exec"
    assert pull(uid="uid-2") == "u2", "a service account made again"
    assert [r["serviceAccountToken"] for r in run.requests] == [
        sa_token(pod="p1"), sa_token(name="other"), sa_token(uid="uid-2")]


def test_a_pod_naming_another_service_account_in_its_token_gets_nothing(caplog):
    """The reviewer's forgery: without tokenRequests the kubelet passes a pod's inline
    volumeAttributes on unchanged, tokens key and all. A pod of namespace `intruder` writes
    an unsigned token whose claims name the victim's service account: it must get neither
    the victim's cached answer nor an exec of its own."""
    clock = Clock()
    run = FakeRun(answer("Registry", "1h", {"r.io": {"username": "victim", "password": "pw"}}))
    providers = CredentialProviders([provider(run, clock, tokens=TokenAttributes(
        "registry", True, "ServiceAccount"))])
    real = sa_token(ns="victim-ns", name="puller", pod="v")
    out = providers.provide("r.io/private/app", pod("victim-ns", "puller", "v", tokens=json.dumps(
        {"registry": {"token": real}})))
    assert out.keyrings[0].lookup("r.io", "private/app").password == "pw"

    forged = jwt({"kubernetes.io": {"namespace": "victim-ns",
                                    "serviceaccount": {"name": "puller", "uid": "uid-1"},
                                    "pod": {"name": "v", "uid": "v-uid"}}})
    for intruder in (pod("intruder", "default", "i", tokens=json.dumps(
            {"registry": {"token": forged}})),
            # claims copied from the victim, pod attributes its own: still not its token
            pod("intruder", "default", "i", tokens=json.dumps({"registry": {"token": real}}))):
        with pytest.raises(PermissionDenied) as e:
            providers.provide("r.io/private/other", intruder)
        assert "credential provider p was not run" in str(e.value)
        assert "is not this pod's" in str(e.value)
    assert len(run.requests) == 1, "no exec for the intruder"
    for record in caplog.records:
        assert forged not in record.getMessage() and real not in record.getMessage()
    assert "refused for r.io/private/other (pod intruder/i)" in caplog.text


def test_providers_that_do_not_match_or_must_not_run():
    clock = Clock()
    run = FakeRun(answer(), answer())
    plain = provider(run, clock, match=("other.io",))
    needs_sa = provider(run, clock, tokens=TokenAttributes("registry", True, "Token"))
    annotations = provider(run, clock, tokens=TokenAttributes(
        "registry", True, "Token", required_annotation_keys=("a.io/role",)))
    everyone = CredentialProviders([plain, needs_sa, annotations])
    out = everyone.provide("r.io/app", pod(tokens=json.dumps(
        {"registry": {"token": sa_token()}})))
    assert [r["serviceAccountToken"] for r in run.requests] == [sa_token()], \
        "only the one that matches and may run"
    assert out.gated and len(out.keyrings) == 1
    [note] = out.notes
    assert note == ("credential provider p was not run: it requires service account "
                    "annotations (requiredServiceAccountAnnotationKeys: a.io/role), which a "
                    "CSI driver cannot read")
    assert not CredentialProviders([plain]).provide("r.io/app").gated
    out = CredentialProviders([needs_sa]).provide("r.io/app", Identity())
    assert len(run.requests) == 1
    assert out.notes == [
        "credential provider p was not run: it requires the pod's service-account token "
        "for audience 'registry' (tokenAttributes.requireServiceAccount) and the request "
        "carried none; the CSIDriver must list that audience in tokenRequests, and tokens "
        "come only with NodePublishVolume"]
    optional = provider(run, clock, tokens=TokenAttributes("registry", False, "Token"))
    assert CredentialProviders([optional]).provide("r.io/app").keyrings
    assert "serviceAccountToken" not in run.requests[1]


def script(tmp_path, body: str, name="provider") -> str:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_exec_gets_the_request_args_and_env_and_failures_are_notes(tmp_path, caplog):
    script(tmp_path, """
req = json.load(sys.stdin)
if os.environ.get("MODE") == "fail":
    print("no luck for", req.get("serviceAccountToken"), file=sys.stderr); sys.exit(3)
json.dump({"apiVersion": req["apiVersion"], "kind": "CredentialProviderResponse",
           "cacheKeyType": "Image", "cacheDuration": "0s",
           "auth": {"r.io": {"username": sys.argv[1] + os.environ["MODE"] + os.environ["HOME"],
                             "password": req["image"]}}}, sys.stdout)
""")
    spec = ProviderSpec("provider", ("r.io",), 0, V1, args=("arg",),
                        env=(("MODE", "ok"), ("HOME", "/h")),
                        tokens=TokenAttributes("aud", False, "Token"))
    p = Provider(spec, str(tmp_path), environ={"HOME": "/root", "PATH": os.environ["PATH"]})
    tokens = json.dumps({"aud": {"token": sa_token()}})
    out = CredentialProviders([p]).provide("r.io/app", pod(tokens=tokens))
    assert out.keyrings[0].lookup("r.io", "app") == Credentials("argok/h", "r.io/app")
    failing = Provider(dataclasses.replace(spec, env=(("MODE", "fail"),)), str(tmp_path))
    out = CredentialProviders([failing]).provide("r.io/app", pod(tokens=tokens))
    assert out.keyrings == []
    [note] = out.notes
    # The note goes into the status the pod's events show: the plugin's stderr stays in
    # the node's log, where the token in it is scrubbed too.
    assert note == "credential provider provider failed for r.io/app (see the strata log " \
                   "on the node)"
    assert "credential provider provider failed for r.io/app: it exited with status 3 " \
           "after " in caplog.text
    assert "no luck for ***; pulling without its credentials" in caplog.text
    assert "sekrit" not in caplog.text and sa_token() not in caplog.text


def test_a_provider_that_hangs_is_given_up_with_its_children(tmp_path):
    """A child the plugin left behind holding its stdout does not keep the pull waiting."""
    script(tmp_path, f"""
import subprocess, time
child = subprocess.Popen([{sys.executable!r}, "-c", "import time; time.sleep(60)"])
open({str(tmp_path / "child")!r}, "w").write(str(child.pid))
time.sleep(60)
""")
    p = Provider(ProviderSpec("provider", ("r.io",), 0, V1), str(tmp_path))
    with pytest.raises(ProviderFailed, match="did not answer within 1s"):
        p.exec("r.io/app", timeout=1)
    # The plugin's process group was killed, the child with it: SIGKILL is delivered
    # asynchronously, so it is gone (or a zombie waiting for init) soon, not at once.
    child = int((tmp_path / "child").read_text())

    def state() -> str:
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return "gone"

    for _ in range(200):
        if state() in ("Z", "X", "gone"):
            break
        time.sleep(0.05)
    assert state() in ("Z", "X", "gone"), "the plugin's child outlived its process group"


@pytest.fixture
def sleeper(tmp_path):
    """A file for a plugin's orphan to write its pid in; the orphan is killed by that pid
    when the test ends (it is out of the plugin's process group and session)."""
    path = tmp_path / "orphan.pid"
    yield path
    if path.exists():
        pid = int(path.read_text())
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                mine = b"sleep" in f.read()
            if mine:
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


ANSWER = json.dumps({"apiVersion": V1, "kind": "CredentialProviderResponse",
                     "cacheKeyType": "Image", "auth": {"r.io": {"username": "u",
                                                                "password": "p"}}})


def test_an_orphan_holding_the_plugins_stdout_does_not_hold_the_answer(tmp_path, sleeper):
    """The plugin answers and exits 0, leaving a child that setsid'd out of its process
    group (no killpg reaches it) with its stdout open for five minutes. Its exit is the
    end of the run: the answer is used. (Before, the pull waited for EOF on stdout: the
    child's life, past the exec timeout, and then failed.)"""
    plugin = tmp_path / "provider"
    plugin.write_text(f"""#!/bin/sh
cat >/dev/null
setsid sh -c 'echo $$ > {sleeper}; exec sleep 300' &
while [ ! -s {sleeper} ]; do :; done
echo '{ANSWER}'
exit 0
""")
    plugin.chmod(0o755)
    p = Provider(ProviderSpec("provider", ("r.io",), 0, V1), str(tmp_path))
    answer = p.exec("r.io/app", timeout=20)
    assert answer.keyring.lookup("r.io", "app") == Credentials("u", "p")
    pid = int(sleeper.read_text())
    assert os.path.exists(f"/proc/{pid}"), "the orphan was there, holding the pipe"


def test_a_plugins_output_is_bounded(tmp_path):
    """Megabytes on stdout are no answer, and megabytes on stderr are kept to their end."""
    script(tmp_path, """
sys.stdin.read()
sys.stderr.write("x" * (8 << 20) + "the end")
sys.stdout.write(" " * (3 << 20) + "{}")
""")
    p = Provider(ProviderSpec("provider", ("r.io",), 0, V1), str(tmp_path))
    with pytest.raises(ProviderFailed, match="its answer is larger than 1 MiB"):
        p.exec("r.io/app", timeout=60)
    done = run_plugin([str(tmp_path / "provider")], b"{}", dict(os.environ), 60)
    assert len(done.stdout) == (1 << 20) + 1 and len(done.stderr) == 1 << 20
    assert done.stderr.endswith(b"the end")


def test_a_plugin_that_never_reads_its_request_still_answers(tmp_path):
    script(tmp_path, f"print({ANSWER!r})")
    p = Provider(ProviderSpec("provider", ("r.io",), 0, V1), str(tmp_path))
    request = "r.io/" + "a" * (1 << 20)  # more than a pipe holds
    assert p.exec(request, timeout=60).keyring.lookup("r.io", "app") == Credentials("u", "p")


# -- the chain, the registry's offers, the payload log ---------------------------------------
def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_the_chain_offers_each_sources_best_match_in_order_once():
    def ring(user):
        return Keyring(parse_config(json.dumps({"auths": {"r.io": {"auth": b64(user + ":p")}}}),
                                    user))

    pod, provided, node = ring("pod"), ring("provided"), ring("node")
    chain = CredentialChain([pod, provided, node, ring("pod")])
    assert [c.username for c in chain.lookup("r.io", "a")] == ["pod", "provided", "node"]
    assert chain.lookup("other.io", "a") == []
    assert CredentialChain([]).fingerprint("r.io", "a") == ""
    assert chain.fingerprint("r.io", "a") != CredentialChain([provided, pod]).fingerprint(
        "r.io", "a")
    assert offers(chain.lookup, "r.io", "a")[0].username == "pod"
    assert offers(chain.lookup, "other.io", "a") == [None]
    assert offers(lambda h, r: None, "r.io", "a") == [None]
    assert offers(lambda h, r: Credentials("x"), "r.io", "a") == [Credentials("x")]


def test_the_payload_log_strips_tokens_from_volume_context_and_secrets():
    tokens = json.dumps({"registry": {"token": "eyJ.sekrit.sig"}})
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id="v", volume_context={"image": "r.io/app:1", TOKENS_KEY: tokens},
        secrets={TOKENS_KEY: tokens, ".dockerconfigjson": "{}"})
    text = redact(req)
    assert "sekrit" not in text and text.count("***stripped***") == 3
    assert 'value: "r.io/app:1"' in text
    assert req.volume_context[TOKENS_KEY] == tokens, "the request itself is left alone"


def test_tokens_in_secrets_are_the_kubelets_and_win(caplog):
    """A Secret's keys cannot hold a "/": the tokens key in secrets can only be the
    kubelet's (serviceAccountTokenInSecrets). One in volume_context besides is the
    volume's own attributes: ignored, with a warning that never quotes it."""
    from csi.volumes import service_account_tokens

    kubelet, pods = tokens_json("kubelet-token"), tokens_json("pod-written")
    assert service_account_tokens({TOKENS_KEY: pods}, {TOKENS_KEY: kubelet}) == kubelet
    assert "ignored: the kubelet's are in secrets" in caplog.text
    assert "pod-written" not in caplog.text
    assert service_account_tokens({TOKENS_KEY: pods}, {}) == pods
    assert service_account_tokens({}, {}) == ""


def tokens_json(token: str) -> str:
    return json.dumps({"aud": {"token": token}})
