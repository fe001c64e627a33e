"""Kubelet credential-provider plugins through the real `strata serve` socket, against a
real `docker-registry` with token auth: a provider executable of the tests' own that speaks
the exec protocol (`credentialprovider.kubelet.k8s.io/v1`), counts its executions to prove
its answers are cached, and, in service-account mode (KEP-4412), checks the pod's token
that NodePublishVolume carries (in volume_context, or in secrets) and answers credentials
only for the identity the registry should let pull."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from csi.image.build import write_image
from csi.image.podtokens import TOKENS_KEY
from csi.paths import StorePaths
from csi.proto import csi_pb2
from csi.store.state import State
from tests.conftest import (
    ROOT_REASON,
    app_layer,
    base_layer,
    mount_cap,
    needs_tools,
    strata_servers,
)
from tests.faultproxy import FaultProxy
from tests.registry import Registry, push, registry_get

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
    needs_tools("docker-registry", "skopeo"),
]
ALICE = ("alice", "secret")
AUDIENCE = "strata-registry"

# The provider: reads the CredentialProviderRequest, records the execution in $STATE/calls,
# behaves as $STATE/mode says (fail, garbage), and answers alice's credentials for
# $REGISTRY; with a token, only for the service account `puller` of the audience asked for
# (the registry's answer decides: another identity gets credentials the registry refuses).
PROVIDER = r"""
import base64, json, os, sys

state = os.environ["STATE"]
req = json.load(sys.stdin)
token = req.get("serviceAccountToken", "")
claims = {}
if token:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
with open(os.path.join(state, "calls"), "a") as f:
    f.write(json.dumps({"image": req["image"], "apiVersion": req["apiVersion"],
                        "sub": claims.get("sub"), "argv": sys.argv[1:]}) + "\n")
mode = open(os.path.join(state, "mode")).read().strip() \
    if os.path.exists(os.path.join(state, "mode")) else ""
if mode == "fail":
    print("cannot reach the cloud's token service", file=sys.stderr)
    sys.exit(1)
if mode == "garbage":
    print("Username: alice Password: secret")
    sys.exit(0)
if mode == "orphan":  # a child out of our process group and session, holding our stdout
    import subprocess
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    with open(os.path.join(state, "orphan.pid"), "w") as f:
        f.write(str(child.pid))
user, password = "alice", "secret"
if token:
    if os.environ["AUDIENCE"] not in claims.get("aud", []):
        print("token for the wrong audience", file=sys.stderr)
        sys.exit(2)
    if claims.get("sub") != "system:serviceaccount:team:puller":
        user, password = claims["sub"].rsplit(":", 1)[-1], "not-allowed"
json.dump({"apiVersion": req["apiVersion"], "kind": "CredentialProviderResponse",
           "cacheKeyType": os.environ["CACHE_KEY_TYPE"],
           "cacheDuration": os.environ["CACHE_DURATION"],
           "auth": {os.environ["REGISTRY"]: {"username": user, "password": password}}},
          sys.stdout)
"""


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cp-images") / "layout")
    write_image(path, "app", [base_layer(), app_layer()])
    return path


@pytest.fixture(scope="module")
def registry(layout):
    with Registry(auth="token") as reg:
        for repo in ("team/app", "team/other", "team/race", "team/cli", "team/never",
                     "team/mirrored"):
            push(layout, "app", reg, repo, "1.0", creds=ALICE)
        yield reg


@pytest.fixture(scope="module")
def cache(layout):
    """A pull-through cache at /cache/v2/ that serves the origin's team/mirrored to anyone:
    a real docker-registry proxying an open copy of it, as a cache given the origin's
    credentials (proxy.username/password) or a P2P mirror holding what another node
    pulled would serve it."""
    with Registry() as copy:
        push(layout, "app", copy, "team/mirrored", "1.0")
        with Registry(proxy=copy.url, prefix="/cache/") as reg:
            yield reg


class Provider:
    """The provider's bin dir, config file and state (its execution log and its mode)."""

    def __init__(self, base, registry, name="test-provider", match=None, tokens=None,
                 key_type="Registry", duration="1h"):
        self.bin_dir, self.state = base / "bin", base / "state"
        self.bin_dir.mkdir()
        self.state.mkdir()
        exe = self.bin_dir / name
        exe.write_text(f"#!{sys.executable}\n{PROVIDER}")
        exe.chmod(0o755)
        provider = {
            "name": name, "matchImages": match or [registry.host],
            "defaultCacheDuration": "0s", "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "args": ["get-credentials"],
            "env": [{"name": "STATE", "value": str(self.state)},
                    {"name": "REGISTRY", "value": registry.host},
                    {"name": "AUDIENCE", "value": AUDIENCE},
                    {"name": "CACHE_KEY_TYPE", "value": key_type},
                    {"name": "CACHE_DURATION", "value": duration}],
        }
        if tokens:
            provider["tokenAttributes"] = tokens
        self.config = base / "providers.yaml"
        self.config.write_text(json.dumps({"apiVersion": "kubelet.config.k8s.io/v1",
                                           "kind": "CredentialProviderConfig",
                                           "providers": [provider]}))

    @property
    def args(self) -> tuple[str, ...]:
        return ("--image-credential-provider-config", str(self.config),
                "--image-credential-provider-bin-dir", str(self.bin_dir))

    def calls(self) -> list[dict]:
        path = self.state / "calls"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def mode(self, mode: str) -> None:
        (self.state / "mode").write_text(mode)


