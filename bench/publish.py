"""Warm publish latency: strata against a bare overlay mount(2), measured in the same run.

Four figures per publish+unpublish cycle, on layers already on the node:
  bare      mkdir + mount(2) overlay + umount(2) + rmdir, fresh upper/work dirs (the kernel's part)
  manager   VolumeManager.publish + unpublish in-process (server-side work: locks, state, mount;
            the trash's background deletions are let finish between rounds, as the server's are
            before the floor's round)
  rpc       NodePublishVolume + NodeUnpublishVolume over the real unix socket (what kubelet sees)
  floor     two no-op RPCs (NodeGetCapabilities) over the same socket plus one bare cycle:
            what the rpc cycle would cost if the server's own work were free, so that
            rpc / floor is the part of the ratio the server can still win back
  grpc      the same against bench/_noop_server.py, a gRPC server with nothing but the
            thread pool (no interceptor, no logging, no other thread), in its own process:
            what any Python gRPC server costs here before it does any work. The goal's
            budget (3x bare) less this is what is left for the server's own work
Reported as p50/p99 in ms and as ratios to the bare cycle, and as CPU time per cycle (user +
system, of this process and, for rpc, of the server too): on a machine shared with other
work, waiting for a CPU swells every wall-clock figure, CPU time much less.

`--live N` (default 1000): then N volumes are published over the socket and kept live
while cycles of one more volume are measured over the socket, interleaved with bare
cycles (mountinfo, the state and the kernel's lists all grow with them). Everything it
publishes is unpublished, the server stopped and whatever is still mounted under its work
dir unmounted, whatever happens (SIGTERM and ^C included).
"""

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._util import NoopServer, Strata  # noqa: E402
from bench.realistic import unmount_under  # noqa: E402
from csi import compose  # noqa: E402
from csi.config import Config  # noqa: E402
from csi.demo import build_demo_image  # noqa: E402
from csi.mount import spec  # noqa: E402
from csi.paths import StorePaths  # noqa: E402
from csi.proto import csi_pb2  # noqa: E402
from csi.volumes import PublishSpec  # noqa: E402


class Cpu:
    """CPU seconds (user + system) spent per contender: this process's, and the server's
    (/proc/PID/stat) when given its pid."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid=None):
        self.pid = pid
        self.spent: dict[str, float] = {}
        self.cycles: dict[str, int] = {}

    def now(self) -> float:
        t = os.times()
        total = t.user + t.system
        if self.pid is not None:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / self.TICK  # utime, stime
        return total

    def run(self, name, fn, *args, **kw):
        t0 = self.now()
        out = fn(*args, **kw)
        self.spent[name] = self.spent.get(name, 0.0) + self.now() - t0
        self.cycles[name] = self.cycles.get(name, 0) + len(out)
        return out

    def report(self, base="bare"):
        per = {k: self.spent[k] / self.cycles[k] for k in self.spent}
        for name, sec in per.items():
            ratio = f"  {sec / per[base]:5.2f}x {base}" if name != base and base in per else ""
            print(f"  {name:<8} CPU {sec * 1e3:7.3f} ms per cycle{ratio}")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summary(name, xs, base=None, vs="bare"):
    p50, p99 = pct(xs, 50) * 1e3, pct(xs, 99) * 1e3
    ratio = f"  {statistics.median(xs) / statistics.median(base):5.2f}x {vs}" if base else ""
    print(f"  {name:<8} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms{ratio}")


def bench_bare(mounter, lowers, work, n, mount_only):
    out = []
    for i in range(n):
        d = os.path.join(work, f"bare{i}")
        t0 = time.perf_counter()
        os.makedirs(os.path.join(d, "upper"))
        os.mkdir(os.path.join(d, "work"))
        os.mkdir(os.path.join(d, "t"))
        m = spec.overlay(lowers, os.path.join(d, "upper"), os.path.join(d, "work"),
                         os.path.join(d, "t"), volatile=mounter.features.volatile)  # as strata
        t1 = time.perf_counter()
        mounter.mount(m)
        mount_only.append(time.perf_counter() - t1)
        mounter.unmount(m.target)
        os.rmdir(m.target)
        out.append(time.perf_counter() - t0)
        shutil.rmtree(d)
    return out


def bench_manager(vm, image, work, n, publish_only=None, size_limit=0, tag="mgr"):
    """`n` warm publish+unpublish cycles through the volume manager (seconds each);
    `publish_only` collects the publishes alone. bench/size_limit.py runs it with limits."""
    out = []
    for i in range(n):
        target = os.path.join(work, f"{tag}{i}")
        p = PublishSpec(f"bench-{tag}-{i}", target, image, False, 1, size_limit=size_limit)
        t0 = time.perf_counter()
        vm.publish(p)
        t1 = time.perf_counter()
        vm.unpublish(p.volume_id, target)
        out.append(time.perf_counter() - t0)
        if publish_only is not None:
            publish_only.append(t1 - t0)
    return out


CAP = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                               access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))


def rpc_publish(node, vid, target, image):
    node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vid, target_path=target, volume_capability=CAP,
        volume_context={"image": image, "csi.storage.k8s.io/ephemeral": "true"}), timeout=600)


def rpc_unpublish(node, vid, target):
    node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=vid, target_path=target), timeout=600)


def bench_rpc(node, image, work, n, tag="rpc"):
    out = []
    for i in range(n):
        target = os.path.join(work, f"{tag}{i}")
        t0 = time.perf_counter()
        rpc_publish(node, f"{tag}-{i}", target, image)
        rpc_unpublish(node, f"{tag}-{i}", target)
        out.append(time.perf_counter() - t0)
    return out


NOOP = csi_pb2.NodeGetCapabilitiesRequest()


def settle(trash: str, timeout: float = 60.0) -> None:
    """Wait until the server's trash has deleted what the last round left there."""
    deadline = time.monotonic() + timeout
    while os.listdir(trash) and time.monotonic() < deadline:
        time.sleep(0.01)


