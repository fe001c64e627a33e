"""The backend conformance suite: what every storage backend promises, tested through the
`csi.backend.Backend` interface alone, in the spirit of containerd's snapshotter test suite.

Each test takes a `harness` (conftest.py): a fresh store, a backend on it, a `Mounter` told
the same kernel features, and `make_layer(builder)`, which unpacks a `LayerBuilder` into
`layers/ID/fs` as the layer store does. A test builds layers, asks the backend for a plan
(`prepare` or `view`), has the mounter carry it out on a target under the test's own
directory, and then looks only at what a pod or start-up could see: the files at the
target, the kernel's mount table, and the backend's own answers (`changes`, `dirs`,
`lowers`, `usage`, `keys`, `recognizer`). Nothing here reads a backend's private layout
but through its flavour (`harness.written(key)`: where the flavour says a key's writes
can be read); one test puts a mount inside `paths.volume(key)`, the directory the store
gives each key. The layers a write must not change are the layer store's own directories
(`harness.layer_dirs`), and what a backend made of them.

Adding a backend: write it against csi/backend/__init__.py and add one `Flavour` to
FLAVOURS in conftest.py (its class, and which kernel features to show it). Every test here
then runs against it; a test it fails is a promise it breaks.

Vocabulary: a *chain* is a list of layer IDs, base first; the *nearest* layer is the last
one. `kind` is "prepare" (a writable view) or "view" (a read-only one).
"""

import contextlib
import errno
import hashlib
import os
import stat

import pytest

from csi.backend import Usage
from csi.image.build import LayerBuilder
from csi.mount import spec, users
from csi.mount.mountinfo import MountInfo, MountTable
from csi.mount.spec import Mount
from tests.conftest import needs_root

pytestmark = needs_root

KiB, MiB = 1 << 10, 1 << 20
DEEP = 200  # a chain deeper than a page of absolute lowerdirs (about 90 of them)
MISSING = "feedfacefeedface"  # a layer ID the store does not have


# -- layers ----------------------------------------------------------------------------------
def base_layer() -> LayerBuilder:
    return (LayerBuilder()
            .dir("etc").file("etc/motd", "base motd\n").file("etc/base-only", "base\n")
            .file("etc/gone", "deleted by the top layer\n")
            .dir("var").dir("var/cache")
            .file("var/cache/old1", "old 1\n").file("var/cache/old2", "old 2\n"))


def mid_layer() -> LayerBuilder:
    return LayerBuilder().dir("etc").file("etc/motd", "mid motd\n").file("etc/mid-only", "mid\n")


def top_layer() -> LayerBuilder:
    return (LayerBuilder()
            .dir("etc").file("etc/motd", "top motd\n").whiteout("etc/gone")
            .file("top-only", "top\n")
            .dir("var").dir("var/cache").opaque("var/cache").file("var/cache/new", "new\n"))


def metadata_layer() -> LayerBuilder:
    return (LayerBuilder()
            .dir("srv", mode=0o2775, gid=50)
            .dir("scratch", mode=0o1777)
            .file("srv/app", "app\n", mode=0o750, uid=1000, gid=1001)
            .file("srv/su", "setuid\n", mode=0o4755)
            .file("srv/sg", "setgid\n", mode=0o2711, gid=50)
            .symlink("srv/link", "app", uid=1000, gid=1001)
            .symlink("srv/abs-link", "/etc/motd")
            .symlink("srv/dangling", "../nowhere")
            .hardlink("srv/app-hard", "srv/app")
            .file("srv/tagged", "x\n", xattrs={"user.strata": "hello", "user.other": "2"}))


def deep_layer(i: int) -> LayerBuilder:
    return LayerBuilder().file(f"f{i:03d}", f"{i}\n").file("clash", f"{i}\n")


@pytest.fixture
def image(harness) -> list[str]:
    """Three layers: base, mid, top (nearest)."""
    return [harness.make_layer(b) for b in (base_layer(), mid_layer(), top_layer())]


@pytest.fixture
def meta(harness) -> list[str]:
    """The metadata layer under a second one that leaves its files alone."""
    return [harness.make_layer(metadata_layer()),
            harness.make_layer(LayerBuilder().file("top", "top\n"))]