@pytest.fixture
def plugin(tmp_path, registry):
    with strata_servers(tmp_path) as start:
        yield lambda provider, *args: start("--insecure-registry", registry.host,
                                            *provider.args, *args)


def b64url(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def sa_token(name: str, pod: str, audience: str = AUDIENCE, namespace: str = "team") -> str:
    """A token shaped as the API server's (the provider and strata read its claims only)."""
    claims = {"aud": [audience], "sub": f"system:serviceaccount:{namespace}:{name}",
              "kubernetes.io": {"namespace": namespace,
                                "serviceaccount": {"name": name, "uid": f"uid-{name}"},
                                "pod": {"name": pod, "uid": f"uid-{pod}"}}}
    return f"{b64url({'alg': 'RS256', 'kid': 'k'})}.{b64url(claims)}.c2lnbmF0dXJl"


def tokens_json(token: str, audience: str = AUDIENCE) -> str:
    return json.dumps({audience: {"token": token,
                                  "expirationTimestamp": "2030-01-01T00:00:00Z"}})


def publish(p, target, image, vid="v", sa="", token="", in_secrets=False, audience=AUDIENCE,
            namespace="team", pull_secret="", **attrs) -> str:
    """NodePublishVolume as the kubelet sends it for a pod `vid` of service account `sa`
    in `namespace` (podInfoOnMount), with its token as the CSIDriver's tokenRequests have it
    passed (or, for a pod without them, as its own volumeAttributes had it)."""
    context = {"image": image, "csi.storage.k8s.io/ephemeral": "true", **attrs}
    secrets = {".dockerconfigjson": pull_secret} if pull_secret else {}
    if sa:
        context.update({"csi.storage.k8s.io/pod.namespace": namespace,
                        "csi.storage.k8s.io/pod.name": vid,
                        "csi.storage.k8s.io/pod.uid": f"uid-{vid}",
                        "csi.storage.k8s.io/serviceAccount.name": sa})
    if token:
        (secrets if in_secrets else context)[TOKENS_KEY] = tokens_json(token, audience)
    p.csi.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vid, target_path=str(target), volume_capability=mount_cap(),
        volume_context=context, secrets=secrets), timeout=60)
    try:
        return (target / "etc/motd").read_text()
    finally:
        p.csi.unpublish(vid, target)


def refused(code, *args, **kw) -> str:
    with pytest.raises(grpc.RpcError) as e:
        publish(*args, **kw)
    assert e.value.code() == code, e.value.details()
    return e.value.details()


def test_a_provider_answers_for_the_node_and_its_answer_is_cached(plugin, registry, tmp_path):
    provider = Provider(tmp_path, registry, key_type="Registry", duration="1h")
    p = plugin(provider)
    assert publish(p, tmp_path / "a", f"{registry.host}/team/app:1.0") == "app motd\n"
    assert provider.calls() == [{"image": f"{registry.host}/team/app", "argv":
                                 ["get-credentials"], "sub": None,
                                 "apiVersion": "credentialprovider.kubelet.k8s.io/v1"}]
    # Another repository of the same registry, asking the registry again (Always): the
    # Registry-keyed answer is reused without exec.
    assert publish(p, tmp_path / "b", f"{registry.host}/team/other:1.0",
                   pullPolicy="Always") == "app motd\n"
    assert publish(p, tmp_path / "c", f"{registry.host}/team/app:1.0",
                   pullPolicy="Always") == "app motd\n"
    assert len(provider.calls()) == 1
    log = p.read_log()
    assert base64.b64encode(b"alice:secret").decode() not in log and '"secret"' not in log


