"""`strata demo` (`make demo`): the whole path on this machine, no cluster, no network.

Builds a two-layer image from files on this machine, starts `strata serve` on a temporary
root, publishes the image to two "pods" over the real gRPC socket, changes one pod's
filesystem, prints its `strata diff` and the per-pod series a Prometheus scrape of the
server returns, shows that the other pod and the shared layers are untouched and that the
image is stored once, then tears everything down and checks that nothing is left behind.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from csi import compose
from csi.config import Config
from csi.image.build import LayerBuilder, write_image
from csi.mount.mountinfo import MountTable
from csi.paths import StorePaths
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.tree import usage
from csi.units import human_bytes

MOTD_BASE = "Welcome to the strata demo base image.\n"
MOTD_APP = "Welcome to the demo web app (built on the strata base image).\n"


def build_demo_image(layout: str) -> str:
    """A small realistic image: a base layer with /etc and a copy of Python's `json` and
    `email` packages, and an app layer that adds a site, modifies /etc/motd and deletes one
    lower file. Returns the image reference."""
    stdlib = sysconfig.get_paths()["stdlib"]
    base = LayerBuilder()
    for d in ("etc", "usr", "usr/lib", "srv", "tmp"):
        base.dir(d, mode=0o1777 if d == "tmp" else 0o755)
    base.file("etc/motd", MOTD_BASE)
    base.file("etc/os-release", 'NAME="strata demo"\nID=strata-demo\nVERSION_ID=1\n')
    base.file("etc/hostname", "demo\n")
    for pkg in ("json", "email"):
        base.tree(os.path.join(stdlib, pkg), f"usr/lib/python3/{pkg}")
    app = LayerBuilder()
    app.dir("srv/www")
    app.file("srv/www/index.html", "<h1>Hello from an image volume</h1>\n")
    app.file("srv/app.py", "import json\nprint(json.dumps({'hello': 'strata'}))\n", mode=0o755)
    app.file("etc/motd", MOTD_APP)
    app.whiteout("usr/lib/python3/json/tool.py")
    write_image(layout, "1.0", [base, app])
    return f"oci:{layout}:1.0"


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"strata serve did not start (exit code {proc.poll()})")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} from one scrape of /metrics, as Prometheus reads it."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def per_pod(samples: dict, pod: str) -> dict[str, float]:
    """One pod's per-publication series: {"created": 1, ..., "upper_bytes": 8192}."""
    out = {}
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if labels.get("pod_name") != pod:
            continue
        if name == "strata_volume_files":
            out[labels["change"]] = value
        elif name.startswith("strata_volume_") and name != "strata_volume_info":
            out[name.removeprefix("strata_volume_")] = value
    return out


