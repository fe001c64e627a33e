"""deploy/ as the tests read it: what `kubectl kustomize` renders for the base, each overlay
and the monitoring component, the example files, and lookups into the rendered objects
(the node DaemonSet, its containers, flags, ports and where a container path lives on the
host).

Rendering uses the real kubectl and its built-in kustomize (`kubectl kustomize`), as an
operator's `kubectl apply -k` does. Without it the tests skip on a developer's machine and
fail in CI (.ci/run checks for it first, and says what is missing).
"""

import functools
import os
import re
import shutil
import subprocess

import pytest
import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(REPO, "deploy")
EXAMPLES = os.path.join(DEPLOY, "examples")
OVERLAYS = ("kind", "minikube")
TARGETS = ("base", *(f"overlays/{o}" for o in OVERLAYS))
NAMESPACE = "strata-system"
KUBECTL = shutil.which("kubectl")
KUBECTL_MISSING = ("needs kubectl with its built-in kustomize (`kubectl kustomize`, kubectl "
                   "1.21+); .ci/run requires it")


def need(ok: bool, reason: str) -> None:
    """Skip where a tool is missing on a developer's machine; in CI a missing tool fails."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@functools.cache
def _kustomize(path: str) -> str:
    run = subprocess.run([KUBECTL, "kustomize", path], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, f"kubectl kustomize {path} failed:\n{run.stderr}"
    return run.stdout


def render(target: str) -> list[dict]:
    """The objects `kubectl kustomize deploy/TARGET` renders (a fresh copy each call)."""
    need(KUBECTL is not None, KUBECTL_MISSING)
    path = target if os.path.isabs(target) else os.path.join(DEPLOY, target)
    return [d for d in yaml.safe_load_all(_kustomize(path)) if d]


def example_files() -> list[str]:
    return sorted(n for n in os.listdir(EXAMPLES) if n.endswith(".yaml"))


def example(name: str) -> list[dict]:
    with open(os.path.join(EXAMPLES, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


class Node:
    """The node DaemonSet of one rendering, and questions about its pod."""

    def __init__(self, docs: list[dict]):
        self.docs = docs
        self.daemonset = one(docs, "DaemonSet", "strata-node")
        self.pod = self.daemonset["spec"]["template"]["spec"]
        self.volumes = {v["name"]: v for v in self.pod["volumes"]}

    def container(self, name: str) -> dict:
        [c] = [c for c in self.pod["containers"] if c["name"] == name]
        return c

    @property
    def strata(self) -> dict:
        return self.container("strata")

    def mount(self, c: dict, path: str) -> tuple[dict, str]:
        """The volumeMount of container `c` that holds `path`, and the rest of the path."""
        for m in sorted(c.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
            mp = m["mountPath"].rstrip("/")
            if path == mp or path.startswith(mp + "/"):
                return m, path[len(mp):]
        raise AssertionError(f"{c['name']}: nothing mounted at {path}")

    def host_path(self, c: dict, path: str) -> str:
        """Where `path` inside container `c` lives on the host, through its hostPath mounts."""
        m, rest = self.mount(c, path)
        return self.volumes[m["name"]]["hostPath"]["path"].rstrip("/") + rest

    def ports(self, c: dict) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def flag(c: dict, name: str) -> str:
    values = [a.split("=", 1)[1] for a in c.get("args", []) if a.startswith(name + "=")]
    assert len(values) == 1, f"{c['name']}: {name} given {len(values)} times"
    return values[0]


def port_of(address: str) -> int:
    """The port of a Go/strata listen address: `:9809`, `0.0.0.0:9808`, `[::]:1`."""
    return int(address.rsplit(":", 1)[1])


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's expansion of `$(VAR)` in a container's args and env values: a defined
    variable is replaced, an undefined reference is kept as written, `$$` is a `$`."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  text)


def container_env(c: dict, field_refs: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: plain values (expanded against
    the variables before them) and `fieldRef`s resolved from `field_refs`; any other
    source is refused, so a new kind of reference cannot slip past the drift test."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
            continue
        source = e.get("valueFrom", {})
        assert set(source) == {"fieldRef"}, f"{e['name']}: unsupported source {source}"
        env[e["name"]] = field_refs[source["fieldRef"]["fieldPath"]]
    assert not c.get("envFrom"), "envFrom: the settings are a plain env list"
    return env


def pyproject_version() -> str:
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)
