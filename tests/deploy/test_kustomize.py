"""deploy/: the base and each overlay render with `kubectl kustomize`, and what they render
is a CSI node plugin as the kubelet needs it, and agrees with itself and with strata.

No cluster here, so this checks what a typo would break on one: the CSIDriver's fields,
the DaemonSet's sidecars and their socket paths, the probes and their ports, the update
strategy strata's one-server-per-store rule needs, the provisioner's RBAC, labels on every
object, and the strata container's flags and environment parsed by strata's own CLI.
test_manifests_drive_serve.py goes further: it starts `strata serve` as the DaemonSet does.
"""

import os
import re

import pytest

import csi
from csi import cli
from tests.deploy.manifests import (
    DEPLOY,
    NAMESPACE,
    OVERLAYS,
    TARGETS,
    Node,
    container_env,
    expand,
    flag,
    one,
    port_of,
    pyproject_version,
    render,
)

LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/version",
          "app.kubernetes.io/managed-by", "app.kubernetes.io/component")
SIDECARS = {  # image: the release the reference hostpath driver deploys (kubernetes-latest)
    "node-driver-registrar": "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.17.0",
    "liveness-probe": "registry.k8s.io/sig-storage/livenessprobe:v2.19.0",
    "csi-provisioner": "registry.k8s.io/sig-storage/csi-provisioner:v6.3.0",
}
ALL = [*TARGETS, "monitoring"]


def node(target: str) -> Node:
    return Node(render(target))


def strata_config(n: Node, node_name: str = "node-1"):
    """The strata container's settings as its own CLI reads them: args with `$(VAR)`
    expanded, and the container's STRATA_* environment (not the test runner's)."""
    c = n.strata
    env = container_env(c, {"spec.nodeName": node_name})
    args = [expand(a, env) for a in c["args"]]
    saved = {k: v for k, v in os.environ.items() if k.startswith("STRATA_")}
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update({k: v for k, v in env.items() if k.startswith("STRATA_")})
        parser = cli._parser()
        parsed = parser.parse_args(args)
        return parsed, cli._config(parsed, parser)
    finally:
        for k in [k for k in os.environ if k.startswith("STRATA_")]:
            del os.environ[k]
        os.environ.update(saved)


@pytest.mark.parametrize("target", ALL)
def test_it_renders_and_every_object_carries_the_app_labels(target):
    docs = render(target)
    assert docs
    for d in docs:
        labels = d["metadata"].get("labels", {})
        missing = [k for k in LABELS if k not in labels]
        assert not missing, f"{d['kind']} {d['metadata']['name']}: no {missing}"
        assert labels["app.kubernetes.io/name"] == "strata"
        assert labels["app.kubernetes.io/version"] == pyproject_version()
        namespaced = d["kind"] not in ("Namespace", "CSIDriver", "ClusterRole",
                                       "ClusterRoleBinding", "StorageClass")
        assert d["metadata"].get("namespace") == (NAMESPACE if namespaced else None), d


