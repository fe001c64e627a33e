"""csi/inspect.py: classifying an upper dir against its lowers as A (added), C (changed) and
D (deleted), like `docker diff`. Whiteouts are 0:0 character devices, so this needs root."""

import os
import stat

import pytest

from csi.inspect import diff

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="overlay whiteouts are 0:0 char devices: mknod needs root")


def make(root, spec: dict) -> str:
    """spec: relative path → "dir" | "wh" (whiteout) | ("link", target) | file content."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    for rel, what in spec.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if what == "dir":
            os.makedirs(p, exist_ok=True)
        elif what == "wh":
            os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        elif isinstance(what, tuple):
            os.symlink(what[1], p)
        else:
            with open(p, "w") as f:
                f.write(what)
    return root


@pytest.fixture
def stack(tmp_path):
    base = make(tmp_path / "base", {
        "etc/passwd": "root", "etc/motd": "base", "usr/bin/tool": "t", "usr/bin/other": "o",
        "var/cache/a": "a", "only-in-base": "b", "old": "o", "dir-in-base": "dir",
    })
    mid = make(tmp_path / "mid", {
        "etc/motd": "mid", "old": "wh", "added-in-mid": "m",
    })
    return [mid, base]  # nearest first


def test_classification(tmp_path, stack):
    upper = make(tmp_path / "upper", {
        "etc/motd": "changed",            # copied up from mid
        "etc/new.conf": "new",            # created
        "usr/bin/tool": "wh",             # deleted
        "only-in-base": "changed",        # copied up from the bottom layer
        "added-in-mid": "changed",
        "newdir/f": "x",                  # new dir and its child
        "newdir/link": ("link", "f"),
        "never-existed": "wh",            # a whiteout of nothing is not a change
    })
    assert diff(upper, stack) == [
        ("C", "/added-in-mid"),
        ("C", "/etc"),
        ("C", "/etc/motd"),
        ("A", "/etc/new.conf"),
        ("A", "/newdir"),
        ("A", "/newdir/f"),
        ("A", "/newdir/link"),
        ("C", "/only-in-base"),
        ("C", "/usr"),
        ("C", "/usr/bin"),
        ("D", "/usr/bin/tool"),
    ]


def test_recreated_after_a_lower_whiteout_is_added(tmp_path, stack):
    # "old" exists in base but mid deleted it: in the image it does not exist.
    upper = make(tmp_path / "upper", {"old": "again"})
    assert diff(upper, stack) == [("A", "/old")]


def test_whiteout_of_something_already_deleted_below_is_not_reported(tmp_path, stack):
    upper = make(tmp_path / "upper", {"old": "wh"})
    assert diff(upper, stack) == []


def test_deleted_directory(tmp_path, stack):
    upper = make(tmp_path / "upper", {"var": "wh", "dir-in-base": "wh"})
    assert diff(upper, stack) == [("D", "/dir-in-base"), ("D", "/var")]


def test_lower_file_replaced_by_directory_is_changed(tmp_path, stack):
    upper = make(tmp_path / "upper", {"only-in-base/child": "x"})
    assert diff(upper, stack) == [("C", "/only-in-base"), ("A", "/only-in-base/child")]


def test_entry_below_a_lower_file_is_added(tmp_path, stack):
    # base has a *file* etc/passwd; a lookup of etc/passwd/x there is ENOTDIR, not a hit.
    upper = make(tmp_path / "upper", {"etc/passwd": "dir", "etc/passwd/x": "y"})
    assert ("A", "/etc/passwd/x") in diff(upper, stack)


def test_empty_upper(tmp_path, stack):
    assert diff(make(tmp_path / "upper", {}), stack) == []


def test_no_lowers_everything_added(tmp_path):
    upper = make(tmp_path / "upper", {"a/b": "x", "c": "wh"})
    assert diff(upper, []) == [("A", "/a"), ("A", "/a/b")]


def test_output_sorted_by_path(tmp_path, stack):
    upper = make(tmp_path / "upper", {"z": "1", "a": "1", "m/n": "1", "etc/b": "1",
                                      "etc/a": "1"})
    paths = [p for _, p in diff(upper, stack)]
    assert paths == sorted(paths)


def test_entry_under_a_dir_deleted_in_a_nearer_lower_is_added(tmp_path):
    base = make(tmp_path / "base", {"a/f": "base"})
    top = make(tmp_path / "top", {"a": "wh"})  # the image has no /a at all
    upper = make(tmp_path / "upper", {"a/f": "new"})
    assert diff(upper, [top, base]) == [("A", "/a"), ("A", "/a/f")]


def test_entry_under_an_opaque_dir_of_a_nearer_lower_is_added(tmp_path):
    base = make(tmp_path / "base", {"a/f": "base"})
    top = make(tmp_path / "top", {"a": "dir"})
    os.setxattr(os.path.join(top, "a"), "trusted.overlay.opaque", b"y")
    upper = make(tmp_path / "upper", {"a/f": "new"})
    assert diff(upper, [top, base]) == [("C", "/a"), ("A", "/a/f")]
