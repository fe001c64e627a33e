"""deploy/monitoring: the dashboard and the alerts parse, name only metrics strata exports
(with their labels and label values), and the alerts fire when they should — checked by
the real promtool, not by a parser of ours. tests/integration/test_prometheus.py evaluates
the same expressions against a live scrape.
"""

import json
import os
import re
import shutil
import subprocess

import grpc
import pytest

from csi.proto import csi_pb2

yaml = pytest.importorskip("yaml", reason="pyyaml is a dev dependency (make test installs it)")
from tests import prom  # noqa: E402  (reads the deploy files with yaml)

DATA = os.path.join(os.path.dirname(__file__), "data", "monitoring")
needs_promtool = pytest.mark.skipif(prom.PROMTOOL is None, reason=prom.MISSING)

# Every metric strata exports (the brief's fixed table, docs/metrics.md), with its labels.
POD = {"volume_id", "pod_namespace", "pod_name"}
HISTOGRAMS = {"strata_rpc_duration_seconds": {"method", "code"},
              "strata_layer_unpack_seconds": set(), "strata_pull_seconds": set()}
METRICS = {
    "strata_volume_upper_bytes": POD, "strata_volume_upper_inodes": POD,
    "strata_volume_files": POD | {"change"}, "strata_volume_copied_up_bytes": POD,
    "strata_volume_copied_up_logical_bytes": POD,
    "strata_copy_up_logical_bytes_total": set(), "strata_store_reflink": {"filesystem"},
    "strata_volume_size_limit_bytes": POD,
    "strata_volume_info": POD | {"image", "readonly", "ephemeral"},
    "strata_copy_up_files_total": set(), "strata_copy_up_bytes_total": set(),
    "strata_ephemeral_discarded_bytes_total": set(),
    "strata_store_cache_hits_total": set(), "strata_store_cache_misses_total": set(),
    "strata_gc_runs_total": {"result"},
    "strata_layer_unpacks_total": set(), "strata_layer_unpack_bytes_total": set(),
    "strata_gc_removed_layers_total": set(), "strata_gc_freed_bytes_total": set(),
    "strata_lazy_unmounts_total": set(), "strata_pulls_total": {"result"},
    "strata_blob_fetched_bytes_total": set(), "strata_blob_fetches_total": set(),
    "strata_layers": set(), "strata_store_physical_bytes": set(),
    "strata_store_logical_bytes": set(), "strata_sharing_saved_bytes": set(),
    "strata_publications": set(), "strata_layer_page_cache_bytes": set(),
    "strata_page_cache_saved_bytes": set(), "strata_stages": set(),
    "strata_pending_releases": set(), "strata_trash_entries": set(),
    "strata_image_publications": {"image"}, "strata_layer_references": {"layer"},
    "strata_layer_bytes": {"layer"},
    "strata_store_used_bytes": set(), "strata_store_capacity_bytes": set(),
    "strata_gc_high_mark_bytes": set(), "strata_gc_low_mark_bytes": set(),
}
for _name, _labels in HISTOGRAMS.items():
    METRICS |= {f"{_name}_bucket": _labels | {"le"}, f"{_name}_sum": _labels,
                f"{_name}_count": _labels}
TARGET_LABELS = {"instance", "job"}  # what Prometheus adds to every scraped series
CSI_METHODS = {m for s in ("Identity", "Node", "Controller")
               for m in csi_pb2.DESCRIPTOR.services_by_name[s].methods_by_name}
VALUES = {  # the closed sets of label values
    "change": {"created", "copied_up", "metacopy", "deleted", "renamed"},
    ("strata_gc_runs_total", "result"): {"ok", "error"},
    ("strata_pulls_total", "result"): {"pulled", "present", "error"}
    | {c.name.lower() for c in grpc.StatusCode},
    "method": CSI_METHODS,
    "code": {c.name for c in grpc.StatusCode},
}

EXPRS = [pytest.param(e, id=f"dashboard:{i}") for i, e in prom.dashboard_exprs()] + \
        [pytest.param(e, id=f"rule:{i}") for i, e in prom.rule_exprs()]


def test_dashboard_is_grafana_json_on_a_datasource_variable():
    with open(prom.DASHBOARD) as f:
        board = json.loads(f.read())
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["node"]["type"] == "query"
    assert "label_values(" in variables["node"]["definition"]
    assert ", instance)" in variables["node"]["definition"]
    panels = prom.panels(board)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for p in panels:
        assert p["title"] and p.get("description"), p
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"{p['title']}: no targets"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"{p['title']}/{t.get('refId')}: no expr"
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert re.search(r'instance=~"\$node"', t["expr"]), \
                f"{p['title']}/{t['refId']}: not filtered by the node variable"
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), f"{p['title']}: duplicate refIds"


@pytest.mark.parametrize("expr", [
    'rate(x{instance=~"$node"}[$__rate_interval])', "${datasource} [[node]] ${node:regex}"])
def test_substitute_replaces_every_grafana_variable(expr):
    out = prom.substitute(expr, node="n1")
    assert "$" not in out and "[[" not in out
    with pytest.raises(KeyError):
        prom.substitute("rate(x[$__unknown])")


