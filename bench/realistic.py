"""The realistic image the peer benchmarks pull: Debian minbase + nginx + a small website,
built from Debian packages at bench time and cached (PERFORMANCE.md, TEST-IMAGES.md).

Three layers, packed into an OCI layout with umoci:
  1. base   `debootstrap --variant=minbase` of the release apt on this machine uses, from the
            mirror apt uses, without the .debs and package lists debootstrap leaves (as
            distribution base images are)
  2. nginx  `apt-get install nginx` in a chroot of it, with a policy-rc.d that forbids
            starting services and /proc, /sys, /dev bind-mounted for that step only; apt's
            lists and archives are then removed, as an image build does
  3. site   a small website that modifies one lower file (nginx's default site) and deletes
            another (the Debian welcome page), so the layer carries a whiteout

The layout is cached in `.bench-cache/` at the top of the repository (git-ignored), keyed by
release and recipe version, with stats.json describing its layers; later runs reuse it.
Building needs root and the network to the Debian mirror: when the mirror cannot be reached
this says so and exits non-zero. `python bench/realistic.py` builds it (if needed) and prints
where it is.
"""

import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(HERE, ".bench-cache")
RECIPE = 1  # bump when the recipe below changes, so cached images are rebuilt
TAG = "nginx"


class Unavailable(SystemExit):
    """The image cannot be built here (no root, a missing tool, the mirror out of reach):
    raised with the reason, which Python prints to stderr before exiting with status 1."""

    def __init__(self, why: str):
        super().__init__(f"realistic image: {why}")


def apt_release() -> str:
    """The Debian release this machine's apt uses (its codename)."""
    with open("/etc/os-release") as f:
        for line in f:
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"')
    raise Unavailable("cannot tell the Debian release from /etc/os-release")


