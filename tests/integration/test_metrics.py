"""Per-publication metrics through a real `strata serve`: real overlay mounts, publishes over
the real gRPC socket, /metrics scraped over HTTP and parsed with prometheus_client's parser.

Two pods share one image; one of them creates a file, appends to a lower file, chmods
another, deletes a lower file and renames a lower directory. Its series carry exactly those
changes (bytes: the upper's st_blocks summed here), the other pod's series are all zero,
and after its unpublish its series are gone while the counters keep what it did."""

import errno
import os
import shutil
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi.backend.overlay import OverlayBackend
from csi.inspect import summarize
from csi.mount.mountinfo import MountTable
from csi.paths import StorePaths
from csi.store.state import State
from tests.conftest import ROOT_REASON, StrataProcess, free_port, unmount_all_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

POLL = 60.0  # generous: a pass runs every 0.2 s here


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label pairs): value} of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def pod_labels(volume_id: str, namespace: str, name: str) -> dict[str, str]:
    return {"volume_id": volume_id, "pod_namespace": namespace, "pod_name": name}


def per_pod(m: dict, labels: dict[str, str]) -> dict[str, float]:
    """The volume series of one pod: {"upper_bytes": …, "files:created": …, …}."""
    want = set(labels.items())
    out = {}
    for (name, pairs), value in m.items():
        if not name.startswith("strata_volume_") or not want <= set(pairs):
            continue
        rest = dict(set(pairs) - want)
        short = name.removeprefix("strata_volume_")
        if short == "files":
            short += ":" + rest["change"]
        elif short == "info":
            short += ":" + ",".join(f"{k}={v}" for k, v in sorted(rest.items()))
        out[short] = value
    return out


def pod_context(namespace: str, name: str) -> dict[str, str]:
    """podInfoOnMount, as the kubelet sends it."""
    return {"csi.storage.k8s.io/pod.namespace": namespace,
            "csi.storage.k8s.io/pod.name": name,
            "csi.storage.k8s.io/pod.uid": f"uid-{name}",
            "csi.storage.k8s.io/serviceAccount.name": "default"}


def upper_of(root: str, target) -> tuple[str, list[str]]:
    """The publication's upper dir and its lowers (nearest first), as the backend says."""
    state = State(os.path.join(root, "state.db"), migrate=False)
    try:
        with state.read() as tx:
            pub = tx.publication(str(target))
            chain = tx.image(pub.manifest_digest).layer_ids
    finally:
        state.close()
    backend = OverlayBackend(StorePaths(root))
    return backend.dirs(pub.key).upper, backend.lowers(chain)