def test_selectors_and_comparisons_are_found():
    expr = ('sum by (pod_name) (rate(a_total{x="1", y=~"p|q"}[5m] offset 1h)) '
            '/ on (instance) group_left (z) b > bool 0.9')
    assert [str(s) for s in prom.selectors(expr)] == [
        'a_total{x="1", y=~"p|q"}', "b"]
    assert prom.without_comparison(expr).endswith("group_left (z) b")
    assert prom.without_comparison('topk(10, x{a!="b"})') is None
    assert prom.without_comparison("x > y") is None, "only a threshold is taken off"


@pytest.mark.parametrize("expr", EXPRS)
def test_expressions_name_only_exported_metrics_and_labels(expr):
    found = prom.selectors(prom.substitute(expr))
    assert found, "no metric in the expression"
    for sel in found:
        assert sel.name in METRICS, f"{sel.name} is not a strata metric (a typo?)"
        for label, op, value in sel.matchers:
            assert label in METRICS[sel.name] | TARGET_LABELS, \
                f"{sel.name} has no label {label!r}"
            allowed = VALUES.get((sel.name, label), VALUES.get(label))
            if allowed is None or label in TARGET_LABELS:
                continue
            # An alternation of literals (a|b) is checked value by value.
            values = value.split("|") if op in ("=~", "!~") else [value]
            if all(re.fullmatch(r"[\w]+", v) for v in values):
                unknown = set(values) - allowed
                assert not unknown, f"{sel.name}{{{label}}} never takes {sorted(unknown)}"


def test_every_rule_is_an_alert_with_severity_summary_description_and_runbook():
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "monitoring.md")) as f:
        doc = f.read()
    anchors = {re.sub(r"[^\w -]", "", h).strip().lower().replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", doc, re.M)}
    rule = prom.prometheus_rule()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    names = [r["alert"] for r in prom.rules()]
    assert len(set(names)) == len(names)
    for r in prom.rules():
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert set(r["annotations"]) >= {"summary", "description", "runbook"}, r["alert"]
        page, _, anchor = r["annotations"]["runbook"].partition("#")
        assert page == "docs/monitoring.md" and anchor in anchors, \
            f"{r['alert']}: no section #{anchor} in docs/monitoring.md"
        assert r["alert"] in doc, f"{r['alert']} is not described in docs/monitoring.md"


@needs_promtool
def test_rules_pass_promtool_check_rules(tmp_path):
    out = prom.promtool("check", "rules", prom.write_rules_file(tmp_path / "rules.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(prom.rules())} rules found" in out.stdout


@needs_promtool
def test_dashboard_expressions_pass_promtool_check_rules(tmp_path):
    exprs = [prom.substitute(e) for _, e in prom.dashboard_exprs()]
    path = prom.write_recording_rules(tmp_path / "dashboard.yaml", exprs)
    out = prom.promtool("check", "rules", path)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_a_typo_fails_promtool_check_rules(tmp_path):
    """The check above can fail: promtool really parses what it is given."""
    path = prom.write_recording_rules(tmp_path / "bad.yaml", ["sum by (x (strata_layers)"])
    assert prom.promtool("check", "rules", path).returncode != 0


@needs_promtool
def test_alerts_fire_as_promtool_test_rules_expects(tmp_path):
    with open(os.path.join(DATA, "alerts_test.yaml")) as f:
        tested = set(re.findall(r"alertname: (\w+)", f.read()))
    assert tested == {r["alert"] for r in prom.rules()}, "every alert has a promtool test"
    prom.write_rules_file(tmp_path / "rules.yaml")
    shutil.copy(os.path.join(DATA, "alerts_test.yaml"), tmp_path)
    out = prom.promtool("test", "rules", str(tmp_path / "alerts_test.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_scrape_config_example_is_a_prometheus_config(tmp_path):
    """Debian's promtool is built without Kubernetes service discovery: where it refuses
    `kubernetes_sd_configs`, the job is checked with the discovery swapped for a static
    target, so the relabelling and the rest are still checked by promtool itself."""
    path = os.path.join(prom.MONITORING, "prometheus-scrape.yaml")
    out = prom.promtool("check", "config", path)
    if "kubernetes_sd_configs not found" in out.stdout + out.stderr:
        with open(path) as f:
            config = yaml.safe_load(f)
        for job in config["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
            job["static_configs"] = [{"targets": ["127.0.0.1:9808"]}]
        path = str(tmp_path / "prometheus.yml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        out = prom.promtool("check", "config", path)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl")
def test_kustomization_builds():
    out = subprocess.run(["kubectl", "kustomize", prom.MONITORING], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out.stdout)}
    assert docs == {("PrometheusRule", "strata"), ("PodMonitor", "strata-node"),
                    ("ConfigMap", "strata-dashboard")}
    [cm] = [d for d in yaml.safe_load_all(out.stdout) if d["kind"] == "ConfigMap"]
    assert json.loads(cm["data"]["strata-dashboard.json"]) == prom.dashboard()
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