@pytest.fixture
def deep(harness) -> list[str]:
    return [harness.make_layer(deep_layer(i)) for i in range(DEEP)]


@pytest.fixture(params=["prepare", "view"])
def kind(request) -> str:
    return request.param


# -- helpers ---------------------------------------------------------------------------------
def plan(h, kind: str, key: str, chain: list[str]) -> Mount:
    """`prepare` or `view` of `chain` under `key`, at a fresh target named after the key."""
    return getattr(h.backend, kind)(key, chain, h.target(key))


def read(*parts) -> str:
    with open(os.path.join(*parts)) as f:
        return f.read()


def write(path: str, data: bytes | str, mode: str = "w") -> None:
    with open(path, mode + ("b" if isinstance(data, bytes) else "")) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fingerprint(dirs: list[str]) -> dict:
    """Everything about the trees under `dirs` that a write through a view must not change:
    each entry's type, mode, owner, size, times (but atime), contents and xattrs."""
    out = {}
    for top in dirs:
        for dirpath, dirnames, filenames in os.walk(top):
            for path in [dirpath] + [os.path.join(dirpath, n) for n in filenames + dirnames]:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        body = hashlib.sha256(f.read()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    body = os.readlink(path)
                else:
                    body = ""
                xattrs = {n: os.getxattr(path, n, follow_symlinks=False)
                          for n in os.listxattr(path, follow_symlinks=False)}
                out[path] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_rdev,
                             st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns, body,
                             xattrs)
    return out


def is_whiteout(path: str) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def erofs(fn, *args) -> None:
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == errno.EROFS, e.value


def mounts_at(targets: list[str]) -> tuple[list[MountInfo], dict[str, MountInfo]]:
    """One reading of the mount table, and the (top) mount at each of `targets`."""
    mounts = MountTable().mounts()
    at = {m.mount_point: m for m in mounts}
    return mounts, {t: at[os.path.realpath(t)] for t in targets}


def lowerdirs(p: Mount) -> list[str]:
    return [d for o in p.options if o.startswith("lowerdir=")
            for d in o[len("lowerdir="):].split(":")]


# -- a writable view -------------------------------------------------------------------------
def test_lowers_are_the_layer_directories_nearest_first(harness, image):
    lowers = harness.backend.lowers(image)
    if harness.backend.shared_by == "chain":  # one directory holds the whole chain
        assert len(lowers) == 1
        with harness.mounted(harness.backend.view("v", image, harness.target("v"))):
            assert os.path.isfile(os.path.join(lowers[0], "top-only"))
            assert os.path.isfile(os.path.join(lowers[0], "etc/mid-only"))
            assert os.path.isfile(os.path.join(lowers[0], "etc/base-only"))
        return
    assert len(lowers) == 3
    assert os.path.isfile(os.path.join(lowers[0], "top-only"))
    assert os.path.isfile(os.path.join(lowers[1], "etc/mid-only"))
    assert os.path.isfile(os.path.join(lowers[2], "etc/base-only"))


def test_files_of_every_layer_are_visible(harness, image, kind):
    with harness.mounted(plan(harness, kind, "k", image)) as t:
        assert read(t, "etc/base-only") == "base\n"
        assert read(t, "etc/mid-only") == "mid\n"
        assert read(t, "top-only") == "top\n"


def test_the_nearest_layer_wins_a_name_clash(harness, image, kind):
    with harness.mounted(plan(harness, kind, "k", image)) as t:
        assert read(t, "etc/motd") == "top motd\n"


def untouched_dirs(harness, chain: list[str]) -> list[str]:
    """`harness.layer_dirs(chain)` once the backend has made its own of them (a btrfs
    chain is made at the first view or prepare): all of them are fingerprinted, and the
    whole fingerprint compared after, so a directory made later cannot escape it."""
    harness.backend.view("warm-up", chain, harness.target("warm-up"))  # a plan: mounts nothing
    return harness.layer_dirs(chain)