def _wait_for_pod_series(url: str, pod: str, timeout: float = 30) -> dict:
    """The scrape once the background walk has counted `pod`'s writes (it refreshes every
    second in the demo; a scrape itself never walks an upper layer)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        seen = per_pod(samples, pod)  # a pass may land between the pod's writes: all three
        if all(seen.get(c, 0) > 0 for c in ("created", "copied_up", "deleted")) \
                or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def _show_series(samples: dict, pods) -> None:
    _say(f"   {'POD':<10} {'CREATED':>8} {'COPIED_UP':>10} {'METACOPY':>9} {'DELETED':>8} "
         f"{'RENAMED':>8} {'UPPER_BYTES':>12} {'COPIED_UP_BYTES':>16}")
    for pod in pods:
        v = per_pod(samples, pod)
        _say(f"   demo/{pod:<5} {v.get('created', 0):>8.0f} {v.get('copied_up', 0):>10.0f} "
             f"{v.get('metacopy', 0):>9.0f} {v.get('deleted', 0):>8.0f} "
             f"{v.get('renamed', 0):>8.0f} {v.get('upper_bytes', 0):>12.0f} "
             f"{v.get('copied_up_bytes', 0):>16.0f}")


def _gauge(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and labels.items() <= dict(ls).items())


def run(keep: bool = False) -> int:
    if os.geteuid() != 0:
        print("strata demo mounts overlayfs and must run as root", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="strata-demo-")
    store, sock = os.path.join(root, "store"), os.path.join(root, "csi.sock")
    pods = {name: os.path.join(root, "pods", name, "volume") for name in ("pod-a", "pod-b")}
    os.makedirs(os.path.join(root, "pods", "pod-a"))
    os.makedirs(os.path.join(root, "pods", "pod-b"))
    table = MountTable()
    proc = None
    published: list[str] = []
    try:
        _say("== Building a demo image (like `docker build`, from files on this machine)")
        image = build_demo_image(os.path.join(root, "image"))
        _say(f"   image {image}: layer 1 = base (/etc, Python's json and email packages),")
        _say("   layer 2 = app (adds /srv/www, modifies /etc/motd, deletes "
             "/usr/lib/python3/json/tool.py)")

        _say("\n== Starting the plugin: strata serve")
        log = open(os.path.join(root, "serve.log"), "w")
        metrics = f"http://127.0.0.1:{_free_port()}/metrics"
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi", "serve", "--endpoint", f"unix://{sock}",
             "--root", store, "--node-id", "demo-node",
             "--metrics-address", metrics.split("/")[2], "--metrics-refresh-seconds", "1"],
            stdout=log, stderr=log)
        _wait_for_socket(sock, proc)
        channel = grpc.insecure_channel(f"unix://{sock}")
        identity = csi_pb2_grpc.IdentityStub(channel)
        node = csi_pb2_grpc.NodeStub(channel)
        info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
        ready = identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
        _say(f"   {info.name} {info.vendor_version} on unix://{sock} (ready={ready}), "
             f"metrics on {metrics}")

        cap = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
        _say("\n== Two pods mount the image (like two `docker run` of one image)")
        for name, target in pods.items():
            t0 = time.perf_counter()
            node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=f"csi-{name}", target_path=target, volume_capability=cap,
                volume_context={"image": image, "csi.storage.k8s.io/ephemeral": "true",
                                "csi.storage.k8s.io/pod.namespace": "demo",
                                "csi.storage.k8s.io/pod.name": name,
                                "csi.storage.k8s.io/pod.uid": f"uid-{name}"}), timeout=60)
            published.append(target)
            _say(f"   {name}: published at {target} in {(time.perf_counter() - t0) * 1e3:.1f} ms")
        a, b = pods["pod-a"], pods["pod-b"]
        with open(os.path.join(a, "etc/motd")) as f:
            _say(f"   pod-a reads /etc/motd: {f.read().strip()!r} (the app layer's version)")
        gone = not os.path.exists(os.path.join(a, "usr/lib/python3/json/tool.py"))
        _say(f"   /usr/lib/python3/json/tool.py hidden by the app layer's whiteout: {gone}")

        _say("\n== pod-a writes: adds a file, edits /etc/motd, deletes json/decoder.py")
        with open(os.path.join(a, "srv/www/visits.log"), "w") as f:
            f.write("1 visit\n")
        with open(os.path.join(a, "etc/motd"), "a") as f:
            f.write("pod-a was here\n")
        os.unlink(os.path.join(a, "usr/lib/python3/json/decoder.py"))

        views = _views(store)
        layer_dirs = sorted(set(views[a][1]))
        upper, lowers = views[a]
        _say(f"   $ strata diff {a}   (read from pod-a's private upper layer, "
             "like `docker diff`)")
        shown = subprocess.run([sys.executable, "-m", "csi", "diff", a, "--root", store],
                               capture_output=True, text=True, check=True)
        for line in shown.stdout.splitlines():
            _say(f"     {line}")

        _say(f"\n== What Prometheus sees, per pod (a scrape of {metrics})")
        samples = _wait_for_pod_series(metrics, "pod-a")
        _show_series(samples, pods)
        _say(f"   sharing: {_gauge(samples, 'strata_image_publications', image=image):.0f} "
             "publications of the image (strata_image_publications), "
             f"{human_bytes(_gauge(samples, 'strata_sharing_saved_bytes'))} of disk saved "
             "(strata_sharing_saved_bytes);")
        _say(f"   layers found in the store at publish: "
             f"{_gauge(samples, 'strata_store_cache_hits_total'):.0f}, pulled: "
             f"{_gauge(samples, 'strata_store_cache_misses_total'):.0f} "
             "(strata_store_cache_hits_total / _misses_total)")
        seen_a, seen_b = per_pod(samples, "pod-a"), per_pod(samples, "pod-b")
        assert (seen_a["created"], seen_a["copied_up"], seen_a["deleted"]) == (1, 1, 1), \
            f"pod-a's series do not show its three changes: {seen_a}"
        assert not any(seen_b.values()), f"pod-b changed nothing, yet: {seen_b}"

        _say("\n== pod-b and the shared layers are untouched")
        with open(os.path.join(b, "etc/motd")) as f:
            motd_b = f.read()
        _say(f"   pod-b reads /etc/motd: {motd_b.strip()!r}")
        _say(f"   pod-b still has json/decoder.py: "
             f"{os.path.exists(os.path.join(b, 'usr/lib/python3/json/decoder.py'))}")
        _say(f"   pod-b sees pod-a's visits.log: "
             f"{os.path.exists(os.path.join(b, 'srv/www/visits.log'))}")
        app_motd = [os.path.join(d, "etc/motd") for d in layer_dirs
                    if os.path.exists(os.path.join(d, "srv/www/index.html"))][0]
        with open(app_motd) as f:
            _say(f"   the app layer's /etc/motd on disk is unchanged: {f.read() == MOTD_APP}")
        assert motd_b == MOTD_APP, "pod-b saw pod-a's write"

        _say("\n== The image is stored once (like Docker's shared image layers)")
        total = 0
        for d in layer_dirs:
            size, inodes = usage(d)
            total += size
            _say(f"   layer {os.path.basename(os.path.dirname(d))}: {human_bytes(size)}, "
                 f"{inodes} inodes")
        both = views[b][1] == lowers
        _say(f"   both pods stack the same {len(lowers)} layer directories: {both}")
        ua, ub = usage(upper)[0], usage(views[b][0])[0]
        _say(f"   on disk: {human_bytes(total)} of layers + {human_bytes(ua)} (pod-a's "
             f"upper) + {human_bytes(ub)} (pod-b's upper);")
        _say(f"   a copy per pod would have cost {human_bytes(2 * total)}")

        _say("\n== Both pods stop: unpublish")
        for name, target in pods.items():
            node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=f"csi-{name}", target_path=target), timeout=60)
            published.remove(target)
            _say(f"   {name}: unmounted, its writable layer deleted, "
                 f"target removed: {not os.path.exists(target)}")
        samples = scrape(metrics)
        left = [n for (n, ls), _ in samples.items() if n.startswith("strata_volume_")]
        _say(f"   per-pod series left after unpublish: {len(left)}; the node's counters "
             "keep what the pods did:")
        for name in ("strata_copy_up_files_total", "strata_copy_up_bytes_total",
                     "strata_ephemeral_discarded_bytes_total"):
            _say(f"     {name} = {_gauge(samples, name):.0f}")
        channel.close()
    finally:
        if proc is not None:
            for target in published:  # only after a failure above
                subprocess.run(["umount", target], check=False)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    leftover_mounts = table.under(root)
    leftover_uppers = os.listdir(StorePaths(store).volumes)
    _say("\n== Clean-up check")
    _say(f"   plugin stopped (exit {proc.returncode}), socket removed: "
         f"{not os.path.exists(sock)}")
    _say(f"   mounts left under {root}: {len(leftover_mounts)}; "
         f"upper layers left: {len(leftover_uppers)}")
    _say(f"   the shared layers stay cached for the next pod: {len(layer_dirs)} in "
         f"{StorePaths(store).layers}")
    ok = not leftover_mounts and not leftover_uppers and proc.returncode == 0
    if keep:
        _say(f"   kept {root}")
    else:
        shutil.rmtree(root)
        _say(f"   removed {root}")
    _say("\nDemo " + ("passed." if ok else "FAILED."))
    return 0 if ok else 1


def _views(store: str) -> dict[str, tuple[str, list[str]]]:
    """Each publication's upper directory and the layer directories it reads through, as
    `strata diff` finds them: from the store's records and its backend, read-only."""
    parts = compose.reader(Config(root=store))
    try:
        with parts.state.read() as tx:
            pubs = [(p, tx.image(p.manifest_digest)) for p in tx.publications()]
    finally:
        parts.close()
    return {p.target: (parts.backend.dirs(p.key).upper, parts.backend.lowers(img.layer_ids))
            for p, img in pubs}
