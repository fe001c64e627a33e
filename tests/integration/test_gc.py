"""Layer references and garbage collection against a real store and real mounts."""

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT_REASON, StrataProcess, free_port, scrape, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)


def start(tmp_path, *gc_args) -> StrataProcess:
    return StrataProcess(str(tmp_path), metrics_port=free_port(),
                         extra_args=tuple(gc_args)).start()


@pytest.fixture
def plugins(tmp_path):
    started = []
    yield lambda *args: started.append(start(tmp_path, *args)) or started[-1]
    for p in started:
        p.stop(signal.SIGKILL)
    unmount_all_under(str(tmp_path))


def layer_dirs(plugin) -> set[str]:
    return set(os.listdir(os.path.join(plugin.root, "layers")))


def test_immediate_gc_keeps_shared_layers_until_last_user(plugins, images, tmp_path):
    p = plugins("--gc-policy", "immediate", "--gc-min-age", "0")
    p.csi.publish("app", tmp_path / "app", images.app)
    p.csi.publish("other", tmp_path / "other", images.other)
    assert len(layer_dirs(p)) == 3  # base shared, app top, other top
    p.csi.unpublish("app", tmp_path / "app")
    assert len(layer_dirs(p)) == 2, "app's own layer goes; the shared base stays"
    assert (tmp_path / "other/etc/motd").read_text() == "base motd\n"
    p.csi.unpublish("other", tmp_path / "other")
    assert layer_dirs(p) == set()
    m = scrape(p.metrics_port)
    assert m["strata_gc_removed_layers_total"] == 3
    assert m["strata_gc_freed_bytes_total"] > 0
    assert m["strata_layers"] == 0
    assert os.listdir(os.path.join(p.root, "tmp")) == []


def test_stage_pins_layers(plugins, images, tmp_path):
    p = plugins("--gc-policy", "immediate", "--gc-min-age", "0")
    staging = tmp_path / "staging"
    staging.mkdir()
    p.csi.stage("pv", staging, images.app)
    p.csi.publish("pv", tmp_path / "pod", staging=staging)
    p.csi.unpublish("pv", tmp_path / "pod")
    assert len(layer_dirs(p)) == 2, "the stage still holds the layers"
    p.csi.unstage("pv", staging)
    assert layer_dirs(p) == set()


def test_min_age_counts_from_the_release_not_from_the_publish(tmp_path, images):
    """A layer a pod used for a week is as warm as it gets the moment the pod goes:
    --gc-min-age must protect it from then on (last_used is refreshed on release)."""
    from csi import compose
    from csi.config import Config
    from csi.volumes import PublishSpec, StageSpec

    now = [1000.0]
    config = Config(root=str(tmp_path / "store"), node_id="t", gc_policy="immediate",
                    gc_min_age=300)
    parts = compose.node(config, clock=lambda: now[0])
    vm, gc, state = parts.volumes, parts.gc, parts.state
    try:
        vm.publish(PublishSpec("v", str(tmp_path / "pod"), images.app, False, 1))
        vm.stage(StageSpec("s", str(tmp_path / "staging"), images.base, 1))
        now[0] += 7 * 86400
        vm.unpublish("v", str(tmp_path / "pod"))
        vm.unstage("s", str(tmp_path / "staging"))
        with state.read() as tx:
            assert len(tx.layers()) == 2, "released just now: still warm"
        now[0] += 301
        gc.collect()
        with state.read() as tx:
            assert tx.layers() == []
    finally:
        parts.close()
        unmount_all_under(str(tmp_path))


def test_lru_keeps_a_warm_cache_until_the_high_water_mark(plugins, images, tmp_path):
    # A huge capacity: far below the mark, released layers stay for the next pod.
    p = plugins("--gc-policy", "lru", "--gc-max-bytes", str(1 << 40), "--gc-min-age", "0")
    p.csi.publish("a", tmp_path / "a", images.app)
    p.csi.unpublish("a", tmp_path / "a")
    assert len(layer_dirs(p)) == 2
    p.stop()
    # Restart with a capacity the store already exceeds: start-up GC evicts down to low.
    q = plugins("--gc-policy", "lru", "--gc-max-bytes", "1000", "--gc-high-percent", "50",
                "--gc-low-percent", "0", "--gc-min-age", "0")
    assert q.root == p.root
    assert layer_dirs(q) == set()


def test_lru_respects_min_age(plugins, images, tmp_path):
    p = plugins("--gc-policy", "lru", "--gc-max-bytes", "1000", "--gc-high-percent", "50",
                "--gc-low-percent", "0", "--gc-min-age", "3600")
    p.csi.publish("a", tmp_path / "a", images.app)
    p.csi.unpublish("a", tmp_path / "a")
    assert len(layer_dirs(p)) == 2, "recently used layers survive even above the mark"


def test_strata_gc_cli_while_serving_spares_held_layers(plugins, images, tmp_path):
    p = plugins("--gc-policy", "lru", "--gc-max-bytes", str(1 << 40))
    p.csi.publish("held", tmp_path / "held", images.base)
    p.csi.publish("gone", tmp_path / "gone", images.app)
    p.csi.unpublish("gone", tmp_path / "gone")
    assert len(layer_dirs(p)) == 2
    out = subprocess.run([sys.executable, "-m", "csi", "gc", "--root", p.root,
                          "--gc-policy", "immediate", "--gc-min-age", "0"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("removed 1 layers")
    assert len(layer_dirs(p)) == 1, "the base layer is held by a publication"
    assert (tmp_path / "held/etc/motd").read_text() == "base motd\n"
    ls = subprocess.run([sys.executable, "-m", "csi", "ls", "--root", p.root],
                        capture_output=True, text=True, check=True).stdout
    assert images.base[-40:] in ls
    df = subprocess.run([sys.executable, "-m", "csi", "df", "--root", p.root],
                        capture_output=True, text=True, check=True).stdout
    assert "1 publications" in df
    p.csi.unpublish("held", tmp_path / "held")


def test_df_reports_sharing(plugins, images, tmp_path):
    p = plugins()
    for i in range(3):
        p.csi.publish(f"pod{i}", tmp_path / f"pod{i}", images.app)
    m = scrape(p.metrics_port)
    assert m["strata_store_logical_bytes"] == 3 * m["strata_store_physical_bytes"]
    assert m["strata_sharing_saved_bytes"] == 2 * m["strata_store_physical_bytes"]
    df = subprocess.run([sys.executable, "-m", "csi", "df", "--root", p.root],
                        capture_output=True, text=True, check=True).stdout
    assert "3 publications would take" in df
    for i in range(3):
        p.csi.unpublish(f"pod{i}", tmp_path / f"pod{i}")


def test_strata_diff_shows_what_a_pod_changed(plugins, images, tmp_path):
    p = plugins()
    t = tmp_path / "pod"
    p.csi.publish("d", t, images.app)
    try:
        with open(t / "etc/motd", "a") as f:
            f.write("changed\n")
        (t / "srv/new.txt").write_text("new")
        os.unlink(t / "usr/lib/python3/json/decoder.py")
        (t / "var/cache/new").unlink()
        out = subprocess.run([sys.executable, "-m", "csi", "diff", str(t), "--root", p.root],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        assert "C /etc/motd" in out
        assert "A /srv/new.txt" in out
        assert "D /usr/lib/python3/json/decoder.py" in out
        assert "D /var/cache/new" in out
        assert not any(line.endswith("/usr/bin/tool") for line in out), "untouched: not listed"
    finally:
        p.csi.unpublish("d", t)