def test_writes_land_in_the_upper_and_never_in_a_layer(harness, image):
    dirs = untouched_dirs(harness, image)
    before = fingerprint(dirs)
    assert len(dirs) > len(image) or harness.backend.name == "overlay"
    with harness.mounted(harness.backend.prepare("k", image, harness.target("t"))) as t:
        write(os.path.join(t, "etc/new"), "new\n")
        write(os.path.join(t, "etc/motd"), "appended\n", mode="a")  # a copy-up
        os.mkdir(os.path.join(t, "newdir"))
        assert read(t, "etc/motd") == "top motd\nappended\n"
    upper = harness.written("k")
    assert read(upper, "etc/new") == "new\n"
    assert read(upper, "etc/motd") == "top motd\nappended\n"
    assert os.path.isdir(os.path.join(upper, "newdir"))
    assert harness.backend.changes("k", image) == [
        ("C", "/etc"), ("C", "/etc/motd"), ("A", "/etc/new"), ("A", "/newdir")]
    assert harness.layer_dirs(image) == dirs
    assert fingerprint(dirs) == before


def test_two_keys_over_one_chain_are_isolated(harness, image):
    a = harness.backend.prepare("a", image, harness.target("a"))
    b = harness.backend.prepare("b", image, harness.target("b"))
    with harness.mounted(a) as ta, harness.mounted(b) as tb:
        write(os.path.join(ta, "etc/new"), "only in a\n")
        write(os.path.join(ta, "etc/motd"), "changed by a\n")
        os.unlink(os.path.join(ta, "etc/base-only"))
        os.rename(os.path.join(ta, "etc/mid-only"), os.path.join(ta, "etc/renamed"))
        assert sorted(os.listdir(os.path.join(ta, "etc"))) == ["motd", "new", "renamed"]

        assert sorted(os.listdir(os.path.join(tb, "etc"))) == ["base-only", "mid-only", "motd"]
        assert read(tb, "etc/motd") == "top motd\n"
        assert read(tb, "etc/base-only") == "base\n"
        assert read(tb, "etc/mid-only") == "mid\n"
    assert harness.written("a") != harness.written("b")


# -- whiteouts and opaque directories --------------------------------------------------------
def test_a_layer_whiteout_hides_the_lower_file(harness, image, kind):
    with harness.mounted(plan(harness, kind, "k", image)) as t:
        assert not os.path.lexists(os.path.join(t, "etc/gone"))
        assert "gone" not in os.listdir(os.path.join(t, "etc"))


def test_deleting_a_lower_file_leaves_a_whiteout_in_the_upper(harness, image):
    base = harness.paths.layer_fs(image[0])
    with harness.mounted(harness.backend.prepare("k", image, harness.target("t"))) as t:
        os.unlink(os.path.join(t, "etc/base-only"))
        assert not os.path.lexists(os.path.join(t, "etc/base-only"))
    if harness.backend.dirs("k") is not None:  # an upper: the deletion is a whiteout there
        assert is_whiteout(os.path.join(harness.backend.dirs("k").upper, "etc/base-only"))
    assert ("D", "/etc/base-only") in harness.backend.changes("k", image)
    assert read(base, "etc/base-only") == "base\n"


def test_an_opaque_directory_hides_lower_entries_and_shows_its_own(harness, image, kind):
    with harness.mounted(plan(harness, kind, "k", image)) as t:
        assert os.listdir(os.path.join(t, "var/cache")) == ["new"]
        assert read(t, "var/cache/new") == "new\n"


# -- metadata --------------------------------------------------------------------------------
def owner_mode(path: str) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_owners_and_modes_are_the_layers(harness, meta, kind):
    with harness.mounted(plan(harness, kind, "k", meta)) as t:
        assert owner_mode(os.path.join(t, "srv")) == (0, 50, 0o2775)
        assert owner_mode(os.path.join(t, "scratch")) == (0, 0, 0o1777)
        assert owner_mode(os.path.join(t, "srv/app")) == (1000, 1001, 0o750)
        assert owner_mode(os.path.join(t, "srv/su")) == (0, 0, 0o4755)
        assert owner_mode(os.path.join(t, "srv/sg")) == (0, 50, 0o2711)


