"""The mount executor against the real kernel: deep overlays both ways (lowerdir+ and the
relative-path fallback), the thread that carries a relative mount, the refusal when neither
way is open, the ordinary path, and probe() on this kernel."""

import errno
import os
import threading

import pytest

from csi.mount import spec, syscalls
from csi.mount.features import Features, probe
from csi.mount.mountinfo import MountTable
from csi.mount.syscalls import Mounter
from tests.conftest import needs_root, unmount_all_under

pytestmark = needs_root

DEPTH = 200


@pytest.fixture(scope="module")
def layers(tmp_path_factory) -> list[str]:
    """DEPTH layer directories named as strata names them (layers/<16 hex>/fs), base first.
    Layer i holds its own file f<i> and a `clash` file that every layer has."""
    root = tmp_path_factory.mktemp("store") / "layers"
    dirs = []
    for i in range(DEPTH):
        fs = root / os.urandom(8).hex() / "fs"
        (fs / "etc").mkdir(parents=True)
        (fs / f"f{i:03d}").write_text(f"{i}\n")
        (fs / "etc" / "clash").write_text(f"{i}\n")
        dirs.append(str(fs))
    return dirs


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> Features:
    return probe(str(tmp_path_factory.mktemp("probe")))


@pytest.fixture
def vol(tmp_path):
    """One publication's directories (volumes/KEY/{upper,work,lower}) and its target. The
    tests leave their mounts up; this unmounts them, pass or fail."""
    d = tmp_path / "volumes" / "0123456789abcdef"
    for sub in ("upper", "work", "lower"):
        (d / sub).mkdir(parents=True)
    (tmp_path / "target").mkdir()
    try:
        yield d, str(tmp_path / "target")
    finally:
        unmount_all_under(str(tmp_path))
        assert MountTable().under(str(tmp_path)) == []


def read(*path: str) -> str:
    with open(os.path.join(*path)) as f:
        return f.read()


def nearest_first(layers: list[str]) -> list[str]:
    return list(reversed(layers))


def link_layers(lower_dir, layers: list[str]) -> list[str]:
    """The fallback's short names: lower/<i> -> layer i; returns them nearest first."""
    for i, layer in enumerate(layers):
        os.symlink(layer, lower_dir / str(i))
    return [str(i) for i in reversed(range(len(layers)))]


def assert_stack_visible(target: str, n: int) -> None:
    names = set(os.listdir(target))
    assert {f"f{i:03d}" for i in range(n)} <= names
    for i in range(n):
        with open(os.path.join(target, f"f{i:03d}")) as f:
            assert f.read() == f"{i}\n"
    with open(os.path.join(target, "etc", "clash")) as f:
        assert f.read() == f"{n - 1}\n", "the nearest layer wins a name clash"


def the_overlay_at(target: str):
    mounts = MountTable().at(target)
    assert [m.fstype for m in mounts] == ["overlay"], mounts
    return mounts[0]


# -- 200 layers ------------------------------------------------------------------------------
def test_deep_overlay_with_lowerdir_plus(layers, probed, vol):
    d, target = vol
    assert probed.lowerdir_plus, "this kernel (>= 6.8) has lowerdir+"
    m = spec.overlay(nearest_first(layers), str(d / "upper"), str(d / "work"), target)
    assert not spec.fits(m, probed.page_size), "the absolute plan must be over a page"
    Mounter(features=probed).mount(m)
    mi = the_overlay_at(target)
    assert f"lowerdir+={layers[-1]}" in mi.super_options
    assert mi.source == "overlay"  # as mount(2) would have shown it
    assert_stack_visible(target, DEPTH)
    with open(os.path.join(target, "etc", "clash"), "w") as f:
        f.write("mine\n")
    assert (d / "upper" / "etc" / "clash").read_text() == "mine\n"
    assert read(layers[-1], "etc", "clash") == f"{DEPTH - 1}\n"


def test_deep_view_with_lowerdir_plus(layers, probed, vol):
    _, target = vol
    Mounter(features=probed).mount(spec.view(nearest_first(layers), target))
    assert "ro" in the_overlay_at(target).options.split(",")
    assert_stack_visible(target, DEPTH)
    with pytest.raises(OSError) as e:
        open(os.path.join(target, "new"), "w")
    assert e.value.errno == errno.EROFS


def test_deep_overlay_by_relative_lowerdirs_without_lowerdir_plus(layers, vol):
    d, target = vol
    lowers = link_layers(d / "lower", layers)
    m = spec.overlay(lowers, str(d / "upper"), str(d / "work"), target, cwd=str(d / "lower"))
    forced = Features(lowerdir_plus=False)
    assert spec.fits(m, forced.page_size)
    cwd = os.getcwd()
    Mounter(features=forced).mount(m)
    assert os.getcwd() == cwd
    mi = the_overlay_at(target)
    # The kernel keeps the lowerdirs as given: relative, so the table alone cannot say
    # which layers they are.
    assert f"lowerdir={DEPTH - 1}:{DEPTH - 2}:" in mi.super_options
    assert_stack_visible(target, DEPTH)
    with open(os.path.join(target, "etc", "clash"), "w") as f:
        f.write("mine\n")
    with open(os.path.join(target, "written"), "w") as f:
        f.write("new\n")
    assert (d / "upper" / "etc" / "clash").read_text() == "mine\n"
    assert (d / "upper" / "written").read_text() == "new\n"
    assert read(layers[-1], "etc", "clash") == f"{DEPTH - 1}\n"
    assert not os.path.exists(os.path.join(layers[-1], "written"))


