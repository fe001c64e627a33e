"""Reads a publication's upper directory against its image's layers: `summarize` counts what
the pod changed (for the per-publication metrics), `diff` lists it as `docker diff` does.

Both walk the upper directory once, carrying for each upper directory the lower directories
that overlayfs merges into it, so a lower lookup costs one lstat per layer of the entry's
own directory, never a resolution from the root. Overlay's rules, as the kernel applies
them (fs/overlayfs/namei.c):
  - a whiteout (character device 0:0) hides the lower entry of its name;
  - an opaque directory (`trusted.overlay.opaque=y`) hides every lower directory below it,
    and so does a directory over a lower non-directory;
  - a renamed directory (`redirect_dir`) carries `trusted.overlay.redirect`, an absolute
    path from the layers' roots or a name in the parent's lower directories: its lower
    contents come from there, not from its own path;
  - a metadata-only copy-up (`metacopy`) carries `trusted.overlay.metacopy`: the upper file
    has the attributes and the size, the data stays in a lower layer.
Entries the pod removes while we walk are skipped; symlinks are never followed.

The upper is the pod's to change while we read it, so it is walked by directory descriptors,
never by path (`_walk`): each directory is opened by name in its parent's descriptor with
O_NOFOLLOW and kept only if it is the inode its parent listed, so a directory swapped for a
symlink (or another directory) between the listing and the descent is skipped, and no path
grows with the depth (no ENAMETOOLONG past PATH_MAX). The lowers are the image's read-only
layers: they are read by path, never following a symlink either.

`diff` is Docker's "naive diff" (moby pkg/archive ChangesDirs, which overlay2 uses whenever
redirect_dir or metacopy is in effect): the container's merged tree compared with the image's
merged tree, computed here from the upper alone. docs/diff.md says what it prints and why.
"""

import dataclasses
import os
import stat
from collections.abc import Callable, Iterator, Sequence

from csi import fdwalk
from csi.extents import shared_bytes

OPAQUE = "trusted.overlay.opaque"
REDIRECT = "trusted.overlay.redirect"
METACOPY = "trusted.overlay.metacopy"
CAPABILITY = "security.capability"
# An overlay mounted with `userxattr` writes the same marks under user.overlay.*.
_USER = {"user.overlay." + n.rsplit(".", 1)[1]: n for n in (OPAQUE, REDIRECT, METACOPY)}

Dirs = tuple[str, ...]  # lower directories merged at one place, nearest first


class Stopped(Exception):
    """`summarize` gave up because its `stop` said so (the server is stopping)."""


@dataclasses.dataclass(frozen=True)
class Summary:
    """One publication's upper layer, counted. Entries by change, a hard-linked inode once:
    `created` upper entries (directories included) with no lower counterpart; `copied_up`
    lower non-directories replaced with data (a file deleted then re-created included);
    `metacopy` copied up metadata-only; `deleted` lower entries hidden by whiteouts or by
    opaque directories (a directory's own entry, not what was below it); `renamed`
    directories with a redirect; `modified_dirs` lower directories present in the upper.
    Bytes are allocated bytes (st_blocks), each inode once, less what a copied-up file
    shares with its lower file (a reflink copy-up: FIEMAP's shared extents), so they are
    what the upper holds of its own; `upper_bytes`/`upper_inodes` cover every upper entry,
    directories and whiteouts included. `copied_up_logical_bytes` is the size (st_size)
    of the regular files copied up with their data: what a copy-up without reflink would
    allocate (sparse files aside)."""

    created: int = 0
    copied_up: int = 0
    metacopy: int = 0
    deleted: int = 0
    renamed: int = 0
    modified_dirs: int = 0
    upper_bytes: int = 0
    upper_inodes: int = 0
    copied_up_bytes: int = 0
    created_bytes: int = 0
    copied_up_logical_bytes: int = 0

    def __add__(self, other: "Summary") -> "Summary":
        return Summary(*(a + b for a, b in zip(dataclasses.astuple(self),
                                               dataclasses.astuple(other), strict=True)))


