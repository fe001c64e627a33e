"""Copy-on-write by store filesystem: what a pod's writes cost on ext4-overlay (copy-up copies
whole files), XFS-overlay with reflink=1 and btrfs-overlay (copy-up clones extents), and
btrfs-native (subvolume snapshots: the btrfs backend, measured once `strata serve` has
`--backend`; until then its column says so).

Each store is a filesystem this bench makes on a sparse file under a temp dir and
loop-mounts (tests/storefs.py's make_fs: the same filesystems the tests prove things on),
unmounted at the end whatever happens. Everything that is a publish goes through a real
`strata serve` over its gRPC socket; images are OCI layouts the bench writes (no network).
  publish / unpublish   warm (layers present) NodePublish and NodeUnpublish, median and p95
  first write           append one line to a 4 KiB, 1 MB and 200 MB lower file through a
                        fresh pod, page cache dropped first: the time of open+write+close,
                        and the bytes the filesystem allocated for it (df delta after syncfs,
                        the upper's copy of the file's directory included); median of 3 pods
  10 pods               10 pods of an nginx-like image (a Debian-like base of host files and
                        an nginx-like layer, some 150 MB) each doing what nginx's entrypoint
                        and a few requests do: disk used by the image's layers and the ten
                        uppers, and by the uppers alone (df deltas after syncfs)
  walk                  `find -printf` (an lstat of each entry) over an image of 10,000 files
                        in 100 directories merged from two layers, through a view: cold
                        (page cache dropped) and warm
Ratios are to ext4-overlay. docs/reflink.md holds a table this printed.
"""

import argparse
import ctypes
import ctypes.util
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)


from bench._util import Strata, drop_caches  # noqa: E402
from csi.image.build import LayerBuilder, write_image  # noqa: E402
from tests.storefs import STORES, make_fs  # noqa: E402

FS_SIZE = "3G"  # sparse: room for a 200 MB copy-up and ten pods on ext4
# (column, tests/storefs.py STORES entry, extra `strata serve` arguments)
SETUPS = [("ext4-overlay", "ext4", ()), ("xfs-overlay", "xfs-reflink", ()),
          ("btrfs-overlay", "btrfs", ()), ("btrfs-native", "btrfs", ("--backend", "btrfs"))]
WRITES = 3  # fresh pods per first write; the median is reported
SIZES = (("4 KiB", 4 << 10), ("1 MB", 1 << 20), ("200 MB", 200 << 20))
BASE_TREES = ("/etc", "/usr/lib/python3.11", "/usr/share/zoneinfo", "/usr/share/perl",
              "/usr/lib/x86_64-linux-gnu/perl-base", "/usr/share/i18n")
NGINX_TREES = ("/usr/lib/x86_64-linux-gnu/perl",)

DEFAULT_CONF = """server {
    listen       80;
    server_name  localhost;
    location / {
        root   /usr/share/nginx/html;
        index  index.html index.htm;
    }
    error_page   500 502 503 504  /50x.html;
}
"""


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def build_images(layouts: str) -> dict[str, str]:
    """The bench's images as OCI layouts under `layouts`; {name: reference}."""
    rnd = random.Random(8)
    files = LayerBuilder()
    for _, size in SIZES:
        files.file(f"data/{size}.bin", rnd.randbytes(size))  # incompressible, not sparse
    write_image(f"{layouts}/files", "1", [files], compression="none")

    lower, upper = LayerBuilder(), LayerBuilder()
    for d in range(100):
        for i in range(50):
            lower.file(f"tree/d{d:03}/a{i:02}", f"{d} {i}\n")
            upper.file(f"tree/d{d:03}/b{i:02}", f"{d} {i}\n")
    write_image(f"{layouts}/tree", "1", [lower, upper], compression="none")

    base = LayerBuilder()
    for src in BASE_TREES:
        if os.path.isdir(src):
            base.tree(src, src.lstrip("/"))
    nginx = LayerBuilder()
    for src in NGINX_TREES:
        if os.path.isdir(src):
            nginx.tree(src, "usr/lib/nginx/modules")
    with open(sys.executable, "rb") as f:
        nginx.file("usr/sbin/nginx", f.read(), mode=0o755)  # a binary of a realistic size
    nginx.file("etc/nginx/nginx.conf", "user nginx;\nworker_processes auto;\n"
               "events { worker_connections 1024; }\nhttp { include conf.d/*.conf; }\n")
    nginx.file("etc/nginx/conf.d/default.conf", DEFAULT_CONF)
    nginx.file("usr/share/nginx/html/index.html", "<h1>Welcome to nginx!</h1>\n" * 20)
    nginx.file("var/log/nginx/access.log", b"").file("var/log/nginx/error.log", b"")
    nginx.dir("var/cache/nginx").dir("var/run")
    write_image(f"{layouts}/nginx", "1", [base, nginx], compression="none")
    return {name: f"oci:{layouts}/{name}:1" for name in ("files", "tree", "nginx")}


