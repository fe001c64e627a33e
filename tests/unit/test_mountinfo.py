"""csi/mount/mountinfo.py: parsing /proc/self/mountinfo and querying a table read from a file."""

import os
import shutil

import pytest

from csi.mount.mountinfo import MountInfo, MountTable, parse

DATA = os.path.join(os.path.dirname(__file__), "data", "mountinfo")
KUBELET = "/var/lib/kubelet/pods/abc/volumes/kubernetes.io~csi/img/mount"


@pytest.fixture
def table(tmp_path) -> MountTable:
    path = tmp_path / "mountinfo"
    shutil.copy(os.path.join(DATA, "node.txt"), path)
    return MountTable(str(path))


def test_parse_plain_line():
    [m] = parse("23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n")
    assert m == MountInfo(mount_id=23, parent_id=22, mount_point="/proc", root="/",
                          fstype="proc", source="proc",
                          options="rw,nosuid,nodev,noexec,relatime", super_options="rw",
                          device="0:21")


@pytest.mark.parametrize("optional", ["", "shared:1 ", "shared:40 master:2 ",
                                      "master:7 propagate_from:3 unbindable "])
def test_optional_fields_do_not_shift_the_rest(optional):
    [m] = parse(f"101 30 0:55 / /t rw,relatime {optional}- overlay overlay rw,lowerdir=/a:/b")
    assert (m.mount_id, m.parent_id, m.mount_point, m.options) == (101, 30, "/t", "rw,relatime")
    assert (m.fstype, m.source, m.super_options) == ("overlay", "overlay", "rw,lowerdir=/a:/b")
    assert m.optional == tuple(optional.split())
    assert m.peer_group == ("shared:1" if "shared:1 " in optional else
                            "shared:40" if "shared:40" in optional else "")


def test_overlay_super_options_are_kept_whole():
    text = ("101 30 0:55 / /m rw,relatime shared:40 master:2 - overlay overlay "
            "rw,lowerdir=/l/1:/l/2,upperdir=/v/k/upper,workdir=/v/k/work\n")
    [m] = parse(text)
    assert m.super_options.split(",") == [
        "rw", "lowerdir=/l/1:/l/2", "upperdir=/v/k/upper", "workdir=/v/k/work"]


@pytest.mark.parametrize("escaped, plain", [
    (r"/mnt/with\040space", "/mnt/with space"),
    (r"/mnt/tab\011here", "/mnt/tab\there"),
    (r"/mnt/new\012line", "/mnt/new\nline"),
    (r"/mnt/back\134slash", "/mnt/back\\slash"),
    (r"/mnt/two\040\040spaces", "/mnt/two  spaces"),
])
def test_octal_escapes_in_mount_point_root_and_source(escaped, plain):
    [m] = parse(f"7 1 8:1 {escaped} {escaped} rw - ext4 /dev/disk\\040x rw\n")
    assert m.mount_point == plain
    assert m.root == plain
    assert m.source == "/dev/disk x"


def test_escape_decoding_is_single_pass():
    # "\134040" is an escaped backslash followed by the text "040": it must not turn
    # into a space by being decoded twice.
    [m] = parse(r"7 1 8:1 / /a\134040b rw - ext4 /dev/x rw")
    assert m.mount_point == "/a\\040b"


def test_missing_super_options_is_empty():
    [m] = parse("7 1 0:3 / /x rw - nsfs nsfs")
    assert m.super_options == ""


def test_blank_lines_skipped_and_order_kept():
    text = "\n1 0 8:1 / / rw - ext4 /dev/a rw\n\n2 1 0:5 / /proc rw - proc proc rw\n  \n"
    assert [m.mount_point for m in parse(text)] == ["/", "/proc"]


def test_fixture_file_parses_every_line():
    with open(os.path.join(DATA, "node.txt")) as f:
        text = f.read()
    mounts = parse(text)
    assert len(mounts) == len(text.strip().splitlines())
    assert {m.mount_id for m in mounts} == {22, 23, 24, 25, 30, 101, 102, 103, 104, 105, 106,
                                           107}


def test_live_mountinfo_parses():
    mounts = MountTable().mounts()  # the real /proc/self/mountinfo, default path
    assert any(m.mount_point == "/" for m in mounts)


def test_at_finds_the_overlay(table):
    [m] = table.at(KUBELET)
    assert m.mount_id == 101 and m.fstype == "overlay"
    assert "upperdir=/var/lib/strata/volumes/k1/upper" in m.super_options


def test_at_normalises_the_path(table):
    assert [m.mount_id for m in table.at(KUBELET + "/")] == [101]
    assert [m.mount_id for m in table.at("/var/lib/kubelet/../kubelet")] == [30]


def test_at_returns_stacked_mounts_bottom_first(table):
    assert [m.mount_id for m in table.at("/var/lib/strata/tmp")] == [105, 106]


def test_at_unescapes_before_matching(table):
    assert [m.mount_id for m in table.at("/mnt/with space")] == [103]
    assert table.at(r"/mnt/with\040space") == []


def test_is_mountpoint(table):
    assert table.is_mountpoint("/proc")
    assert table.is_mountpoint(KUBELET)
    assert table.is_mountpoint("/mnt/with space/inner")
    assert not table.is_mountpoint("/var/lib")
    assert not table.is_mountpoint(KUBELET + "/sub")
    assert not table.is_mountpoint("/pro")


def test_under_includes_prefix_itself_and_descendants(table):
    got = {m.mount_id for m in table.under("/var/lib/kubelet")}
    assert got == {30, 101, 102}


def test_under_does_not_match_a_sibling_sharing_the_prefix(table):
    # /var/lib/strata/tmpfoo starts with the string "/var/lib/strata/tmp" but is not below it.
    got = {m.mount_id for m in table.under("/var/lib/strata/tmp")}
    assert got == {105, 106}
    assert {m.mount_id for m in table.under("/var/lib/kubelet/pods/abc")} == {101}


def test_under_trailing_slash_and_spaces(table):
    assert {m.mount_id for m in table.under("/var/lib/strata/tmp/")} == {105, 106}
    assert {m.mount_id for m in table.under("/mnt/with space")} == {103, 104}


def test_under_unknown_prefix_is_empty(table):
    assert table.under("/nonexistent") == []


def test_under_root_returns_everything(table):
    assert len(table.under("/")) == len(table.mounts())


def test_table_rereads_the_file(table, tmp_path):
    assert not table.is_mountpoint("/new")
    with open(tmp_path / "mountinfo", "a") as f:
        f.write("200 22 0:90 / /new rw - tmpfs tmpfs rw\n")
    assert table.is_mountpoint("/new")


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        MountTable(str(tmp_path / "absent")).mounts()
