"""csi/store/unpack.py: the pure path logic of a safe tar apply.

clean_name() normalises a tar member name; root_path() resolves a name below a layer root,
reading symlinks as if the root were "/". Both run as any user. apply() itself chowns,
mknods and sets trusted.* xattrs, so it is tested as root in
tests/integration/test_unpack_apply.py.
"""

import os

import pytest

from csi.errors import InvalidArgument
from csi.store.unpack import UnsafeLayer, clean_name, root_path


# -- clean_name ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, cleaned", [
    ("a", "a"),
    ("a/b/c", "a/b/c"),
    ("a/", "a"),
    ("a//b", "a/b"),
    ("./a/./b/.", "a/b"),
    ("/etc/passwd", "etc/passwd"),
    ("//etc/passwd", "etc/passwd"),
    ("///etc", "etc"),
    ("../x", "x"),
    ("../../x", "x"),
    ("a/../../../x", "x"),
    ("a/b/../c", "a/c"),
    ("a/..", ""),
    ("..", ""),
    ("", ""),
    (".", ""),
    ("./", ""),
    ("/", ""),
    ("..a/b..", "..a/b.."),
    (".wh..wh..opq", ".wh..wh..opq"),
])
def test_clean_name(name, cleaned):
    assert clean_name(name) == cleaned


# -- root_path -----------------------------------------------------------------------------
@pytest.fixture
def linked_root(tmp_path):
    """A layer root with symlinks that would escape if followed on the host."""
    root = tmp_path / "root"
    (root / "d" / "e").mkdir(parents=True)
    links = {
        "abs": "/",
        "rel": "../../..",
        "d/up": "..",
        "d/absd": "/d",
        "chain1": "chain2",
        "chain2": "d/e",
        "loop1": "loop2",
        "loop2": "loop1",
        "self": "self",
        "dangling": "missing/deeper",
        "hostetc": "/hostetc",
        "out": "../outside",
    }
    for name, target in links.items():
        os.symlink(target, root / name)
    return str(root)


@pytest.mark.parametrize("rel, expected", [
    ("", ""),
    ("x", "x"),
    ("d/e/f", "d/e/f"),
    ("abs/x", "x"),
    ("abs/etc/passwd", "etc/passwd"),
    ("rel/x", "x"),
    ("rel/rel/rel/x", "x"),
    ("d/up/x", "x"),
    ("d/up/d/up/d/e", "d/e"),
    ("d/absd/e/f", "d/e/f"),
    ("chain1/f", "d/e/f"),
    ("dangling/x", "missing/deeper/x"),
    ("../../x", "x"),
    ("d/../../../x", "x"),
    ("./d//e/./f", "d/e/f"),
    ("out/sentinel", "outside/sentinel"),
])
def test_root_path_resolves_inside_root(linked_root, rel, expected):
    got = root_path(linked_root, rel)
    assert got == os.path.join(linked_root, expected).rstrip("/")
    assert os.path.commonpath([got, linked_root]) == linked_root


@pytest.mark.parametrize("rel", ["abs", "rel", "d/up", "chain1", "dangling", "out"])
def test_root_path_does_not_follow_final_component_by_default(linked_root, rel):
    assert root_path(linked_root, rel) == os.path.join(linked_root, rel)


@pytest.mark.parametrize("rel, expected", [
    ("abs", ""), ("rel", ""), ("d/up", ""), ("chain1", "d/e"), ("dangling", "missing/deeper"),
    ("out", "outside"), ("d", "d"),
])
def test_root_path_follow_final(linked_root, rel, expected):
    got = root_path(linked_root, rel, follow_final=True)
    assert got == os.path.join(linked_root, expected).rstrip("/")


# hostetc -> /hostetc names <root>/hostetc, i.e. itself, once the root is "/".
@pytest.mark.parametrize("rel", ["loop1/x", "self/x", "d/../loop2/y", "hostetc/passwd"])
def test_root_path_symlink_loop_is_refused(linked_root, rel):
    with pytest.raises(UnsafeLayer, match="too many levels"):
        root_path(linked_root, rel)


def test_root_path_loop_as_final_component_only_with_follow(linked_root):
    assert root_path(linked_root, "loop1") == os.path.join(linked_root, "loop1")
    with pytest.raises(UnsafeLayer):
        root_path(linked_root, "loop1", follow_final=True)


def test_unsafe_layer_is_invalid_argument():
    assert issubclass(UnsafeLayer, InvalidArgument)
