"""Crash safety: a randomized kill -9 loop (tests/crashloop.py) against a real `strata serve`
with GC racing the publishes, and the regressions it found, each pinned by its own test.

`make test` runs a short loop (STRATA_CRASH_ROUNDS, default 120 rounds, within a time budget:
100 s on overlay, 45 s on btrfs); `make crash` runs it at full length. The loop runs on every
backend (tests/conftest.py's BACKENDS); on btrfs without its size-limited pods, which the
backend refuses where quotas are off (tests/integration/test_btrfs_size_limit.py covers them).
STRATA_CRASH_SEED replays a failing run's sequence of calls and kill moments (the kernel's
timing is not replayed, so a rare race may need a few runs); STRATA_CRASH_TALLY names a file
to write the tally to as JSON.
"""

import os
import random
import signal
import subprocess

import pytest

from csi.mount.mountinfo import MountTable
from csi.store.state import State
from tests.conftest import ROOT_REASON, unmount_all_under
from tests.crashloop import SERVER_ARGS, CrashLoop, build_images, write_tally

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

DEFAULT_ROUNDS = 120
# Seconds of rounds in `make test`; a full run sets no budget. The second backend's loop
# is shorter: most of what it finds is the backend-neutral code that overlay's loop runs.
DEFAULT_BUDGET = {"overlay": 100.0, "btrfs": 45.0}


class BtrfsCrashLoop(CrashLoop):
    """The loop on the btrfs backend: no size-limited pods (a qgroup limit needs quotas,
    which the session's btrfs does not enable), and the chain subvolumes checked too:
    each one's layers are recorded (immediate GC deletes the chains of the layers it
    collects, and start-up those of layers gone), none is left in tmp/ half-made, and none
    at all once the node is empty."""

    def __init__(self, base, images, seed, backend):
        super().__init__(base, images, seed)
        self.server = backend.process(base, extra_args=SERVER_ARGS)

    def _new_pod(self, *args, **kw):
        pod = super()._new_pod(*args, **kw)
        pod.size_limit = ""  # the same choices (and seeds) as overlay's, unlimited
        return pod

    def _check_store(self, final: bool) -> list[str]:
        problems = super()._check_store(final)
        st = State(os.path.join(self.root, "state.db"), migrate=False)
        try:
            with st.read() as tx:
                layers = {x.id for x in tx.layers()}
        finally:
            st.close()
        chains = os.path.join(self.root, "chains")
        names = os.listdir(chains) if os.path.isdir(chains) else []
        for name in sorted(n for n in names if n.endswith(".layers")):
            with open(os.path.join(chains, name)) as f:
                lost = set(f.read().split()) - layers
            if lost and os.path.isdir(os.path.join(chains, name[:-len(".layers")])):
                problems.append(f"chain {name[:-len('.layers')]} holds layers {sorted(lost)} "
                                "that are not recorded")
        if final and [n for n in names if not n.endswith(".layers")]:
            problems.append(f"chains left after everything was unpublished: {sorted(names)}")
        return problems


@pytest.fixture(scope="session")
def crash_images(tmp_path_factory):
    """base, base+a, base+a+b, base+c: images that share layers."""
    return build_images(str(tmp_path_factory.mktemp("crash-images")))


def test_kill_9_at_random_moments_leaves_every_pod_intact_and_nothing_behind(
        backend, tmp_path, crash_images):
    rounds = int(os.environ.get("STRATA_CRASH_ROUNDS", DEFAULT_ROUNDS))
    budget = None if "STRATA_CRASH_ROUNDS" in os.environ else DEFAULT_BUDGET[backend.name]
    seed = int(os.environ.get("STRATA_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    loop = CrashLoop(str(tmp_path), crash_images, seed) if backend.name == "overlay" else \
        BtrfsCrashLoop(str(tmp_path), crash_images, seed, backend)

    def progress(tally):
        if tally.rounds % 100 == 0:
            print(f"\n  ... round {tally.rounds}: {tally.calls} calls, {tally.interrupted} "
                  "interrupted", flush=True)

    try:
        tally = loop.run(rounds, budget, progress)
    finally:
        loop.close()
        backend.wipe(loop.root)
    print("\n" + str(tally))
    if os.environ.get("STRATA_CRASH_TALLY"):
        write_tally(tally, os.environ["STRATA_CRASH_TALLY"])
    assert not tally.problems, f"{tally}\nserver log: {loop.server.log}"
    assert tally.rounds >= 1
    assert tally.restarts == tally.rounds + 1 + tally.startup_kills


# -- regressions -----------------------------------------------------------------------------
# `server` (tests/conftest.py): a `strata serve` of the test's own, on each backend.


def test_unpublish_removes_the_empty_target_dir_a_killed_unpublish_left(
        tmp_path, server, images):
    """A kill between forgetting a publication and removing its target dir leaves the dir;
    the kubelet's retry must remove it (csi-driver-host-path's CleanupMountPoint), not
    answer OK around it. Reproduced here by undoing the steps the killed call had done."""
    target = tmp_path / "pod" / "mount"
    target.parent.mkdir()
    server.csi.publish("killed-unpublish", target, images.app)
    server.stop(signal.SIGKILL)
    # What the killed unpublish had done: unmounted, forgotten (its upper is removed at
    # start-up as unrecorded); only the target dir was still to go.
    unmount_all_under(str(target))
    st = State(os.path.join(server.root, "state.db"))
    with st.transaction() as tx:
        tx.forget_publication(str(target), 0)
    st.close()
    server.start()
    server.csi.unpublish("killed-unpublish", target)  # the kubelet's retry
    assert not target.exists()
    assert os.listdir(os.path.join(server.root, "volumes")) == []


@pytest.mark.overlay_only("nothing is published: unpublish's judgement of a target it never "
                          "recorded is volumes.py's, which no backend takes part in")
def test_unpublish_of_an_unrecorded_target_leaves_what_is_not_an_empty_dir(tmp_path, server):
    """Only an empty directory is removed (what a publish killed between making the target
    and mounting it leaves, too, when the kubelet unpublishes instead of retrying): a dir
    with files in it, a file, a symlink, or a mount point that strata did not record are
    someone else's, and the answer is still OK."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "data").write_text("keep me\n")
    afile = tmp_path / "afile"
    afile.write_text("keep me too\n")
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "strata-test", str(mounted)], check=True)
    try:
        assert MountTable().is_mountpoint(str(mounted))
        for path in (full, afile, link, mounted, tmp_path / "absent"):
            server.csi.unpublish("never-published", path)
        assert (full / "data").read_text() == "keep me\n"
        assert afile.read_text() == "keep me too\n"
        assert link.is_symlink() and (tmp_path / "elsewhere").is_dir()
        assert MountTable().is_mountpoint(str(mounted))
    finally:
        unmount_all_under(str(mounted))
    empty = tmp_path / "empty"
    empty.mkdir()
    server.csi.unpublish("never-published", empty)
    assert not empty.exists()
