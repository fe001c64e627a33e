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
    assert not m.readonly


def test_overlay_keeps_given_order_not_sorted():
    m = spec.overlay(["/b", "/a", "/c"], "/u", "/w", "/t")
    assert m.options[0] == "lowerdir=/b:/a:/c"


def test_overlay_single_lower_is_still_writable_overlay():
    m = spec.overlay(["/l/only"], "/u", "/w", "/t")
    assert m.type == "overlay"
    assert m.options == ("lowerdir=/l/only", "upperdir=/u", "workdir=/w")


@pytest.mark.parametrize("lowers", [[], ()])
def test_overlay_without_lowers_is_refused(lowers):
    with pytest.raises(ValueError, match="at least one lower"):
        spec.overlay(lowers, "/u", "/w", "/t")


def test_view_of_one_layer_is_readonly_rbind():
    m = spec.view(["/l/only"], "/pods/t")
    assert m == Mount(type="bind", source="/l/only", target="/pods/t", options=("rbind", "ro"))
    assert m.readonly


@pytest.mark.parametrize("n", [2, 3, 128])
def test_view_of_several_layers_is_lowerdir_only_overlay(n):
    lowers = [f"/l/{i}" for i in range(n)]
    m = spec.view(lowers, "/pods/t")
    assert m.type == "overlay" and m.source == "overlay" and m.target == "/pods/t"
    assert m.options == ("lowerdir=" + ":".join(lowers), "ro")
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in m.options)
    assert m.readonly


def test_view_without_layers_is_refused():
    with pytest.raises(ValueError):
        spec.view([], "/t")


def test_readonly_appends_ro_once():
    m = spec.overlay(["/a", "/b"], "/u", "/w", "/t")
    ro = spec.readonly(m)
    assert ro.options == m.options + ("ro",)
    assert ro.readonly
    assert spec.readonly(ro) == ro  # idempotent: no second "ro"
    assert ro.options.count("ro") == 1
    assert m.options[-1] != "ro"  # the original plan is untouched


def test_readonly_keeps_everything_but_options():
    m = Mount("bind", "/src", "/dst", ("rbind",))
    ro = spec.readonly(m)
    assert (ro.type, ro.source, ro.target) == ("bind", "/src", "/dst")
    assert ro.options == ("rbind", "ro")


def test_readonly_property_matches_whole_option_only():
    # "rootcontext=…" or "errors=remount-ro" must not read as read-only.
    assert not Mount("ext4", "/dev/x", "/t", ("errors=remount-ro", "rw")).readonly
    assert Mount("ext4", "/dev/x", "/t", ("nosuid", "ro")).readonly


def test_mount_is_frozen_and_hashable():
    m = spec.view(["/a"], "/t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.target = "/elsewhere"  # type: ignore[misc]
    assert {m, spec.view(["/a"], "/t")} == {m}
