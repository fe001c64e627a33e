"""Unpack throughput of a large real layer: strata against GNU `tar -xzf` and `umoci unpack`
of the same blob, measured in the same run, plus strata's peak RSS, and what making the
layer durable before it is recorded costs (strata with its syncfs against strata without).

The layer is built from real files on this machine (by default the Python standard library
without site-packages: ~250 MB in ~10k entries), gzip-compressed by GNU gzip. Each contender
unpacks into a fresh directory on the same filesystem, with the page cache dropped first
(PERFORMANCE.md: a mass delete slows the next writes for a while). Contenders run in
interleaved rounds; medians are shown. `--baseline REPO` adds another checkout's LayerStore
(e.g. `--baseline /work/main`) to each round, so a change is measured against what it
replaces in the same run, on the same machine load.
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from bench._util import drop_caches  # noqa: E402

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from csi.image.layout import OciLayout
from csi.image.reference import parse
from csi.paths import StorePaths
from csi.store.layers import LayerStore
from csi.store.state import State
paths, ref = StorePaths(sys.argv[2]).make(), sys.argv[3]
state = State(paths.state_db)
src = OciLayout(parse(ref))
image = src.resolve()
kwargs = {"sync": lambda fd: None} if sys.argv[4] == "nosync" else {}
t0 = time.perf_counter()
LayerStore(paths, state, **kwargs).ensure(src, image.layers)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt,
                  "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""



def build_layer(work: str, sources: list[str], given: str | None = None):
    """Write an OCI layout with one gzip layer of `sources` (or the gzip layer blob `given`,
    e.g. the realistic image's base layer); returns (ref, tar bytes, entries, blob, size)."""
    layout = os.path.join(work, "layout")
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    tar_path = os.path.join(work, "layer.tar")
    if given is None:
        args = ["tar", "-cf", tar_path, "--numeric-owner", "--exclude=site-packages"]
        for src in sources:
            args += ["-C", os.path.dirname(src), os.path.basename(src)]
        subprocess.run(args, check=True)
    else:
        with open(tar_path, "wb") as out:
            subprocess.run(["gzip", "-dc", given], check=True, stdout=out)
    entries = int(subprocess.run(f"tar -tf {tar_path} | wc -l", shell=True, check=True,
                                 capture_output=True, text=True).stdout)
    tar_size = os.path.getsize(tar_path)
    diff_id = "sha256:" + _sha256_file(tar_path)
    gz = tar_path + ".gz"
    if given is None:
        subprocess.run(["gzip", "-6", tar_path], check=True)
    else:
        os.unlink(tar_path)
        shutil.copyfile(given, gz)
    digest = _sha256_file(gz)
    size = os.path.getsize(gz)
    os.rename(gz, os.path.join(blobs, digest))

    def blob(obj) -> dict:
        data = json.dumps(obj).encode()
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, d), "wb") as f:
            f.write(data)
        return {"digest": "sha256:" + d, "size": len(data)}

    config = blob({"architecture": "amd64", "os": "linux",
                   "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    manifest = blob({"schemaVersion": 2,
                     "mediaType": "application/vnd.oci.image.manifest.v1+json",
                     "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                **config},
                     "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                 "digest": "sha256:" + digest, "size": size}]})
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
            "annotations": {"org.opencontainers.image.ref.name": "big"}}]}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return f"oci:{layout}:big", tar_size, entries, os.path.join(blobs, digest), size


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def timed(cmd: list[str]) -> tuple[float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, max(before, resource.getrusage(
        resource.RUSAGE_CHILDREN).ru_maxrss)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", action="append", help="directories to put in the layer")
    ap.add_argument("--blob", metavar="FILE", help="a gzip layer blob to unpack instead of "
                    "one built from --source (e.g. the realistic image's base layer)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds (medians shown)")
    ap.add_argument("--baseline", metavar="REPO",
                    help="also run the LayerStore of another checkout (e.g. main) each round")
    ap.add_argument("--no-umoci", action="store_true", help="leave umoci out (it is slow)")
    args = ap.parse_args()
    sources = args.source or [sysconfig.get_paths()["stdlib"]]
    work = tempfile.mkdtemp(prefix="strata-bench-unpack-", dir="/var/tmp")
    try:
        ref, tar_bytes, entries, blob, blob_size = build_layer(work, sources, args.blob)
        print(f"layer: {entries} entries, {tar_bytes / 1e6:.1f} MB uncompressed, "
              f"{blob_size / 1e6:.1f} MB gzip")
        layout = ref[len("oci:"):].rsplit(":", 1)[0]
        names = ["tar -xzf", "umoci unpack", "strata", "strata nosync"]
        if args.no_umoci:
            names.remove("umoci unpack")
        if args.baseline:
            names += ["baseline", "baseline nosync"]
        results: dict[str, list[float]] = {n: [] for n in names}
        rss = {"strata": 0, "baseline": 0}
        for i in range(args.runs):
            for name in results:
                out = os.path.join(work, f"{name.replace(' ', '-')}-{i}")
                os.makedirs(out)
                drop_caches()
                if name == "tar -xzf":
                    dt, _ = timed(["tar", "-xzf", blob, "-C", out, "--numeric-owner"])
                elif name == "umoci unpack":
                    dt, _ = timed(["umoci", "unpack", "--image", f"{layout}:big",
                                   os.path.join(out, "bundle")])
                else:
                    # `strata nosync`: the same unpack without its syncfs; the files are
                    # then still being written back when it returns.
                    who = name.split()[0]
                    repo = args.baseline if who == "baseline" else HERE
                    r = subprocess.run([sys.executable, "-c", CHILD, repo, out, ref,
                                        name.split()[-1]],
                                       check=True, capture_output=True, text=True)
                    stats = json.loads(r.stdout)
                    dt, rss[who] = stats["seconds"], max(rss[who], stats["rss_kb"])
                results[name].append(dt)
                shutil.rmtree(out)
        best = {k: statistics.median(v) for k, v in results.items()}
        for name, dt in best.items():
            ratio = best["strata"] / dt
            print(f"  {name:<15} {dt:6.2f} s [{min(results[name]):5.2f}-"
                  f"{max(results[name]):5.2f}] {tar_bytes / dt / 1e6:6.1f} MB/s   strata takes "
                  f"{ratio:4.2f}x its time")
        print(f"  strata peak RSS: {rss['strata'] / 1024:.0f} MB" + (
            f" (baseline: {rss['baseline'] / 1024:.0f} MB)" if args.baseline else ""))
        print(f"  durable before recorded: strata with its syncfs takes "
              f"{best['strata'] / best['strata nosync']:4.2f}x the time of strata without "
              f"(+{(best['strata'] - best['strata nosync']) * 1e3:.0f} ms per layer)")
        from csi.store.compression import GZIP_IMPL

        print(f"  (strata inflates with {GZIP_IMPL}; medians of {args.runs} interleaved "
              "rounds [min-max])")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    raise SystemExit(main())
