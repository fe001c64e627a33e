"""csi/inspect.py against the kernel: every case writes through a real overlay mount (the
options strata mounts with, and each of redirect_dir, metacopy and index where the kernel
takes them), unmounts, and reads the upper the kernel left.

`diff` is checked twice: against the lines spelled out per case, and against `reference`,
a direct transcription of moby's ChangesDirs (pkg/archive/changes.go, changes_linux.go,
changes_unix.go) run over the two merged trees Docker's naive diff compares: the container's
overlay and a read-only overlay of the image's layers, both mounted.
"""

import contextlib
import dataclasses
import errno
import os
import random
import shutil
import stat

import pytest

from csi.inspect import Summary, diff, summarize
from csi.mount import spec
from csi.mount.syscalls import Mounter
from tests.conftest import ROOT_REASON

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)

# Feature sets: strata's own options (spec.overlay: the module defaults), then each
# option that changes what an upper holds.
FEATURES = {"strata": (), "redirect_dir": ("redirect_dir=on",),
            "metacopy": ("metacopy=on", "redirect_dir=on"), "index": ("index=on",)}


# -- the image: two layers in overlay form, as unpack.py leaves them ------------------------
def write(path, data="x", mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)


def layers(base) -> list[str]:
    bottom, top = os.path.join(base, "l1"), os.path.join(base, "l0")
    for rel, data in {"etc/passwd": "root\n", "etc/motd": "base\n", "usr/bin/su": "su",
                      "var/cache/a": "a", "var/cache/b": "b", "var/cache/c": "c",
                      "data/old/x": "x", "data/old/y": "y", "data/old/sub/z": "z",
                      "opt/file": "f", "srv/keep": "k"}.items():
        write(os.path.join(bottom, rel), data)
    write(os.path.join(bottom, "usr/bin/tool"), "#!/bin/sh\n", mode=0o755)
    write(os.path.join(bottom, "big"), "b" * 70000)
    os.symlink("etc/passwd", os.path.join(bottom, "link"))
    write(os.path.join(top, "etc/motd"), "top\n")
    write(os.path.join(top, "data/old/y2"), "y2")
    os.makedirs(os.path.join(top, "var/cache"))
    os.mknod(os.path.join(top, "var/cache/b"), stat.S_IFCHR, os.makedev(0, 0))
    write(os.path.join(top, "tmp/opq/new"), "n")
    write(os.path.join(bottom, "tmp/opq/hidden"), "h")
    os.setxattr(os.path.join(top, "tmp/opq"), "trusted.overlay.opaque", b"y")
    return [top, bottom]


class Stack:
    """An image's layers, an upper/work pair over them, and the mounts of both trees."""

    def __init__(self, base, options):
        self.base, self.options = str(base), options
        self.lowers = layers(self.base)
        self.upper, self.work = (os.path.join(self.base, d) for d in ("upper", "work"))
        self.merged, self.image = (os.path.join(self.base, d) for d in ("merged", "image"))
        for d in (self.upper, self.work, self.merged, self.image):
            os.makedirs(d)
        self.mounter = Mounter()

    def mount(self):
        m = spec.overlay(self.lowers, self.upper, self.work, self.merged)
        self.mounter.mount(dataclasses.replace(m, options=m.options + self.options))
        self.mounter.mount(spec.Mount("overlay", "overlay", self.image,
                                      (f"lowerdir={':'.join(self.lowers)}", "ro")))

    def unmount(self):
        for target in (self.merged, self.image):
            self.mounter.unmount(target, lazy=False)


def accepted(tmp_path, options) -> bool:
    s = Stack(tmp_path / "probe", options)
    try:
        s.mount()
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    finally:
        s.unmount()
    return True


@pytest.fixture(params=list(FEATURES))
def stack(request, tmp_path):
    options = FEATURES[request.param]
    if not accepted(tmp_path, options):
        pytest.skip(f"this kernel's overlay refuses {options}")
    s = Stack(tmp_path / "case", options)
    s.feature = request.param
    s.mount()
    try:
        yield s
    finally:
        s.unmount()


def run(s: Stack, op):
    """`op` through the mount, then the reference diff of the mounted trees, then unmount:
    what the inspector reads is what the kernel left in the upper."""
    op(s.merged)
    expected = reference(s.merged, s.image)
    s.unmount()
    return expected


