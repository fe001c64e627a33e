"""`strata diff` and `strata ls` as an operator runs them: the real commands, in a child
process, on the store of a real `strata serve` whose pods wrote through real overlays.

What `strata diff` prints is checked against the changes spelled out and against moby's
ChangesDirs (transcribed in test_inspect.py) over the pod's mounted tree and a read-only
publication of the same image: the two trees Docker's naive diff compares.
"""

import json
import os
import subprocess
import sys

import pytest

from csi import compose
from csi.config import Config
from tests.conftest import Mode
from tests.integration.test_inspect import reference, rename_dir

POD = {"csi.storage.k8s.io/pod.name": "writer", "csi.storage.k8s.io/pod.namespace": "team"}

CHANGES = ["C /etc", "C /etc/motd", "A /etc/new.conf", "D /etc/passwd", "D /srv", "A /srv2",
           "A /srv2/index.html", "C /usr", "C /usr/bin", "C /usr/bin/tool"]


def changes_on(backend) -> list[str]:
    """What `strata diff` prints for pod "writer" on `backend`. The same list, but for the
    other name of the hard-linked tool on btrfs: a snapshot is a real filesystem, where a
    chmod changes the inode under both names; overlay (without index=on) copies up the one
    name and breaks the link. Docker's naive diff (`reference`) sees the same on each."""
    return CHANGES + (["C /usr/bin/tool-hard"] if backend.name == "btrfs" else [])


# The tests that read a pod's changes run on every backend (the `served` session server of
# each); the CLI's own behaviour (usage errors, unknown names) on the default one.


def cmd(*args, root: str = "", env=None, check=None):
    argv = [sys.executable, "-m", "csi", *args] + (["--root", root] if root else [])
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if check is not None:
        assert r.returncode == check, r.stderr
    return r


@pytest.fixture
def pod(served, pods, images):
    """Pod "writer" changed its image; pod "idle" on the same image did not; "ro" is a
    read-only view of that image."""
    a, b, ro = pods / "writer", pods / "idle", pods / "ro"
    csi = served.csi
    csi.publish("diff-writer", a, images.app, **POD)
    try:
        csi.publish("diff-idle", b, images.app)
        try:
            csi.publish("diff-ro", ro, images.app, readonly=True)
            try:
                (a / "etc/new.conf").write_text("new\n")
                with open(a / "etc/motd", "a") as f:
                    f.write("appended\n")
                os.chmod(a / "usr/bin/tool", 0o700)
                os.unlink(a / "etc/passwd")
                rename_dir(str(a / "srv"), str(a / "srv2"))
                yield a, b, ro, reference(str(a), str(ro))
            finally:
                csi.unpublish("diff-ro", ro)
        finally:
            csi.unpublish("diff-idle", b)
    finally:
        csi.unpublish("diff-writer", a)


def test_diff_prints_what_docker_diff_prints(backend, served, pod):
    strata = served
    target, idle, ro, expected = pod
    out = cmd("diff", str(target), root=strata.root, check=0).stdout
    assert out.splitlines() == changes_on(backend)
    assert out.splitlines() == [f"{k} {p}" for k, p in expected]
    by_volume = cmd("diff", "diff-writer", root=strata.root, check=0)
    assert by_volume.stdout == out
    assert cmd("diff", str(idle), root=strata.root, check=0).stdout == ""
    r = cmd("diff", str(ro), root=strata.root, check=0)
    assert r.stdout == "" and "read-only" in r.stderr


def test_diff_json(backend, served, pod):
    strata = served
    target, _, _, _ = pod
    changes = json.loads(cmd("diff", "--json", str(target), root=strata.root,
                                check=0).stdout)
    assert changes[:2] == [{"Path": "/etc", "Kind": 0, "Change": "C"},
                           {"Path": "/etc/motd", "Kind": 0, "Change": "C"}]
    assert [f"{c['Change']} {c['Path']}" for c in changes] == changes_on(backend)
    assert {c["Kind"] for c in changes} == {0, 1, 2}
    assert all(set(c) == {"Path", "Kind", "Change"} for c in changes)
    assert all(c["Kind"] == {"C": 0, "A": 1, "D": 2}[c["Change"]] for c in changes)
    r = cmd("diff", "--json", str(pod[2]), root=strata.root, check=0)
    assert json.loads(r.stdout) == []


