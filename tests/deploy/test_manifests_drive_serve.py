"""Manifests and code cannot drift apart: the real `strata serve`, started exactly as the
rendered kind overlay's DaemonSet starts it, serves every example in deploy/examples/ when
driven with the calls the kubelet would make.

From the DaemonSet's strata container the test takes the args (with `$(VAR)` expanded as
the kubelet does), the env (fieldRef spec.nodeName resolved to a test node name), the
ports and the volumeMounts. Each hostPath volume becomes a directory under a fake node
root in tmp_path, and each container path in the args and env is rewritten to the
directory its mount maps to: nothing else changes. The process runs in a network
namespace of its own, as a pod does, so that --metrics-address=0.0.0.0:9808 is served as
written (tests/deploy/netns.py). The test adds only what strata needs to reach the test's
registries, since the examples name nginx:1.27 and a private registry that do not exist
here: STRATA_REGISTRY_MIRROR entries mapping docker.io and the example's private registry
to local `docker-registry` processes (relayed into the namespace), and
STRATA_INSECURE_REGISTRY for those (plain HTTP). The images the examples name are test
images pushed there under those names.

Then each example's pods are set up as the kubelet would (tests/deploy/kubelet.py) through
the socket the registrar's --csi-address names, checked (content, writability, readOnly,
sizeLimit, subPath, one image for ten replicas), and torn down; nothing may stay mounted.
"""

import base64
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest

import csi
from csi.image import reference
from csi.image.build import LayerBuilder, write_image
from csi.mount.mountinfo import MountTable
from csi.proto import csi_pb2
from csi.quantity import bytes_of
from csi.store.state import State
from tests.conftest import ROOT_REASON, Csi, base_layer, read_text, unmount_all_under
from tests.deploy.kubelet import Kubelet, pods_of
from tests.deploy.manifests import (
    KUBECTL,
    KUBECTL_MISSING,
    Node,
    container_env,
    example,
    example_files,
    expand,
    flag,
    need,
    one,
    port_of,
    render,
)
from tests.deploy.netns import NSENTER, PodNetwork
from tests.registry import Registry, push

TOOLS = ("docker-registry", "skopeo", "htpasswd", "mkfs.ext4", "nsenter")
MISSING = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
    pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"),
                       reason=f"missing {', '.join(MISSING)} (scripts/system-deps.sh)"),
]
NODE_NAME = "strata-test-node"
USER = ("alice", "secret")
DRIVER = csi.DRIVER_NAME


# -- what the examples need from a registry -------------------------------------------------
def images_of(docs: list[dict]) -> dict[str, bool]:
    """Every image an example names, and whether it comes with a pull Secret."""
    out: dict[str, bool] = {}
    for d in docs:
        if d["kind"] == "StorageClass" and d["provisioner"] == DRIVER:
            params = d.get("parameters", {})
            out[params["image"]] = "csi.storage.k8s.io/node-stage-secret-name" in params
    for pod in pods_of(docs):
        for v in pod.spec.get("volumes", []):
            if "csi" in v and v["csi"]["driver"] == DRIVER:
                image = v["csi"]["volumeAttributes"]["image"]
                out[image] = out.get(image, False) or "nodePublishSecretRef" in v["csi"]
    return out


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> str:
    """Small stand-ins for the examples' images, with the paths the examples use."""
    path = str(tmp_path_factory.mktemp("deploy-images") / "layout")
    web = LayerBuilder()
    for d in ("usr/share", "usr/share/nginx", "usr/share/nginx/html", "etc/nginx"):
        web.dir(d)
    web.file("usr/share/nginx/html/index.html", "<h1>Welcome to nginx!</h1>\n")
    web.file("etc/nginx/nginx.conf", "events {}\nhttp { server { listen 80; } }\n")
    write_image(path, "public", [base_layer(), web])
    private = LayerBuilder().dir("srv").file("srv/app.txt", "private app\n")
    write_image(path, "private", [base_layer(), private])
    return path


