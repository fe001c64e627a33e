"""What asking "does a view of this volume live on?" costs (csi/releases.py).

An unpublish of a writable volume asks the kernel, after its unmount, whether an overlay
still uses the upper (a copy of the mount in another mount namespace): first whether any
superblock still has the overlay's device number (ustat(2)); only when one does (or that
cannot be asked), one trial overlay that the kernel refuses, and one line in the kernel log.
Measured in the same run:
  unpublish     VolumeManager.unpublish of a writable volume, as shipped (it asks)
  no probe      the same, with a Releases that never asks (what it cost before the probe)
  umount(2)     a bare unmount of an overlay (the floor of any unpublish)
  ustat         users.superblock_exists on the device of an overlay just unmounted
  probe         Mounter.in_use on the upper of an overlay just unmounted (the trial overlay)
and, for a read-only view detached lazily, one scan of /proc for its device (each sweep of
the background thread makes one for all such views while any is pending).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.realistic import unmount_under  # noqa: E402
from csi import compose  # noqa: E402
from csi.config import Config  # noqa: E402
from csi.demo import build_demo_image  # noqa: E402
from csi.mount import spec, users  # noqa: E402
from csi.releases import Releases  # noqa: E402
from csi.volumes import PublishSpec, VolumeManager  # noqa: E402


class NeverAsks(Releases):
    """The baseline: every unmounted view is taken as gone, as before the probe."""

    def held(self, key: str, device: str = "", root_inode: int | None = None) -> bool:
        return False


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summary(name, xs, base=None, vs=""):
    ratio = f"  {statistics.median(xs) / statistics.median(base):5.2f}x {vs}" if base else ""
    print(f"  {name:<10} p50 {pct(xs, 50) * 1e3:7.3f} ms   p99 {pct(xs, 99) * 1e3:7.3f} ms"
          f"{ratio}")


def unpublishes(vm, image, work, n, tag):
    out = []
    for i in range(n):
        target = os.path.join(work, f"{tag}{i}")
        p = PublishSpec(f"{tag}-{i}", target, image, False, 1)
        vm.publish(p)
        with open(os.path.join(target, "written"), "w") as f:
            f.write("x\n")
        t0 = time.perf_counter()
        vm.unpublish(p.volume_id, target)
        out.append(time.perf_counter() - t0)
    return out


def bare(mounter, lowers, work, n, umounts, probes, ustats):
    for i in range(n):
        d = os.path.join(work, f"bare{i}")
        for sub in ("upper", "work", "t"):
            os.makedirs(os.path.join(d, sub))
        m = spec.overlay(lowers, os.path.join(d, "upper"), os.path.join(d, "work"),
                         os.path.join(d, "t"), volatile=mounter.features.volatile)
        mounter.mount(m)
        dev = users.parse(users.device_of(m.target))
        t0 = time.perf_counter()
        mounter.unmount(m.target, lazy=False)
        t1 = time.perf_counter()
        gone = users.superblock_exists(dev) is False
        t2 = time.perf_counter()
        assert not mounter.in_use(spec.holder_probe(os.path.join(d, "upper")))
        probes.append(time.perf_counter() - t2)
        umounts.append(t1 - t0)
        if gone:  # else no ustat here, or the number was taken again at once
            ustats.append(t2 - t1)
        shutil.rmtree(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=300)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="strata-bench-release-")
    try:
        image = build_demo_image(os.path.join(root, "image"))
        parts = compose.node(Config(root=os.path.join(root, "store"), node_id="bench",
                                    gc_policy="lru", gc_max_bytes=1 << 40))
        vm, mounter = parts.volumes, parts.mounter
        never = VolumeManager(parts.paths, parts.state, parts.backend, mounter, parts.puller,
                              gc=parts.gc, releases=NeverAsks(parts.paths, parts.state,
                                                              parts.backend, mounter))
        work = os.path.join(root, "work")
        os.mkdir(work)
        unpublishes(vm, image, work, 5, "warm")
        with parts.state.read() as tx:
            ids = tx.images()[0].layer_ids
        lowers = parts.backend.lowers(ids)
        shipped, baseline, umounts, probes, ustats = [], [], [], [], []
        rounds = 10  # interleaved: every contender meets the machine's drift
        for r in range(rounds):
            shipped += unpublishes(vm, image, work, args.n // rounds, f"s{r}-")
            baseline += unpublishes(never, image, work, args.n // rounds, f"b{r}-")
            bare(mounter, lowers, work, args.n // rounds, umounts, probes, ustats)
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        namespaces = set()
        for p in pids:
            try:
                namespaces.add(os.stat(f"/proc/{p}/ns/mnt").st_ino)
            except OSError:
                pass
        scans = []
        for _ in range(30):
            t0 = time.perf_counter()
            users.find({(0, (1 << 20) - 1)})  # a device nobody uses: the whole pass
            scans.append(time.perf_counter() - t0)
        parts.close()

        print(f"unpublish of a writable volume, {len(lowers)}-layer image, n={args.n}")
        summary("no probe", baseline)
        summary("unpublish", shipped, baseline, "no probe")
        added = (statistics.median(shipped) - statistics.median(baseline)) * 1e3
        print(f"  asking adds {added:+.3f} ms per unpublish (p50 difference); the trial "
              "overlay, when it is made, one kernel log line")
        summary("umount(2)", umounts)
        if ustats:
            summary("ustat", ustats, umounts, "umount(2)")
        summary("probe", probes, umounts, "umount(2)")
        print(f"one /proc scan for a detached read-only view ({len(pids)} processes, "
              f"{len(namespaces)} mount namespaces)")
        summary("scan", scans)
    finally:
        unmount_under(root)  # never delete into a mount a failure left behind
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