# -- moby's ChangesDirs, transcribed ---------------------------------------------------------
@dataclasses.dataclass
class FileInfo:
    path: str
    st: os.stat_result | None = None
    capability: bytes | None = None
    children: dict = dataclasses.field(default_factory=dict)
    added: bool = False

    def is_dir(self):
        return self.st is None or stat.S_ISDIR(self.st.st_mode)


def collect(root: str) -> FileInfo:
    """The whole tree (moby prunes equal inodes of one device: two mounts never share one)."""
    info = FileInfo("/")

    def walk(node, full):
        for name in os.listdir(full):
            p = os.path.join(full, name)
            st = os.lstat(p)
            try:
                cap = os.getxattr(p, "security.capability", follow_symlinks=False)
            except OSError:
                cap = None
            child = node.children[name] = FileInfo(os.path.join(node.path, name), st, cap)
            if stat.S_ISDIR(st.st_mode):
                walk(child, p)

    walk(info, root)
    return info


def same_fs_time(a: int, b: int) -> bool:
    return a == b or (a // 10**9 == b // 10**9 and (a % 10**9 == 0 or b % 10**9 == 0))


def stat_different(old: os.stat_result, new: os.stat_result) -> bool:
    return (old.st_mode != new.st_mode or old.st_uid != new.st_uid
            or old.st_gid != new.st_gid or old.st_rdev != new.st_rdev
            or (not stat.S_ISDIR(old.st_mode)
                and (not same_fs_time(old.st_mtime_ns, new.st_mtime_ns)
                     or old.st_size != new.st_size)))


def add_changes(info: FileInfo, old: FileInfo | None, changes: list):
    size_at_entry = len(changes)
    if old is None:
        changes.append(("A", info.path))
        info.added = True
    old_children = dict(old.children) if old is not None and info.is_dir() else {}
    for name, new_child in info.children.items():
        old_child = old_children.get(name)
        if old_child is not None:
            if (stat_different(old_child.st, new_child.st)
                    or (old_child.capability or b"") != (new_child.capability or b"")):
                changes.append(("C", new_child.path))
                new_child.added = True
            del old_children[name]
        add_changes(new_child, old_child, changes)
    for old_child in old_children.values():
        changes.append(("D", old_child.path))
    if (len(changes) > size_at_entry and info.is_dir() and not info.added
            and info.path != "/"):
        changes.insert(size_at_entry, ("C", info.path))


def reference(container: str, image: str) -> list[tuple[str, str]]:
    changes: list = []
    add_changes(collect(container), collect(image), changes)
    return sorted(changes, key=lambda c: os.fsencode(c[1]))


# -- the cases -------------------------------------------------------------------------------
def append(p, data="more\n"):
    with open(p, "a") as f:
        f.write(data)


def rename_dir(src, dst):
    """What mv(1) does: rename(2), or without redirect_dir (EXDEV) copy and delete."""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copytree(src, dst, symlinks=True)
        shutil.rmtree(src)


def recreate_dir(m):
    shutil.rmtree(f"{m}/var/cache")
    os.mkdir(f"{m}/var/cache")
    write(f"{m}/var/cache/a", "new a")


def replace_file_by_dir(m):
    os.unlink(f"{m}/opt/file")
    os.mkdir(f"{m}/opt/file")
    write(f"{m}/opt/file/inner")


def hardlink(m):
    write(f"{m}/etc/h1", "h" * 5000)
    os.link(f"{m}/etc/h1", f"{m}/etc/h2")


def delete_recreate(m):
    os.unlink(f"{m}/etc/passwd")
    write(f"{m}/etc/passwd", "new\n")


def touch_rw(m):
    os.close(os.open(f"{m}/etc/motd", os.O_RDWR))


def chmod_meta(feature, data_class="copied_up"):
    return "metacopy" if feature == "metacopy" else data_class


RENAMED = ["A /data/new", "A /data/new/sub", "A /data/new/sub/z", "A /data/new/x",
           "A /data/new/y", "A /data/new/y2", "C /data", "D /data/old"]

def many(m):
    """Enough names in one directory that its lower directories are listed, not probed."""
    for i in range(30):
        write(f"{m}/etc/n{i}")
    append(f"{m}/etc/motd")
    os.unlink(f"{m}/etc/passwd")


# name: (operation, diff lines (any order), {feature or "*": Summary fields expected})
CASES = {
    "create file": (lambda m: write(f"{m}/etc/new.conf", "n" * 5000),
                    ["C /etc", "A /etc/new.conf"],
                    {"*": dict(created=1, modified_dirs=1, created_bytes=8192)}),
    "append to lower file": (lambda m: append(f"{m}/etc/motd"), ["C /etc", "C /etc/motd"],
                             {"*": dict(copied_up=1, modified_dirs=1, copied_up_bytes=4096,
                                            copied_up_logical_bytes=9)}),
    "append to big lower file": (lambda m: append(f"{m}/big"), ["C /big"],
                                 {"*": dict(copied_up=1, copied_up_bytes=73728,
                                            copied_up_logical_bytes=70005)}),
    "chmod lower file": (lambda m: os.chmod(f"{m}/usr/bin/tool", 0o700),
                         ["C /usr", "C /usr/bin", "C /usr/bin/tool"],
                         {"metacopy": dict(metacopy=1, modified_dirs=2),
                          "*": dict(copied_up=1, modified_dirs=2, copied_up_bytes=4096)}),
    "chown lower file": (lambda m: os.chown(f"{m}/usr/bin/su", 1000, 1000),
                         ["C /usr", "C /usr/bin", "C /usr/bin/su"],
                         {"metacopy": dict(metacopy=1, modified_dirs=2),
                          "*": dict(copied_up=1, modified_dirs=2)}),
    "chmod lower dir": (lambda m: os.chmod(f"{m}/usr/bin", 0o700), ["C /usr", "C /usr/bin"],
                        {"*": dict(modified_dirs=2)}),
    "delete lower file": (lambda m: os.unlink(f"{m}/etc/passwd"), ["C /etc", "D /etc/passwd"],
                          {"*": dict(deleted=1, modified_dirs=1)}),
    "delete lower dir": (lambda m: shutil.rmtree(f"{m}/data/old"), ["C /data", "D /data/old"],
                         {"*": dict(deleted=1, modified_dirs=1)}),
    "rm -rf dir and mkdir (opaque)": (
        recreate_dir, ["C /var", "C /var/cache", "C /var/cache/a", "D /var/cache/c"],
        {"*": dict(copied_up=1, deleted=1, modified_dirs=2)}),
    "rename lower dir": (
        lambda m: rename_dir(f"{m}/data/old", f"{m}/data/new"), RENAMED,
        {"redirect_dir": dict(renamed=1, deleted=1, modified_dirs=1),
         "metacopy": dict(renamed=1, deleted=1, modified_dirs=1),
         "*": dict(created=6, deleted=1, modified_dirs=1)}),
    "rename lower dir elsewhere": (
        lambda m: rename_dir(f"{m}/data/old", f"{m}/srv/moved"),
        ["C /data", "D /data/old", "C /srv", "A /srv/moved", "A /srv/moved/sub",
         "A /srv/moved/sub/z", "A /srv/moved/x", "A /srv/moved/y", "A /srv/moved/y2"],
        {"redirect_dir": dict(renamed=1, deleted=1, modified_dirs=2),
         "metacopy": dict(renamed=1, deleted=1, modified_dirs=2),
         "*": dict(created=6, deleted=1, modified_dirs=2)}),
    "rename lower file": (
        lambda m: os.rename(f"{m}/etc/motd", f"{m}/etc/motd2"),
        ["C /etc", "D /etc/motd", "A /etc/motd2"],
        {"metacopy": dict(metacopy=1, deleted=1, modified_dirs=1),
         "*": dict(created=1, deleted=1, modified_dirs=1)}),
    "delete then re-create file": (delete_recreate, ["C /etc", "C /etc/passwd"],
                                   {"*": dict(copied_up=1, modified_dirs=1)}),
    "hardlink created in upper": (hardlink, ["C /etc", "A /etc/h1", "A /etc/h2"],
                                  {"*": dict(created=1, modified_dirs=1, created_bytes=8192)}),
    "symlink": (lambda m: os.symlink("/etc/passwd", f"{m}/lnk"), ["A /lnk"],
                {"*": dict(created=1)}),
    "replace lower symlink": (lambda m: (os.unlink(f"{m}/link"), os.symlink("etc/motd",
                                                                            f"{m}/link")),
                              ["C /link"], {"*": dict(copied_up=1)}),
    "file replaced by dir": (replace_file_by_dir, ["C /opt", "C /opt/file", "A /opt/file/inner"],
                             {"*": dict(created=2, deleted=1, modified_dirs=1)}),
    "nested creates under a new dir": (
        lambda m: write(f"{m}/new/a/b/f"), ["A /new", "A /new/a", "A /new/a/b", "A /new/a/b/f"],
        {"*": dict(created=4)}),
    "many changes in one directory": (
        many, ["C /etc", "C /etc/motd", "D /etc/passwd", *(f"A /etc/n{i}" for i in range(30))],
        {"*": dict(created=30, copied_up=1, deleted=1, modified_dirs=1)}),
    "copied up but unchanged": (touch_rw, [], {"*": dict(copied_up=1, modified_dirs=1)}),
    "re-create what the image deleted": (
        lambda m: write(f"{m}/var/cache/b"), ["C /var", "C /var/cache", "A /var/cache/b"],
        {"*": dict(created=1, modified_dirs=2)}),
    "write under a lower opaque dir": (
        lambda m: write(f"{m}/tmp/opq/hidden", "again"),
        ["C /tmp", "C /tmp/opq", "A /tmp/opq/hidden"], {"*": dict(created=1, modified_dirs=2)}),
}


def upper_usage(upper: str) -> tuple[int, int]:
    """(bytes, inodes) of every upper entry, each inode once: the plain definition."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total, len(seen)


@pytest.mark.parametrize("case", list(CASES))
def test_case(stack, case):
    op, lines, summaries = CASES[case]
    expected = run(stack, op)
    got = diff(stack.upper, stack.lowers)
    assert [f"{k} {p}" for k, p in got] == sorted(lines, key=lambda x: x.split(" ", 1)[1])
    assert got == expected, "differs from moby's ChangesDirs over the mounted trees"
    want = summaries.get(stack.feature, summaries["*"])
    s = summarize(stack.upper, stack.lowers)
    upper_bytes, upper_inodes = upper_usage(stack.upper)
    fields = {f.name: 0 for f in dataclasses.fields(Summary)
              if f.name not in ("upper_bytes", "upper_inodes", "copied_up_bytes",
                                "created_bytes", "copied_up_logical_bytes")}
    got_fields = {k: getattr(s, k) for k in fields | want}
    assert got_fields == fields | want
    assert (s.upper_bytes, s.upper_inodes) == (upper_bytes, upper_inodes)


def test_summary_adds_field_by_field():
    a, b = Summary(created=1, upper_bytes=10), Summary(created=2, deleted=1, upper_bytes=5)
    assert a + b == Summary(created=3, deleted=1, upper_bytes=15)


# -- a random sequence of operations, checked against the reference after each batch ------
def random_ops(m: str, rng: random.Random, n: int):
    def entries():
        out = []
        for dirpath, dirnames, filenames in os.walk(m):
            for name in dirnames + filenames:
                out.append(os.path.join(dirpath, name))
        return out

    for i in range(n):
        ps = entries()
        p = rng.choice(ps)
        d = p if os.path.isdir(p) and not os.path.islink(p) else os.path.dirname(p)
        op = rng.choice(["create", "append", "chmod", "chown", "delete", "mkdir", "rename",
                         "link", "symlink", "recreate", "touch", "utime"])
        try:
            if op == "create":
                write(os.path.join(d, f"c{i}"), "c" * rng.randrange(0, 9000))
            elif op == "append" and os.path.isfile(p) and not os.path.islink(p):
                append(p)
            elif op == "chmod" and not os.path.islink(p):
                os.chmod(p, rng.choice([0o700, 0o644, 0o755, 0o4755]))
            elif op == "chown":
                os.chown(p, rng.randrange(3), rng.randrange(3), follow_symlinks=False)
            elif op == "delete":
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
            elif op == "mkdir":
                os.mkdir(os.path.join(d, f"d{i}"))
            elif op == "rename":
                q = os.path.join(rng.choice([x for x in ps if os.path.isdir(x)
                                             and not os.path.islink(x)] + [m]), f"r{i}")
                if not q.startswith(p + "/"):
                    rename_dir(p, q) if os.path.isdir(p) else os.rename(p, q)
            elif op == "link" and os.path.isfile(p) and not os.path.islink(p):
                os.link(p, os.path.join(d, f"h{i}"))
            elif op == "symlink":
                os.symlink(rng.choice(ps)[len(m):], os.path.join(d, f"s{i}"))
            elif op == "recreate" and os.path.isfile(p):
                os.unlink(p)
                write(p, "again")
            elif op == "touch" and os.path.isfile(p) and not os.path.islink(p):
                os.close(os.open(p, os.O_RDWR))
            elif op == "utime" and not os.path.islink(p):
                os.utime(p, ns=(10**18, 10**18))
        except FileNotFoundError:
            pass


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_sequence_matches_reference(stack, seed):
    rng = random.Random(seed)
    expected = run(stack, lambda m: random_ops(m, rng, 120))
    assert len(expected) > 10
    assert diff(stack.upper, stack.lowers) == expected
    s = summarize(stack.upper, stack.lowers)
    assert (s.upper_bytes, s.upper_inodes) == upper_usage(stack.upper)


def test_entries_removed_during_the_walk_are_skipped(tmp_path, monkeypatch):
    """A pod deleting while the metrics thread walks: the walk sees a directory listed but
    gone when it is read, and a name listed but gone when it is stat'ed."""
    import csi.inspect as inspect

    lower = tmp_path / "l"
    write(str(lower / "d/f"))
    upper = tmp_path / "u"
    write(str(upper / "d/g"))
    write(str(upper / "gone/x"))
    real = os.scandir

    def racing(fd):  # the walk lists the upper's directories by descriptor
        if (isinstance(fd, int) and (upper / "gone").exists()
                and os.readlink(f"/proc/self/fd/{fd}") == str(upper / "gone")):
            monkeypatch.setattr(inspect.os, "scandir", real)  # rmtree lists too
            shutil.rmtree(upper / "gone")
            monkeypatch.setattr(inspect.os, "scandir", racing)
        return real(fd)

    monkeypatch.setattr(inspect.os, "scandir", racing)
    assert inspect.diff(str(upper), [str(lower)]) == [("C", "/d"), ("A", "/d/g"), ("A", "/gone")]
    write(str(upper / "gone/x"))
    s = inspect.summarize(str(upper), [str(lower)])
    assert (s.created, s.modified_dirs) == (2, 1)


# -- the walk holds on to the upper: swaps, depth, stop ---------------------------------------
def listing_then(real, act):
    """An os.scandir that lists (and lstats) a directory, then runs `act(fd)` before the walk
    goes on: the pod's change lands between the listing and the descent."""
    acting = []

    def scandir(fd):
        if acting or not isinstance(fd, int):  # rmtree's own listings, the lowers'
            return real(fd)
        with real(fd) as it:
            entries = list(it)
        for e in entries:
            e.stat(follow_symlinks=False)  # the walk's lstat, as it saw it, cached
        acting.append(fd)
        try:
            act(fd)
        finally:
            acting.clear()
        return contextlib.nullcontext(entries)
    return scandir


def test_directories_swapped_during_the_walk_are_not_followed(tmp_path, monkeypatch):
    """A pod replacing a directory it just had listed by a symlink to / (or by another
    directory) must not lead the walk out of its upper."""
    import csi.inspect as inspect

    lower, upper, outside = tmp_path / "l", tmp_path / "u", tmp_path / "host"
    write(str(lower / "keep"))
    write(str(upper / "x/f"))
    write(str(upper / "y/f"))
    write(str(outside / "secret"), "s" * (1 << 20))
    write(str(tmp_path / "other/secret"), "s" * (1 << 20))
    listed = []

    def swap(fd):
        listed.append(os.readlink(f"/proc/self/fd/{fd}"))
        if listed[-1] == str(upper) and (upper / "x").is_dir():
            shutil.rmtree(upper / "x")
            os.symlink(outside, upper / "x")
            shutil.rmtree(upper / "y")
            os.rename(tmp_path / "other", upper / "y")

    def reset():
        for d in ("x", "y"):
            p = upper / d
            os.unlink(p) if p.is_symlink() else shutil.rmtree(p)
            write(str(p / "f"))
        os.makedirs(tmp_path / "other")
        write(str(tmp_path / "other/secret"), "s" * (1 << 20))
        listed.clear()

    monkeypatch.setattr(inspect.os, "scandir", listing_then(os.scandir, swap))
    s = inspect.summarize(str(upper), [str(lower)])
    assert listed == [str(upper)]  # neither x (a symlink now) nor y (another inode) read
    assert (s.created, s.created_bytes) == (2, 0)  # x and y as listed, their contents skipped
    reset()
    assert inspect.diff(str(upper), [str(lower)]) == [("A", "/x"), ("A", "/y")]
    assert listed == [str(upper)]


def remove_chain(path: str):
    """rmtree recurses a level a call (RecursionError past some 1000 levels, here or in
    pytest's clean-up of old temporary directories): lift the chain a level at a time."""
    lifted = path + ".next"
    while os.path.lexists(path):
        for name in os.listdir(path):
            p = os.path.join(path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                os.rename(p, lifted)  # one directory a level in these chains
            else:
                os.unlink(p)
        os.rmdir(path)
        if os.path.lexists(lifted):
            os.rename(lifted, path)


def test_a_tree_deeper_than_path_max_is_counted(tmp_path, monkeypatch):
    """1500 levels (some 6000 bytes of path, past PATH_MAX) with 1 MiB at the bottom: all
    counted, holding a bounded number of descriptors."""
    import csi.inspect as inspect

    lower, upper = tmp_path / "l", tmp_path / "u"
    os.makedirs(lower)
    os.makedirs(upper)
    try:
        fd = os.open(upper, os.O_RDONLY)
        for _ in range(1500):
            os.mkdir("abc", dir_fd=fd)
            fd, parent = os.open("abc", os.O_RDONLY, dir_fd=fd), fd
            os.close(parent)
        with open(os.open("big", os.O_CREAT | os.O_WRONLY, dir_fd=fd), "wb") as f:
            f.write(b"x" * (1 << 20))
        os.close(fd)
        held = []
        with monkeypatch.context() as m:
            m.setattr(inspect.os, "scandir", listing_then(
                os.scandir, lambda fd: held.append(len(os.listdir("/proc/self/fd")))))
            s = summarize(str(upper), [str(lower)])
        assert (s.created, s.upper_inodes) == (1501, 1501)
        assert s.created_bytes >= 1 << 20
        assert max(held) - min(held) <= 100  # _OPEN_DEPTH (64), and a few
        changes = diff(str(upper), [str(lower)])
        assert len(changes) == 1501 and changes[-1] == ("A", "/abc" * 1500 + "/big")
    finally:
        remove_chain(str(upper / "abc"))


def test_a_directory_moved_away_during_the_walk_is_found_again(tmp_path, monkeypatch):
    """Its ancestors beyond _OPEN_DEPTH closed, the walk climbs back through "..": where the
    pod moved a directory meanwhile, ".." is elsewhere and the walk finds its parent again
    by name from the root, then walks what it had left there."""
    import csi.inspect as inspect

    lower, upper = tmp_path / "l", tmp_path / "u"
    os.makedirs(lower)
    chain = "/c" * 100
    os.makedirs(f"{upper}{chain}")
    write(f"{upper}{'/c' * 10}/side/f")
    real = os.scandir

    def move(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == f"{upper}{chain}":
            os.rename(f"{upper}{'/c' * 11}", upper / "moved")

    def side_last(fd):  # walked after the chain, so after the move (the walk pops the end)
        with listing_then(real, move)(fd) as entries:
            return contextlib.nullcontext(sorted(entries, key=lambda e: e.name != "side"))

    monkeypatch.setattr(inspect.os, "scandir", side_last)
    s = inspect.summarize(str(upper), [str(lower)])
    assert s.created == 100 + 2  # the chain's directories, side and side/f


def test_renamed_then_touched_metacopy_is_not_created(tmp_path):
    if not accepted(tmp_path, FEATURES["metacopy"]):
        pytest.skip(f"this kernel's overlay refuses {FEATURES['metacopy']}")
    s = Stack(tmp_path / "case", FEATURES["metacopy"])
    s.mount()
    try:
        for name in ("usr/bin/tool", "big"):  # a one-block file and a 70000-byte one
            os.chmod(f"{s.merged}/{name}", 0o700)  # a metadata-only copy-up
            os.rename(f"{s.merged}/{name}", f"{s.merged}/{name}2")
            os.utime(f"{s.merged}/{name}2")  # its mtime now its ctime, as a new file's
    finally:
        s.unmount()
    got = summarize(s.upper, s.lowers)
    assert (got.metacopy, got.created, got.copied_up) == (2, 0, 0)


def test_stop_ends_the_walk(tmp_path):
    import csi.inspect as inspect

    lower, upper = tmp_path / "l", tmp_path / "u"
    os.makedirs(lower)
    for i in range(1000):
        write(str(upper / f"d{i % 3}/f{i}"))
    asked = []

    def stop():
        asked.append(1)
        return len(asked) == 2

    fds = os.listdir("/proc/self/fd")
    with pytest.raises(inspect.Stopped):
        summarize(str(upper), [str(lower)], stop=stop)
    assert len(asked) == 2  # every 256 entries, of 1003
    assert os.listdir("/proc/self/fd") == fds  # the walk's descriptors closed
    assert summarize(str(upper), [str(lower)], stop=lambda: False) == summarize(
        str(upper), [str(lower)])