# -- overlay's view of the lowers -------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class _Found:
    st: os.stat_result  # the topmost layer's entry: what the merged view shows
    path: str
    dirs: Dirs          # if a directory, the lower directories merged into it


def _whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:  # ENODATA, a symlink's EPERM, or gone
        return None


def _lookup(dirs: Dirs, name: str, listed: Sequence[set[str] | None] = ()) -> _Found | None:
    """`name` in the merged view of `dirs`, as ovl_lookup resolves it layer by layer: a
    whiteout or a non-directory ends the search, an opaque directory is the last merged.
    `listed`, where given, holds the names of some of `dirs`: no lstat where it says no."""
    top, below = None, []
    for i, d in enumerate(dirs):
        if i < len(listed) and listed[i] is not None and name not in listed[i]:
            continue
        p = f"{d}/{name}"
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if _whiteout(st):
            break
        if top is None:
            top = (st, p)
        if not stat.S_ISDIR(st.st_mode):
            break
        below.append(p)
        if _xattr(p, OPAQUE) == b"y":
            break
    return None if top is None else _Found(top[0], top[1], tuple(below))


class _Lowers:
    """Lookups of many names in one merged directory. A lower directory is listed once
    (getdents returns hundreds of names a call) where that is cheaper than an lstat for each
    name looked up: most names of an upper directory are in few of its layers, or none."""

    # A directory takes some 32 bytes a name on disk (ext4, xfs); reading a name costs about
    # a twentieth of a failed lstat.
    BYTES_PER_NAME, NAMES_PER_LSTAT = 32, 20

    def __init__(self, dirs: Dirs, lookups: int):
        self.dirs, self._lookups, self._listed = dirs, lookups, None
        self._found: dict[str, _Found | None] = {}

    def __call__(self, name: str) -> _Found | None:
        if name not in self._found:
            if self._listed is None:
                self._listed = ([self._names(d) for d in self.dirs] if self._lookups > 4
                                else [])
            self._found[name] = _lookup(self.dirs, name, self._listed)
        return self._found[name]

    def _names(self, d: str) -> set[str] | None:
        try:
            size = os.lstat(d).st_size
            if size > self._lookups * self.BYTES_PER_NAME * self.NAMES_PER_LSTAT:
                return None
            with os.scandir(d) as it:
                return {e.name for e in it}
        except OSError:
            return None


def _listing(dirs: Dirs) -> dict[str, _Found]:
    """The merged view of `dirs`, name by name. Only for the rare places where a whole lower
    directory matters (opaque, renamed and added directories)."""
    names: set[str] = set()
    for d in dirs:
        try:
            with os.scandir(d) as it:
                names.update(e.name for e in it)
        except OSError:
            continue
    return {n: f for n in names if (f := _lookup(dirs, n)) is not None}