def test_an_image_answer_is_cached_for_that_image_only(plugin, registry, tmp_path):
    provider = Provider(tmp_path, registry, key_type="Image", duration="1h")
    p = plugin(provider)
    for name in ("app", "app", "other"):
        assert publish(p, tmp_path / name, f"{registry.host}/team/{name}:1.0",
                       pullPolicy="Always") == "app motd\n"
    assert [c["image"] for c in provider.calls()] == [f"{registry.host}/team/app",
                                                      f"{registry.host}/team/other"]


def test_a_404_for_one_credential_tries_the_next(plugin, registry, tmp_path):
    """The pod's pull secret (bob's) meets a 404, as registries that hide a private
    repository from credentials that may not see it answer; like the kubelet, which moves
    on after any failed pull, the pull tries the next credentials: the provider's (alice's).
    A fault proxy in front of the real registry answers that first manifest request 404."""
    with FaultProxy(registry.host) as front:
        front.fail(404, times=1, path=r"^/v2/team/app/manifests/")
        provider = Provider(tmp_path, types.SimpleNamespace(host=front.host))
        p = plugin(provider, "--insecure-registry", front.host)
        bob = base64.b64encode(b"bob:guess").decode()
        secret = json.dumps({"auths": {front.host: {"auth": bob}}})
        assert publish(p, tmp_path / "t", f"{front.host}/team/app:1.0",
                       pull_secret=secret) == "app motd\n"
        asked = [(e.path, e.status) for e in front.requests_to("/manifests/")]
    assert asked[0] == ("/v2/team/app/manifests/1.0", 404)
    assert ("/v2/team/app/manifests/1.0", 200) in asked[1:]
    assert "credentials 1 of 2: image" in p.read_log()


def test_a_provider_whose_match_images_do_not_match_is_not_run(plugin, registry, tmp_path):
    provider = Provider(tmp_path, registry, match=["*.example.com", f"{registry.host}/else"])
    p = plugin(provider)
    details = refused(grpc.StatusCode.PERMISSION_DENIED, p, tmp_path / "t",
                      f"{registry.host}/team/app:1.0")
    assert "credential provider" not in details
    assert provider.calls() == []


def test_a_failing_provider_is_logged_and_named_in_the_denial(plugin, registry, tmp_path):
    provider = Provider(tmp_path, registry, duration="0s")
    p = plugin(provider)
    image = f"{registry.host}/team/app:1.0"
    provider.mode("fail")
    details = refused(grpc.StatusCode.PERMISSION_DENIED, p, tmp_path / "t", image)
    # The status (what the pod's events show) names the provider; why it failed, with
    # the plugin's stderr, is in the node's log only.
    assert f"credential provider test-provider failed for {registry.host}/team/app (see " \
           "the strata log on the node)" in details
    assert "cannot reach the cloud's token service" not in details
    provider.mode("garbage")
    details = refused(grpc.StatusCode.PERMISSION_DENIED, p, tmp_path / "t", image)
    assert "see the strata log on the node" in details and "not JSON" not in details
    log = p.read_log()
    assert f"credential provider test-provider failed for {registry.host}/team/app: it " \
           "exited with status 1" in log and "cannot reach the cloud's token service" in log
    assert "its answer on stdout is not JSON" in log
    assert "Password: secret" not in log, "a garbage answer is never quoted"
    provider.mode("")
    assert publish(p, tmp_path / "t", image) == "app motd\n", "failures are not cached"
    assert len(provider.calls()) == 3


def test_an_orphan_holding_the_plugins_stdout_does_not_hold_the_pull(plugin, registry,
                                                                     tmp_path):
    """The plugin answers and exits 0, leaving a `setsid` child with its stdout open for
    five minutes (no killpg reaches it): the plugin's exit ends the exec, and the pull
    uses its answer. Before, strata waited for EOF on stdout, past the RPC's deadline."""
    provider = Provider(tmp_path, registry, duration="0s")
    provider.mode("orphan")
    p = plugin(provider)
    try:
        assert publish(p, tmp_path / "t", f"{registry.host}/team/app:1.0") == "app motd\n"
        assert len(provider.calls()) == 1
    finally:
        pid_file = provider.state / "orphan.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"sleep"):
                        os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


