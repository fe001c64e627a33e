"""`strata pull` as an operator runs it (`python -m csi pull`, as `kubectl exec … strata
pull` would) against a real plain-HTTP `docker-registry`: the server's settings read from
the environment or the config file, docker-pull-like progress (plain lines in a pipe,
redrawn rows on a terminal), retries shown once each, a plain-HTTP registry reached over
TLS failing at once with what to do, errors on stderr, and a mistyped --root refused."""

import os
import pty
import re
import subprocess
import sys

import pytest

from csi.paths import StorePaths
from csi.store.state import State
from tests.conftest import ROOT_REASON, needs_tools
from tests.faultproxy import FaultProxy
from tests.registry import Registry, push

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),  # whiteouts are mknod(2)
    needs_tools("docker-registry", "skopeo"),
]


@pytest.fixture(scope="module")
def registry(images):
    layout = os.path.join(images.root, "layout")  # tests/conftest.py's session images
    with Registry() as reg:
        reg.digests = {tag: push(layout, tag, reg, f"team/{tag}", "1.0")
                       for tag in ("base", "app")}
        yield reg


@pytest.fixture
def store(tmp_path) -> str:
    """A store as `strata serve` leaves one (only serve creates stores)."""
    root = str(tmp_path / "store")
    State(StorePaths(root).make().state_db).close()
    return root


def strata(*argv: str, env: dict | None = None, config: str = "",
           ) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    return subprocess.run([sys.executable, "-m", "csi", *argv], capture_output=True,
                          text=True, timeout=120,
                          env={**clean, "STRATA_CONFIG": config, **(env or {})})


def assert_no_repeated_line(text: str) -> None:
    lines = text.splitlines()
    assert len(lines) == len(set(lines)), text


def test_settings_come_from_the_config_file(registry, store, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"insecure-registry: [{registry.host}]\nroot: {store}\n")
    image = f"{registry.host}/team/app:1.0"
    r = strata("pull", image, config=str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0] == "1.0: Pulling from team/app"
    rows = [x for x in lines if re.match(r"[0-9a-f]{16}: ", x)]
    layers = list(dict.fromkeys(x.split(":")[0] for x in rows))
    assert len(layers) == 2
    for lid in layers:  # each layer's states in order, each once
        assert [x.split(": ", 1)[1].split(" ")[0] for x in rows if x.startswith(lid)] == \
            ["Pulling", "Downloading", "Extracting", "Pull"], rows
    assert re.search(r": Downloading \d+(\.\d)? (B|KiB|MiB)$", r.stdout, re.M)
    assert lines[-3:] == [f"Digest: {registry.digests['app']}",
                          f"Status: Downloaded newer image for {image}", image]
    assert_no_repeated_line(r.stdout)

    again = strata("pull", image, config=str(config))
    assert again.returncode == 0 and again.stderr == ""
    assert again.stdout.splitlines() == [
        "1.0: Pulling from team/app", f"Digest: {registry.digests['app']}",
        f"Status: Image is up to date for {image}", image]


def test_settings_come_from_the_environment(registry, store):
    """The DaemonSet's STRATA_* variables reach a tool exec'd in the plugin's container."""
    image = f"{registry.host}/team/base:1.0"
    r = strata("pull", image, env={"STRATA_INSECURE_REGISTRY": registry.host,
                                   "STRATA_ROOT": store})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Status: Downloaded newer image for {image}" in r.stdout
    other = strata("pull", f"{registry.host}/team/app:1.0",
                   env={"STRATA_INSECURE_REGISTRY": registry.host, "STRATA_ROOT": store})
    assert other.returncode == 0, other.stderr
    states = [x.split(": ", 1)[1] for x in other.stdout.splitlines()
              if re.match(r"[0-9a-f]{16}: ", x)]
    assert states[0] == "Already exists", "the base layer, shared with team/base"
    assert "Pull complete" in states


def test_a_plain_http_registry_without_insecure_registry_says_what_to_do(registry, store):
    r = strata("pull", f"{registry.host}/team/app:1.0", "--root", store)
    assert r.returncode == 1
    assert r.stdout == "1.0: Pulling from team/app\n", "no retries, no progress"
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert f"registry {registry.host} answered plain HTTP to HTTPS" in r.stderr
    assert (f"add --insecure-registry {registry.host} (or STRATA_INSECURE_REGISTRY, or "
            "insecure-registry in the config file)") in r.stderr
    assert "attempts" not in r.stderr, "refused at the first attempt"


def test_each_retry_is_one_line(registry, store):
    with FaultProxy(registry.host) as proxy:
        proxy.fail(503, times=2, path=r"/manifests/")
        proxy.fail(503, times=1, path=r"/blobs/")  # the config blob
        proxy.fail(503, times=1, path=r"/blobs/")  # a layer's
        r = strata("pull", f"{proxy.host}/team/app:1.0", "--root", store,
                   "--insecure-registry", proxy.host)
    assert r.returncode == 0, r.stdout + r.stderr
    retries = [x for x in r.stdout.splitlines() if "Retrying in " in x]
    assert len(retries) == 4, r.stdout
    assert sum("after attempt 1: image" in x and "manifest 1.0" in x for x in retries) == 1
    assert sum("after attempt 2: image" in x and "manifest 1.0" in x for x in retries) == 1
    assert all(x.endswith("HTTP 503: UNAVAILABLE: injected 503") for x in retries)
    assert_no_repeated_line(r.stdout)
    assert r.stderr == "", "a retry is progress, not a log line"


def test_a_terminal_gets_rows_redrawn_in_place(registry, store):
    image = f"{registry.host}/team/app:1.0"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi", "pull", image, "--root", store,
             "--insecure-registry", registry.host],
            stdout=secondary, stderr=subprocess.PIPE, env={**clean, "STRATA_CONFIG": "",
                                                           "TERM": "xterm"})
        os.close(secondary)
        secondary = -1
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        err = proc.communicate(timeout=120)[1]
    finally:
        os.close(primary)
        if secondary != -1:
            os.close(secondary)
    out = b"".join(chunks).decode()
    assert proc.returncode == 0, out + err.decode()
    assert "\x1b[2A" in out, "back up over the two rows"
    assert re.search(r": Downloading \d+(\.\d)? (B|KiB|MiB)/\d+(\.\d)? (B|KiB|MiB)", out)
    tail = out.rsplit("\x1b[2A", 1)[1].replace("\r\n", "\n")
    rows, after = tail.rsplit("Pull complete\n", 1)
    assert rows.count("Pull complete") == 1, "both rows complete in the last redraw"
    assert after == (f"Digest: {registry.digests['app']}\n"
                     f"Status: Downloaded newer image for {image}\n{image}\n")


def test_errors_go_to_stderr(registry, store):
    r = strata("pull", f"{registry.host}/team/nope:1", "--root", store,
               "--insecure-registry", registry.host)
    assert r.returncode == 1 and r.stdout == "1: Pulling from team/nope\n"
    assert r.stderr.startswith("strata pull: NOT_FOUND: image ") and "not found" in r.stderr
    bad = strata("pull", "", "--root", store)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "strata pull: error: invalid image reference '': it is empty" in bad.stderr


def test_a_mistyped_root_is_refused_and_nothing_is_created(registry, tmp_path):
    typo = tmp_path / "stor"
    r = strata("pull", f"{registry.host}/team/app:1.0", "--root", str(typo),
               "--insecure-registry", registry.host)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"strata pull: no store at {typo} (--root, STRATA_ROOT or `root` in "
                        f"the config file): start `strata serve --root {typo}` first, or "
                        "check the path\n")
    assert not typo.exists()