def bench_floor(node, mounter, lowers, work, n):
    """The rpc cycle's floor: two round trips of a handler that does nothing, and the
    mount work itself (a bare cycle)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        node.NodeGetCapabilities(NOOP, timeout=600)
        node.NodeGetCapabilities(NOOP, timeout=600)
        t1 = time.perf_counter()
        out.append(t1 - t0 + bench_bare(mounter, lowers, work, 1, [])[0])
    return out


def bench_live_rpc(node, mounter, lowers, image, work, live, n, rounds, published, cpu):
    """Publish `live` volumes over the socket and keep them (their targets go into
    `published`, for the caller to unpublish whatever happens), then interleave bare
    cycles with rpc cycles of one more volume: (bare, rpc) seconds."""
    for i in range(live):
        t = os.path.join(work, f"live{i}")
        rpc_publish(node, f"live-{i}", t, image)
        published.append((f"live-{i}", t))
    bare, rpc = [], []
    for r in range(rounds):
        bare += cpu.run("bare", bench_bare, mounter, lowers, work, n // rounds, [])
        rpc += cpu.run("rpc", bench_rpc, node, image, work, n // rounds, tag=f"xl{r}-")
    return bare, rpc


def bench_big_upper(parts, image, work, files, n=5):
    """Unpublish of a publication whose pod wrote `files` small files: seconds each, with
    the server's trash (the tree leaves by one rename, deleted in the background), then
    with it stopped (deleted before the unpublish returns, as before step 9)."""
    def one(tag, i):
        target = os.path.join(work, f"{tag}{i}")
        parts.volumes.publish(PublishSpec(f"big-{tag}-{i}", target, image, False, 1))
        d = os.path.join(target, "written")
        os.mkdir(d)
        for j in range(files):
            if j % 1000 == 0:
                sub = os.path.join(d, str(j // 1000))
                os.mkdir(sub)
            with open(os.path.join(sub, str(j)), "wb") as f:
                f.write(b"x" * 100)
        t0 = time.perf_counter()
        parts.volumes.unpublish(f"big-{tag}-{i}", target)
        return time.perf_counter() - t0

    trashed = []
    for i in range(n):
        trashed.append(one("bt", i))
        parts.trash.drain()  # each measured alone
    parts.trash.stop()  # from here on a discard deletes at once
    return trashed, [one("bs", i) for i in range(n)]


def bench_scale(vm, image, work, parts, live_counts=(10, 1000), n=100):
    """Warm publish+unpublish p50 with `live` other publications mounted (mountinfo and
    state grow with them), and a /metrics scrape with the last count live."""
    from csi.metrics import Metrics, exposition

    out, live_targets, scrape = {}, [], None
    for live in live_counts:
        while len(live_targets) < live:
            t = os.path.join(work, f"live{len(live_targets)}")
            vm.publish(PublishSpec(f"live-{len(live_targets)}", t, image, False, 1))
            live_targets.append(t)
        out[live] = bench_manager(vm, image, work, n)
        if live >= 200:
            parts.trash.drain()  # the scrape alone, not the deletions of the cycles above
            metrics = Metrics()
            metrics.install_store(parts.state, parts.backend, parts.paths)
            scrape = []
            for _ in range(20):
                t0 = time.perf_counter()
                exposition(metrics.registry)
                scrape.append(time.perf_counter() - t0)
    for i, t in enumerate(live_targets):
        vm.unpublish(f"live-{i}", t)
    return out, scrape


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--live", type=int, default=1000,
                    help="publications kept live for the last measurement (0: skip it)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--upper-files", type=int, default=10000,
                    help="files a pod writes before the big-upper unpublish (0: skip it)")
    ap.add_argument("--log-level", default="WARNING", help="the server's")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below
    root = tempfile.mkdtemp(prefix="strata-bench-")
    server, noop, parts, published = None, None, None, []
    try:
        image = build_demo_image(os.path.join(root, "image"))
        parts = compose.node(Config(root=os.path.join(root, "store"), node_id="bench",
                                    gc_policy="lru", gc_max_bytes=1 << 40))
        vm, mounter, backend = parts.volumes, parts.mounter, parts.backend
        from csi.image.layout import OciLayout
        from csi.image.reference import parse

        src = OciLayout(parse(image))
        img = src.resolve()
        ids = parts.layers.ensure(src, img.layers)  # warm: layers on the node
        lowers = backend.lowers(ids)
        work = os.path.join(root, "work")
        os.mkdir(work)
        server_root = os.path.join(root, "store2")
        server = Strata(os.path.join(root, "csi.sock"), server_root,
                        os.path.join(root, "serve.log"), log_level=args.log_level)
        node = server.node
        noop = NoopServer(os.path.join(root, "noop.sock"), os.path.join(root, "noop.log"))
        bench_manager(vm, image, work, 5)  # warm-up: the layer cache, the channel
        bench_rpc(node, image, work, 5)
        # Interleaved rounds: the machine's speed drifts (frequency, neighbours), and every
        # contender should meet the same drift.
        bare, mgr, rpc, floor, grpc_floor, bare_mount, mgr_pub = [], [], [], [], [], [], []
        rounds = args.rounds
        cpu = Cpu(server.proc.pid)
        for _ in range(rounds):
            bare += cpu.run("bare", bench_bare, mounter, lowers, work, args.n // rounds,
                            bare_mount)
            mgr += cpu.run("manager", bench_manager, vm, image, work, args.n // rounds, mgr_pub)
            parts.trash.drain()  # the manager's deletions (in this process) are not the rpc's
            rpc += cpu.run("rpc", bench_rpc, node, image, work, args.n // rounds)
            settle(StorePaths(server_root).trash)  # nor the floor's
            floor += bench_floor(node, mounter, lowers, work, args.n // rounds)
            grpc_floor += bench_floor(noop.node, mounter, lowers, work, args.n // rounds)
        scale, scrape = bench_scale(vm, image, work, parts)

        print(f"warm publish+unpublish cycle, {len(lowers)}-layer image, n={args.n}")
        summary("bare", bare)
        summary("manager", mgr, bare)
        summary("rpc", rpc, bare)
        summary("floor", floor, bare)
        summary("grpc", grpc_floor, bare)
        summary("rpc", rpc, floor, vs="floor")
        budget = 3 * statistics.median(bare) - statistics.median(grpc_floor)
        print(f"  3x bare leaves {budget * 1e3:.3f} ms for the server's own work per cycle "
              "once a gRPC server that does nothing has answered twice")
        cpu.report()
        print("warm NodePublish alone (server side) against one bare overlay mount(2):")
        summary("mount(2)", bare_mount)
        summary("publish", mgr_pub, bare_mount)
        print("warm publish+unpublish with other publications live (in-process):")
        for live, xs in scale.items():
            summary(f"{live} live", xs, scale[min(scale)], vs=f"{min(scale)} live")
        summary("/metrics", scrape)
        print(f"  (/metrics scraped with {max(scale)} live publications; the first scrape "
              "walks every upper layer, later ones reuse the walks for 15 s)", flush=True)
        if args.live:
            live_cpu = Cpu(server.proc.pid)
            live_bare, live_rpc = bench_live_rpc(node, mounter, lowers, image, work,
                                                 args.live, args.n, rounds, published, live_cpu)
            print(f"warm publish+unpublish over the socket with {args.live} publications "
                  "live on the server:")
            summary("bare", live_bare)
            summary("rpc", live_rpc, live_bare)
            live_cpu.report()
        if args.upper_files:  # last: writing and deleting its files slows what follows
            big = bench_big_upper(parts, image, work, args.upper_files)
            print(f"unpublish of a publication whose pod wrote {args.upper_files} files "
                  "(in-process):")
            summary("trash", big[0])
            summary("at once", big[1], big[0], vs="trash")
    finally:
        if noop is not None:
            noop.stop()
        if server is not None:
            for vid, target in published:
                try:
                    rpc_unpublish(server.node, vid, target)
                except Exception as e:  # the server may be gone: unmounted below
                    print(f"cannot unpublish {vid}: {e}", file=sys.stderr)
                    break
            server.stop()
        if parts is not None:
            parts.close()
        unmount_under(root)  # never delete into a mount left behind
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