def test_deep_view_by_relative_lowerdirs_without_lowerdir_plus(layers, vol):
    d, target = vol
    lowers = link_layers(d / "lower", layers)
    Mounter(features=Features(lowerdir_plus=False)).mount(
        spec.view(lowers, target, cwd=str(d / "lower")))
    assert "ro" in the_overlay_at(target).options.split(",")
    assert_stack_visible(target, DEPTH)


def test_relative_bind_of_a_one_layer_view(layers, vol):
    d, target = vol
    (lower,) = link_layers(d / "lower", layers[:1])
    Mounter(features=Features(lowerdir_plus=False)).mount(
        spec.view([lower], target, cwd=str(d / "lower")))
    (mi,) = MountTable().at(target)
    assert "ro" in mi.options.split(",")
    assert os.stat(target).st_ino == os.stat(layers[0]).st_ino  # the link was followed
    assert sorted(os.listdir(target)) == sorted(os.listdir(layers[0]))


def test_e2big_when_options_exceed_a_page_and_there_is_no_lowerdir_plus(layers, vol):
    d, target = vol
    m = spec.overlay(nearest_first(layers), str(d / "upper"), str(d / "work"), target)
    with pytest.raises(OSError) as e:
        Mounter(features=Features(lowerdir_plus=False)).mount(m)
    assert e.value.errno == errno.E2BIG
    assert target in str(e.value) and "exceed one page" in str(e.value)
    assert MountTable().at(target) == []
    assert os.listdir(d / "upper") == [] and os.listdir(d / "work") == []


# -- the thread that carries a relative mount -------------------------------------------------
@pytest.fixture
def home(tmp_path, monkeypatch):
    """The process's working directory for the test, holding a file `marker` that relative
    opens must keep finding there."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "marker").write_text("home\n")
    monkeypatch.chdir(home)
    return home


def test_relative_mount_leaves_every_other_thread_where_it_was(layers, vol, home,
                                                               monkeypatch):
    """While the mount's own thread sits in volumes/KEY/lower (held there after mount(2)
    until the check is done), another thread's relative paths still resolve from the
    process's directory."""
    d, target = vol
    lowers = link_layers(d / "lower", layers)
    inside, checked = threading.Event(), threading.Event()
    in_mount_thread: list[str] = []
    mount2 = Mounter._mount2

    def mount2_then_wait(self, m):
        mount2(self, m)
        in_mount_thread.append(os.getcwd())
        inside.set()
        assert checked.wait(10)

    monkeypatch.setattr(Mounter, "_mount2", mount2_then_wait)
    seen = []

    def other_thread():
        if inside.wait(10):
            with open("marker") as f:
                seen.append((os.getcwd(), f.read(), os.path.exists(lowers[0])))
        checked.set()

    t = threading.Thread(target=other_thread)
    t.start()
    try:
        Mounter(features=Features(lowerdir_plus=False)).mount(
            spec.overlay(lowers, str(d / "upper"), str(d / "work"), target,
                         cwd=str(d / "lower")))
    finally:
        checked.set()
        t.join()
    assert in_mount_thread == [str(d / "lower")]
    assert seen == [(str(home), "home\n", False)]
    assert os.getcwd() == str(home)
    assert_stack_visible(target, DEPTH)


def test_relative_mounts_under_concurrent_relative_opens(layers, vol, home):
    """Repeated relative mounts while eight threads keep opening a relative path: none of
    them ever resolves it from the wrong directory."""
    d, target = vol
    lowers = link_layers(d / "lower", layers)
    stop = threading.Event()
    errors: list[str] = []
    opens = [0]

    def reader():
        while not stop.is_set():
            try:
                with open("marker") as f:
                    if f.read() != "home\n":
                        errors.append("wrong marker")
                opens[0] += 1
            except OSError as e:
                errors.append(repr(e))
            if os.getcwd() != str(home):
                errors.append(os.getcwd())

    readers = [threading.Thread(target=reader) for _ in range(8)]
    for r in readers:
        r.start()
    mounter = Mounter(features=Features(lowerdir_plus=False))
    try:
        for _ in range(10):
            mounter.mount(spec.view(lowers, target, cwd=str(d / "lower")))
            assert_stack_visible(target, DEPTH)
            mounter.unmount(target)
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert errors == []
    assert opens[0] > 0