@pytest.fixture(scope="module")
def registries(layout):
    """One plain registry for the public images, one with htpasswd auth for the images an
    example pulls with a Secret; every image of every example pushed under its own name.
    Yields {registry host as the examples name it: (Registry, needs credentials)}."""
    wanted: dict[str, bool] = {}
    for name in example_files():
        for image, guarded in images_of(example(name)).items():
            wanted[image] = wanted.get(image, False) or guarded
    with Registry() as public, Registry(auth="htpasswd", users=dict([USER])) as private:
        hosts: dict[str, tuple[Registry, bool]] = {}
        for image, guarded in wanted.items():
            ref = reference.parse(image)
            reg = private if guarded else public
            assert hosts.setdefault(ref.registry, (reg, guarded)) == (reg, guarded), \
                f"{ref.registry}: some of its images need a Secret and some not"
            push(layout, "private" if guarded else "public", reg, ref.repository,
                 ref.reference, creds=USER if guarded else None)
        yield hosts


# -- the node ---------------------------------------------------------------------------------
class FakeNode:
    """The kind overlay's plugin pod, on a node whose root is `host`."""

    def __init__(self, base: str, docs: list[dict]):
        self.base = base
        self.host = os.path.join(base, "host")
        self.docs = docs
        self.n = Node(docs)
        self.strata = self.n.strata
        self.proc: subprocess.Popen | None = None
        self.network: PodNetwork | None = None
        self.csi: Csi | None = None
        self.log = os.path.join(base, "serve.log")
        for v in self.n.volumes.values():  # the node's directories, as on a node
            os.makedirs(self.on_host(v["hostPath"]["path"]), exist_ok=True)

    def on_host(self, host_path: str) -> str:
        return os.path.join(self.host, host_path.lstrip("/"))

    def path(self, container: str, path: str) -> str:
        """Where `path` in `container` is here."""
        return self.on_host(self.n.host_path(self.n.container(container), path))

    def to_host(self, value: str) -> str:
        """`value` with every container path of the strata container's mounts replaced by
        its directory here (one pass: a replaced path is not matched again)."""
        mounts = sorted((m["mountPath"].rstrip("/") for m in self.strata["volumeMounts"]),
                        key=len, reverse=True)
        pattern = r"(?<![\w.-])(" + "|".join(map(re.escape, mounts)) + r")(?=/|$|[,:\s])"
        return re.sub(pattern, lambda m: self.path("strata", m.group(1)), value)

    @property
    def kubelet_dir(self) -> str:
        # The kubelet's directory, at the same path in the container as on the host.
        assert self.n.host_path(self.strata, "/var/lib/kubelet") == "/var/lib/kubelet"
        return self.on_host("/var/lib/kubelet")

    @property
    def socket(self) -> str:
        """The socket the registrar hands the kubelet, by its --csi-address."""
        registrar = self.n.container("node-driver-registrar")
        return self.path("node-driver-registrar", flag(registrar, "--csi-address"))

    @property
    def controller_socket(self) -> str:
        prov = self.n.container("csi-provisioner")
        return self.path("csi-provisioner", flag(prov, "--csi-address"))

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        """The container's environment with its paths mapped, `extra` appended to the
        comma-separated settings it names; PATH and PYTHONPATH from the test run (the
        image has its own), nothing else of it (no STRATA_* of the runner's)."""
        env = {k: self.to_host(v)
               for k, v in container_env(self.strata, {"spec.nodeName": NODE_NAME}).items()}
        for k, v in extra.items():
            env[k] = ",".join(x for x in (env.get(k, ""), v) if x)
        keep = {k: os.environ[k] for k in ("PATH", "PYTHONPATH") if k in os.environ}
        return {**keep, **env}

    def args(self) -> list[str]:
        assert "command" not in self.strata, "the image's ENTRYPOINT (strata) runs"
        env = container_env(self.strata, {"spec.nodeName": NODE_NAME})
        return [self.to_host(expand(a, env)) for a in self.strata["args"]]

    def start(self, extra_env: dict[str, str], forward: list[int]) -> None:
        self.network = PodNetwork()
        for port in forward:
            self.network.forward(port)
        self.environ = self.env(extra_env)
        # The image's ENTRYPOINT is `strata` (tests/deploy/test_dockerfile.py), which is
        # csi.cli:main, as `python -m csi` is.
        argv = self.network.command([sys.executable, "-m", "csi", *self.args()])
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, env=self.environ, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"strata serve did not create {self.socket}:\n"
                                   f"{read_text(self.log)}")
            time.sleep(0.05)
        self.csi = Csi(self.socket, self.controller_socket)
        grpc.channel_ready_future(self.csi._channels[0]).result(timeout=30)

    def stop(self) -> None:
        if self.csi is not None:
            self.csi.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.network is not None:
            self.network.close()

    def store(self) -> State:
        return State(os.path.join(self.path("strata", "/var/lib/strata"), "state.db"),
                     migrate=False)