def nginx_pod(root: str) -> None:
    """What nginx's docker-entrypoint and a few requests write: the IPv6 listen line added
    to default.conf (sed -i: a new file renamed over the old), the pid file, the cache's
    temp dirs, log lines appended to the image's (empty) logs, one cached response."""
    conf = f"{root}/etc/nginx/conf.d/default.conf"
    with open(conf) as f:
        text = f.read().replace("listen       80;", "listen       80;\n    listen  [::]:80;")
    with open(conf + ".sed", "w") as f:
        f.write(text)
    os.rename(conf + ".sed", conf)
    with open(f"{root}/var/run/nginx.pid", "w") as f:
        f.write("1\n")
    for d in ("client_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
        os.makedirs(f"{root}/var/cache/nginx/{d}", exist_ok=True)
    with open(f"{root}/var/log/nginx/access.log", "a") as f:
        for i in range(200):
            f.write(f'10.0.0.{i % 250} - - [03/Dec/2026:08:00:00 +0000] "GET / HTTP/1.1" '
                    f'200 615 "-" "kube-probe/1.31"\n')
    with open(f"{root}/var/log/nginx/error.log", "a") as f:
        f.write("2026/12/03 08:00:00 [notice] 1#1: start worker processes\n")
    with open(f"{root}/var/cache/nginx/proxy_temp/1", "wb") as f:
        f.write(os.urandom(64 << 10))


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def used(path: str) -> int:
    """Bytes used on the filesystem of `path`, after writing back what is dirty there."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:  # os.syncfs is Python 3.12's
            raise OSError(ctypes.get_errno(), f"syncfs {path}")
    finally:
        os.close(fd)
    s = os.statvfs(path)
    return (s.f_blocks - s.f_bfree) * s.f_frsize


class Server(Strata):
    """`strata serve` on a store, over its real unix socket."""

    def __init__(self, work: str, root: str, layouts: str, extra: tuple[str, ...]):
        super().__init__(os.path.join(work, "node.sock"), root,
                         os.path.join(work, "serve.log"), "--oci-layout-root", layouts,
                         *extra, log_level="INFO")

    def said(self) -> str:
        """The start-up line on copy-up (reflink probe)."""
        with open(self.log) as f:
            return next((ln.split("store ", 1)[1].strip() for ln in f if "copy-up" in ln), "")


def walk(target: str) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(["find", target, "-printf", "%s %m\n"], check=True,
                         stdout=subprocess.PIPE).stdout
    took = time.perf_counter() - t0
    assert out.count(b"\n") > 10_000, "the walk saw the whole tree"
    return took


def measure(work: str, fsroot: str, layouts: str, images: dict, extra, rounds: int) -> dict:
    root = os.path.join(fsroot, "store")
    targets = os.path.join(work, "t")
    os.makedirs(targets)
    r: dict[str, object] = {}
    empty = used(fsroot)
    s = Server(work, root, layouts, extra)
    try:
        # Pull everything once (a publish each), so that every later publish is warm; the
        # nginx-like image first, to know what its layers take in the store.
        for name in sorted(images, key=lambda n: n != "nginx"):
            s.publish(f"warm-{name}", f"{targets}/warm-{name}", images[name])
            s.unpublish(f"warm-{name}", f"{targets}/warm-{name}")
            if name == "nginx":
                nginx_store = used(fsroot) - empty
        r["said"] = s.said()
        pubs, unpubs = [], []
        for i in range(rounds):
            t = f"{targets}/p{i}"
            pubs.append(s.publish(f"p{i}", t, images["nginx"]))
            unpubs.append(s.unpublish(f"p{i}", t))
        r["publish"] = (statistics.median(pubs), pct(pubs, 95))
        r["unpublish"] = (statistics.median(unpubs), pct(unpubs, 95))

        for label, size in SIZES:
            times, allocated = [], []
            for i in range(WRITES):
                t = f"{targets}/w{size}-{i}"
                s.publish(f"w{size}-{i}", t, images["files"])
                drop_caches()
                before = used(fsroot)
                t0 = time.perf_counter()
                with open(f"{t}/data/{size}.bin", "ab") as f:
                    f.write(b"one more line\n")
                times.append(time.perf_counter() - t0)
                allocated.append(used(fsroot) - before)
                s.unpublish(f"w{size}-{i}", t)
            r[f"write {label}"] = (statistics.median(times), statistics.median(allocated))

        before = used(fsroot)
        for i in range(10):
            t = f"{targets}/nginx{i}"
            s.publish(f"nginx{i}", t, images["nginx"])
            nginx_pod(t)
        uppers = used(fsroot) - before
        r["10 pods"] = (nginx_store + uppers, uppers)
        for i in range(10):
            s.unpublish(f"nginx{i}", f"{targets}/nginx{i}")

        t = f"{targets}/walk"
        s.publish("walk", t, images["tree"])
        drop_caches()
        cold = walk(t)
        warm = min(walk(t) for _ in range(3))
        r["walk"] = (cold, warm)
        s.unpublish("walk", t)
    finally:
        s.stop()
    return r


def ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.1f} s"


def mb(x: int) -> str:
    if x < 1 << 20:
        return f"{x / 1024:.0f} KiB"
    return f"{x / 1e6:.2f} MB" if x < 100e6 else f"{x / 1e6:.0f} MB"


def table(results: dict[str, dict | str]) -> list[str]:
    cols = [c for c, _, _ in SETUPS]
    base = results.get("ext4-overlay")
    rows = [
        ("publish median", lambda r: r["publish"][0], ms),
        ("publish p95", lambda r: r["publish"][1], ms),
        ("unpublish median", lambda r: r["unpublish"][0], ms),
        ("unpublish p95", lambda r: r["unpublish"][1], ms),
    ]
    for label, _ in SIZES:
        rows.append((f"first write {label}: time", lambda r, k=label: r[f"write {k}"][0], ms))
        rows.append((f"first write {label}: allocated",
                     lambda r, k=label: r[f"write {k}"][1], mb))
    rows += [("10 nginx pods: disk used (layers + uppers)", lambda r: r["10 pods"][0], mb),
             ("  of which uppers", lambda r: r["10 pods"][1], mb),
             ("walk 10,000 files: cold", lambda r: r["walk"][0], ms),
             ("walk 10,000 files: warm", lambda r: r["walk"][1], ms)]
    out = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, get, fmt in rows:
        cells = []
        for c in cols:
            r = results.get(c)
            if not isinstance(r, dict):
                cells.append("—")
                continue
            v = get(r)
            cell = fmt(v)
            if isinstance(base, dict) and c != "ext4-overlay":
                b = get(base)
                cell += f" ({v / b:.2f}×)" if b else ""
            cells.append(cell)
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def has_backend_flag() -> bool:
    help_text = subprocess.run([sys.executable, "-m", "csi", "serve", "--help"], cwd=HERE,
                               capture_output=True, text=True).stdout
    return "--backend" in help_text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="publish/unpublish rounds")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/cow.py needs root (loop mounts, overlay mounts)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="strata-bench-cow-", dir="/var/tmp")
    results: dict[str, dict | str] = {}
    try:
        layouts = os.path.join(work, "layouts")
        images = build_images(layouts)
        native = has_backend_flag()
        for col, store, extra in SETUPS:
            if extra and not native:
                results[col] = "strata serve has no --backend yet"
                continue
            sub = os.path.join(work, col)
            os.makedirs(sub)
            fs = make_fs(_Dir(sub), name="fs", size=FS_SIZE, **{
                k: v for k, v in STORES[store].items() if k != "size"})
            if fs.skip:
                results[col] = fs.skip
                continue
            try:
                results[col] = measure(sub, fs.root, layouts, images, extra, args.rounds)
            finally:
                unmount_under(sub)
            print(f"{col}: {results[col]['said']}", flush=True)
    finally:
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(table(results)))
    print()
    for col, r in results.items():
        if isinstance(r, dict):
            print(f"{col}: {r}")
    for col, r in results.items():
        if not isinstance(r, dict):
            print(f"{col}: not measured: {r}")
    print("(first write: median of 3 pods, page cache dropped; publish/unpublish: "
          f"{args.rounds} rounds)")
    return 0


class _Dir(str):
    """make_fs joins with `/` (it is given pytest's Path); a str that does the same."""

    def __truediv__(self, other: str) -> "_Dir":
        return _Dir(os.path.join(self, other))

    def mkdir(self) -> None:
        os.mkdir(self)


def unmount_under(path: str) -> None:
    """Unmount everything below `path`, deepest first (pods, then the loop filesystems)."""
    with open("/proc/self/mountinfo") as f:
        points = [ln.split()[4] for ln in f]
    for p in sorted((p for p in points if p == path or p.startswith(path + "/")),
                    key=len, reverse=True):
        subprocess.run(["umount", p], check=False, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    raise SystemExit(main())
