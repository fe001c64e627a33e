"""deploy/kubernetes: the manifests agree with each other and with the code.

No cluster here, so this checks what a typo would break on one: the strata container's
arguments parse with strata's own CLI, every sidecar talks to a socket strata serves on a
volume they share, the kubelet registration path is the socket's host path, the provisioner
runs per node with the RBAC it needs, and the driver name and images are ones strata accepts.
"""

import os
import re

import pytest

import csi
from csi import cli
from csi.image import reference

yaml = pytest.importorskip("yaml", reason="pyyaml is a dev dependency (make test installs it)")

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "kubernetes")


def docs() -> list[dict]:
    out = []
    for name in sorted(os.listdir(DEPLOY)):
        if name.endswith(".yaml"):
            with open(os.path.join(DEPLOY, name)) as f:
                out += [d for d in yaml.safe_load_all(f) if d]
    return out


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in docs() if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def pod_spec() -> dict:
    return one("DaemonSet", "strata-node")["spec"]["template"]["spec"]


def container(name: str) -> dict:
    [c] = [c for c in pod_spec()["containers"] if c["name"] == name]
    return c


def flag(c: dict, name: str) -> str:
    values = [a.split("=", 1)[1] for a in c.get("args", []) if a.startswith(name + "=")]
    assert len(values) == 1, f"{c['name']}: {name} given {len(values)} times"
    return values[0]


def host_path_of(c: dict, path: str) -> str:
    """Where `path` inside container `c` lives on the host, through its hostPath mounts."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    for m in sorted(c["volumeMounts"], key=lambda m: -len(m["mountPath"])):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            return volumes[m["name"]]["hostPath"]["path"].rstrip("/") + path[len(mp):]
    raise AssertionError(f"{c['name']}: nothing mounted at {path}")


def strata_args() -> list[str]:
    args = container("strata")["args"]
    return [re.sub(r"\$\(NODE_NAME\)", "node-1", a) for a in args]


def test_every_document_is_a_named_kubernetes_object():
    for d in docs():
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d


def test_the_strata_arguments_parse_with_strata_s_own_cli():
    args = cli._parser().parse_args(strata_args())
    config = cli._config(args, cli._parser())
    assert args.command == "serve" and config.node_id == "node-1"
    assert config.controller_endpoint, "the provisioner sidecar needs the controller"


def test_the_driver_name_is_strata_s():
    assert one("CSIDriver")["metadata"]["name"] == csi.DRIVER_NAME
    assert one("StorageClass")["provisioner"] == csi.DRIVER_NAME


def test_the_kubelet_finds_the_node_socket_where_the_registrar_says():
    config = cli._config(cli._parser().parse_args(strata_args()), cli._parser())
    strata, registrar = container("strata"), container("node-driver-registrar")
    node_sock = config.socket_path
    on_host = host_path_of(strata, node_sock)
    assert on_host == f"/var/lib/kubelet/plugins/{csi.DRIVER_NAME}/csi.sock"
    assert flag(registrar, "--kubelet-registration-path") == on_host
    assert host_path_of(registrar, flag(registrar, "--csi-address")) == on_host
    assert host_path_of(registrar, "/registration") == "/var/lib/kubelet/plugins_registry"
    probe = container("liveness-probe")
    assert host_path_of(probe, flag(probe, "--csi-address")) == on_host


def test_the_provisioner_talks_to_the_controller_on_its_own_node():
    config = cli._config(cli._parser().parse_args(strata_args()), cli._parser())
    prov = container("csi-provisioner")
    assert host_path_of(prov, flag(prov, "--csi-address")) == \
        host_path_of(container("strata"), config.controller_socket_path)
    # --node-deployment calls NodeGetInfo on that socket too (and exits if it fails):
    # strata serves Node and Controller on one socket when both endpoints are the same.
    assert config.controller_socket_path == config.socket_path
    assert "--node-deployment" in prov["args"]
    env = {e["name"]: e for e in prov["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # With immediate binding off, only WaitForFirstConsumer classes get volumes.
    assert flag(prov, "--node-deployment-immediate-binding") == "false"
    assert one("StorageClass")["volumeBindingMode"] == "WaitForFirstConsumer"


def test_the_provisioner_s_service_account_may_do_its_job():
    sa = pod_spec()["serviceAccountName"]
    ns = one("DaemonSet", "strata-node")["metadata"]["namespace"]
    granted: set[tuple[str, str]] = set()
    for b in (d for d in docs() if d["kind"] == "ClusterRoleBinding"):
        if {"kind": "ServiceAccount", "name": sa, "namespace": ns} in b["subjects"]:
            role = one("ClusterRole", b["roleRef"]["name"])
            granted |= {(r, v) for rule in role["rules"] for r in rule["resources"]
                        for v in rule["verbs"]}
    needed = {("persistentvolumes", v) for v in ("get", "list", "watch", "create", "delete")}
    needed |= {("persistentvolumeclaims", v) for v in ("get", "list", "watch", "update")}
    needed |= {("storageclasses", "get"), ("storageclasses", "watch"), ("events", "create"),
               ("nodes", "get"), ("csinodes", "get")}
    assert needed <= granted, needed - granted


def test_the_node_plugin_can_mount_into_pods():
    strata = container("strata")
    assert strata["securityContext"]["privileged"] is True
    pods = [m for m in strata["volumeMounts"] if m["mountPath"] == "/var/lib/kubelet/pods"]
    assert pods and pods[0]["mountPropagation"] == "Bidirectional"
    assert host_path_of(strata, "/var/lib/kubelet/pods") == "/var/lib/kubelet/pods"
    config = cli._config(cli._parser().parse_args(strata_args()), cli._parser())
    assert host_path_of(strata, config.root) == config.root, "the store survives restarts"


def test_the_liveness_probe_port_is_the_one_the_sidecar_serves():
    strata, probe = container("strata"), container("liveness-probe")
    port_name = strata["livenessProbe"]["httpGet"]["port"]
    ports = {p["name"]: p["containerPort"] for p in strata["ports"]}
    assert flag(probe, "--http-endpoint").rsplit(":", 1)[1] == str(ports[port_name])
    assert flag(strata, "--metrics-address").rsplit(":", 1)[1] == str(ports["metrics"])
    annotations = one("DaemonSet", "strata-node")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_example_images_are_references_strata_accepts():
    sc = one("StorageClass")
    reference.parse(sc["parameters"]["image"])
    assert sc["parameters"]["pullPolicy"] in ("IfNotPresent", "Always", "Never")
    pod = one("Pod", "strata-example")
    [vol] = [v for v in pod["spec"]["volumes"] if "csi" in v]
    assert vol["csi"]["driver"] == csi.DRIVER_NAME
    reference.parse(vol["csi"]["volumeAttributes"]["image"])
