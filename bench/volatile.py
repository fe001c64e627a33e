"""What mounting a writable publication `volatile` saves, measured against the same overlay
without it, in the same run, on the store's filesystem.

Without `volatile`, an fsync(2) inside the overlay flushes the upper file, a syncfs(2)
inside it flushes the upper's whole filesystem (the store's, shared with the layers and
every other pod), and so does the unmount at unpublish. With it, overlay omits all three;
whatever the pod wrote is written back later by the kernel, or never, when unpublish
deletes the upper first.

  fsync     a pod appending 4 KiB and fsyncing, --fsyncs times (a database's log)
  syncfs    a pod that wrote --files files of --file-kib KiB calling syncfs once
  unmount   the unmount of a publication into which --files files were written, unsynced
  unpublish that unmount and the deletion of the upper (what NodeUnpublish does)

Each figure is the median of --runs publications, alternating with and without, each
starting from a clean page cache; the ratio is without over with.
"""

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._util import drop_caches  # noqa: E402
from csi.backend.overlay import OverlayBackend  # noqa: E402
from csi.mount.features import probe  # noqa: E402
from csi.mount.syscalls import Mounter  # noqa: E402
from csi.paths import StorePaths  # noqa: E402
from csi.store.durable import syncfs  # noqa: E402
from csi.tree import remove_tree  # noqa: E402

LAYER = "00000000000000a1"


def make_layer(paths: StorePaths) -> None:
    fs = paths.layer_fs(LAYER)
    os.makedirs(os.path.join(fs, "etc"))
    os.makedirs(os.path.join(fs, "data"))
    with open(os.path.join(fs, "etc", "motd"), "w") as f:
        f.write("bench\n")


class Publication:
    """A writable overlay of the bench layer, as the backend plans and the executor mounts
    it, with or without `volatile`."""

    def __init__(self, backend: OverlayBackend, mounter: Mounter, base: str, key: str):
        self.backend, self.mounter, self.key = backend, mounter, key
        self.target = os.path.join(base, "mnt-" + key)
        os.makedirs(self.target)
        self.mount = backend.prepare(key, [LAYER], self.target)
        mounter.mount(self.mount)

    def unmount(self) -> None:
        self.mounter.unmount(self.target)

    def remove(self) -> None:
        if os.path.exists(self.target):  # once
            self.backend.remove(self.key)
            os.rmdir(self.target)


def write_files(target: str, count: int, size: int) -> None:
    chunk = os.urandom(size)
    for i in range(count):
        with open(os.path.join(target, "data", f"f{i}"), "wb") as f:
            f.write(chunk)


def run_fsync(pub: Publication, n: int) -> float:
    block = os.urandom(4096)
    fd = os.open(os.path.join(pub.target, "data", "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, block)
            os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def run_syncfs(pub: Publication, files: int, size: int) -> float:
    write_files(pub.target, files, size)
    fd = os.open(pub.target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.perf_counter()
        syncfs(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


@contextlib.contextmanager
def published(backend: OverlayBackend, mounter: Mounter, base: str, key: str):
    """A fresh publication from a clean page cache; unmounted and removed after."""
    drop_caches()
    pub = Publication(backend, mounter, base, key)
    try:
        yield pub
    finally:
        pub.unmount()
        pub.remove()


def one_run(backend, mounter, base, keys, args, size, out) -> None:
    with published(backend, mounter, base, next(keys)) as pub:
        out["fsync"].append(run_fsync(pub, args.fsyncs))
    with published(backend, mounter, base, next(keys)) as pub:
        out["syncfs"].append(run_syncfs(pub, args.files, size))
    with published(backend, mounter, base, next(keys)) as pub:
        write_files(pub.target, args.files, size)
        t0 = time.perf_counter()
        pub.unmount()
        t1 = time.perf_counter()
        pub.remove()
        t2 = time.perf_counter()
        out["unmount"].append(t1 - t0)
        out["unpublish"].append(t2 - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fsyncs", type=int, default=1000)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--file-kib", type=int, default=32)
    ap.add_argument("--dir", default="/var/tmp", help="where the store goes (its filesystem "
                                                      "is the one measured)")
    args = ap.parse_args()
    size = args.file_kib * 1024
    base = tempfile.mkdtemp(prefix="strata-bench-volatile-", dir=args.dir)
    try:
        paths = StorePaths(os.path.join(base, "store")).make()
        make_layer(paths)
        probed = probe(paths.tmp)
        if not probed.volatile:
            print("this kernel's overlayfs refuses `volatile` (Linux < 5.10): nothing to "
                  "compare")
            return 0
        kinds = {"volatile": probed, "plain": dataclasses.replace(probed, volatile=False)}
        mounter = Mounter(features=probed)
        results = {k: {"fsync": [], "syncfs": [], "unmount": [], "unpublish": []}
                   for k in kinds}
        keys = (f"k{i}" for i in range(1 << 30))
        for _ in range(args.runs):
            for kind, features in kinds.items():
                one_run(OverlayBackend(paths, features), mounter, base, keys, args, size,
                        results[kind])
        mib = args.files * size / (1 << 20)
        print(f"store on {args.dir}; {args.runs} runs; fsync: {args.fsyncs} x 4 KiB; "
              f"others: {args.files} files x {args.file_kib} KiB ({mib:.0f} MiB)")
        for what in ("fsync", "syncfs", "unmount", "unpublish"):
            plain = statistics.median(results["plain"][what])
            vol = statistics.median(results["volatile"][what])
            print(f"  {what:<10} without {plain * 1e3:8.2f} ms   volatile {vol * 1e3:8.2f} ms"
                  f"   without/volatile {plain / vol:7.1f}x")
    finally:
        remove_tree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