def test_symlinks_are_the_layers(harness, meta, kind):
    with harness.mounted(plan(harness, kind, "k", meta)) as t:
        assert os.readlink(os.path.join(t, "srv/link")) == "app"
        assert os.readlink(os.path.join(t, "srv/abs-link")) == "/etc/motd"
        assert os.readlink(os.path.join(t, "srv/dangling")) == "../nowhere"
        assert os.lstat(os.path.join(t, "srv/link")).st_uid == 1000
        assert read(t, "srv/link") == "app\n"


def test_hardlinks_within_a_layer_share_an_inode(harness, meta, kind):
    with harness.mounted(plan(harness, kind, "k", meta)) as t:
        app, hard = os.lstat(os.path.join(t, "srv/app")), os.lstat(os.path.join(t, "srv/app-hard"))
        assert hard.st_ino == app.st_ino and hard.st_dev == app.st_dev
        assert read(t, "srv/app-hard") == "app\n"


def test_user_xattrs_are_the_layers(harness, meta, kind):
    with harness.mounted(plan(harness, kind, "k", meta)) as t:
        path = os.path.join(t, "srv/tagged")
        assert {n for n in os.listxattr(path) if n.startswith("user.")} == {
            "user.strata", "user.other"}
        assert os.getxattr(path, "user.strata") == b"hello"
        assert os.getxattr(path, "user.other") == b"2"


def test_the_root_takes_the_owner_and_mode_of_the_chain_s_root(harness, meta, kind):
    # Layers from the store all have a 0755 root:root root; make the nearest one differ
    # from that and from the base's, as a layer a future store unpacked could.
    nearest = harness.paths.layer_fs(meta[-1])
    os.chown(nearest, 1234, 4321)
    os.chmod(nearest, 0o751)
    with harness.mounted(plan(harness, kind, "k", meta)) as t:
        assert owner_mode(t) == (1234, 4321, 0o751)


# -- read-only views -------------------------------------------------------------------------
def ro_chain(h, depth: int) -> list[str]:
    return [h.make_layer(b) for b in (base_layer(), mid_layer(), top_layer())[:depth]]


MOTD = {1: "base motd\n", 3: "top motd\n"}


@pytest.mark.parametrize("depth", [1, 3])
def test_a_read_only_view_shows_the_chain(harness, depth):
    with harness.mounted(harness.backend.view("v", ro_chain(harness, depth),
                                              harness.target("t"))) as t:
        assert read(t, "etc/motd") == MOTD[depth]
        assert read(t, "etc/base-only") == "base\n"
        assert os.path.exists(os.path.join(t, "etc/gone")) == (depth == 1)


@pytest.mark.parametrize("depth", [1, 3])
def test_a_read_only_view_refuses_writes(harness, depth):
    chain = ro_chain(harness, depth)
    dirs = untouched_dirs(harness, chain)
    before = fingerprint(dirs)
    with harness.mounted(harness.backend.view("v", chain, harness.target("t"))) as t:
        erofs(write, os.path.join(t, "new"), "x")
        erofs(write, os.path.join(t, "etc/motd"), "x", "a")
        erofs(os.unlink, os.path.join(t, "etc/base-only"))
        erofs(os.mkdir, os.path.join(t, "d"))
        erofs(os.chmod, os.path.join(t, "etc/motd"), 0o600)
        erofs(os.rename, os.path.join(t, "etc/motd"), os.path.join(t, "etc/moved"))
        assert read(t, "etc/motd") == MOTD[depth]
    assert harness.layer_dirs(chain) == dirs
    assert fingerprint(dirs) == before


@pytest.mark.parametrize("depth", [1, 3])
def test_a_read_only_view_has_no_dirs(harness, depth):
    p = harness.backend.view("v", ro_chain(harness, depth), harness.target("t"))
    assert harness.backend.dirs("v") is None
    with harness.mounted(p):
        assert harness.backend.dirs("v") is None


@pytest.mark.parametrize("depth", [1, 3])
def test_removing_a_read_only_view_leaves_nothing(harness, depth):
    p = harness.backend.view("v", ro_chain(harness, depth), harness.target("t"))
    with harness.mounted(p):
        pass
    harness.backend.remove("v")
    assert "v" not in harness.backend.keys()
    assert harness.backend.usage("v") == Usage(0, 0)


