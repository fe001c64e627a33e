"""Cold publish from a registry on loopback, against `skopeo copy` + `umoci unpack` of the
same image in the same run; and a second image sharing the base layer, against its own cold
time.

A real Debian `docker-registry` is started on 127.0.0.1 with its own config; the images are
built from real files (parts of the Python standard library), pushed with skopeo, then:
  baseline   skopeo copy docker://… oci:DIR + umoci unpack (what a pull-and-unpack costs)
  strata     NodePublishVolume over the real socket on an empty store (pull + unpack + mount)
  second     the second image on a store that already holds the shared base layer
  second*    the second image on an empty store (its own cold time)
The page cache is dropped before each timed step.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)


from bench._util import Strata, drop_caches, free_port  # noqa: E402
from csi.image.build import LayerBuilder, write_image  # noqa: E402

STDLIB = sysconfig.get_paths()["stdlib"]
BASE_PKGS = ("encodings", "email", "json", "http", "asyncio", "xml", "unittest", "logging",
             "lib2to3", "pydoc_data", "concurrent", "importlib", "multiprocessing", "sqlite3",
             "urllib", "tkinter", "idlelib", "ensurepip")




def build(layout: str) -> None:
    base = LayerBuilder()
    for pkg in BASE_PKGS:
        if os.path.isdir(os.path.join(STDLIB, pkg)):
            base.tree(os.path.join(STDLIB, pkg), f"usr/lib/python3/{pkg}")
    mid = LayerBuilder().tree(os.path.join(STDLIB, "test"), "usr/lib/python3/test")
    app = LayerBuilder().file("srv/app.py", "print('hello')\n").whiteout("usr/lib/python3/idlelib")
    other = LayerBuilder().tree(os.path.join(STDLIB, "lib-dynload"), "opt/lib-dynload")
    write_image(layout, "app", [base, mid, app])
    write_image(layout, "other", [base, other])


def start_registry(work: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = os.path.join(work, "registry.yml")
    with open(cfg, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {work}/registry-data\nhttp:\n  addr: 127.0.0.1:{port}\n")
    log = open(os.path.join(work, "registry.log"), "w")
    proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=log, stderr=log)
    host = f"127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, host
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("registry did not start")


def strata(work: str, name: str, registry: str) -> Strata:
    return Strata(os.path.join(work, f"{name}.sock"), os.path.join(work, f"{name}-store"),
                  os.path.join(work, f"{name}.log"), "--insecure-registry", registry)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="strata-bench-pull-", dir="/var/tmp")
    registry = None
    try:
        layout = os.path.join(work, "layout")
        build(layout)
        registry, host = start_registry(work)
        for tag in ("app", "other"):
            subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                            f"docker://{host}/bench/{tag}:1"], check=True,
                           stdout=subprocess.DEVNULL)
        size = sum(os.path.getsize(os.path.join(layout, "blobs/sha256", b))
                   for b in os.listdir(os.path.join(layout, "blobs/sha256")))
        print(f"images: bench/app (3 layers) and bench/other (shares the base), "
              f"{size / 1e6:.1f} MB of blobs, registry at {host}")
        times: dict[str, list[float]] = {"skopeo+umoci": [], "strata": [], "second": [],
                                         "second*": []}
        for run in range(args.runs):
            out = os.path.join(work, f"baseline{run}")
            os.makedirs(out)
            drop_caches()
            t0 = time.perf_counter()
            subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                            f"docker://{host}/bench/app:1", f"oci:{out}/layout:app"],
                           check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["umoci", "unpack", "--image", f"{out}/layout:app",
                            f"{out}/bundle"], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            times["skopeo+umoci"].append(time.perf_counter() - t0)
            shutil.rmtree(out)

            s = strata(work, f"s{run}", host)
            t = os.path.join(work, f"t{run}")
            os.makedirs(t)
            drop_caches()
            times["strata"].append(s.publish("a", f"{t}/a", f"{host}/bench/app:1"))
            drop_caches()
            times["second"].append(s.publish("b", f"{t}/b", f"{host}/bench/other:1"))
            s.unpublish("a", f"{t}/a")
            s.unpublish("b", f"{t}/b")
            s.stop()
            s2 = strata(work, f"c{run}", host)
            drop_caches()
            times["second*"].append(s2.publish("b", f"{t}/b2", f"{host}/bench/other:1"))
            s2.unpublish("b", f"{t}/b2")
            s2.stop()
        best = {k: min(v) for k, v in times.items()}
        print(f"  skopeo copy + umoci unpack  {best['skopeo+umoci']:6.2f} s")
        print(f"  strata cold publish         {best['strata']:6.2f} s   "
              f"{best['strata'] / best['skopeo+umoci']:.2f}x skopeo+umoci")
        print(f"  second image, base present  {best['second']:6.2f} s   "
              f"{best['second'] / best['second*']:.2f}x its own cold time "
              f"({best['second*']:.2f} s)")
        print(f"  (best of {args.runs} runs)")
    finally:
        if registry is not None:
            registry.send_signal(signal.SIGTERM)
            registry.wait()
        subprocess.run(f"grep -o ' {work}[^ ]*' /proc/self/mountinfo | xargs -r -n1 umount",
                       shell=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
