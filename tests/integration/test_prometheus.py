"""The dashboard and the alerts against a real Prometheus scraping a real `strata serve`.

Two pods on one image, pulled from a real registry (tests/registry.py) through the real gRPC
socket: `writer` (with a sizeLimit) creates a file, appends to a lower file and deletes
another; `reader` changes nothing. Before them, a pod that wrote and was unpublished
(discarded bytes, a GC run, the pull) and a publish of a tag the registry does not have (a
pull error, a publish error), so that the error panels have series to show.
`promtool check metrics` lints a live scrape. Then `prometheus` scrapes the plugin every
second with the rules loaded and, after two scrapes:
- every dashboard expression (Grafana's variables substituted, `$node` = this instance) must
  parse and return series, and so must every metric selector inside it;
- every alert's expression must parse and its rule evaluate without error; alerts do not
  fire on a healthy node, so the value each one tests (its expression without the final
  `> threshold`) must return series instead, as must each of its selectors;
- the per-pod series must equal what the pods did.
"""

import dataclasses
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest

from tests.conftest import ROOT_REASON, StrataProcess, free_port, unmount_all_under
from tests.registry import Registry, push

yaml = pytest.importorskip("yaml", reason="pyyaml is a dev dependency (make test installs it)")
from tests import prom  # noqa: E402  (reads the deploy files with yaml)

MISSING = [t for t in ("docker-registry", "skopeo") if shutil.which(t) is None]
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
              pytest.mark.skipif(prom.PROMETHEUS is None or prom.PROMTOOL is None,
                                 reason=prom.MISSING),
              pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"),
                                 reason=f"missing {', '.join(MISSING)} (.ci/run installs them)")]

SIZE_LIMIT = 32 << 20
# `promtool check metrics` complaints accepted on a live scrape, as {(metric, complaint)}:
# none so far. Add one only with the reason it cannot be fixed in csi/metrics.py.
ACCEPTED_LINT: set[tuple[str, str]] = set()


def pod(name: str) -> dict[str, str]:
    """The podInfoOnMount keys the kubelet sends."""
    return {"csi.storage.k8s.io/pod.namespace": "shop", "csi.storage.k8s.io/pod.name": name,
            "csi.storage.k8s.io/pod.uid": f"uid-{name}",
            "csi.storage.k8s.io/serviceAccount.name": "default"}


@dataclasses.dataclass
class Live:
    strata: StrataProcess
    prometheus: prom.Prometheus
    instance: str
    image: str
    writer: Path
    reader: Path
    lint: subprocess.CompletedProcess
    publish_error: grpc.StatusCode


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return s.value
    return None


def wait_for_scrape_of_changes(strata: StrataProcess) -> None:
    """Per-publication series come from a cache refreshed in the background: wait (bounded)
    until a scrape shows all three of the writer's changes (a pass may land between them),
    so that every sample Prometheus takes is current. If it never does, the value test
    below says what it saw."""
    def current() -> bool:
        text = metrics_text(strata.metrics_port)
        return all(sample(text, "strata_volume_files", change=c, pod_name="writer") == 1
                   for c in ("created", "copied_up", "deleted"))

    prom.wait_for(current, timeout=30)


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory) -> str:
    return prom.write_rules_file(tmp_path_factory.mktemp("rules") / "rules.yaml")


