"""csi/releases.py: who holds a busy volume (read from /proc links, never by touching the
files), the reboot rule (a reboot ends every overlay, so nothing needs asking), how a view
without an upper is asked about (its device), and start-up's quiet until settle()."""

import os

from csi.mount.users import device_of
from csi.paths import StorePaths
from csi.releases import Releases, holders
from csi.store.state import State
from tests.unit.test_mount_users import MOUNTINFO
from tests.unit.test_mount_users import fake_proc as fake_users_proc


def fake_proc(root, pids: dict[str, dict]) -> str:
    """A /proc with one directory per pid: `comm`, and cwd/root/fd links to the paths
    given (they need not exist: only the links are read)."""
    proc = os.path.join(root, "proc")
    for pid, p in pids.items():
        base = os.path.join(proc, pid)
        os.makedirs(os.path.join(base, "fd"))
        with open(os.path.join(base, "comm"), "w") as f:
            f.write(p.get("comm", "sh") + "\n")
        os.symlink(p.get("cwd", "/"), os.path.join(base, "cwd"))
        os.symlink("/", os.path.join(base, "root"))
        for i, path in enumerate(p.get("fds", [])):
            os.symlink(path, os.path.join(base, "fd", str(i)))
    os.makedirs(os.path.join(proc, "self-not-a-pid"))
    return proc


def test_holders_by_open_file_or_working_directory(tmp_path):
    proc = fake_proc(str(tmp_path), {
        "10": {"comm": "app", "fds": ["/dev/null", "/pods/p/vol/data/log.txt"]},
        "11": {"comm": "shell", "cwd": "/pods/p/vol"},
        "12": {"comm": "neighbour", "cwd": "/pods/p/volume-2", "fds": ["/pods/p/vol2/x"]},
        "13": {"comm": "idle"},
    })
    assert sorted(holders("/pods/p/vol", proc)) == ["pid 10 (app)", "pid 11 (shell)"]
    assert holders("/pods/p/vol", proc, limit=1) in (["pid 10 (app)"], ["pid 11 (shell)"])
    assert holders("/pods/elsewhere", proc) == []
    assert holders("/pods/p/vol", str(tmp_path / "no-proc")) == []


class Asked:
    """A backend that only records which keys it was asked about (nothing to probe)."""

    def __init__(self):
        self.asked: list[str] = []

    def holder_probe(self, key: str):
        self.asked.append(key)

    def snapshot(self, key: str):
        return None  # an overlay-shaped key: its views are asked about by device


def releases(tmp_path, last: str | None, now: str = "boot-b") -> tuple[Releases, Asked]:
    paths = StorePaths(str(tmp_path / "store")).make()
    if last is not None:
        with open(paths.boot_id, "w") as f:
            f.write(last + "\n")
    current = tmp_path / "boot_id"
    current.write_text(now + "\n")
    backend = Asked()
    return Releases(paths, None, backend, None, boot_id=str(current)), backend


def test_after_a_reboot_nothing_is_held_and_nothing_is_asked(tmp_path):
    r, backend = releases(tmp_path, "boot-a")
    assert r.held("k") is False and backend.asked == []


def test_within_one_boot_or_without_a_record_the_kernel_is_asked(tmp_path):
    for last in ("boot-b", None):
        r, backend = releases(tmp_path / str(last), last)
        assert r.held("k") is False and backend.asked == ["k"], last


# -- views: no upper to ask about, so their device is ----------------------------------
def test_a_view_is_held_while_its_device_shows_in_proc(tmp_path):
    r, backend = releases(tmp_path, None)
    r._proc = fake_users_proc(str(tmp_path / "p"), {
        "10": {"comm": "pause", "ns": "pod", "mountinfo": MOUNTINFO.format(dev="0:4242")}})
    assert r.held("k", "0:4242") is True, "a copy of the view in a pod's namespace"
    assert r.held("k", "0:4243") is False, "nothing shows it: gone"
    assert r.held("k", "") is False, "unknown device: nothing to ask about"


def test_a_one_layer_view_is_held_until_the_next_boot(tmp_path):
    """Its device is the store filesystem's: nothing tells its holders apart."""
    r, _ = releases(tmp_path, None)
    store = device_of(str(tmp_path / "store" / "layers"))
    assert r.held("k", store) is True
    rebooted, _ = releases(tmp_path / "later", "boot-a")
    assert rebooted.held("k", store) is False


# -- start-up: no background sweep before settle() --------------------------------------
class Held:
    """A backend whose keys all have an upper, and a mounter whose kernel says held."""

    def __init__(self):
        self.held = True
        self.features = type("F", (), {"index": True})()

    def holder_probe(self, key):
        return key

    def in_use(self, probe):
        return self.held

    def remove_or_log(self, key):
        pass


def test_start_up_records_releases_without_waking_the_thread_until_settle(tmp_path):
    paths = StorePaths(str(tmp_path / "store")).make()
    (tmp_path / "boot_id").write_text("boot-b\n")
    state = State(paths.state_db)
    fake = Held()
    r = Releases(paths, state, fake, fake, boot_id=str(tmp_path / "boot_id"), starting=True)
    try:
        r.remove_unless_held("k1", "unrecorded publication k1")
        with state.read() as tx:
            assert [x.key for x in tx.releases()] == ["k1"]
        assert r._thread is None, "no sweep (nor GC after one) beside the rest of start-up"
        r.settle()
        assert r._thread is not None, "what is still held is asked about in the background"
        with open(paths.boot_id) as f:
            assert f.read() == "boot-b\n"
    finally:
        r.stop()
        state.close()
