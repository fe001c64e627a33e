"""Every object deploy/ renders and every example validates against the OpenAPI schemas of
the newest Kubernetes release kubernetes-validate knows, strictly: an unknown or misspelt
field is an error, as `kubectl apply --validate=strict` would make it on a cluster.

The Prometheus Operator's kinds (PodMonitor, PrometheusRule) are CRDs, not in those
schemas: they are checked here for the structure the operator requires of the fields we
use, and their PromQL by promtool (tests/unit/test_monitoring.py).
"""

import os
import re

import pytest
import yaml

from tests.deploy.manifests import DEPLOY, TARGETS, example, example_files, need, render

try:
    import kubernetes_validate
except ImportError:  # a dev dependency (pyproject.toml); make test installs it
    kubernetes_validate = None

CRDS = {"PodMonitor", "PrometheusRule"}  # monitoring.coreos.com/v1


def newest() -> str:
    need(kubernetes_validate is not None, "needs kubernetes-validate (pip install -e '.[dev]')")
    return kubernetes_validate.latest_version()


def validate(doc: dict, where: str) -> None:
    name = f"{where}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, newest(), strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{name} is invalid for Kubernetes {newest()}: {e.message} at "
                    f"{'.'.join(str(p) for p in e.path)}")


@pytest.mark.parametrize("target", [*TARGETS, "monitoring"])
def test_every_rendered_object_validates(target):
    checked = 0
    for doc in render(target):
        if doc["kind"] in CRDS:
            continue
        validate(doc, target)
        checked += 1
    assert checked


@pytest.mark.parametrize("name", example_files())
def test_every_example_validates(name):
    docs = example(name)
    assert docs
    for doc in docs:
        validate(doc, f"examples/{name}")


def test_the_validation_is_strict():
    """A misspelt field must fail, or the tests above would prove nothing."""
    newest()
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "c", "image": "i", "volumeMount": []}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, newest(), strict=True)


def test_the_operator_objects_have_the_structure_the_operator_reads():
    docs = {d["kind"]: d for d in render("monitoring")}
    assert CRDS <= set(docs)
    for kind in CRDS:
        d = docs[kind]
        assert d["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(d) == {"apiVersion", "kind", "metadata", "spec"}, kind
        assert set(d["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    monitor = docs["PodMonitor"]["spec"]
    assert set(monitor) <= {"selector", "namespaceSelector", "podMetricsEndpoints",
                            "jobLabel", "podTargetLabels"}
    assert set(monitor["selector"]) == {"matchLabels"}
    for endpoint in monitor["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings",
                                 "metricRelabelings", "honorLabels", "scheme"}
        for r in endpoint.get("relabelings", []):
            assert set(r) <= {"sourceLabels", "targetLabel", "regex", "replacement",
                              "action", "separator", "modulus"}
    rule = docs["PrometheusRule"]["spec"]
    assert set(rule) == {"groups"}
    for group in rule["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations",
                              "keep_firing_for"}
            assert ("alert" in r) != ("record" in r) and isinstance(r["expr"], str)


def test_the_commented_token_requests_are_valid_once_uncommented():
    """What the CSIDriver's comment tells an operator to uncomment must apply as it is."""
    with open(os.path.join(DEPLOY, "base", "csidriver.yaml")) as f:
        text = f.read()
    block = re.search(r"^  # tokenRequests:\n(?:  #  .*\n)*  # serviceAccountTokenInSecrets.*\n",
                      text, re.M)
    assert block, "the commented tokenRequests block"
    uncommented = re.sub(r"^  # ?", "  ", block.group(0), flags=re.M)
    doc = yaml.safe_load(text.replace(block.group(0), uncommented))
    assert doc["spec"]["tokenRequests"][0]["audience"]
    assert doc["spec"]["serviceAccountTokenInSecrets"] is True
    validate(doc, "base/csidriver.yaml, tokenRequests uncommented")
