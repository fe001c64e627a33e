"""csi/mount/users.py: who still uses a device, found in a /proc laid out by the test
(links to real paths, whose devices statx reads; mountinfo and maps as text)."""

import builtins
import os

from csi.mount.users import device_of, find, parse

MOUNTINFO = ("22 27 {dev} / /pods/p/vol ro,relatime - overlay strata:/store ro,lowerdir=a:b\n"
             "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n")


def fake_proc(root, pids: dict[str, dict]) -> str:
    """One directory per pid: `comm`, `ns/mnt` (a link to a file per namespace: one inode
    per namespace, as the kernel's), `mountinfo`, `maps`, and cwd/root/fd links."""
    proc = os.path.join(root, "proc")
    namespaces = os.path.join(root, "namespaces")
    os.makedirs(namespaces, exist_ok=True)
    for pid, p in pids.items():
        base = os.path.join(proc, pid)
        os.makedirs(os.path.join(base, "fd"))
        os.makedirs(os.path.join(base, "ns"))
        ns = os.path.join(namespaces, p.get("ns", "host"))
        open(ns, "a").close()
        os.symlink(ns, os.path.join(base, "ns", "mnt"))
        with open(os.path.join(base, "comm"), "w") as f:
            f.write(p.get("comm", "sh") + "\n")
        with open(os.path.join(base, "mountinfo"), "w") as f:
            f.write(p.get("mountinfo", ""))
        with open(os.path.join(base, "maps"), "w") as f:
            f.write(p.get("maps", ""))
        os.symlink(p.get("cwd", root), os.path.join(base, "cwd"))
        os.symlink(root, os.path.join(base, "root"))
        for i, path in enumerate(p.get("fds", [])):
            os.symlink(path, os.path.join(base, "fd", str(i)))
    os.makedirs(os.path.join(proc, "self-not-a-pid"))
    return proc


def test_parse():
    assert parse("0:55") == (0, 55) and parse("259:3") == (259, 3)
    assert parse("") is None and parse("0") is None and parse("a:b") is None
    assert parse("0:0") is None, "no filesystem's (a deleted subvolume's bind shows it)"


def test_a_mount_in_another_namespace_a_working_directory_a_file_or_a_mapping(tmp_path):
    here = parse(device_of(str(tmp_path)))
    proc_dev = parse(device_of("/proc"))
    assert here and proc_dev and here != proc_dev
    far = (0, 4242)  # no real filesystem: only mountinfo and maps can name it
    pids = {
        "10": {"comm": "pause", "ns": "pod", "mountinfo": MOUNTINFO.format(dev="0:4242")},
        "20": {"comm": "shell", "cwd": "/proc"},
        "30": {"comm": "app", "fds": ["/dev/null", "/proc/self"]},
    }
    proc = fake_proc(str(tmp_path), pids)
    found = find({far, proc_dev}, proc)
    assert found[far] == "a mount at /pods/p/vol in the mount namespace of pid 10 (pause)"
    assert found[proc_dev] in ("pid 20 (shell), its working directory",
                               "pid 30 (app), its open file (fd 1)")
    assert find({(0, 4243)}, proc) == {}
    assert find(set(), proc) == {}
    assert find({far}, str(tmp_path / "no-proc")) == {}


def test_a_mapping_names_its_device_in_hex(tmp_path):
    maps = ("7f00-7f10 r-xp 00000000 00:2d 12 /usr/bin/tool\n"
            "7f10-7f20 rw-p 00000000 00:00 0 \n")
    proc = fake_proc(str(tmp_path), {"7": {"comm": "tool", "maps": maps}})
    assert find({(0, 45)}, proc) == {(0, 45): "pid 7 (tool), its mapping of /usr/bin/tool"}


def test_one_namespace_s_table_is_read_once(tmp_path, monkeypatch):
    """Processes in one mount namespace share its table: one of them is read; a second
    namespace's is read too."""
    pids = {str(pid): {"ns": "pod", "mountinfo": MOUNTINFO.format(dev="0:77")}
            for pid in range(100, 110)}
    pids["200"] = {"ns": "other", "mountinfo": MOUNTINFO.format(dev="0:78")}
    proc = fake_proc(str(tmp_path), pids)
    read = []
    real_open = open

    def counting_open(path, *a, **kw):
        if str(path).endswith("mountinfo"):
            read.append(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting_open)
    found = find({(0, 77), (0, 78), (0, 79)}, proc)
    monkeypatch.undo()
    assert set(found) == {(0, 77), (0, 78)}
    assert len(read) == 2


def test_superblock_exists_finds_a_mounted_filesystem_and_no_unused_number():
    from csi.mount.users import superblock_exists

    st = os.stat("/")
    here = superblock_exists((os.major(st.st_dev), os.minor(st.st_dev)))
    if here is None:  # no ustat(2) on this architecture: nothing else can be asked
        assert superblock_exists((0, 1)) is None
        return
    assert here is True
    assert superblock_exists((4095, 0xFFFFF)) is False  # the largest number ustat carries
    assert superblock_exists((4096, 0)) is None  # beyond its 32 bits: cannot ask
    assert superblock_exists((0, 1 << 20)) is None