# -- odd chains ------------------------------------------------------------------------------
def test_a_layer_listed_twice_counts_at_its_topmost_place(harness, kind):
    a = harness.make_layer(LayerBuilder().file("clash", "a\n").file("a-only", "a\n"))
    b = harness.make_layer(LayerBuilder().file("clash", "b\n").file("b-only", "b\n"))
    with harness.mounted(plan(harness, kind, "k", [a, b, a])) as t:
        assert read(t, "clash") == "a\n"
        assert read(t, "a-only") == "a\n"
        assert read(t, "b-only") == "b\n"


def test_one_layer_listed_twice_is_a_one_layer_chain(harness, kind):
    a = harness.make_layer(base_layer())
    with harness.mounted(plan(harness, kind, "k", [a, a])) as t:
        assert read(t, "etc/motd") == "base motd\n"


def test_prepare_over_a_one_layer_chain(harness):
    chain = [harness.make_layer(base_layer())]
    with harness.mounted(harness.backend.prepare("k", chain, harness.target("t"))) as t:
        assert read(t, "etc/motd") == "base motd\n"
        write(os.path.join(t, "etc/motd"), "mine\n")
        write(os.path.join(t, "new"), "new\n")
    upper = harness.written("k")
    assert read(upper, "etc/motd") == "mine\n"
    assert read(upper, "new") == "new\n"
    assert read(harness.backend.lowers(chain)[0], "etc/motd") == "base motd\n"
    assert read(harness.paths.layer_fs(chain[0]), "etc/motd") == "base motd\n"


# -- remove ----------------------------------------------------------------------------------
def test_remove_deletes_the_key_s_state(harness, image):
    with harness.mounted(harness.backend.prepare("k", image, harness.target("t"))) as t:
        write(os.path.join(t, "new"), os.urandom(64 * KiB))
    assert "k" in harness.backend.keys()
    harness.backend.remove("k")
    assert "k" not in harness.backend.keys()
    assert harness.backend.dirs("k") is None
    assert harness.backend.usage("k") == Usage(0, 0)


def test_removing_an_unknown_key_is_fine(harness):
    harness.backend.remove("never-prepared")
    assert harness.backend.keys() == set()


def test_removing_twice_is_fine(harness, image):
    harness.backend.prepare("k", image, harness.target("t"))
    harness.backend.remove("k")
    harness.backend.remove("k")
    assert "k" not in harness.backend.keys()


def test_remove_refuses_a_key_with_a_mount_inside(harness, image):
    harness.backend.prepare("k", image, harness.target("t"))
    precious = os.path.join(harness.base, "precious")
    os.mkdir(precious)
    write(os.path.join(precious, "keep"), "not the backend's\n")
    inside = os.path.join(harness.paths.volume("k"), "held")
    os.mkdir(inside)
    harness.mounter.mount(Mount(type="bind", source=precious, target=inside, options=("bind",)))
    try:
        with pytest.raises(OSError):
            harness.backend.remove("k")
        assert read(inside, "keep") == "not the backend's\n"
    finally:
        harness.mounter.unmount(inside)
    assert read(precious, "keep") == "not the backend's\n"
    harness.backend.remove("k")  # with the mount gone, it goes
    assert "k" not in harness.backend.keys()


# -- usage -----------------------------------------------------------------------------------
def test_usage_grows_by_what_was_written(harness, image):
    with harness.mounted(harness.backend.prepare("k", image, harness.target("t"))) as t:
        before = harness.backend.usage("k")
        write(os.path.join(t, "blob"), os.urandom(MiB))
        after = harness.backend.usage("k")
    assert MiB <= after.bytes - before.bytes <= MiB + 64 * KiB


def test_usage_counts_the_files_created(harness, image):
    with harness.mounted(harness.backend.prepare("k", image, harness.target("t"))) as t:
        before = harness.backend.usage("k")
        for name in ("a", "b", "c"):
            write(os.path.join(t, name), name)
        after = harness.backend.usage("k")
    assert after.inodes - before.inodes == 3