def allocated(upper: str) -> tuple[int, int]:
    """(bytes, inodes) of every entry below `upper`, each inode once: st_blocks * 512."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(upper):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total, len(seen)


def wait_for(port: int, ok, what: str):
    deadline = time.monotonic() + POLL
    while True:
        m = metrics(port)
        if ok(m):
            return m
        assert time.monotonic() < deadline, f"{what}: never seen; last scrape {m}"
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path):
    procs = []

    def start(*args: str) -> StrataProcess:
        p = StrataProcess(str(tmp_path), metrics_port=free_port(), extra_args=args).start()
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            p.stop()
        unmount_all_under(str(tmp_path))


def mount_options(target) -> set[str]:
    [m] = MountTable().at(str(target))
    return set(m.super_options.split(",")) | set(m.options.split(","))


def change(a) -> dict[str, int]:
    """The five changes of the issue, made through the mount at `a`; returns the counts
    expected of them (what the kernel's features let each become)."""
    (a / "srv/new.txt").write_text("created\n")  # created
    with open(a / "etc/passwd", "a") as f:  # copied up with data
        f.write("pod:x:2000:2000::/:/bin/sh\n")
    metacopy = "metacopy=on" in mount_options(a)
    (a / "etc/motd").chmod(0o600)  # copied up, metadata only where metacopy is on
    os.unlink(a / "srv/index.html")  # deleted (a whiteout)
    src, dst = a / "usr/lib/python3/json", a / "usr/lib/python3/json-renamed"
    try:
        os.rename(src, dst)  # redirect_dir: a redirect in the upper, a whiteout at src
        renamed, created = 1, 1
    except OSError as e:  # no redirect_dir: EXDEV, and mv copies then deletes
        assert e.errno == errno.EXDEV
        shutil.copytree(src, dst, symlinks=True)
        shutil.rmtree(src)
        renamed = 0
        # new.txt, the copy of the directory, and everything in it
        created = 2 + sum(len(d) + len(f) for _, d, f in os.walk(dst))
    return {"files:created": created, "files:copied_up": 1 + (not metacopy),
            "files:metacopy": int(metacopy), "files:deleted": 2, "files:renamed": renamed}


def test_two_pods_on_one_image_each_see_only_their_own_changes(server, images, tmp_path):
    p = server("--metrics-refresh-seconds", "0.2")
    a, b = tmp_path / "pod-a", tmp_path / "pod-b"
    p.csi.publish("vol-a", a, images.app, **pod_context("team", "writer"))
    p.csi.publish("vol-b", b, images.app, **pod_context("team", "reader"))
    la, lb = pod_labels("vol-a", "team", "writer"), pod_labels("vol-b", "team", "reader")
    try:
        expected = change(a)
        upper, lowers = upper_of(p.root, a)
        upper_bytes, inodes = allocated(upper)
        copied = [os.lstat(os.path.join(upper, f))
                  for f in ["etc/passwd"] + (["etc/motd"] if not expected["files:metacopy"]
                                             else [])]
        copied_bytes = sum(st.st_blocks * 512 for st in copied)  # tmp: no reflink
        expected |= {"upper_bytes": upper_bytes, "upper_inodes": inodes,
                     "copied_up_bytes": copied_bytes,
                     "copied_up_logical_bytes": sum(st.st_size for st in copied)}
        m = wait_for(p.metrics_port,
                     lambda m: per_pod(m, la).get("upper_bytes") == upper_bytes,
                     "pod a's upper bytes")
        got = per_pod(m, la)
        assert {k: got[k] for k in expected} == expected
        assert got["info:ephemeral=true,image=" + images.app + ",readonly=false"] == 1
        assert "size_limit_bytes" not in got
        other = per_pod(m, lb)
        assert {k: v for k, v in other.items() if not k.startswith("info:")} == {
            k: 0 for k in expected}, "the other pod changed nothing"
        # The cache agrees with inspect.summarize read here, field by field.
        s = summarize(upper, lowers)
        assert (got["upper_inodes"], got["files:created"], got["files:deleted"]) == (
            s.upper_inodes, s.created, s.deleted)
        assert m[("strata_image_publications", (("image", images.app),))] == 2
        files_total = expected["files:copied_up"] + expected["files:metacopy"]
        assert m[("strata_copy_up_files_total", ())] == files_total
        assert m[("strata_copy_up_bytes_total", ())] == copied_bytes
    finally:
        p.csi.unpublish("vol-a", a)
    m = metrics(p.metrics_port)
    assert per_pod(m, la) == {}, "its series went with it"
    assert per_pod(m, lb)["upper_bytes"] == 0
    assert m[("strata_copy_up_files_total", ())] == files_total, "counters keep it"
    assert m[("strata_copy_up_bytes_total", ())] == copied_bytes
    assert m[("strata_ephemeral_discarded_bytes_total", ())] == upper_bytes
    p.csi.unpublish("vol-b", b)
    m = metrics(p.metrics_port)
    assert per_pod(m, lb) == {}
    assert m[("strata_ephemeral_discarded_bytes_total", ())] == upper_bytes  # b wrote nothing


def test_a_scrape_reads_the_cache_and_a_restart_relearns_live_publications(
        server, images, tmp_path):
    """With an hour between passes, a scrape right after a big write still shows what the
    last pass found: no scrape walks. A restarted server walks what state.db holds."""
    p = server("--metrics-refresh-seconds", "3600")
    c = tmp_path / "pod-c"
    p.csi.publish("vol-c", c, images.app, **pod_context("ns", "c"))
    m = metrics(p.metrics_port)
    assert m[("strata_store_cache_misses_total", ())] == 2, "cold: both layers pulled"
    assert m[("strata_store_cache_hits_total", ())] == 0
    p.csi.publish("vol-c2", tmp_path / "pod-c2", images.other, **pod_context("ns", "c2"))
    m = metrics(p.metrics_port)
    assert m[("strata_store_cache_hits_total", ())] == 1, "warm: the shared base layer"
    assert m[("strata_store_cache_misses_total", ())] == 3
    (c / "srv/one.txt").write_text("1\n")
    p.stop()  # the mounts stay; the next server finds them in state.db
    p = server("--metrics-refresh-seconds", "3600")
    lc = pod_labels("vol-c", "ns", "c")
    m = wait_for(p.metrics_port, lambda m: per_pod(m, lc).get("files:created") == 1,
                 "the first pass after a restart")
    before = per_pod(m, lc)
    with open(c / "srv/big", "wb") as f:
        f.write(os.urandom(8 << 20))
    assert per_pod(metrics(p.metrics_port), lc) == before, "a scrape never walks"
    p.csi.unpublish("vol-c", c)
    p.csi.unpublish("vol-c2", tmp_path / "pod-c2")
    m = metrics(p.metrics_port)
    # Measured once more at unpublish: the big file it wrote is what it threw away.
    assert m[("strata_ephemeral_discarded_bytes_total", ())] >= 8 << 20
    assert m[("strata_gc_runs_total", (("result", "ok"),))] >= 1
    assert m[("strata_gc_runs_total", (("result", "error"),))] == 0


def test_layers_by_size_with_the_rest_as_other(server, images, tmp_path):
    p = server("--metrics-top-layers", "1")
    p.csi.publish("vol-l1", tmp_path / "l1", images.app)
    p.csi.publish("vol-l2", tmp_path / "l2", images.other)
    try:
        m = metrics(p.metrics_port)
        named = {dict(labels)["layer"]: v for (name, labels), v in m.items()
                 if name == "strata_layer_bytes"}
        refs = {dict(labels)["layer"]: v for (name, labels), v in m.items()
                if name == "strata_layer_references"}
        assert len(named) == 2 and "other" in named  # one by name, the rest summed
        assert sum(named.values()) == m[("strata_store_physical_bytes", ())]
        [big] = set(named) - {"other"}
        assert refs[big] == 2, "the base layer, shared by both pods"
        assert sum(refs.values()) == 4
        assert m[("strata_gc_high_mark_bytes", ())] > m[("strata_gc_low_mark_bytes", ())]
        assert m[("strata_store_capacity_bytes", ())] >= m[("strata_store_used_bytes", ())]
    finally:
        p.csi.unpublish("vol-l1", tmp_path / "l1")
        p.csi.unpublish("vol-l2", tmp_path / "l2")