def apt_mirror(release: str) -> str:
    """The mirror apt uses for `release` main (deb822 .sources first, then sources.list)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            for stanza in f.read().split("\n\n"):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if (release in fields.get("Suites", "").split()
                        and "deb" in fields.get("Types", "").split()
                        and "main" in fields.get("Components", "").split()):
                    return fields["URIs"].split()[0]
    for path in ["/etc/apt/sources.list", *glob.glob("/etc/apt/sources.list.d/*.list")]:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
            if m and m.group(2) == release and "main" in m.group(3).split():
                return m.group(1)
    raise Unavailable(f"no apt source for {release} main in /etc/apt: cannot pick a mirror")


def cache_dir(release: str) -> str:
    return os.path.join(CACHE, f"realistic-nginx-{release}-r{RECIPE}")


def ensure_image(quiet: bool = False) -> tuple[str, dict]:
    """(OCI layout dir, stats) of the realistic image, tagged `nginx`; built if not cached.
    stats: {"layers": [{"name", "digest", "size", "diff_id", "tar_bytes", "entries"}],
    "compressed", "tar_bytes", "entries", "release", "mirror", "build_seconds"}."""
    release = apt_release()
    final = cache_dir(release)
    stats_path = os.path.join(final, "stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            return os.path.join(final, "layout"), json.load(f)
    if os.geteuid() != 0:
        raise Unavailable("building it needs root (debootstrap, chroot, mounts)")
    for tool in ("debootstrap", "umoci", "chroot", "mount", "umount"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is missing (scripts/bench-deps.sh installs it)")
    mirror = apt_mirror(release)
    _check_mirror(mirror, release)
    os.makedirs(CACHE, exist_ok=True)
    work = tempfile.mkdtemp(prefix="build-", dir=CACHE)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    try:
        t0 = time.monotonic()
        layout = os.path.join(work, "layout")
        bundle = os.path.join(work, "bundle")
        rootfs = os.path.join(bundle, "rootfs")
        img = f"{layout}:{TAG}"
        _run(["umoci", "init", "--layout", layout])
        _run(["umoci", "new", "--image", img])
        _run(["umoci", "unpack", "--image", img, bundle])
        say(f"realistic image: debootstrap --variant=minbase {release} from {mirror} ...")
        _debootstrap(release, mirror, rootfs, os.path.join(work, "debootstrap.log"))
        _repack(img, bundle, "debootstrap --variant=minbase " + release)
        say("realistic image: apt-get install nginx in a chroot ...")
        _install_nginx(rootfs, os.path.join(work, "apt.log"))
        _repack(img, bundle, "apt-get install nginx")
        _site(rootfs)
        _repack(img, bundle, "website")
        _run(["umoci", "config", "--image", img, "--no-history",
              "--config.cmd", "nginx", "--config.cmd", "-g", "--config.cmd", "daemon off;",
              "--config.exposedports", "80/tcp"])
        _run(["umoci", "gc", "--layout", layout])
        stats = _describe(layout)
        stats.update(release=release, mirror=mirror,
                     build_seconds=round(time.monotonic() - t0, 1))
        with open(os.path.join(work, "stats.json"), "w") as f:
            json.dump(stats, f, indent=1)
        unmount_under(work)
        shutil.rmtree(bundle)
        os.rename(work, final)
        say(f"realistic image: built in {stats['build_seconds']} s, cached in {final}")
        with open(stats_path) as f:
            return os.path.join(final, "layout"), json.load(f)
    finally:
        if os.path.exists(work):
            unmount_under(work)
            shutil.rmtree(work, ignore_errors=True)


def _check_mirror(mirror: str, release: str) -> None:
    url = f"{mirror.rstrip('/')}/dists/{release}/Release"
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            r.read(1)
    except Exception as e:  # any failure means the same thing here
        raise Unavailable(f"cannot reach the Debian mirror apt uses ({url}: {e}); "
                          "debootstrap needs it to build the image") from None


def _run(argv: list[str], log: str | None = None, **kw) -> None:
    out = open(log, "ab") if log else subprocess.PIPE
    try:
        r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False, **kw)
    finally:
        if log:
            out.close()
    if r.returncode != 0:
        if log:
            with open(log, "rb") as f:
                text = f.read()[-3000:].decode(errors="replace")
        else:
            text = r.stdout.decode(errors="replace")[-3000:]
        raise Unavailable(f"{' '.join(argv[:4])} ... failed ({r.returncode}):\n{text}")


def _debootstrap(release: str, mirror: str, rootfs: str, log: str) -> None:
    _run(["debootstrap", "--variant=minbase", release, rootfs, mirror], log=log)
    # debootstrap keeps the .debs it installed and the mirror's package lists (~50 MB);
    # distribution base images (debuerreotype) ship neither, and nor does this one.
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin",
                    "var/lib/apt/lists/*"):
        for path in glob.glob(os.path.join(rootfs, pattern)):
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
    # An image carries no host's name or resolver; the chroot step lends the host's below.
    for name in ("etc/resolv.conf", "etc/hostname"):
        path = os.path.join(rootfs, name)
        if os.path.lexists(path):
            os.unlink(path)
            open(path, "w").close()


def _install_nginx(rootfs: str, log: str) -> None:
    policy = os.path.join(rootfs, "usr/sbin/policy-rc.d")
    resolv = os.path.join(rootfs, "etc/resolv.conf")
    mounted: list[str] = []
    try:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\n# no service starts while the image is built\nexit 101\n")
        os.chmod(policy, 0o755)
        shutil.copyfile("/etc/resolv.conf", resolv)
        for fs in ("proc", "sys", "dev"):
            target = os.path.join(rootfs, fs)
            _run(["mount", "--bind", "/" + fs, target])
            mounted.append(target)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
               "LANG": "C.UTF-8", "HOME": "/root"}
        script = ("apt-get update -qq && apt-get install -y -qq nginx && apt-get clean && "
                  "rm -rf /var/lib/apt/lists/*")
        _run(["chroot", rootfs, "/bin/sh", "-c", script], log=log, env=env)
    finally:
        for target in reversed(mounted):
            if subprocess.run(["umount", target], check=False).returncode != 0:
                subprocess.run(["umount", "-l", target], check=False)
        for path in (policy,):
            if os.path.lexists(path):
                os.unlink(path)
        open(resolv, "w").close()
    unmount_under(rootfs)  # nothing of the host may be packed


def _site(rootfs: str) -> None:
    """The website layer: new files, one lower file modified, one deleted."""
    www = os.path.join(rootfs, "var/www/site")
    os.makedirs(os.path.join(www, "css"))
    os.makedirs(os.path.join(www, "img"))
    with open(os.path.join(www, "index.html"), "w") as f:
        f.write("<!doctype html><title>strata bench</title><link rel=stylesheet "
                "href=css/site.css><h1>served from an image volume</h1>\n")
    with open(os.path.join(www, "css/site.css"), "w") as f:
        f.write("body { font-family: sans-serif; margin: 4em; }\n" * 20)
    for i in range(16):  # some binary assets, as a real site has
        with open(os.path.join(www, f"img/{i:02d}.bin"), "wb") as f:
            f.write(hashlib.sha256(str(i).encode()).digest() * 2048)
    default = os.path.join(rootfs, "etc/nginx/sites-available/default")
    with open(default) as f:
        conf = f.read()
    with open(default, "w") as f:
        f.write(conf.replace("root /var/www/html;", "root /var/www/site;"))
    os.unlink(os.path.join(rootfs, "var/www/html/index.nginx-debian.html"))


def _repack(img: str, bundle: str, created_by: str) -> None:
    unmount_under(bundle)
    _run(["umoci", "repack", "--refresh-bundle", "--history.created_by", created_by,
          "--image", img, bundle])


def _describe(layout: str) -> dict:
    blobs = os.path.join(layout, "blobs", "sha256")
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    (desc,) = [m for m in index["manifests"]
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == TAG]
    with open(os.path.join(blobs, desc["digest"].split(":")[1])) as f:
        manifest = json.load(f)
    with open(os.path.join(blobs, manifest["config"]["digest"].split(":")[1])) as f:
        diff_ids = json.load(f)["rootfs"]["diff_ids"]
    layers = []
    for name, layer, diff_id in zip(("base", "nginx", "site"), manifest["layers"], diff_ids,
                                    strict=True):
        path = os.path.join(blobs, layer["digest"].split(":")[1])
        with gzip.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
            entries = sum(1 for _ in tf)
            raw.read()  # the end-of-archive blocks
            tar_bytes = raw.tell()
        layers.append({"name": name, "digest": layer["digest"], "size": layer["size"],
                       "diff_id": diff_id, "tar_bytes": tar_bytes, "entries": entries})
    return {"layers": layers, "manifest": desc["digest"],
            "compressed": sum(x["size"] for x in layers),
            "tar_bytes": sum(x["tar_bytes"] for x in layers),
            "entries": sum(x["entries"] for x in layers)}


def unmount_under(top: str) -> None:
    """Unmount everything mounted at or below `top`, deepest first (lazily if busy)."""
    top = os.path.realpath(top)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    points = [p.encode().decode("unicode_escape") for p in points]
    for p in sorted((p for p in points if p == top or p.startswith(top + "/")),
                    key=len, reverse=True):
        if subprocess.run(["umount", p], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", p], capture_output=True)


def main() -> int:
    layout, stats = ensure_image()
    print(f"{layout}:{TAG}  {len(stats['layers'])} layers, "
          f"{stats['compressed'] / 2**20:.1f} MiB compressed, "
          f"{stats['tar_bytes'] / 2**20:.1f} MiB in {stats['entries']:,} tar entries "
          f"({stats['release']}, built in {stats['build_seconds']} s)")
    for x in stats["layers"]:
        print(f"  {x['name']:<6} {x['size'] / 2**20:6.1f} MiB gzip  "
              f"{x['tar_bytes'] / 2**20:6.1f} MiB tar  {x['entries']:6,} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