def _marks(path: str) -> tuple[bool, bytes | None, bool]:
    """An upper entry's overlay marks (opaque, redirect, metacopy), from one listxattr."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False, None, False
    found = {_USER.get(n, n): n for n in names}
    opaque = OPAQUE in found and _xattr(path, found[OPAQUE]) == b"y"
    redirect = _xattr(path, found[REDIRECT]) if REDIRECT in found else None
    return opaque, redirect, METACOPY in found


def _redirected(target: bytes, parent: Dirs, roots: Dirs) -> Dirs:
    """The lower directories a renamed directory merges: an absolute redirect is resolved
    from the layers' roots, a relative one (a rename within its directory) in the parent's."""
    path = os.fsdecode(target)
    dirs = roots if path.startswith("/") else parent
    for part in path.split("/"):
        if part and dirs:
            found = _lookup(dirs, part)
            dirs = found.dirs if found else ()
    return dirs


def _children(dirs: Dirs, merged: Dirs, opaque: bool, redirect: bytes | None,
              roots: Dirs) -> Dirs:
    return () if opaque else _redirected(redirect, merged, roots) if redirect else dirs


# -- the upper, by descriptors (csi.fdwalk) ----------------------------------------------------
_EXHAUSTED = fdwalk.EXHAUSTED
_at = fdwalk.at


def _walk(upper: str, context, visit: Callable) -> None:
    """Calls `visit(fd, entries, context)` for `upper` and each directory below it, depth
    first; `visit` returns the subdirectories to walk, as (name, lstat, their context).
    A subdirectory that is gone or no longer the inode listed when it is opened is skipped,
    as is what remained to walk in a directory that cannot be reached again."""

    def each(fds: tuple, here) -> list:
        return [(name, (fdwalk.key(st),), sub)
                for name, st, sub in visit(fds[0], fdwalk.entries(fds[0]), here)]

    fdwalk.walk((upper,), context, each)


# -- summarize -------------------------------------------------------------------------------
_CREATED, _COPIED, _META = range(3)
_STOP_EVERY = 256


def summarize(upper: str, lowers: Sequence[str], *,
              stop: Callable[[], bool] | None = None) -> Summary:
    """The upper layer `upper` over `lowers` (nearest first), counted. `stop`, asked every
    _STOP_EVERY entries, ends the walk with `Stopped` when it says so.

    Each upper directory carries two lists of lower directories: `merged`, what overlay
    shows through it, and `hidden`, what lies at its place in the lowers even where an
    opaque directory above hides it (a re-created entry there is a change, not an add)."""
    roots = tuple(lowers)
    n = dict.fromkeys((f.name for f in dataclasses.fields(Summary)), 0)
    linked: dict[tuple[int, int], tuple[int, int, int]] = {}  # inode → (class, bytes, size)
    shared: dict[tuple[int, int], int] = {}  # a linked copied-up inode → its shared bytes
    inodes: set[tuple[int, int]] = set()
    seen = 0

    def visit(fd: int, entries: list[os.DirEntry], dirs: tuple[Dirs, Dirs]) -> list:
        nonlocal seen
        merged, hidden = dirs
        subdirs = []
        look_hidden = _Lowers(hidden, len(entries))
        look_merged = look_hidden if merged is hidden else _Lowers(merged, len(entries))
        present = set()
        for e in entries:
            seen += 1
            if stop is not None and seen % _STOP_EVERY == 0 and stop():
                raise Stopped
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            key = (st.st_dev, st.st_ino)
            if is_dir or st.st_nlink == 1 or key not in inodes:
                n["upper_inodes"] += 1
                n["upper_bytes"] += st.st_blocks * 512
                if not is_dir and st.st_nlink > 1:
                    inodes.add(key)
            if _whiteout(st):
                if merged and look_merged(e.name):
                    n["deleted"] += 1
                continue
            present.add(e.name)
            below = look_hidden(e.name) if hidden else None
            lower_dir = below is not None and stat.S_ISDIR(below.st.st_mode)
            if below is not None and lower_dir != is_dir:
                n["deleted"] += 1  # a lower file replaced by a directory, or the reverse
                below = None
            if is_dir:
                opaque, redirect, _ = _marks(_at(fd, e.name))
                n["renamed" if redirect else "modified_dirs" if below else "created"] += 1
                dirs = below.dirs if below else ()
                if merged is not hidden:  # below an opaque directory: nothing shows through
                    shown = look_merged(e.name) if merged else None
                    shown_dirs = shown.dirs if shown and stat.S_ISDIR(shown.st.st_mode) else ()
                else:
                    shown_dirs = dirs
                merged_here = _children(shown_dirs, merged, opaque, redirect, roots)
                subdirs.append((e.name, st, (merged_here, merged_here
                                             if redirect or dirs == merged_here else dirs)))
                continue
            kind = _CREATED
            size = st.st_blocks * 512
            # Only a copy-up can carry the metacopy mark, but one renamed (it has a redirect
            # then, not a lower counterpart of its name) and touched since looks like a file
            # written in the upper, times included. What it lacks is data: it allocates at
            # most its xattrs (in the inode, or one block), less than its size unless it is
            # small. So only those pay the listxattr (some 3 µs: asking every file made a
            # walk of 3000 files 45% slower). Missed: xattrs over a block on a small file.
            if (stat.S_ISREG(st.st_mode)
                    and (below or size <= st.st_blksize or size < st.st_size)
                    and _marks(_at(fd, e.name))[2]):
                kind = _META
            logical = 0
            if kind == _CREATED and below:
                kind = _COPIED
                if stat.S_ISREG(st.st_mode):
                    logical = st.st_size
                    # A reflink copy-up shares the lower file's extents: st_blocks counts
                    # them, the upper holds only what the pod wrote over. One FIEMAP per
                    # copied-up file (a linked inode once); see _shared for why not fewer.
                    if key in shared:
                        common = shared[key]
                    else:
                        common = _shared(fd, e.name, st)
                        n["upper_bytes"] -= min(common, size)
                        if st.st_nlink > 1:
                            shared[key] = common
                    size = max(0, size - common)
            if st.st_nlink > 1:
                linked[key] = max(linked.get(key, (kind, size, logical)),
                                  (kind, size, logical))
            else:
                _count(n, kind, size, logical)
        if hidden and hidden != merged:
            gone = _listing(hidden).keys() - _listing(merged).keys() - present
            n["deleted"] += len(gone)
        return subdirs

    _walk(upper, (roots, roots), visit)
    for kind, size, logical in linked.values():
        _count(n, kind, size, logical)
    return Summary(**n)


_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _shared(fd: int, name: str, st: os.stat_result) -> int:
    """Bytes of the upper file `name` (in the directory `fd`, listed with `st`) in extents
    it shares with another file: its lower file's, after a copy-up that cloned them.

    Asked of every copied-up file with blocks, whatever the store's start-up probe said:
    an upper is not always on the store's filesystem (a size-limited publication's lives in
    its own loop-mounted image, where copy-up cannot clone), a copy-up made by a kernel
    that did not clone may sit beside one that did, and where nothing is shared FIEMAP
    says so for the price of the one ioctl (about the cost of an lstat). Copied-up files
    are few next to the entries a walk lstats. 0 if the file changed or went meanwhile
    (a FIFO swapped in does not block: O_NONBLOCK)."""
    if st.st_blocks == 0:
        return 0
    try:
        f = os.open(name, _FILE, dir_fd=fd)
    except OSError as e:
        if e.errno in _EXHAUSTED:
            raise
        return 0
    try:
        now = os.fstat(f)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return 0
        return shared_bytes(f)
    except OSError:
        return 0
    finally:
        os.close(f)


def _count(n: dict[str, int], kind: int, size: int, logical: int = 0) -> None:
    if kind == _META:
        n["metacopy"] += 1
    elif kind == _COPIED:
        n["copied_up"] += 1
        n["copied_up_bytes"] += size
        n["copied_up_logical_bytes"] += logical
    else:
        n["created"] += 1
        n["created_bytes"] += size


# -- diff ------------------------------------------------------------------------------------
def _same_time(a: int, b: int) -> bool:
    """moby's sameFsTime on nanosecond timestamps: equal, or the same second with either
    one's nanoseconds zero (tar keeps no sub-second times)."""
    return a == b or (a // 10**9 == b // 10**9 and (a % 10**9 == 0 or b % 10**9 == 0))


def stat_different(old: os.stat_result, new: os.stat_result) -> bool:
    """moby's statDifferent: what `docker diff` calls a change of an entry found in both
    trees (the backends' diffs share it, so that they give one answer)."""
    if (old.st_mode != new.st_mode or old.st_uid != new.st_uid or old.st_gid != new.st_gid
            or old.st_rdev != new.st_rdev):
        return True
    # A directory's size and mtime say nothing of a change (moby#9874, moby#11422).
    return not stat.S_ISDIR(old.st_mode) and (not _same_time(old.st_mtime_ns, new.st_mtime_ns)
                                              or old.st_size != new.st_size)


def _changed(old: os.stat_result, new: os.stat_result, old_path: str, new_path: str) -> bool:
    """moby's statDifferent, then the security.capability comparison of addChanges."""
    if stat_different(old, new):
        return True
    return old_path != new_path and _xattr(old_path, CAPABILITY) != _xattr(new_path, CAPABILITY)


def diff(upper: str, lowers: Sequence[str]) -> list[tuple[str, str]]:
    """[(kind, /path)]: what `docker diff` prints for a container whose writable layer is
    `upper` over an image of `lowers` (nearest first), sorted by path as Go sorts strings.

    Each directory of the container's tree carries `merged` (the lower directories overlay
    shows through it) and `image` (the image's directories at the same path). Where the two
    are equal, lower entries the upper does not name are the same in both trees and are not
    read; elsewhere (opaque, renamed, added directories) both sides are listed."""
    roots = tuple(lowers)
    changes: dict[str, str] = {}

    def visit(fd: int, entries: list[os.DirEntry], here: tuple[str, Dirs, Dirs]) -> list:
        subdirs = []
        # Directories only in the lowers have no descriptor: walked here, by path.
        todo: list[tuple[tuple[str, Dirs, Dirs], int | None, list]] = [(here, fd, entries)]
        while todo:
            (rel, merged, image), at, listed = todo.pop()
            for name, st, dirs, in_upper in _diff_dir(rel, at, listed, merged, image, roots,
                                                      changes):
                if in_upper:
                    subdirs.append((name, st, dirs))
                else:
                    todo.append((dirs, None, []))
        return subdirs

    _walk(upper, ("", roots, roots), visit)
    # A change inside a directory makes the directory a change (moby#13590), up to "/".
    for p in list(changes):
        parent = os.path.dirname(p)
        while parent != "/" and parent not in changes:
            changes[parent] = "C"
            parent = os.path.dirname(parent)
    return sorted(((k, p) for p, k in changes.items()), key=lambda c: os.fsencode(c[1]))


def _diff_dir(rel: str, fd: int | None, entries: list[os.DirEntry], merged: Dirs, image: Dirs,
              roots: Dirs, changes: dict[str, str]) -> Iterator:
    """One directory of the container's tree (`fd`, its upper directory, or None), its
    changes into `changes`; yields its subdirectories (name, lstat, (rel, merged, image),
    in the upper)."""
    same = merged == image
    if fd is None and same:
        return  # a lower directory the image has as it is
    container: dict[str, tuple[os.stat_result, str, Dirs, bool]] = {}
    named = set()  # every upper name, whiteouts included: they hide the lower ones
    if fd is not None:
        look_image = _Lowers(image, len(entries))
        look_merged = look_image if same else _Lowers(merged, len(entries))
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            named.add(e.name)
            if _whiteout(st):
                if same and look_image(e.name):
                    changes[f"{rel}/{e.name}"] = "D"
                continue
            dirs: Dirs = ()
            if stat.S_ISDIR(st.st_mode):
                opaque, redirect, _ = _marks(_at(fd, e.name))
                shown = (look_merged(e.name) if merged and not (opaque or redirect)
                         else None)
                shown_dirs = shown.dirs if shown and stat.S_ISDIR(shown.st.st_mode) else ()
                dirs = _children(shown_dirs, merged, opaque, redirect, roots)
            container[e.name] = (st, _at(fd, e.name), dirs, True)
    else:
        look_image = _Lowers(image, 0)
    if not same:
        for name, f in _listing(merged).items():
            if name not in named:
                container[name] = (f.st, f.path, f.dirs, False)
        for name in _listing(image).keys() - container.keys():
            changes[f"{rel}/{name}"] = "D"
    for name, (st, p, dirs, in_upper) in container.items():
        old = look_image(name) if image else None
        child = f"{rel}/{name}"
        if old is None:
            changes[child] = "A"
        elif _changed(old.st, st, old.path, p):
            changes[child] = "C"
        if stat.S_ISDIR(st.st_mode):
            old_dirs = old.dirs if old and stat.S_ISDIR(old.st.st_mode) else ()
            yield name, st, (child, dirs, old_dirs), in_upper
