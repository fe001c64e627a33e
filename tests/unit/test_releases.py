"""csi/releases.py: who holds a busy volume (read from /proc links, never by touching the
files), and the reboot rule (a reboot ends every overlay, so nothing needs asking)."""

import os

from csi.paths import StorePaths
from csi.releases import Releases, holders


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