@pytest.fixture(scope="module")
def live(tmp_path_factory, images, rules_file):
    base = tmp_path_factory.mktemp("prometheus")
    (base / "strata").mkdir()
    (base / "prom").mkdir()
    (base / "pods").mkdir()
    registry = Registry()
    strata = prometheus = None
    pods = base / "pods"
    published = []
    try:
        registry.start()
        layout = images.app.split(":")[1]  # oci:LAYOUT:TAG
        push(layout, "app", registry, "team/app", "1.0")
        image = f"{registry.host}/team/app:1.0"
        strata = StrataProcess(str(base / "strata"), metrics_port=free_port(),
                               extra_args=("--insecure-registry", registry.host))
        strata.start()
        csi = strata.csi

        def publish(vid, target, image, **ctx):
            csi.publish(vid, target, image, **ctx)
            published.append((vid, target))

        # A pod that wrote and is gone: the pull (a cache miss per layer), discarded bytes,
        # a GC run.
        scratch = pods / "scratch"
        csi.publish("prom-scratch", scratch, image, **pod("scratch"))
        (scratch / "scratch.bin").write_bytes(os.urandom(64 << 10))
        csi.unpublish("prom-scratch", scratch)
        # A tag the registry does not have: a pull error and a publish that is not OK.
        with pytest.raises(grpc.RpcError) as failed:
            csi.publish("prom-missing", pods / "missing", f"{registry.host}/team/app:9.9",
                        **pod("missing"))
        # The two pods, on layers the store has now (cache hits).
        writer, reader = pods / "writer", pods / "reader"
        publish("prom-writer", writer, image, sizeLimit=str(SIZE_LIMIT), **pod("writer"))
        publish("prom-reader", reader, image, **pod("reader"))
        (writer / "srv" / "new.txt").write_text("created by the writer\n")
        with open(writer / "etc" / "motd", "a") as f:
            f.write("appended by the writer\n")
        os.unlink(writer / "etc" / "passwd")

        wait_for_scrape_of_changes(strata)
        lint = prom.promtool("check", "metrics", stdin=metrics_text(strata.metrics_port))

        instance = f"127.0.0.1:{strata.metrics_port}"
        prometheus = prom.Prometheus(base / "prom", free_port(), [instance], [rules_file])
        prometheus.start()
        assert prometheus.wait(lambda: prometheus.scrapes() >= 1), \
            f"no scrape of {instance}:\n{prometheus.read_log()}"
        # A pod that comes and goes while Prometheus watches: the RPC counters move between
        # two scrapes, so the latency percentiles are numbers rather than NaN (0/0).
        csi.publish("prom-late", pods / "late", image, **pod("late"))
        csi.unpublish("prom-late", pods / "late")
        seen = prometheus.scrapes()
        assert prometheus.wait(lambda: prometheus.scrapes() >= seen + 2), \
            f"no two scrapes of {instance}:\n{prometheus.read_log()}"
        assert prometheus.wait(lambda: all(r["health"] != "unknown"
                                           for r in prometheus.rules())), "rules not evaluated"
        yield Live(strata, prometheus, instance, image, writer, reader, lint,
                   failed.value.code())
    finally:
        if prometheus is not None:
            prometheus.stop()
        try:
            for vid, target in published:
                if strata is not None and strata.csi is not None:
                    strata.csi.unpublish(vid, target)
        finally:
            if strata is not None:
                strata.stop()
            unmount_all_under(str(base))
            registry.stop()


# -- the checks, shared by the parametrized tests ---------------------------------------------
def empty_selectors(p: prom.Prometheus, expr: str) -> list[str]:
    return [str(s) for s in prom.selectors(expr) if not p.vector(str(s))]


def check_returns_series(p: prom.Prometheus, expr: str) -> list[dict]:
    result = p.vector(expr)  # raises unless Prometheus parsed and ran it
    missing = empty_selectors(p, expr)
    assert not missing, f"no series for {missing} (a metric or label value not exported)"
    assert result, f"{expr}: no series"
    return result


def check_alert(p: prom.Prometheus, name: str, expr: str) -> None:
    assert p.query(expr)["status"] == "success", p.query(expr)
    value = prom.without_comparison(expr)
    assert value is not None, f"{name}: compare the outermost expression with a threshold"
    check_returns_series(p, value)


# -- the tests ----------------------------------------------------------------------------------
def test_live_scrape_passes_promtool_check_metrics(live):
    problems = {tuple(line.split(" ", 1)) for line in live.lint.stdout.splitlines() if line}
    assert problems <= ACCEPTED_LINT, live.lint.stdout + live.lint.stderr


@pytest.mark.parametrize("expr", [pytest.param(e, id=i) for i, e in prom.dashboard_exprs()])
def test_dashboard_expression_returns_series(live, expr):
    check_returns_series(live.prometheus, prom.substitute(expr, node=live.instance))


@pytest.mark.parametrize("name,expr", [pytest.param(n, e, id=n) for n, e in prom.rule_exprs()])
def test_alert_expression_evaluates_on_live_series(live, name, expr):
    check_alert(live.prometheus, name, expr)


def test_publish_latency_percentiles_are_measured(live):
    targets = [e for i, e in prom.dashboard_exprs() if i.startswith("Publish latency")]
    assert len(targets) == 3
    for expr in targets:
        [q] = live.prometheus.vector(prom.substitute(expr, node=live.instance))
        assert 0 < float(q["value"][1]) < 60, (expr, q)