def test_root_comes_from_strata_root(backend, served, pod):
    env = dict(os.environ, STRATA_ROOT=served.root)
    assert cmd("diff", str(pod[0]), env=env, check=0).stdout.splitlines() == \
        changes_on(backend)


def test_ls_shows_pods_upper_bytes_and_copy_up_counts(served, pod):
    strata = served
    target, idle, ro, _ = pod
    rows = {line.split()[-1]: line.split()
            for line in cmd("ls", root=strata.root, check=0).stdout.splitlines()
            if line.endswith((str(target), str(idle), str(ro)))}
    assert rows[str(target)][:2] == ["team/writer", "diff-writer"]
    parts = compose.reader(Config(root=strata.root))
    try:
        with parts.state.read() as tx:
            pub = tx.publication(str(target))
            chain = tx.image(pub.manifest_digest).layer_ids
        s = parts.backend.summarize(pub.key, chain)
    finally:
        parts.close()
    # append and chmod: two copy-ups (with data, or metadata-only where metacopy is on);
    # /etc/passwd and /srv: two deletions; new.conf, plus srv2 and its file unless
    # redirect_dir made the rename a redirect (overlay; a snapshot has no redirects). The
    # backend's own summary (overlay: its upper against the layers; btrfs: the snapshot
    # against its chain) is what `ls` prints.
    assert (s.copied_up + s.metacopy, s.deleted) == (2, 2)
    assert s.created in (1, 3)
    upper_value, upper_unit = rows[str(target)][2:4]
    assert [upper_unit, *rows[str(target)][4:7]] == [
        upper_unit, str(s.created), str(s.copied_up + s.metacopy), str(s.deleted)]
    assert float(upper_value) > 0
    assert rows[str(idle)][0] == "-" and rows[str(idle)][4:7] == ["0", "0", "0"]
    assert rows[str(ro)][2:6] == ["ro", "-", "-", "-"]


def test_a_volume_published_twice_must_be_named_by_target(served, pods, images):
    strata, csi = served, served.csi
    staging = pods / "staging"
    staging.mkdir()
    a, b = pods / "a", pods / "b"
    csi.stage("diff-pv", staging, images.app)
    try:
        csi.publish("diff-pv", a, staging=staging, mode=Mode.SINGLE_NODE_MULTI_WRITER)
        csi.publish("diff-pv", b, staging=staging, mode=Mode.SINGLE_NODE_MULTI_WRITER)
        (a / "only-a").write_text("a")
        r = cmd("diff", "diff-pv", root=strata.root, check=1)
        assert r.stdout == ""
        assert "published at 2 targets" in r.stderr
        assert str(a) in r.stderr and str(b) in r.stderr
        assert cmd("diff", str(a), root=strata.root, check=0).stdout == "A /only-a\n"
    finally:
        csi.unpublish("diff-pv", a)
        csi.unpublish("diff-pv", b)
        csi.unstage("diff-pv", staging)


def test_unknown_volume_and_target(strata, pods):
    r = cmd("diff", "no-such-volume", root=strata.root, check=1)
    assert r.stdout == "" and "no publication of a volume 'no-such-volume'" in r.stderr
    r = cmd("diff", str(pods / "nowhere"), root=strata.root, check=1)
    assert r.stdout == "" and f"nothing is published at {pods / 'nowhere'}" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_and_usage_errors():
    r = cmd("diff", "--help", check=0)
    assert "TARGET|VOLUME_ID" in r.stdout and "--json" in r.stdout and "--root" in r.stdout
    r = cmd("diff", "--bogus", "x", check=2)
    assert "unrecognized arguments: --bogus" in r.stderr
    r = cmd("diff", check=2)
    assert "the following arguments are required: TARGET|VOLUME_ID" in r.stderr
    r = cmd("diff", "a", "b", check=2)
    assert "unrecognized arguments: b" in r.stderr
