"""csi.fdwalk's bookkeeping on a plain directory: a companion tree carried along the walked
one, past the descriptors it keeps open, and none left open."""

import os

from csi import fdwalk


def make(top, depth: int, extra: str = "") -> None:
    path = os.path.join(top, *(["c"] * depth))
    os.makedirs(path)
    if extra:
        os.makedirs(os.path.join(top, *(["c"] * (depth // 2)), extra))


def where(fd) -> str | None:
    return None if fd is None else os.readlink(f"/proc/self/fd/{fd}")


def test_a_companion_is_carried_at_the_same_places_past_the_open_depth(tmp_path):
    depth = 3 * fdwalk.OPEN_DEPTH
    make(tmp_path / "a", depth, extra="only-a")
    make(tmp_path / "b", depth - 10)
    seen = []

    def visit(fds, rel):
        seen.append((rel, where(fds[0]), where(fds[1])))
        subdirs = []
        names = {t: {e.name: e.stat(follow_symlinks=False) for e in fdwalk.entries(fd)}
                 for t, fd in enumerate(fds)}
        # "c" popped first: only-a is walked after the chain, its ancestors reopened
        for name, st in sorted(names[0].items(), reverse=True):
            other = names[1].get(name)
            subdirs.append((name, (fdwalk.key(st), other and fdwalk.key(other)),
                            f"{rel}/{name}"))
        return subdirs

    fds = os.listdir("/proc/self/fd")
    fdwalk.walk((str(tmp_path / "a"), str(tmp_path / "b")), "", visit)
    assert os.listdir("/proc/self/fd") == fds
    assert len(seen) == depth + 2  # the root, the chain, only-a
    for rel, a, b in seen:
        assert a == f"{tmp_path}/a{rel}"
        if rel.count("/") <= depth - 10 and "only-a" not in rel:
            assert b == f"{tmp_path}/b{rel}"
        else:
            assert b is None


def test_a_missing_first_root_walks_nothing(tmp_path):
    called = []
    fdwalk.walk((str(tmp_path / "none"), str(tmp_path)), "", lambda fds, c: called.append(1))
    assert called == []
