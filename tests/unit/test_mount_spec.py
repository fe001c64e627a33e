"""csi/mount/spec.py: mount plans are plain data (containerd's testOverlayMounts shape)."""

import dataclasses

import pytest

from csi.mount import spec
from csi.mount.spec import Mount


def test_overlay_options_nearest_lower_first():
    m = spec.overlay(["/l/top", "/l/mid", "/l/base"], "/v/k/upper", "/v/k/work", "/pods/t")
    assert m == Mount(
        type="overlay",
        source="overlay",
        target="/pods/t",
        options=("lowerdir=/l/top:/l/mid:/l/base", "upperdir=/v/k/upper", "workdir=/v/k/work"),
    )
    assert "ro" not in m.options


def test_overlay_keeps_given_order_not_sorted():
    m = spec.overlay(["/b", "/a", "/c"], "/u", "/w", "/t")
    assert m.options[0] == "lowerdir=/b:/a:/c"


def test_overlay_single_lower_is_still_writable_overlay():
    m = spec.overlay(["/l/only"], "/u", "/w", "/t")
    assert m.type == "overlay"
    assert m.options == ("lowerdir=/l/only", "upperdir=/u", "workdir=/w")


def test_overlay_is_volatile_only_when_asked():
    # volatile where the kernel takes it (the backend asks when features.probe found it):
    # an upper discarded at unmount needs none of overlay's syncs.
    m = spec.overlay(["/l/a", "/l/b"], "/u", "/w", "/t", volatile=True)
    assert m.options == ("lowerdir=/l/a:/l/b", "upperdir=/u", "workdir=/w", "volatile")
    assert spec.data(m.options).endswith(",volatile")  # data for the kernel, not a flag
    assert "volatile" not in spec.overlay(["/l/a"], "/u", "/w", "/t").options
    relative = spec.overlay(["1", "0"], "/u", "/w", "/t", cwd="/v/k/lower", volatile=True)
    assert relative.options[-1] == "volatile" and relative.cwd == "/v/k/lower"


def test_overlay_never_asks_for_metacopy_or_index():
    for volatile in (False, True):
        opts = spec.overlay(["/l/a", "/l/b"], "/u", "/w", "/t", volatile=volatile).options
        assert not [o for o in opts if o.startswith(("metacopy", "index", "redirect_dir"))]


@pytest.mark.parametrize("lowers", [[], ()])
def test_overlay_without_lowers_is_refused(lowers):
    with pytest.raises(ValueError, match="at least one lower"):
        spec.overlay(lowers, "/u", "/w", "/t")


def test_view_of_one_layer_is_readonly_rbind():
    m = spec.view(["/l/only"], "/pods/t")
    assert m == Mount(type="bind", source="/l/only", target="/pods/t", options=("rbind", "ro"))
    assert "ro" in m.options


@pytest.mark.parametrize("n", [2, 3, 128])
def test_view_of_several_layers_is_lowerdir_only_overlay(n):
    lowers = [f"/l/{i}" for i in range(n)]
    m = spec.view(lowers, "/pods/t")
    assert m.type == "overlay" and m.source == "overlay" and m.target == "/pods/t"
    assert m.options == ("lowerdir=" + ":".join(lowers), "ro")
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in m.options)
    assert "ro" in m.options


def test_view_without_layers_is_refused():
    with pytest.raises(ValueError):
        spec.view([], "/t")


def test_mount_is_frozen_and_hashable():
    m = spec.view(["/a"], "/t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.target = "/elsewhere"  # type: ignore[misc]
    assert {m, spec.view(["/a"], "/t")} == {m}


def test_planners_carry_cwd_for_relative_lowers():
    m = spec.overlay(["2", "1", "0"], "/v/k/upper", "/v/k/work", "/pods/t", cwd="/v/k/lower")
    assert m.cwd == "/v/k/lower"
    assert m.options[0] == "lowerdir=2:1:0"
    assert spec.view(["1", "0"], "/t", cwd="/v/k/lower").cwd == "/v/k/lower"
    assert spec.view(["0"], "/t", cwd="/v/k/lower") == Mount(
        "bind", "0", "/t", ("rbind", "ro"), cwd="/v/k/lower")
    assert spec.overlay(["/a"], "/u", "/w", "/t").cwd == ""  # absolute plans need none


def test_relative_cwd_is_refused():
    with pytest.raises(ValueError, match="absolute"):
        Mount("overlay", "overlay", "/t", ("lowerdir=0",), cwd="v/k/lower")


def test_data_leaves_out_what_mount2_takes_as_flags():
    assert spec.data(("lowerdir=/a:/b", "ro", "nosuid", "nodev", "noexec")) == "lowerdir=/a:/b"
    assert spec.data(("rbind", "ro")) == ""
    assert spec.data(("upperdir=/u", "workdir=/w", "volatile")) == "upperdir=/u,workdir=/w,volatile"


def test_fits_is_strictly_shorter_than_a_page():
    # The kernel NUL-terminates the copied page in its last byte: 4095 bytes of data fit,
    # 4096 do not.
    def plan(n):
        return Mount("overlay", "overlay", "/t", ("lowerdir=/" + "x" * (n - len("lowerdir=/")),))

    assert spec.fits(plan(4095), 4096)
    assert not spec.fits(plan(4096), 4096)
    assert spec.fits(plan(4096), 16384)


def test_fits_counts_commas_but_not_flags():
    m = Mount("overlay", "overlay", "/t", ("lowerdir=/a", "ro", "upperdir=/u"))
    assert len("lowerdir=/a,upperdir=/u") == 23
    assert spec.fits(m, 24) and not spec.fits(m, 23)


def test_fits_counts_bytes_not_characters():
    m = Mount("overlay", "overlay", "/t", ("lowerdir=/" + "é" * 10,))
    assert len(spec.data(m.options)) == 20 and len(spec.data(m.options).encode()) == 30
    assert not spec.fits(m, 30)


def test_200_layers_need_relative_lowers_to_fit():
    # strata's layer paths: /var/lib/strata/layers/<16 hex>/fs, 45 bytes each.
    absolute = [f"/var/lib/strata/layers/{i:016x}/fs" for i in range(200)]
    m = spec.overlay(absolute, "/var/lib/strata/volumes/k/upper",
                     "/var/lib/strata/volumes/k/work", "/pods/t")
    assert not spec.fits(m, 4096)
    relative = [str(i) for i in reversed(range(200))]
    r = spec.overlay(relative, "/var/lib/strata/volumes/k/upper",
                     "/var/lib/strata/volumes/k/work", "/pods/t",
                     cwd="/var/lib/strata/volumes/k/lower")
    assert spec.fits(r, 4096)
