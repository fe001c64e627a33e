"""Cold pulls against strata's peers, in one run, on the realistic nginx image (realistic.py)
served by one loopback `docker-registry`:
  skopeo+umoci   `skopeo copy docker://… oci:DIR` + `umoci unpack` (pull-and-unpack by hand)
  containerd     `ctr image pull --plain-http` against a containerd of the bench's own (root,
                 state dir, socket and config in the work dir); ctr unpacks into the overlayfs
                 snapshotter for the default platform, which the bench checks (3 snapshots)
  strata         NodePublishVolume over the real socket of a `strata serve` on an empty store,
                 until it answers OK (pull, verify, unpack, syncfs, record, overlay mount)
and, the largest layer alone, pre-downloaded: GNU `tar -xzf`, `umoci unpack` of a one-layer
layout, and strata's LayerStore (with its syncfs, and without it to show what durability
costs). Before every timed run: sync + drop the page cache, then read the peer's own CLI
binaries back in (strata's server and containerd are running processes, warm, and so is the
registry). Rounds are interleaved (a, b, c, d…; a, b, c, d…) and medians are reported.

`--profile FILE.json` instead runs one cold strata publish with py-spy attached to the
server (sampling every thread, idle ones too, so blocking syscalls count) and prints where
the pull's critical path spent its time (breakdown() sorts the samples by the innermost
frame that says); FILE.json is a speedscope profile to look at (speedscope.app).

Needs root and scripts/bench-deps.sh; everything it starts is stopped and everything it
mounts is unmounted, whatever happens.
"""

import argparse
import contextlib
import hashlib
import json
import linecache
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)


from bench import _util, realistic  # noqa: E402
from bench._util import drop_caches, free_port, terminate  # noqa: E402
from bench.realistic import unmount_under  # noqa: E402
from bench.unpack import CHILD as STRATA_UNPACK  # noqa: E402

REPO = "bench/nginx"
STARTUP = 60.0  # seconds a server may take to answer


class Failed(RuntimeError):
    pass