def test_a_failed_relative_mount_raises_its_error_here(vol):
    d, target = vol
    m = spec.view(["1", "0"], target, cwd=str(d / "lower"))  # no such links
    with pytest.raises(FileNotFoundError) as e:
        Mounter(features=Features(lowerdir_plus=False)).mount(m)
    assert target in str(e.value)
    assert MountTable().at(target) == []


# -- the ordinary path ------------------------------------------------------------------------
def test_writable_two_layer_overlay(layers, probed, vol):
    d, target = vol
    Mounter(features=probed).mount(
        spec.overlay(nearest_first(layers[:2]), str(d / "upper"), str(d / "work"), target))
    mi = the_overlay_at(target)
    assert f"lowerdir={layers[1]}:{layers[0]}" in mi.super_options
    assert_stack_visible(target, 2)
    with open(os.path.join(target, "written"), "w") as f:
        f.write("new\n")
    assert (d / "upper" / "written").read_text() == "new\n"


def test_read_only_two_layer_overlay(layers, probed, vol):
    _, target = vol
    Mounter(features=probed).mount(spec.view(nearest_first(layers[:2]), target))
    mi = the_overlay_at(target)
    assert "ro" in mi.options.split(",")
    assert_stack_visible(target, 2)
    with pytest.raises(OSError) as e:
        open(os.path.join(target, "written"), "w")
    assert e.value.errno == errno.EROFS


def test_default_mounter_mounts_what_fits_without_probing(layers, vol, monkeypatch):
    _, target = vol

    def no_probe(scratch):
        raise AssertionError("probed for a mount that fits")

    monkeypatch.setattr(syscalls, "probe", no_probe)
    Mounter().mount(spec.view(nearest_first(layers[:2]), target))
    assert_stack_visible(target, 2)


def test_default_mounter_probes_once_when_a_plan_is_over_a_page(layers, vol, monkeypatch):
    d, target = vol
    calls = []
    real = syscalls.probe

    def counting(scratch):
        calls.append(scratch)
        return real(scratch)

    monkeypatch.setattr(syscalls, "probe", counting)
    mounter = Mounter()
    mounter.mount(spec.view(nearest_first(layers), target))
    mounter.unmount(target)
    mounter.mount(spec.view(nearest_first(layers), target))
    assert len(calls) == 1 and not os.path.exists(calls[0])
    assert_stack_visible(target, DEPTH)


# -- probe() on this kernel ------------------------------------------------------------------
def test_probe_on_this_kernel(tmp_path):
    f = probe(str(tmp_path))
    assert f.lowerdir_plus and f.volatile and f.userxattr  # Linux >= 6.8
    assert f.redirect_dir and f.metacopy and f.index
    assert f.page_size == os.sysconf("SC_PAGESIZE")
    for name in ("redirect_dir", "metacopy", "index"):
        param = f"/sys/module/overlay/parameters/{name}"
        if os.path.exists(param):
            assert getattr(f, f"{name}_default") is (read(param).strip() == "Y")
    assert os.listdir(tmp_path) == []
    assert MountTable().under(str(tmp_path)) == [], "the probe's trial mounts are gone"


def test_probe_under_a_long_store_path(tmp_path):
    """fsconfig(2) takes at most 256 bytes per string: `lowerdir=A:B` of two absolute paths
    under a long --root would exceed it, and every attempt would be refused for that alone.
    The attempts name their directories relative to their own."""
    scratch = tmp_path / ("a-rather-long-directory-name-for-a-store-" * 4)
    scratch.mkdir()
    assert len(str(scratch)) > 200
    f = probe(str(scratch))
    assert f.lowerdir_plus and f.volatile and f.redirect_dir  # Linux >= 6.8, as above
    assert os.listdir(scratch) == []
    assert MountTable().under(str(tmp_path)) == []


def test_probe_without_fsopen_uses_mount2_and_leaves_nothing(tmp_path, monkeypatch):
    def nosys():
        raise OSError(errno.ENOSYS, "fsopen: Function not implemented")

    monkeypatch.setattr(syscalls, "_fsopen_overlay", nosys)
    f = probe(str(tmp_path))
    assert not f.lowerdir_plus, "lowerdir+ is a question about fsconfig"
    assert f.volatile and f.userxattr and f.redirect_dir
    assert os.listdir(tmp_path) == []
    assert MountTable().under(str(tmp_path)) == [], "the probe's trial mounts are gone"


def test_probe_that_fails_leaves_nothing(tmp_path, monkeypatch):
    real = syscalls._configure
    calls = [0]

    def fail_third(fs, options, target, source="", **kw):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.EIO, "injected")
        return real(fs, options, target, source, **kw)

    monkeypatch.setattr(syscalls, "_configure", fail_third)
    with pytest.raises(OSError, match="injected"):
        probe(str(tmp_path))
    assert os.listdir(tmp_path) == []
    assert MountTable().under(str(tmp_path)) == [], "the probe's trial mounts are gone"