@pytest.fixture
def sa_provider(tmp_path, registry):
    return Provider(tmp_path, registry, key_type="Registry", duration="1h", tokens={
        "serviceAccountTokenAudience": AUDIENCE, "requireServiceAccount": True,
        "cacheType": "ServiceAccount"})


def test_pods_tokens_reach_the_provider_and_each_pod_is_authorised(plugin, registry,
                                                                   sa_provider, tmp_path):
    """KEP-4412 through NodePublishVolume: the token from volume_context, then from secrets
    (serviceAccountTokenInSecrets); one answer per service account; a pod of another
    service account is refused although the image is on the node; a pod without a token
    does not run the provider; Never is refused; no token reaches the log."""
    p = plugin(sa_provider)
    image = f"{registry.host}/team/app:1.0"
    puller_a, puller_b = sa_token("puller", "a"), sa_token("puller", "b")
    assert publish(p, tmp_path / "a", image, "a", sa="puller", token=puller_a) == \
        "app motd\n"
    assert publish(p, tmp_path / "b", image, "b", sa="puller", token=puller_b,
                   in_secrets=True) == "app motd\n"
    calls = sa_provider.calls()
    assert [c["sub"] for c in calls] == ["system:serviceaccount:team:puller"], \
        "one exec for the service account (cacheType ServiceAccount)"

    intruder = sa_token("intruder", "c")
    details = refused(grpc.StatusCode.PERMISSION_DENIED, p, tmp_path / "c", image, "c",
                      sa="intruder", token=intruder)
    assert "refused our credentials" in details
    assert [c["sub"] for c in sa_provider.calls()][1:] == [
        "system:serviceaccount:team:intruder"]
    assert not (tmp_path / "c").exists()

    details = refused(grpc.StatusCode.PERMISSION_DENIED, p, tmp_path / "d", image, "d",
                      sa="default")
    assert "credential provider test-provider was not run: it requires the pod's " \
           f"service-account token for audience '{AUDIENCE}'" in details
    assert len(sa_provider.calls()) == 2

    # The CSIDriver asked for a token of another audience only: no token for this provider.
    wrong = sa_token("puller", "e", audience="someone-else")
    details = refused(grpc.StatusCode.PERMISSION_DENIED, p, tmp_path / "e", image, "e",
                      sa="puller", token=wrong, audience="someone-else")
    assert "was not run" in details

    details = refused(grpc.StatusCode.FAILED_PRECONDITION, p, tmp_path / "f", image, "f",
                      sa="puller", token=puller_a, pullPolicy="Never")
    assert "pullPolicy Never cannot be used" in details

    log = p.read_log()
    for token in (puller_a, puller_b, intruder, wrong):
        assert token not in log and token.split(".")[1] not in log
    assert "***stripped***" in log


def test_a_pod_forging_another_namespaces_token_gets_nothing(plugin, registry, sa_provider,
                                                             tmp_path):
    """Without tokenRequests on the CSIDriver the kubelet passes an inline volume's
    volumeAttributes on unchanged, the tokens key included: a pod author can write a token
    whose (unsigned) claims name another namespace's service account. One such pod, once
    the victim's answer is cached: refused, the provider not run, nothing mounted, and the
    victim still served."""
    p = plugin(sa_provider)
    image = f"{registry.host}/team/app:1.0"
    victim = sa_token("puller", "victim")
    assert publish(p, tmp_path / "v", image, "victim", sa="puller", token=victim) == \
        "app motd\n"
    assert len(sa_provider.calls()) == 1  # cached (Registry, 1h) for team/puller

    forgeries = {
        "the victim's claims": sa_token("puller", "victim"),
        "the victim's service account, the intruder's own pod": sa_token("puller", "intruder"),
    }
    for why, forged in forgeries.items():
        details = refused(grpc.StatusCode.PERMISSION_DENIED, p, tmp_path / "i", image,
                          "intruder", sa="default", namespace="intruders", token=forged)
        assert "credential provider test-provider was not run" in details, why
        assert "is not this pod's: its claims kubernetes.io.namespace, kubernetes.io." \
               "serviceaccount.name" in details, why
        assert not (tmp_path / "i").exists() or not os.listdir(tmp_path / "i"), why
    assert len(sa_provider.calls()) == 1, "the provider never ran for the intruder"
    assert publish(p, tmp_path / "v", image, "victim", sa="puller", token=victim,
                   pullPolicy="Always") == "app motd\n"
    log = p.read_log()
    assert "refused for" in log and "(pod intruders/intruder)" in log
    for token in (victim, *forgeries.values()):
        assert token.split(".")[1] not in log