@pytest.fixture(scope="module")
def node(tmp_path_factory, registries):
    need(KUBECTL is not None, KUBECTL_MISSING)
    need(NSENTER is not None, "needs nsenter (util-linux)")
    base = str(tmp_path_factory.mktemp("deploy-node"))
    fake = FakeNode(base, render("overlays/kind"))
    # Only to reach the test's registries (see the module docstring):
    mirrors = ",".join(f"{host}=http://{reg.host}" for host, (reg, _) in registries.items())
    insecure = ",".join(reg.host for reg, _ in registries.values())
    try:
        fake.start({"STRATA_REGISTRY_MIRROR": mirrors, "STRATA_INSECURE_REGISTRY": insecure},
                   forward=[reg.port for reg, _ in registries.values()])
        yield fake
    finally:
        fake.stop()
        unmount_all_under(base)


def dockerconfig(auths: list[str]) -> dict[str, str]:
    auth = base64.b64encode(":".join(USER).encode()).decode()
    return {".dockerconfigjson": json.dumps({"auths": {h: {"auth": auth} for h in auths}})}


def test_strata_serves_on_the_registrar_s_socket_with_the_manifest_s_identity(node):
    registrar = node.n.container("node-driver-registrar")
    # The kubelet dials the path the registrar registers: the same socket, seen from the host.
    assert node.on_host(flag(registrar, "--kubelet-registration-path")) == node.socket
    probe = node.n.container("liveness-probe")
    assert node.path("liveness-probe", flag(probe, "--csi-address")) == node.socket
    info = node.csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
    assert info.name == one(node.docs, "CSIDriver")["metadata"]["name"]
    assert node.csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10).node_id == \
        NODE_NAME, "--node-id is the pod's spec.nodeName"
    caps = node.csi.identity.GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(), timeout=10).capabilities
    assert csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE in \
        {c.service.type for c in caps}, "the provisioner sidecar needs the controller"


def test_readiness_comes_from_probe_on_the_socket_the_livenessprobe_watches(node):
    # What the livenessprobe sidecar's /healthz does for the readiness and liveness probes.
    assert node.csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value is True


def test_metrics_are_served_on_the_port_the_manifest_declares(node):
    address = flag(node.strata, "--metrics-address")
    port = node.n.ports(node.strata)["metrics"]
    assert port_of(address) == port
    status, body = node.network.get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and "strata_layers" in body


def secrets_for(docs: list[dict], registries) -> dict[tuple[str, str], dict[str, str]]:
    """Each pull Secret of the example, with this test's credentials for the registries it
    names (and for their mirrors here, by whose host strata may look credentials up)."""
    out = {}
    for d in docs:
        if d["kind"] == "Secret" and d.get("type") == "kubernetes.io/dockerconfigjson":
            raw = d.get("stringData", {}).get(".dockerconfigjson") or \
                base64.b64decode(d["data"][".dockerconfigjson"]).decode()
            hosts = list(json.loads(raw)["auths"])
            hosts += [registries[h][0].host for h in hosts if h in registries]
            out[(d["metadata"].get("namespace", "default"), d["metadata"]["name"])] = \
                dockerconfig(hosts)
    return out


