"""/metrics scrape latency with 10 and with 200 live publications, each with a few thousand
entries in its upper layer, and whether scraping slows a publish down.

A scrape reads the upper-stats cache (csi/upper_stats.py) and one read transaction of
state.db; it never walks an upper dir. The cache's thread walks in the background (here
every --refresh seconds, so that it is walking during most of the measurements). Reported:
  scrape    ms per HTTP GET /metrics (median, p95) at 10 and 200 live, and their ratio
  publish   ms per warm publish+unpublish cycle, alone and while another thread scrapes
            without pause (median, p95), during background refreshes
Goal: a scrape at 200 live in at most 50 ms, and publishes not slower while scraped.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._util import free_port  # noqa: E402
from csi import compose  # noqa: E402
from csi.config import Config  # noqa: E402
from csi.demo import build_demo_image  # noqa: E402
from csi.metrics import render_publications, start_http  # noqa: E402
from csi.volumes import PublishSpec  # noqa: E402


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def line(name, xs):
    print(f"  {name:<28} median {statistics.median(xs) * 1e3:8.2f} ms   "
          f"p95 {pct(xs, 95) * 1e3:8.2f} ms   (n={len(xs)})")


def scrape(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as r:
        return len(r.read())


def scrapes(url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        scrape(url)
        out.append(time.perf_counter() - t0)
    return out


def fill(target: str, entries: int) -> None:
    """`entries` new entries in the pod's view: directories of 100 small files."""
    made = 0
    d = 0
    while made < entries:
        sub = os.path.join(target, "bench", f"d{d}")
        os.makedirs(sub)
        made += 1 + (d == 0)  # bench/ itself once
        for i in range(min(100, entries - made)):
            with open(os.path.join(sub, f"f{i}"), "w") as f:
                f.write("x" * 100)
            made += 1
        d += 1


def cycles(vm, image, work, n, tag) -> list[float]:
    out = []
    for i in range(n):
        target = os.path.join(work, f"{tag}{i}")
        p = PublishSpec(f"bench-{tag}-{i}", target, image, False, 1)
        t0 = time.perf_counter()
        vm.publish(p)
        vm.unpublish(p.volume_id, target)
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=2000, help="upper entries per publication")
    ap.add_argument("--scrapes", type=int, default=50)
    ap.add_argument("--cycles", type=int, default=60)
    ap.add_argument("--refresh", type=float, default=1.0, help="--metrics-refresh-seconds")
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="sys.setswitchinterval (s) for the run; 0: Python's default (5 ms)")
    args = ap.parse_args()
    if args.switch_interval:
        # How long a thread back from a syscall may wait for the GIL while another runs
        # Python code (a scrape): what a publish pays per syscall during a scrape.
        sys.setswitchinterval(args.switch_interval)
    root = tempfile.mkdtemp(prefix="strata-bench-metrics-")
    parts = server = None
    live: list[tuple[str, str]] = []
    try:
        image = build_demo_image(os.path.join(root, "image"))
        port = free_port()
        parts = compose.node(Config(root=os.path.join(root, "store"), node_id="bench",
                                    metrics_address=f"127.0.0.1:{port}",
                                    metrics_refresh_seconds=args.refresh,
                                    gc_policy="lru", gc_max_bytes=1 << 40))
        server, _ = start_http("127.0.0.1", port, parts.metrics.registry)
        url = f"http://127.0.0.1:{port}/metrics"
        vm, stats = parts.volumes, parts.upper_stats
        stats.start()
        work = os.path.join(root, "work")
        os.mkdir(work)
        cycles(vm, image, work, 5, "warm")  # the layers on the node, caches warm
        results = {}
        started = time.monotonic()
        for count in (10, 200):
            while len(live) < count:
                t = os.path.join(work, f"live{len(live)}")
                vid = f"live-{len(live)}"
                vm.publish(PublishSpec(vid, t, image, False, 1))
                fill(t, args.entries)
                live.append((vid, t))
            stats.wait_pass(timeout=600)  # every upper summarized once
            scrapes(url, 3)  # warm-up
            results[count] = scrapes(url, args.scrapes)
            print(f"{count} live publications ready after {time.monotonic() - started:.0f} s "
                  f"({len(live) * args.entries} upper entries)", flush=True)
        size = scrape(url)

        # Pods that keep writing: every walk then changes a summary, and most scrapes
        # render the per-publication text again instead of reusing it.
        writing = threading.Event()

        def writer():
            n = 0
            while not writing.is_set():
                _, t = live[n % len(live)]
                with open(os.path.join(t, "bench", f"w{n}"), "w") as f:
                    f.write("w")
                n += 1
                time.sleep(0.002)

        w = threading.Thread(target=writer)
        w.start()
        try:
            stats.wait_pass(timeout=600)
            versions = stats.version
            results["200 writing"] = scrapes(url, args.scrapes)
            rerendered = stats.version - versions
            # What a change costs the next scrape: the per-publication text rendered anew.
            with parts.state.read() as tx:
                pubs = tx.publications()
            summaries = stats.summaries()
            render = []
            for _ in range(20):
                t0 = time.perf_counter()
                render_publications(pubs, summaries)
                render.append(time.perf_counter() - t0)
        finally:
            writing.set()
            w.join()

        quiet = cycles(vm, image, work, args.cycles, "quiet")
        stop = threading.Event()
        during: list[float] = []

        def scraper():
            while not stop.is_set():
                t0 = time.perf_counter()
                scrape(url)
                during.append(time.perf_counter() - t0)

        thread = threading.Thread(target=scraper)
        thread.start()
        try:
            scraped = cycles(vm, image, work, args.cycles, "scraped")
        finally:
            stop.set()
            thread.join()

        print(f"/metrics scrape over HTTP, {args.entries} upper entries per publication, "
              f"background refresh every {args.refresh:g} s ({size} bytes at 200 live):")
        line("10 live", results[10])
        line("200 live", results[200])
        line("200 live, pods writing", results["200 writing"])
        print(f"  (the figures changed {rerendered} times during those "
              f"{len(results['200 writing'])} scrapes)")
        line("rendering 200 anew", render)
        print(f"  ratio 200/10 (median)        "
              f"{statistics.median(results[200]) / statistics.median(results[10]):.2f}x")
        print("warm publish+unpublish at 200 live, during background refreshes:")
        line("alone", quiet)
        line("while scraped continuously", scraped)
        print(f"  ratio (median)               "
              f"{statistics.median(scraped) / statistics.median(quiet):.2f}x")
        line("scrapes meanwhile", during)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        if parts is not None:
            for vid, t in live:
                try:
                    parts.volumes.unpublish(vid, t)
                except Exception as e:  # report, and go on cleaning up
                    print(f"cannot unpublish {t}: {e}", file=sys.stderr)
            parts.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