def test_prometheus_evaluates_every_rule_without_error(live):
    rules = {r["name"]: r for r in live.prometheus.rules()}
    assert set(rules) == {name for name, _ in prom.rule_exprs()}
    for name, r in rules.items():
        assert r["health"] == "ok" and not r.get("lastError"), (name, r)


def test_a_healthy_node_fires_no_alert(live):
    """Nothing firing, and nothing pending (the alerts wait minutes before they fire) but
    the publish errors the fixture provokes on purpose."""
    alerts = live.prometheus.api("alerts")["data"]["alerts"]
    assert not [a for a in alerts if a["state"] == "firing"], alerts
    pending = {a["labels"]["alertname"] for a in alerts if a["state"] == "pending"}
    assert pending <= {"StrataPublishErrors"}, alerts


def test_per_pod_series_equal_the_pods_changes(live):
    p = live.prometheus

    def per_pod(metric: str, name: str, **labels: str) -> float | None:
        matchers = "".join(f', {k}="{v}"' for k, v in labels.items())
        return p.value(f'sum({metric}{{pod_namespace="shop", pod_name="{name}"{matchers}}})')

    changes = {"created": 1, "copied_up": 1, "metacopy": 0, "deleted": 1, "renamed": 0}
    seen = {c: per_pod("strata_volume_files", "writer", change=c) for c in changes}
    assert seen == changes
    assert {c: per_pod("strata_volume_files", "reader", change=c) for c in changes} == \
        dict.fromkeys(changes, 0)
    # Allocated bytes: a stat through the overlay shows the upper file's blocks.
    motd = os.stat(live.writer / "etc" / "motd").st_blocks * 512
    created = os.stat(live.writer / "srv" / "new.txt").st_blocks * 512
    assert per_pod("strata_volume_copied_up_bytes", "writer") == motd
    assert per_pod("strata_volume_upper_bytes", "writer") >= motd + created
    assert per_pod("strata_volume_upper_inodes", "writer") >= 3
    for metric in ("strata_volume_copied_up_bytes", "strata_volume_upper_bytes",
                   "strata_volume_upper_inodes"):
        assert per_pod(metric, "reader") == 0, metric
    assert per_pod("strata_volume_size_limit_bytes", "writer") == SIZE_LIMIT
    assert p.vector('strata_volume_size_limit_bytes{pod_name="reader"}') == []
    [info] = p.vector('strata_volume_info{pod_name="writer"}')
    assert info["metric"]["image"] == live.image and info["metric"]["volume_id"] == "prom-writer"
    assert float(info["value"][1]) == 1
    assert p.value(f'strata_image_publications{{image="{live.image}"}}') == 2
    assert p.value("strata_publications") == 2
    # The dashboard's own queries show the same: its table row for the writer.
    [row] = [r for r in p.vector(prom.substitute(
        dict(prom.dashboard_exprs())["Copy-up by pod/A"], node=live.instance))
        if r["metric"]["pod_name"] == "writer"]
    assert float(row["value"][1]) == 1
    [top] = p.vector(prom.substitute(
        dict(prom.dashboard_exprs())["Top writers/A"], node=live.instance).replace(
        "topk(10,", "topk(1,"))
    assert top["metric"]["pod_name"] == "writer"


def test_node_counters_saw_the_gone_pod_and_the_failed_pull(live):
    p = live.prometheus
    assert p.value("strata_ephemeral_discarded_bytes_total") >= 64 << 10
    assert p.value('strata_gc_runs_total{result="ok"}') >= 1
    assert p.value('sum(strata_pulls_total{result="pulled"})') == 1
    assert p.value('sum(strata_pulls_total{result!~"pulled|present"})') == 1, "the missing tag"
    assert p.value("strata_blob_fetches_total") >= 2, "config and layers"
    assert p.value("strata_store_cache_misses_total") >= 2, "the first pod pulled its layers"
    assert p.value("strata_store_cache_hits_total") >= 4, "the two pods found them"
    code = live.publish_error.name
    assert p.value(f'strata_rpc_duration_seconds_count{{method="NodePublishVolume", '
                   f'code="{code}"}}') == 1