def _wait(what: str, ready, proc: subprocess.Popen | None, log: str | None) -> None:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise Failed(f"{what} exited ({proc.returncode}) while starting:\n{_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    raise Failed(f"{what} did not start within {STARTUP:.0f} s:\n{_tail(log)}")


def _tail(path: str | None) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            return f.read()[-3000:].decode(errors="replace")
    except OSError:
        return ""


def _run(argv: list[str], **kw) -> None:
    r = subprocess.run(argv, capture_output=True, **kw)
    if r.returncode != 0:
        raise Failed(f"{' '.join(argv)} failed ({r.returncode}):\n"
                     f"{r.stderr.decode(errors='replace')[-3000:]}")


def _warm(*tools: str) -> None:
    """Read CLI binaries back into the page cache after a drop: the daemons compared with
    them (strata's server, containerd) are running already."""
    for tool in tools:
        with open(shutil.which(tool), "rb") as f:
            while f.read(1 << 20):
                pass


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def registry(work: str):
    """A docker-registry on a free loopback port, its own config and storage."""
    port = free_port()
    cfg, log = os.path.join(work, "registry.yml"), os.path.join(work, "registry.log")
    with open(cfg, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {work}/registry-data\nhttp:\n  addr: 127.0.0.1:{port}\n")
    with open(log, "w") as out:
        proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=out, stderr=out,
                                start_new_session=True)
    try:
        _wait("docker-registry", lambda: _port_open(port), proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        terminate(proc, 20.0)


class Containerd:
    """A containerd of the bench's own: root, state, sockets and config under `dir`; no CRI."""

    def __init__(self, work: str, name: str):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        self.sock = os.path.join(self.dir, "c.sock")
        self.log = os.path.join(self.dir, "containerd.log")
        cfg = os.path.join(self.dir, "config.toml")
        with open(cfg, "w") as f:
            f.write(f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    f'[grpc]\n  address = "{self.sock}"\n'
                    f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
                    f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{self.dir}/opt"\n')
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(["containerd", "--config", cfg], stdout=out,
                                         stderr=out, start_new_session=True)
        try:
            _wait("containerd", self._answers, self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        return os.path.exists(self.sock) and subprocess.run(
            ["ctr", "-a", self.sock, "version"], capture_output=True).returncode == 0

    def ctr(self, *args: str) -> str:
        r = subprocess.run(["ctr", "-a", self.sock, "-n", "bench", *args], capture_output=True)
        if r.returncode != 0:
            raise Failed(f"ctr {' '.join(args)} failed ({r.returncode}):\n"
                         f"{r.stderr.decode(errors='replace')[-3000:]}\n{_tail(self.log)}")
        return r.stdout.decode()

    def pull(self, ref: str) -> float:
        t0 = time.perf_counter()
        self.ctr("image", "pull", "--plain-http", ref)
        return time.perf_counter() - t0

    def snapshots(self) -> int:
        return len(self.ctr("snapshots", "ls").splitlines()) - 1  # a header line

    def stop(self) -> None:
        terminate(self.proc, 20.0)
        unmount_under(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


class Strata(_util.Strata):
    """A real `strata serve` on a fresh store, its targets and store in a dir of its own."""

    def __init__(self, work: str, name: str, registry: str):
        self.dir = os.path.join(work, name)
        os.makedirs(os.path.join(self.dir, "targets"))
        try:
            super().__init__(os.path.join(self.dir, "csi.sock"),
                             os.path.join(self.dir, "store"),
                             os.path.join(self.dir, "strata.log"),
                             "--insecure-registry", registry, startup=STARTUP)
        except RuntimeError as e:
            raise Failed(str(e)) from None

    def publish(self, vid: str, image: str) -> float:
        return super().publish(vid, self.target(vid), image)

    def target(self, vid: str) -> str:
        return os.path.join(self.dir, "targets", vid)

    def unpublish(self, vid: str) -> None:
        super().unpublish(vid, self.target(vid))

    def stop(self, grace: float = 60.0) -> None:
        super().stop(grace)
        unmount_under(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


def one_layer_layout(work: str, src_layout: str, layer: dict) -> str:
    """An OCI layout holding the image's largest layer alone (umoci and strata's unpack of
    just that layer read it); the blob is hard-linked, so it is already downloaded."""
    layout = os.path.join(work, "one-layer")
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    hexd = layer["digest"].split(":")[1]
    try:
        os.link(os.path.join(src_layout, "blobs", "sha256", hexd), os.path.join(blobs, hexd))
    except OSError:
        shutil.copyfile(os.path.join(src_layout, "blobs", "sha256", hexd),
                        os.path.join(blobs, hexd))

    def blob(obj: dict, media_type: str) -> dict:
        data = json.dumps(obj).encode()
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, d), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": "sha256:" + d, "size": len(data)}

    config = blob({"architecture": "amd64", "os": "linux",
                   "rootfs": {"type": "layers", "diff_ids": [layer["diff_id"]]}},
                  "application/vnd.oci.image.config.v1+json")
    manifest = blob({"schemaVersion": 2,
                     "mediaType": "application/vnd.oci.image.manifest.v1+json",
                     "config": config,
                     "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                 "digest": layer["digest"], "size": layer["size"]}]},
                    "application/vnd.oci.image.manifest.v1+json")
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {**manifest, "annotations": {"org.opencontainers.image.ref.name": "big"}}]}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return layout


def cold(fn, *args, warm: tuple[str, ...] = ()) -> float:
    """fn(*args) on an empty page cache, with the CLI binaries `warm` read back in."""
    drop_caches()
    _warm(*warm)
    return fn(*args)


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    _run(argv)
    return time.perf_counter() - t0


def run_round(i: int, work: str, host: str, layer_blob: str, one: str,
              times: dict[str, list[float]]) -> None:
    ref = f"{host}/{REPO}:1"
    out = os.path.join(work, f"skopeo-{i}")
    os.makedirs(out)
    try:
        times["skopeo+umoci"].append(cold(lambda: timed(
            ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}",
             f"oci:{out}/layout:nginx"]) + timed(
            ["umoci", "unpack", "--image", f"{out}/layout:nginx", f"{out}/bundle"]),
            warm=("skopeo", "umoci")))
    finally:
        shutil.rmtree(out, ignore_errors=True)

    ctd = Containerd(work, f"containerd-{i}")
    try:
        times["containerd"].append(cold(ctd.pull, ref, warm=("ctr",)))
        n = ctd.snapshots()
        if n != 3:
            raise Failed(f"containerd holds {n} snapshots after the pull, not the image's 3: "
                         "the timed pull did not unpack")
    finally:
        ctd.stop()

    s = Strata(work, f"strata-{i}", host)
    try:
        times["strata"].append(cold(s.publish, "v", ref))
        s.unpublish("v")
    finally:
        s.stop()

    for name, argv, warm in (
            ("tar", ["tar", "-xzf", layer_blob, "--numeric-owner", "-C"], ("tar", "gzip")),
            ("umoci", ["umoci", "unpack", "--image", f"{one}:big"], ("umoci",))):
        dest = os.path.join(work, f"{name}-{i}")
        if name == "tar":
            os.makedirs(dest)
        try:
            times[f"{name} layer"].append(cold(timed, [*argv, dest], warm=warm))
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    for mode in ("sync", "nosync"):
        dest = os.path.join(work, f"strata-unpack-{i}")
        try:
            key = "strata layer" + (" nosync" if mode == "nosync" else "")
            times[key].append(cold(strata_unpack, dest, f"oci:{one}:big", mode))
        finally:
            shutil.rmtree(dest, ignore_errors=True)


def strata_unpack(dest: str, ref: str, mode: str) -> float:
    """strata's LayerStore unpacking the layer in a process of its own (bench/unpack.py's)."""
    r = subprocess.run([sys.executable, "-c", STRATA_UNPACK, HERE, dest, ref, mode],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Failed(f"strata unpack failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)["seconds"]


def report(stats: dict, host: str, rounds: int, times: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    big = max(stats["layers"], key=lambda x: x["size"])
    mib = 2 ** 20
    print(f"image {REPO}:1 ({stats['release']} minbase + nginx + site): "
          f"{len(stats['layers'])} layers, {stats['compressed'] / mib:.1f} MiB compressed, "
          f"{stats['tar_bytes'] / mib:.1f} MiB / {stats['entries']:,} entries unpacked; "
          f"registry {host}")
    print(f"medians of {rounds} interleaved rounds, page cache dropped before each run "
          f"(min-max in brackets)")

    def row(label: str, key: str, extra: str = "") -> None:
        xs = times[key]
        print(f"  {label:<34} {med[key]:6.2f} s  [{min(xs):5.2f}-{max(xs):5.2f}]{extra}")

    print("cold pull of the image, from the registry to files on disk")
    row("skopeo copy + umoci unpack", "skopeo+umoci")
    row("containerd: ctr image pull", "containerd")
    row("strata: cold NodePublishVolume", "strata")
    print(f"  strata / containerd    {med['strata'] / med['containerd']:5.2f}x   (goal <= 0.5)")
    print(f"  strata / skopeo+umoci  {med['strata'] / med['skopeo+umoci']:5.2f}x   (goal <= 0.4)")
    print(f"the largest layer alone ({big['name']}: {big['size'] / mib:.1f} MiB gzip, "
          f"{big['tar_bytes'] / mib:.1f} MiB / {big['entries']:,} entries), "
          f"pre-downloaded")
    row("GNU tar -xzf", "tar layer")
    row("umoci unpack", "umoci layer")
    row("strata unpack (with its syncfs)", "strata layer")
    row("strata unpack without syncfs", "strata layer nosync")
    print(f"  strata-unpack / tar    {med['strata layer'] / med['tar layer']:5.2f}x   "
          f"(goal <= 1.0)")
    print(f"  strata-unpack / umoci  {med['strata layer'] / med['umoci layer']:5.2f}x")
    print(f"  syncfs costs strata    {med['strata layer'] - med['strata layer nosync']:+.2f} s"
          " on this layer (tar and umoci sync nothing)")


def profile(work: str, host: str, out: str) -> None:
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        raise Failed("py-spy is not installed (pip install py-spy into the virtualenv)")
    s = Strata(work, "profiled", host)
    spy_log = os.path.join(work, "py-spy.log")
    # Attached to the running server (not wrapping it, so the server stays the process the
    # bench stops); it writes the profile when the server exits.
    with open(spy_log, "w") as log:
        sampler = subprocess.Popen(
            [spy, "record", "--pid", str(s.proc.pid), "--idle", "--threads", "--nonblocking",
             "--rate", "250", "--format", "speedscope", "--output", out],
            stdout=log, stderr=log, start_new_session=True)
    try:
        time.sleep(2)  # py-spy attaches
        dt = cold(s.publish, "v", f"{host}/{REPO}:1")
        s.unpublish("v")
    finally:
        s.stop()
        try:
            sampler.wait(30)
        except subprocess.TimeoutExpired:
            sampler.send_signal(signal.SIGINT)
            try:
                sampler.wait(30)
            except subprocess.TimeoutExpired:
                sampler.kill()
                sampler.wait()
    if not os.path.exists(out):
        raise Failed(f"py-spy wrote no profile:\n{_tail(spy_log)}")
    print(f"cold publish under py-spy: {dt:.2f} s (sampling slows it); profile in {out}")
    breakdown(out)


# Where a working sample is, by its innermost frame that says (first match wins):
# (category, file suffix or "", function or "", regex on the source line or "").
CATEGORIES = [
    ("syncfs (durability)", "durable.py", "syncfs", ""),
    ("SQLite (state.db)", "csi/store/state.py", "", ""),
    ("SQLite (state.db)", "sqlite3/__init__.py", "", ""),
    ("digest: sha256 of the inflated tar (DiffID)", "csi/digest.py", "", r"\.update\("),
    ("digest: sha256 of the inflated tar (DiffID)", "csi/store/compression.py", "",
     r"\.update\("),
    ("digest: sha256 of the blob (read back from disk)", "csi/digest.py", "sha256_file", ""),
    ("HTTP download (socket reads, blob file writes, its sha256)", "socket.py", "", ""),
    ("HTTP download (socket reads, blob file writes, its sha256)", "http/client.py", "", ""),
    ("HTTP download (socket reads, blob file writes, its sha256)", "csi/image/transport.py",
     "", ""),
    ("HTTP download (socket reads, blob file writes, its sha256)", "csi/image/registry.py",
     "", ""),
    ("HTTP download (socket reads, blob file writes, its sha256)", "csi/store/blobs.py",
     "_Sink.write", ""),
    ("inflate (ISA-L, zstd)", "igzip_threaded.py", "", ""),
    ("inflate (ISA-L, zstd)", "csi/store/compression.py", "", ""),
    ("reading the blob (partial file, pread)", "csi/store/blobs.py", "_Follower.read", ""),
    ("tar parsing: headers and buffers (tarstream.py)", "csi/store/tarstream.py", "", ""),
    ("file data writes", "csi/store/unpack.py", "", r"write\(fd"),
    ("file creation syscalls (open, close, mkdir, symlink, link, mknod)", "csi/store/unpack.py",
     "", r"self\.create\(|os\.(open|close|mkdir|symlink|link|mknod|mkfifo)\("),
    ("metadata syscalls: owner, mode, times, xattrs", "csi/store/unpack.py", "",
     r"os\.(fchown|fchmod|lchown|chmod|utime|setxattr)\(|_set_xattrs\("),
    ("metadata syscalls: lookups (stat, lstat, readlink)", "csi/store/unpack.py", "",
     r"os\.(stat|lstat|readlink|fstat)\("),
    ("metadata syscalls: usage walk after unpack (scandir, stat)", "csi/tree.py", "usage", ""),
    ("unpacker's own Python (unpack.py)", "csi/store/unpack.py", "", ""),
    ("removing the blob after the pull", "csi/store/blobs.py", "remove", ""),
    ("overlay mount and publication", "csi/mount/", "", ""),
    ("overlay mount and publication", "csi/backend/", "", ""),
]
WAITS = ("wait", "_wait_for_tstate_lock", "acquire", "get", "join", "select", "poll")


def _category(stack: list[dict]) -> str:
    for f in reversed(stack):  # innermost first
        name, file = f["name"], f.get("file", "")
        for cat, suffix, func, pattern in CATEGORIES:
            if suffix and not file.endswith(suffix) and suffix not in file:
                continue
            if func and not (name == func or name.endswith("." + func)):
                continue
            if pattern and not re.search(pattern, linecache.getline(file, f.get("line", 0))):
                continue
            return cat
    return "other Python"


def _waiting(stack: list[dict]) -> str | None:
    """`waiting in F` when the sample is a thread blocked on another (a lock, a condition,
    a queue, a join), F the innermost of our functions on its stack; None when working.
    A blocking syscall (a socket read, a write) counts as work: it is the thread's."""
    if not stack[-1]["name"].split(".")[-1].lstrip("_").startswith(WAITS):
        return None
    ours = next((f["name"] for f in reversed(stack) if "/csi/" in f.get("file", "")), "?")
    return f"waiting in {ours}"


def breakdown(path: str) -> None:
    """Sort the samples of a py-spy speedscope profile of one cold publish, per thread: a
    pull's layers unpack on threads `unpack N` (one per layer at a time, fed by a
    `download blob` thread each and an inflate thread), the `pull` thread waits for them,
    the RPC thread for the pull. The critical path is the unpack thread that worked
    longest (the base layer's, for the realistic image): its split is printed whole;
    every other thread's in one line."""
    with open(path) as f:
        prof = json.load(f)
    frames = prof["shared"]["frames"]
    threads: dict[str, dict[str, float]] = {}
    for p in prof["profiles"]:
        name = p["name"].split('"')[1] if '"' in p["name"] else p["name"]
        cats = threads.setdefault(name, {})
        for sample, w in zip(p["samples"], p["weights"], strict=True):
            stack = [frames[i] for i in sample]
            if not stack or not any("/csi/" in f.get("file", "") for f in stack):
                continue  # an idle gRPC worker or py-spy's own view of nothing
            cat = _waiting(stack) or _category(stack)
            cats[cat] = cats.get(cat, 0.0) + w

    def busy(cats: dict[str, float]) -> float:
        return sum(t for c, t in cats.items() if not c.startswith("waiting"))

    unpacks = {n: c for n, c in threads.items() if n.startswith("unpack") and busy(c)}
    if not unpacks:
        raise Failed("the profile holds no unpack thread that worked: nothing to sort")
    critical = max(unpacks, key=lambda n: busy(unpacks[n]))
    cats = threads[critical]
    total = sum(cats.values())
    print(f"critical path: thread '{critical}' (the longest-working unpack), "
          f"{total:.2f} s sampled, {busy(cats):.2f} s working")
    for cat, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * t / total:5.1f}%  {t:5.2f} s  {cat}")
    print("every thread that ran our code (working / sampled, its largest part):")
    for name, c in sorted(threads.items(), key=lambda kv: -busy(kv[1])):
        if not c:
            continue
        top = max(c.items(), key=lambda kv: kv[1])
        print(f"  {name[:48]:<48} {busy(c):5.2f} / {sum(c.values()):5.2f} s   "
              f"{top[0]} {top[1]:.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    ap.add_argument("--profile", metavar="FILE.json",
                    help="profile one cold strata publish with py-spy instead")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/peers.py needs root (mounts, containerd, dropping the page cache)",
              file=sys.stderr)
        return 1
    for tool in ("skopeo", "umoci", "docker-registry", "containerd", "ctr", "tar"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: run scripts/bench-deps.sh", file=sys.stderr)
            return 1
    layout, stats = realistic.ensure_image()
    # SIGTERM unwinds like ^C, so every finally below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp(prefix="strata-bench-peers-", dir="/var/tmp")
    try:
        with registry(work) as host:
            _run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{realistic.TAG}",
                  f"docker://{host}/{REPO}:1"])
            if args.profile:
                profile(work, host, os.path.abspath(args.profile))
                return 0
            big = max(stats["layers"], key=lambda x: x["size"])
            one = one_layer_layout(work, layout, big)
            blob = os.path.join(one, "blobs", "sha256", big["digest"].split(":")[1])
            times: dict[str, list[float]] = {k: [] for k in (
                "skopeo+umoci", "containerd", "strata", "tar layer", "umoci layer",
                "strata layer", "strata layer nosync")}
            for i in range(max(3, args.rounds)):
                run_round(i, work, host, blob, one, times)
                print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}"
                                                      for k, v in times.items()), flush=True)
            report(stats, host, len(times["strata"]), times)
    except Failed as e:
        print(f"bench/peers.py: {e}", file=sys.stderr)
        return 1
    finally:
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