def test_the_monitoring_component_adds_the_operator_objects_to_an_overlay(tmp_path):
    overlay = tmp_path / "with-monitoring"
    overlay.mkdir()
    rel = os.path.relpath(DEPLOY, overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{rel}/overlays/kind]\ncomponents: [{rel}/components/monitoring]\n")
    docs = render(str(overlay))
    kinds = {d["kind"] for d in docs}
    assert {"PodMonitor", "PrometheusRule", "ConfigMap", "DaemonSet"} <= kinds
    monitor = one(docs, "PodMonitor")
    n = Node(docs)
    assert monitor["spec"]["selector"]["matchLabels"] == \
        n.daemonset["spec"]["selector"]["matchLabels"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in n.ports(n.strata)


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_overlay_renders_the_driver_the_daemonset_and_its_sidecars(target):
    docs = render(f"overlays/{target}")
    driver = one(docs, "CSIDriver")
    assert driver["metadata"]["name"] == csi.DRIVER_NAME == "strata.csi.dev"
    n = Node(docs)
    names = {c["name"] for c in n.pod["containers"]}
    assert {"strata", "node-driver-registrar", "liveness-probe", "csi-provisioner"} <= names
    propagation = {m["mountPath"]: m.get("mountPropagation")
                   for m in n.strata["volumeMounts"]}
    assert propagation["/var/lib/kubelet"] == "Bidirectional"
    assert n.strata["image"] == "strata:dev"
    assert n.strata["imagePullPolicy"] == "Never", "the image is loaded, not pulled"


@pytest.mark.parametrize("target", TARGETS)
def test_the_csidriver_is_what_strata_serves(target):
    spec = one(render(target), "CSIDriver")["spec"]
    assert spec["attachRequired"] is False      # no ControllerPublish
    assert spec["podInfoOnMount"] is True       # pod name/uid in volume_context
    assert spec["fsGroupPolicy"] == "None"      # File would chown (copy up) every file
    assert spec["seLinuxMount"] is False        # no -o context= support
    assert spec["requiresRepublish"] is False
    assert sorted(spec["volumeLifecycleModes"]) == ["Ephemeral", "Persistent"]
    assert "tokenRequests" not in spec, "KEP-4412 pulls are opt-in (commented)"
    with open(os.path.join(DEPLOY, "base", "csidriver.yaml")) as f:
        text = f.read()
    assert re.search(r"^\s*# tokenRequests:", text, re.M), "say how tokens are switched on"


@pytest.mark.parametrize("target", TARGETS)
def test_the_sidecars_are_the_reference_driver_s_releases(target):
    n = node(target)
    for name, image in SIDECARS.items():
        assert n.container(name)["image"] == image


@pytest.mark.parametrize("target", TARGETS)
def test_the_daemonset_runs_on_every_node_one_server_per_store(target):
    ds = node(target).daemonset
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    # One server per store (csi/server.py): never two plugin pods on a node at once.
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "app.kubernetes.io/version" not in ds["spec"]["selector"]["matchLabels"], \
        "a selector naming the version could never be upgraded (it is immutable)"


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_and_a_memory_limit(target):
    for c in node(target).pod["containers"]:
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_strata_flags_and_environment_parse_with_strata_s_own_cli(target):
    n = node(target)
    args, config = strata_config(n)
    assert args.command == "serve" and config.node_id == "node-1"
    config.validate("serve")
    assert config.controller_endpoint, "the provisioner sidecar needs the controller"
    # Settings the tools share come from the environment, so `kubectl exec … strata df`
    # sees the server's store: none of them is a flag of serve alone.
    assert not [a for a in n.strata["args"] if a.startswith("--root")]
    assert container_env(n.strata, {"spec.nodeName": "x"})["STRATA_ROOT"] == config.root
    assert n.strata["securityContext"]["privileged"] is True


@pytest.mark.parametrize("target", TARGETS)
def test_the_kubelet_finds_the_node_socket_where_the_registrar_says(target):
    n = node(target)
    _, config = strata_config(n)
    registrar, probe = n.container("node-driver-registrar"), n.container("liveness-probe")
    on_host = n.host_path(n.strata, config.socket_path)
    assert on_host == f"/var/lib/kubelet/plugins/{csi.DRIVER_NAME}/csi.sock"
    assert flag(registrar, "--kubelet-registration-path") == on_host
    assert n.host_path(registrar, flag(registrar, "--csi-address")) == on_host
    assert n.host_path(registrar, "/registration") == "/var/lib/kubelet/plugins_registry"
    assert n.host_path(probe, flag(probe, "--csi-address")) == on_host


@pytest.mark.parametrize("target", TARGETS)
def test_strata_mounts_where_the_kubelet_looks_and_keeps_its_store(target):
    n = node(target)
    _, config = strata_config(n)
    # The kubelet passes host paths: the kubelet dir must be at the same path inside.
    kubelet, rest = n.mount(n.strata, "/var/lib/kubelet/pods")
    assert n.host_path(n.strata, "/var/lib/kubelet/pods") == "/var/lib/kubelet/pods"
    assert n.host_path(n.strata, "/var/lib/kubelet/plugins/kubernetes.io/csi") == \
        "/var/lib/kubelet/plugins/kubernetes.io/csi"
    assert kubelet["mountPropagation"] == "Bidirectional"
    store, _ = n.mount(n.strata, config.root)
    assert store["mountPropagation"] == "Bidirectional"
    assert n.volumes[store["name"]]["hostPath"]["type"] == "DirectoryOrCreate"


@pytest.mark.parametrize("target", TARGETS)
def test_the_probes_reach_strata_s_probe_and_the_ports_are_the_ones_served(target):
    n = node(target)
    strata, probe = n.strata, n.container("liveness-probe")
    _, config = strata_config(n)
    ports = n.ports(strata)
    # liveness, readiness and start-up all ask the livenessprobe sidecar, which calls Probe.
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = strata[kind]["httpGet"]
        assert get["path"] == "/healthz" and get["port"] == "healthz", kind
        assert strata[kind]["timeoutSeconds"] > 3, "above the sidecar's --probe-timeout"
    assert port_of(flag(probe, "--http-endpoint")) == ports["healthz"]
    assert port_of(config.metrics_address) == ports["metrics"]
    registrar = n.container("node-driver-registrar")
    get = registrar["livenessProbe"]["httpGet"]
    assert port_of(flag(registrar, "--http-endpoint")) == n.ports(registrar)[get["port"]]
    every = [p["containerPort"] for c in n.pod["containers"] for p in c.get("ports", [])]
    assert len(every) == len(set(every)), "two containers of one pod on one port"
    service = one(n.docs, "Service", "strata-metrics")
    assert service["spec"]["selector"].items() <= \
        n.daemonset["spec"]["template"]["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == "metrics"


@pytest.mark.parametrize("target", TARGETS)
def test_the_provisioner_talks_to_the_controller_on_its_own_node(target):
    n = node(target)
    _, config = strata_config(n)
    prov = n.container("csi-provisioner")
    assert n.host_path(prov, flag(prov, "--csi-address")) == \
        n.host_path(n.strata, config.controller_socket_path)
    # --node-deployment calls NodeGetInfo on that socket too (and exits if it fails):
    # strata serves Node and Controller on one socket when both endpoints are the same.
    assert config.controller_socket_path == config.socket_path
    assert "--node-deployment" in prov["args"]
    assert container_env(prov, {"spec.nodeName": "n"})["NODE_NAME"] == "n"
    # With immediate binding off, only WaitForFirstConsumer classes get volumes.
    assert flag(prov, "--node-deployment-immediate-binding") == "false"


@pytest.mark.parametrize("target", TARGETS)
def test_the_provisioner_s_service_account_may_do_its_job(target):
    docs = render(target)
    n = Node(docs)
    sa = n.pod["serviceAccountName"]
    one(docs, "ServiceAccount", sa)
    granted: set[tuple[str, str]] = set()
    for b in (d for d in docs if d["kind"] == "ClusterRoleBinding"):
        if {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE} in b["subjects"]:
            role = one(docs, "ClusterRole", b["roleRef"]["name"])
            granted |= {(r, v) for rule in role["rules"] for r in rule["resources"]
                        for v in rule["verbs"]}
    needed = {("persistentvolumes", v) for v in ("get", "list", "watch", "create", "delete")}
    needed |= {("persistentvolumeclaims", v) for v in ("get", "list", "watch", "update")}
    needed |= {("storageclasses", "get"), ("storageclasses", "watch"), ("events", "create"),
               ("nodes", "get"), ("csinodes", "get")}
    assert needed <= granted, needed - granted


def test_the_overlays_say_why_they_differ():
    for target in OVERLAYS:
        with open(os.path.join(DEPLOY, "overlays", target, "kustomization.yaml")) as f:
            text = f.read()
        assert "differs from deploy/base, and why" in text
        for topic in ("imagePullPolicy Never", "registry", "kubelet directory"):
            assert topic in text, f"{target}: says nothing about {topic}"


def test_the_image_the_base_names_is_this_release():
    n = node("base")
    assert n.strata["image"] == f"strata:{pyproject_version()}"