def test_a_mirror_never_authorises_a_pod_for_a_gated_image(plugin, registry, cache,
                                                           sa_provider, tmp_path):
    """An image a token-taking provider covers is authorised per pod by the origin: with a
    --registry-mirror that answers anyone (200), the authorising resolve and HEAD still go
    to the origin with the pod's credentials; the layers then come through the mirror."""
    p = plugin(sa_provider, "--registry-mirror",
               f"{registry.host}=http://{cache.host}/cache")
    image = f"{registry.host}/team/mirrored:1.0"
    status, _, body = registry_get(registry, "/v2/team/mirrored/manifests/1.0",
                                   token=registry.token(["repository:team/mirrored:pull"]))
    assert status == 200
    layers = [d["digest"] for d in json.loads(body)["layers"]]
    before, cache_before = len(registry.access_log()), len(cache.access_log())

    def ours(reg, since):
        return [(a.method, a.target.split("?")[0], a.status)
                for a in reg.access_log()[since:] if a.agent == "strata-csi"]

    # Not on the node yet: the intruder's resolve is refused at the origin.
    refused(grpc.StatusCode.PERMISSION_DENIED, p, tmp_path / "i", image, "i",
            sa="intruder", token=sa_token("intruder", "i"))
    assert not (tmp_path / "i").exists() or not os.listdir(tmp_path / "i")

    assert publish(p, tmp_path / "a", image, "a", sa="puller",
                   token=sa_token("puller", "a")) == "app motd\n"
    assert ("GET", "/v2/team/mirrored/manifests/1.0", 200) in ours(registry, before), \
        "resolved at the origin"
    wanted = {("GET", f"/cache/v2/team/mirrored/blobs/{d}", 200) for d in layers}
    wait_for(lambda: wanted <= set(ours(cache, cache_before)),
             "the layers fetched through the mirror")
    assert not [r for r in ours(registry, before) if r[1].split("/")[-1] in layers], \
        "no layer from the origin"

    # On the node now: the intruder's HEAD goes to the origin too, and is refused there.
    refused(grpc.StatusCode.PERMISSION_DENIED, p, tmp_path / "i", image, "i",
            sa="intruder", token=sa_token("intruder", "i"))
    assert not (tmp_path / "i").exists() or not os.listdir(tmp_path / "i")
    assert not [r for r in ours(cache, cache_before) if "/manifests/" in r[1]], \
        "the mirror is never asked for the manifest"


def wait_for(check, what: str, timeout: float = 60.0):
    """For a registry's access line, written after it answered; the bound only ends a test
    that would otherwise hang."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {timeout:.0f}s: {what}")
        time.sleep(0.05)


def test_racing_pods_of_two_identities_do_not_share_a_pull(plugin, registry, sa_provider,
                                                           tmp_path):
    p = plugin(sa_provider)
    image = f"{registry.host}/team/race:1.0"

    def one(i):
        sa = "puller" if i % 2 == 0 else "intruder"
        try:
            return sa, publish(p, tmp_path / f"r{i}", image, f"r{i}", sa=sa,
                               token=sa_token(sa, f"r{i}"))
        except grpc.RpcError as e:
            return sa, e.code()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert {r for sa, r in results if sa == "puller"} == {"app motd\n"}
    assert {r for sa, r in results if sa == "intruder"} == {
        grpc.StatusCode.PERMISSION_DENIED}


def test_strata_pull_runs_the_providers(registry, tmp_path):
    provider = Provider(tmp_path, registry)
    State(StorePaths(str(tmp_path / "store")).make().state_db).close()  # as serve made it
    out = subprocess.run([sys.executable, "-m", "csi", "pull", f"{registry.host}/team/cli:1.0",
                          "--root", str(tmp_path / "store"), "--insecure-registry",
                          registry.host, *provider.args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [c["image"] for c in provider.calls()] == [f"{registry.host}/team/cli"]
