"""Hostile layer tarballs (tests/data/hostile.py) are refused or contained by the layer store.

Each case runs in its own sandbox:

    SANDBOX/store/     the store root (state.db, tmp/, layers/)
    SANDBOX/outside/   sentinels beside the store: files, a dir, a symlink and its target
    SANDBOX/layout/    the OCI layout holding the image (base layer optional, hostile on top)

The whole sandbox is snapshotted before and after `LayerStore.ensure()` (type, mode,
owner, size, link count, content hash, link target, device number, xattrs, mtime and ctime
of every path), except the new layer's own directory, state.db and its journal files, the
contents of store/tmp/ and the times of the store's own directories, which legitimately
change. A write through any symlink, hardlink or `..` that escaped the layer shows up there.
Afterwards store/tmp/ must be empty, the new layer (if accepted) may hold no device node
but 0:0 whiteouts and only plain symlinks, and a refused layer leaves no directory and no
row. Errors must be StrataErrors (anything else reaches gRPC as a bug: INTERNAL). An
accepted layer is then garbage-collected: it must go entirely, leaving tmp/ empty and the
rest of the sandbox as it was (removal must not follow the layer's symlinks either).
"""

import hashlib
import os
import stat
from collections.abc import Callable, Iterator

import pytest

from csi.errors import StrataError
from csi.image.layout import OciLayout
from csi.image.reference import parse as parse_reference
from csi.paths import StorePaths
from csi.store.layers import LayerStore
from csi.store.state import State
from tests.data import hostile

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: unpacking lchowns, mknods 0:0 "
                       "whiteouts and sets trusted.* xattrs"),
]


def _resolve(ref: str):
    source = OciLayout(parse_reference(ref))
    return source, source.resolve()


@pytest.fixture(scope="session")
def corpus() -> dict[str, hostile.Case]:
    return hostile.build_corpus()


def test_corpus_is_big_enough_and_deterministic(corpus):
    assert len(corpus) >= 30
    again = hostile.build_corpus()
    assert {n: (c.tar, c.blob_bytes()) for n, c in corpus.items()} == \
        {n: (c.tar, c.blob_bytes()) for n, c in again.items()}
    assert {c.expect for c in corpus.values()} <= {hostile.REFUSED, hostile.CONTAINED,
                                                   hostile.EITHER}
    assert all(c.why for c in corpus.values() if c.expect == hostile.EITHER)


