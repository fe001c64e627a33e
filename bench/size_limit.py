"""What a `sizeLimit` adds to a publish: warm publish+unpublish cycles with and without a
limit, measured in the same run and reported as ratios, with the limited cycle's parts.

  none      VolumeManager.publish + unpublish, no limit (the baseline)
  LIMIT     the same with sizeLimit=LIMIT: a sparse image written from the size's template
            (mkfs ran once, for the first image of that size), a loop device, a mount, and
            at unpublish an unmount (which detaches the device) and an unlink
  mkfs      the same, with mkfs.ext4 run for every image (no templates)
Parts of the limited cycle, each timed alone on its own files:
  mkfs      ftruncate + mkfs.ext4 of a new image (an exec, and its fsync)
  template  ftruncate + the template's data segments written into a new image
  loop      attach + mount + unmount (+ the detach the unmount does) of a made image
Rounds are interleaved so that every contender meets the machine's drift alike.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.publish import bench_manager  # noqa: E402
from csi import compose, quantity  # noqa: E402
from csi.backend.loopfs import MOUNT_OPTIONS, LoopBound, Templates, mkfs  # noqa: E402
from csi.backend.overlay import OverlayBackend  # noqa: E402
from csi.config import Config  # noqa: E402
from csi.demo import build_demo_image  # noqa: E402
from csi.mount.loop import LoopControl  # noqa: E402
from csi.mount.spec import Mount  # noqa: E402
from csi.volumes import VolumeManager  # noqa: E402

SIZES = ("64Mi", "1Gi", "10Gi")


def cycles(vm, image, work, n, limit, tag, publish_only=None):
    return bench_manager(vm, image, work, n, publish_only, size_limit=limit, tag=tag)


def mkfs_alone(work, n, size):
    out = []
    for i in range(n):
        img = os.path.join(work, f"mkfs{i}.img")
        t0 = time.perf_counter()
        with open(img, "wb") as f:
            f.truncate(size)
        mkfs(img)
        out.append(time.perf_counter() - t0)
        os.unlink(img)
    return out


def template_alone(templates, work, n, size):
    templates.make(os.path.join(work, "first.img"), size)  # the size's one mkfs
    os.unlink(os.path.join(work, "first.img"))
    out = []
    for i in range(n):
        img = os.path.join(work, f"tpl{i}.img")
        t0 = time.perf_counter()
        templates.make(img, size)
        out.append(time.perf_counter() - t0)
        os.unlink(img)
    return out


def loop_alone(mounter, work, n, size):
    img, mnt = os.path.join(work, "loop.img"), os.path.join(work, "loop-mnt")
    with open(img, "wb") as f:
        f.truncate(size)
    mkfs(img)
    os.makedirs(mnt, exist_ok=True)
    loops = LoopControl()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with loops.attach(img) as held:
            mounter.mount(Mount("ext4", held.device, mnt, MOUNT_OPTIONS))
        mounter.unmount(mnt)
        out.append(time.perf_counter() - t0)
    os.unlink(img)
    return out


def ms(xs):
    return statistics.median(xs) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=200, help="cycles per contender")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="strata-bench-limit-")
    try:
        image = build_demo_image(os.path.join(root, "image"))
        parts = compose.node(Config(root=os.path.join(root, "store"), node_id="bench",
                                    gc_policy="lru", gc_max_bytes=1 << 40))
        vm, mounter = parts.volumes, parts.mounter
        # The same store and parts, but mkfs for every image: what templates save.
        no_templates = LoopBound(parts.paths, mounter, templates=Templates(max_template=0))
        vm_mkfs = VolumeManager(parts.paths, parts.state,
                                OverlayBackend(parts.paths, mounter.features, no_templates),
                                mounter, parts.puller, gc=parts.gc)
        work = os.path.join(root, "work")
        os.mkdir(work)
        limits = {s: quantity.bytes_of(s) for s in SIZES}
        cycles(vm, image, work, 5, 0, "warm")  # layers on the node, caches warm
        names = ("none", *SIZES, *(f"{s} mkfs" for s in SIZES))
        res = {k: [] for k in names}
        pub = {k: [] for k in names}
        parts_res = {(k, s): [] for k in ("mkfs", "template", "loop") for s in SIZES}
        templates = Templates()
        rounds = 10
        per = max(1, args.n // rounds)
        for r in range(rounds):
            res["none"] += cycles(vm, image, work, per, 0, f"n{r}-", pub["none"])
            for s, b in limits.items():
                res[s] += cycles(vm, image, work, per, b, f"l{s}{r}-", pub[s])
                res[f"{s} mkfs"] += cycles(vm_mkfs, image, work, per, b, f"m{s}{r}-",
                                           pub[f"{s} mkfs"])
                parts_res["mkfs", s] += mkfs_alone(work, per, b)
                parts_res["template", s] += template_alone(templates, work, per, b)
                parts_res["loop", s] += loop_alone(mounter, work, per, b)
        parts.close()

        n = per * rounds
        for title, xs in (("publish+unpublish", res), ("publish alone", pub)):
            base = ms(xs["none"])
            print(f"warm {title}, in-process, n={n} each (median)")
            print(f"  {'none':<6} {base:7.2f} ms")
            for s in (*SIZES, *(f"{s} mkfs" for s in SIZES)):
                lim = ms(xs[s])
                print(f"  {s:<11} {lim:7.2f} ms  {lim / base:5.2f}x none   "
                      f"(+{lim - base:.2f} ms)")
        print("parts of a limited cycle, each alone (median)")
        for s in SIZES:
            added = ms(pub[f"{s} mkfs"]) - ms(pub["none"])
            mk, tp = ms(parts_res["mkfs", s]), ms(parts_res["template", s])
            lp = ms(parts_res["loop", s])
            print(f"  {s:<6} mkfs {mk:5.2f} ms ({mk / added:4.0%} of what a limit adds to a "
                  f"publish without templates)   template {tp:5.3f} ms   "
                  f"attach+mount+unmount {lp:5.2f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