def check_volume(m) -> None:
    target = m.target
    assert os.path.ismount(target), f"{m.name}: {target} is not mounted"
    with open(os.path.join(target, "etc/motd")) as f:
        assert f.read(), "the image's files are there"
    marker = os.path.join(target, f"written-by-{m.pod.uid}")
    if m.readonly:
        with pytest.raises(OSError) as e:
            open(marker, "w").close()
        assert e.value.errno == errno.EROFS
        return
    with open(marker, "w") as f:
        f.write(m.pod.name)
    limit = m.context.get("sizeLimit")
    if limit:
        fill = os.path.join(target, "fill")
        chunk = b"\0" * (1 << 20)
        with pytest.raises(OSError) as e, open(fill, "wb") as f:
            for _ in range(bytes_of(limit) // len(chunk) + 8):
                f.write(chunk)
                f.flush()
            os.fsync(f.fileno())
        assert e.value.errno in (errno.ENOSPC, errno.EDQUOT), e.value
        os.unlink(fill)


def check_subpaths(pods, mounted) -> None:
    """A subPath names a directory of the image: the kubelet would create a missing one
    (empty), which is not what an example means."""
    by_pod = {(m.pod.uid, m.name): m for m in mounted}
    for pod in pods:
        for c in pod.spec["containers"]:
            for vm in c.get("volumeMounts", []):
                m = by_pod.get((pod.uid, vm["name"]))
                if m is not None and vm.get("subPath"):
                    path = os.path.join(m.target, vm["subPath"])
                    assert os.path.isdir(path) and os.listdir(path), \
                        f"subPath {vm['subPath']} is not in the image"


def check_one_image(node, mounted) -> None:
    """Replicas of one image: one image and its layers once in the store, a writable layer
    per pod, and each pod's writes its own."""
    targets = {m.target for m in mounted}
    state = node.store()
    try:
        with state.read() as tx:
            pubs = [p for p in tx.publications() if p.target in targets]
            images = {i.manifest_digest: i for i in tx.images()}
            refs = tx.refcounts()
    finally:
        state.close()
    assert len(pubs) == len(mounted)
    [digest] = {p.manifest_digest for p in pubs}
    assert len({p.key for p in pubs}) == len(pubs), "one writable layer per pod"
    assert [i for i in images.values() if i.name == images[digest].name] == [images[digest]]
    for layer in images[digest].layer_ids:
        assert refs.get(layer, 0) >= len(pubs), f"layer {layer} is not shared"
    layers_dir = os.path.join(node.path("strata", "/var/lib/strata"), "layers")
    assert set(images[digest].layer_ids) <= set(os.listdir(layers_dir))
    for m in mounted:
        assert [n for n in os.listdir(m.target) if n.startswith("written-by-")] == \
            [f"written-by-{m.pod.uid}"], "a pod sees only its own writes"
    # What tests/e2e/kind.sh asks in the plugin pod: the tools see the server's store
    # through the container's environment alone.
    df = subprocess.run([sys.executable, "-m", "csi", "df"], env=node.environ,
                        capture_output=True, text=True, timeout=60, check=False)
    assert df.returncode == 0, df.stderr


@pytest.mark.parametrize("name", example_files())
def test_each_example_works_as_the_kubelet_drives_it(node, registries, name):
    docs = example(name)
    pods = pods_of(docs)
    assert pods, f"{name}: makes no pod"
    kubelet = Kubelet(node.csi, node.kubelet_dir, DRIVER, docs,
                      secrets=secrets_for(docs, registries))
    mounted: list = []
    failure = None
    try:
        for pod in pods:
            kubelet.run(pod, mounted)
        assert mounted, f"{name}: no {DRIVER} volume"
        for m in mounted:
            check_volume(m)
        check_subpaths(pods, mounted)
        if len(pods) > 1:
            check_one_image(node, mounted)
    except BaseException as e:
        failure = e
        raise
    finally:
        try:
            kubelet.stop(mounted)
        except Exception as e:
            if failure is None:
                raise
            failure.add_note(f"and the teardown failed too: {e!r}")
        left = [m.mount_point for m in MountTable().under(node.kubelet_dir)]
        if failure is None:
            assert not left, f"left mounted after unpublish: {left}\n{read_text(node.log)}"


def test_every_example_is_covered():
    """Each example makes pods with volumes of this driver (the test above drives them)."""
    for name in example_files():
        docs = example(name)
        assert any("csi" in v or "persistentVolumeClaim" in v
                   for p in pods_of(docs) for v in p.spec.get("volumes", [])), name
        with open(os.path.join(os.path.dirname(__file__), "..", "..", "deploy",
                               "examples", name)) as f:
            assert f.readline().startswith("# "), f"{name}: say what it shows first"