# -- walking and snapshotting (iterative: layers may nest deeper than the recursion limit) ---
def walk(top: str, prune: Callable[[str], bool] = lambda rel: False
         ) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path, path, lstat) of `top` and everything below it, never following a
    symlink; `prune(rel)` drops a path and everything below it."""
    stack = [""]
    while stack:
        rel = stack.pop()
        if prune(rel):
            continue
        path = os.path.join(top, rel) if rel else top
        st = os.lstat(path)
        yield rel, path, st
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as it:
                names = sorted(e.name for e in it)
            stack.extend(os.path.join(rel, n) for n in reversed(names))


def remove_tree(top: str) -> None:
    """rm -rf without recursion (shutil.rmtree recurses once per level)."""
    if not os.path.lexists(top):
        return
    dirs = []
    for _rel, path, st in walk(top):
        if stat.S_ISDIR(st.st_mode):
            os.chmod(path, 0o700)
            dirs.append(path)
        else:
            os.unlink(path)
    for path in reversed(dirs):
        os.rmdir(path)


VOLATILE_DIRS = {"store", "store/tmp", "store/layers"}  # their times and link counts change


def snapshot(sandbox: str, new_layers: set[str]) -> dict[str, tuple]:
    def prune(rel: str) -> bool:
        parts = rel.split("/")
        return (rel.startswith("store/state.db")
                or (len(parts) > 2 and parts[:2] == ["store", "tmp"])
                or (len(parts) > 2 and parts[:2] == ["store", "layers"]
                    and parts[2] in new_layers))

    snap = {}
    for rel, path, st in walk(sandbox, prune):
        kind = stat.S_IFMT(st.st_mode)
        rec: dict = {"type": kind, "mode": oct(stat.S_IMODE(st.st_mode)),
                     "owner": (st.st_uid, st.st_gid)}
        if rel not in VOLATILE_DIRS:
            rec.update(nlink=st.st_nlink, size=st.st_size, mtime=st.st_mtime_ns,
                       ctime=st.st_ctime_ns, ino=st.st_ino)
            try:
                rec["xattrs"] = sorted(
                    (n, os.getxattr(path, n, follow_symlinks=False))
                    for n in os.listxattr(path, follow_symlinks=False))
            except OSError as e:
                rec["xattrs"] = f"unreadable: {e.strerror}"
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    rec["sha256"] = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        snap[rel or "."] = tuple(sorted(rec.items()))
    return snap


def snapshot_diff(before: dict, after: dict) -> list[str]:
    out = []
    for rel in sorted(before.keys() | after.keys()):
        b, a = before.get(rel), after.get(rel)
        if b == a:
            continue
        if b is None:
            out.append(f"created outside the layer: {rel!r} {dict(a)}")
        elif a is None:
            out.append(f"removed outside the layer: {rel!r}")
        else:
            db, da = dict(b), dict(a)
            fields = {k: (db.get(k), da.get(k)) for k in db.keys() | da.keys()
                      if db.get(k) != da.get(k)}
            out.append(f"changed outside the layer: {rel!r} {fields}")
    return out


def layer_problems(layer_dir: str) -> list[str]:
    """Device nodes other than 0:0 whiteouts, and symlinks that are not plain symlinks."""
    out = []
    for rel, path, st in walk(layer_dir):
        if stat.S_ISBLK(st.st_mode) or (stat.S_ISCHR(st.st_mode) and st.st_rdev != 0):
            out.append(f"device node in the layer: {rel!r} "
                       f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            if st.st_size != len(os.fsencode(target)):
                out.append(f"symlink {rel!r} is not a plain symlink (size {st.st_size} for "
                           f"target {target!r})")
    return out


# -- the test --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", hostile.case_names())
def test_hostile_layer(corpus, tmp_path, name):
    case = corpus[name]
    sandbox = str(tmp_path / "sandbox")
    try:
        problems = run_case(case, sandbox)
    finally:
        remove_tree(sandbox)  # deep trees defeat pytest's recursive clean-up
    why = f"\n(either outcome allowed: {case.why})" if case.why else ""
    assert not problems, f"case {name} ({case.expect}):\n  " + "\n  ".join(problems) + why


def run_case(case: hostile.Case, sandbox: str) -> list[str]:
    root = os.path.join(sandbox, hostile.STORE)
    layout = os.path.join(sandbox, hostile.LAYOUT)
    os.makedirs(root)
    hostile.populate_outside(os.path.join(sandbox, hostile.OUTSIDE))
    state = State(os.path.join(root, "state.db"))
    try:
        store = LayerStore(StorePaths(root), state)
        layers = []
        if case.base is not None:
            base = (case.base, hostile.TAR_MT, "sha256:" + hashlib.sha256(case.base).hexdigest())
            base_source, base_image = _resolve(hostile.write_layout(layout, "base", [base]))
            store.ensure(base_source, base_image.layers)
            layers.append(base)
        layers.append((case.blob_bytes(), case.media_type, case.diff_id))
        source, image = _resolve(hostile.write_layout(layout, "hostile", layers))
        with state.read() as tx:
            rows_before = {layer.id for layer in tx.layers()}

        layers_dir = os.path.join(root, "layers")
        present = set(os.listdir(layers_dir))
        before = snapshot(sandbox, set())
        error: Exception | None = None
        ids: list[str] = []
        try:
            ids = store.ensure(source, image.layers)
        except Exception as e:  # judged below: it must be a StrataError
            error = e
        new = set(os.listdir(layers_dir)) - present
        after = snapshot(sandbox, new)

        problems = snapshot_diff(before, after)
        left = os.listdir(os.path.join(root, "tmp"))
        if left:
            problems.append(f"store/tmp/ is not empty: {left}")
        for lid in sorted(new):
            problems += layer_problems(os.path.join(layers_dir, lid))
        with state.read() as tx:
            row = tx.layer_by_diff_id(case.diff_id)
            rows_after = {layer.id for layer in tx.layers()}

        if error is not None and not isinstance(error, StrataError):
            problems.append(f"raised {type(error).__name__} ({error}), not a StrataError: it "
                            "would reach gRPC as INTERNAL")
        if error is None and case.expect == hostile.REFUSED:
            problems.append(f"accepted as layer {ids[-1]}, but must be refused")
        if error is not None and case.expect == hostile.CONTAINED:
            problems.append(f"refused ({type(error).__name__}: {error}), but must be accepted "
                            "and contained")
        if error is not None:
            if new:
                problems.append(f"refused, yet left layer directories {sorted(new)}")
            if row is not None or rows_after != rows_before:
                problems.append(f"refused, yet recorded layer rows {rows_after - rows_before}")
        else:
            lid = ids[-1]
            fs = os.path.join(layers_dir, lid, "fs")
            if new != {lid} or row is None or row.id != lid:
                problems.append(f"accepted as {lid}, but new dirs are {sorted(new)} and the "
                                f"row is {row}")
            elif case.check is not None:
                try:
                    case.check(fs)
                except AssertionError as e:
                    problems.append(f"layer content: {e}")
            problems += collect(store, root, lid, sandbox, before)
        return problems
    finally:
        state.close()


def collect(store: LayerStore, root: str, lid: str, sandbox: str, before: dict) -> list[str]:
    """Garbage-collect the accepted hostile layer: it must go entirely, without following
    any of its symlinks out, and leave nothing in tmp/."""
    remove = getattr(store, "remove_if_unreferenced", None)
    if remove is None:  # a store without GC: nothing to check
        return []
    problems = []
    try:
        if not remove(lid):
            problems.append(f"GC: layer {lid} is unreferenced but was not removed")
    except Exception as e:  # reported as a problem of the case
        problems.append(f"GC: removing layer {lid} raised {type(e).__name__}: {e}")
    if os.path.lexists(os.path.join(root, "layers", lid)):
        problems.append(f"GC: layers/{lid} is still there")
    left = os.listdir(os.path.join(root, "tmp"))
    if left:
        problems.append(f"GC: store/tmp/ is not empty: {left}")
    problems += ["GC: " + p for p in snapshot_diff(before, snapshot(sandbox, {lid}))]
    return problems