@pytest.mark.parametrize("depth", [1, 3])
def test_usage_of_a_read_only_view_is_small(harness, depth):
    p = harness.backend.view("v", ro_chain(harness, depth), harness.target("t"))
    with harness.mounted(p):
        used = harness.backend.usage("v")
    assert used.bytes <= 64 * KiB and used.inodes <= 16


def test_usage_of_an_unknown_key_is_zero(harness):
    assert harness.backend.usage("never-prepared") == Usage(0, 0)


# -- size limits -----------------------------------------------------------------------------
def test_a_size_limited_view_holds_no_more_than_its_limit(harness, image):
    """Every backend bounds a writable view it is given a limit for, whatever the store's
    filesystem offers (overlay: a loop filesystem or a project quota; btrfs: a qgroup
    limit, or without quotas a loop filesystem under an overlay): a write past it fails as
    on a full disk, and `space` shows the limit as the total."""
    limit = 8 * MiB
    written = 0
    with harness.mounted(harness.backend.prepare("lim", image, harness.target("t"),
                                                 limit)) as t:
        with pytest.raises(OSError) as e:
            with open(os.path.join(t, "fill"), "wb") as f:
                for _ in range(4 * limit // MiB):
                    f.write(os.urandom(MiB))
                    f.flush()
                    os.fsync(f.fileno())
                    written += MiB
        assert e.value.errno in (errno.ENOSPC, errno.EDQUOT), e.value
        assert written <= limit
        space = harness.backend.space("lim")
        assert space is not None and space.bytes_total == limit
        assert read(t, "etc/motd") == "top motd\n", "the image is still there to read"
    harness.backend.remove("lim")
    assert "lim" not in harness.backend.keys()


# -- a view that outlives its mount ------------------------------------------------------------
def held(harness, key: str, device: str = "") -> bool:
    """What releases.py asks: the backend's probe where it has one, else whether anything
    in /proc still uses the view's device (`device`, read while it was mounted)."""
    probe = harness.backend.holder_probe(key)
    if probe is not None:
        return harness.mounter.in_use(probe)
    dev = users.parse(device)
    return dev is not None and dev in users.find({dev})


def test_a_writable_view_is_held_until_its_last_holder_lets_go(harness, image):
    """Detached lazily while a file in it is open, a writable view lives on and writes to
    the key's state; the kernel says so until the file is closed, and changes nothing by
    saying it. A backend without a probe (a snapshot: no upper for overlayfs to mark) is
    asked by the view's own device number, which a subvolume has."""
    t = harness.target("t")
    assert not held(harness, "k") and harness.backend.holder_probe("k") is None
    harness.mounter.mount(harness.backend.prepare("k", image, t))
    device = users.device_of(t)
    if harness.backend.holder_probe("k") is not None:
        assert held(harness, "k"), "mounted is held"
    else:  # the device of a view is asked about only once it left the mount table
        assert device != users.device_of(harness.paths.layers), "a device of its own"
    f = open(os.path.join(t, "open"), "w")
    try:
        harness.mounter.detach(t)
        assert held(harness, "k", device), "detached, with a file open"
        f.write("written after the detach\n")
        f.flush()
        assert "open" in os.listdir(harness.written("k"))
    finally:
        f.close()
    assert not held(harness, "k", device)
    assert not held(harness, "k", device), "asking is repeatable: it left nothing behind"
    harness.backend.remove("k")
    assert "k" not in harness.backend.keys()


@pytest.mark.parametrize("depth", [1, 3])
def test_a_read_only_view_has_nothing_to_hold(harness, depth):
    with harness.mounted(harness.backend.view("v", ro_chain(harness, depth),
                                              harness.target("t"))):
        assert harness.backend.holder_probe("v") is None


# -- keys ------------------------------------------------------------------------------------
def test_keys_are_exactly_those_with_state(harness, image):
    assert harness.backend.keys() == set()
    harness.backend.prepare("k1", image, harness.target("k1"))
    harness.backend.prepare("k2", image, harness.target("k2"))
    harness.backend.view("v1", image[:1], harness.target("v1"))
    harness.backend.view("v3", image, harness.target("v3"))
    listed = harness.backend.keys()
    assert {"k1", "k2"} <= listed <= {"k1", "k2", "v1", "v3"}
    harness.backend.remove("k1")
    harness.backend.remove("v3")
    assert {"k2"} <= harness.backend.keys() <= {"k2", "v1"}


def test_a_new_instance_answers_alike(harness, image):
    """Backends keep no state but the disk: a restart changes no answer."""
    with harness.mounted(harness.backend.prepare("k", image, harness.target("t"))) as t:
        write(os.path.join(t, "new"), os.urandom(8 * KiB))
    again = harness.restarted()
    assert again.keys() == harness.backend.keys() == {"k"}
    assert again.dirs("k") == harness.backend.dirs("k")
    assert again.usage("k") == harness.backend.usage("k")
    assert again.lowers(image) == harness.backend.lowers(image)
    again.remove("k")
    assert harness.backend.keys() == set()


# -- recognition after a restart -------------------------------------------------------------
def own_plans(h, chain: list[str], deep: list[str] | None = None) -> list[Mount]:
    """Every kind of view `h`'s backend makes: writable, read-only of several layers and of
    one, and (with `deep`) both over a deep chain."""
    plans = [h.backend.prepare("rw", chain, h.target("rw")),
             h.backend.view("ro", chain, h.target("ro")),
             h.backend.view("ro1", chain[:1], h.target("ro1"))]
    if deep:
        plans += [h.backend.prepare("deep-rw", deep, h.target("deep-rw")),
                  h.backend.view("deep-ro", deep, h.target("deep-ro"))]
    return plans


def foreign_plans(h, chain: list[str]) -> dict[str, Mount]:
    """Mounts on the same node that `h`'s backend did not make."""
    foreign = os.path.join(h.base, "foreign")
    for d in ("l1", "l2", "u", "w", "u2", "w2", "other"):
        os.makedirs(os.path.join(foreign, d))
    return {
        "tmpfs": Mount(type="tmpfs", source="tmpfs", target=h.target("tmpfs")),
        "overlay": spec.overlay([os.path.join(foreign, "l2"), os.path.join(foreign, "l1")],
                                os.path.join(foreign, "u"), os.path.join(foreign, "w"),
                                h.target("overlay")),
        "bind": Mount(type="bind", source=os.path.join(foreign, "other"),
                      target=h.target("bind"), options=("bind",)),
        # Someone else's overlays that stack one of our layers among their own.
        "overlay-over-our-layer": spec.overlay(
            [os.path.join(foreign, "l1"), h.backend.lowers(chain)[-1]],
            os.path.join(foreign, "u2"), os.path.join(foreign, "w2"),
            h.target("overlay-over-our-layer")),
        "view-over-our-layer": spec.view([h.backend.lowers(chain)[0],
                                          os.path.join(foreign, "l2")],
                                         h.target("view-over-our-layer")),
        # A kubelet subPath of a one-layer view: a bind of a directory inside a layer.
        "subpath": Mount(type="bind", source=os.path.join(h.backend.lowers(chain)[-1], "etc"),
                         target=h.target("subpath"), options=("rbind", "ro")),
    }


def mount_all(stack: contextlib.ExitStack, h, plans) -> list[str]:
    """Mount every plan, each unmounted when `stack` closes; returns their targets."""
    return [stack.enter_context(h.mounted(p)) for p in plans]


def test_recognizer_knows_this_store_s_mounts_after_a_restart(harness, image, deep):
    with contextlib.ExitStack() as stack:
        targets = mount_all(stack, harness, own_plans(harness, image, deep))
        mounts, at = mounts_at(targets)
        mine = harness.restarted().recognizer(mounts)
        assert {t: mine(at[t]) for t in targets} == dict.fromkeys(targets, True)


def test_recognizer_refuses_mounts_it_did_not_make(harness, image):
    foreign = foreign_plans(harness, image)
    with contextlib.ExitStack() as stack:
        mount_all(stack, harness, own_plans(harness, image))  # ours, to be mistaken for
        mount_all(stack, harness, foreign.values())
        mounts, at = mounts_at([p.target for p in foreign.values()])
        mine = harness.restarted().recognizer(mounts)
        assert {name: mine(at[p.target]) for name, p in foreign.items()} == dict.fromkeys(
            foreign, False)


def test_recognizers_of_two_stores_tell_their_mounts_apart(make_harness):
    # b's root has a space: mountinfo escapes it (\040) in every field a recognizer reads.
    a, b = make_harness("a"), make_harness("store b")
    # The same builders in the same order: both stores hold layers of the same IDs.
    chain_a = [a.make_layer(base_layer()), a.make_layer(top_layer())]
    chain_b = [b.make_layer(base_layer()), b.make_layer(top_layer())]
    assert chain_a == chain_b
    with contextlib.ExitStack() as stack:
        ta = mount_all(stack, a, own_plans(a, chain_a))
        tb = mount_all(stack, b, own_plans(b, chain_b))
        mounts, at = mounts_at(ta + tb)
        mine_a, mine_b = a.restarted().recognizer(mounts), b.restarted().recognizer(mounts)
        assert {t: (mine_a(at[t]), mine_b(at[t])) for t in ta + tb} == {
            **dict.fromkeys(ta, (True, False)), **dict.fromkeys(tb, (False, True))}


# -- deep chains -----------------------------------------------------------------------------
def check_deep_plan(h, p: Mount) -> None:
    """The executor can carry out `p` on this kernel: with lowerdir+, a deep overlay needs
    no fallback (absolute lowerdirs, no cwd); without it, it must be made to fit one page
    (short lowerdirs relative to the plan's cwd). Any other plan must fit as it is."""
    if p.type != "overlay":
        assert spec.fits(p, h.features.page_size)
    elif h.features.lowerdir_plus:
        assert not p.cwd
        assert all(os.path.isabs(d) for d in lowerdirs(p))
    else:
        assert p.cwd and os.path.isabs(p.cwd)
        assert spec.fits(p, h.features.page_size)
        assert not any(os.path.isabs(d) for d in lowerdirs(p))


def test_a_200_layer_chain_mounts_with_every_layer(harness, deep, kind):
    p = plan(harness, kind, "k", deep)
    check_deep_plan(harness, p)
    with harness.mounted(p) as t:
        names = sorted(os.listdir(t))
        assert names == ["clash"] + [f"f{i:03d}" for i in range(DEEP)]
        assert all(read(t, f"f{i:03d}") == f"{i}\n" for i in range(DEEP))
        assert read(t, "clash") == f"{DEEP - 1}\n"
        if kind == "prepare":
            write(os.path.join(t, "clash"), "mine\n")
            assert read(harness.written("k"), "clash") == "mine\n"
        else:
            assert harness.backend.dirs("k") is None
            erofs(write, os.path.join(t, "clash"), "mine\n")
    harness.backend.remove("k")
    assert "k" not in harness.backend.keys()


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["nearest", "base"])
def test_a_missing_layer_is_refused_and_leaves_no_state(harness, kind, where):
    """A chain naming a layer the store does not have is refused by prepare/view itself
    (not left for mount(2) to fail on), and the refusal leaves no state: keys() is as
    before without any remove()."""
    present = harness.make_layer(base_layer())
    chain = [present, MISSING] if where == "nearest" else [MISSING, present]
    with pytest.raises((OSError, ValueError)):
        plan(harness, kind, "k", chain)
    assert harness.backend.keys() == set()


def test_an_empty_chain_is_refused(harness, kind):
    with pytest.raises(ValueError):
        plan(harness, kind, "k", [])
    assert harness.backend.keys() == set()


def test_prepare_of_a_key_in_use_is_refused(harness, image):
    """Keys are the caller's and unique; a repeated one must not clobber the first's writes."""
    with harness.mounted(harness.backend.prepare("k", image, harness.target("t"))) as t:
        write(os.path.join(t, "kept"), "kept\n")
    with pytest.raises((OSError, ValueError)):
        harness.backend.prepare("k", image, harness.target("again"))
    assert read(harness.written("k"), "kept") == "kept\n"
