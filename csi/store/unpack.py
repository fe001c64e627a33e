"""Safe tar apply: turns one layer's tar stream into a directory in overlay form.

All path safety lives here. Every member name is cleaned as if rooted at "/" (so absolute
names and `..` are contained, as containerd's archive.Apply does), and its parent is
resolved *inside* the layer root: symlinked parents are followed with chroot semantics
(`root_path()`), nothing is ever created or opened through a symlink (entries are created
relative to their parent directory's descriptor with O_NOFOLLOW/O_EXCL), hardlink targets
are bounded the same way, device nodes are never created (except the 0:0 character device
that *is* an overlay whiteout), and xattrs in the `trusted.overlay.` namespace are dropped,
since they would steer overlayfs itself.

OCI whiteouts become overlay whiteouts: `.wh.NAME` → a 0:0 character device named NAME;
`.wh..wh..opq` → `trusted.overlay.opaque=y` on the directory. Directory owner, mode,
xattrs and mtime are set last, deepest first, after their contents stopped changing them.
Duplicate entries: the last one wins.

Per entry the cost is kept to the syscalls the entry needs: `_Dirs` remembers the
directories this unpack created or verified (each known to be a real directory, as are all
its parents), so a parent is found without a lookup and entries are created relative to its
cached descriptor; a name that exists shows as EEXIST on the create rather than by a stat
beforehand; a file is written from the reader's buffer and gets owner, mode, xattrs and
times on its open descriptor, and owner or mode only when creation did not already give
them. Whatever replaces or removes a directory drops it, and everything below it, from
what `_Dirs` knows.
"""

import collections
import dataclasses
import errno
import logging
import os
import posixpath
import stat
from typing import BinaryIO

from csi.errors import InvalidArgument
from csi.store.tarstream import (
    BLKTYPE,
    CHRTYPE,
    FIFOTYPE,
    LNKTYPE,
    SYMTYPE,
    Entry,
    TarReader,
    mtime_ns,
)
from csi.tree import remove_tree

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_MAX_LINKS = 40
_MAX_DIR_FDS = 128  # open parent directories kept; all are closed when it fills
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_PATH_MAX, _NAME_MAX = 4096, 255  # Linux's, in characters here (bytes there)
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_XATTR_PREFIX = "SCHILY.xattr."


class UnsafeLayer(InvalidArgument):
    """The layer tries something no well-formed layer does; it is refused whole."""


@dataclasses.dataclass
class ApplyStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0
    skipped_devices: int = 0


def clean_name(name: str) -> str:
    """A member name as a path relative to the layer root; '' is the root itself."""
    if (name and not name.startswith((".", "/")) and "//" not in name and "/." not in name
            and not name.endswith("/")):
        return name  # already clean: what normpath would return (the common case)
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    return "" if cleaned == "." else cleaned


def root_path(root: str, rel: str, follow_final: bool = False) -> str:
    """Join `rel` to `root`, resolving symlinks as if `root` were "/" (chroot semantics):
    absolute link targets restart at root and `..` stops at root, so the result is always
    inside root. The final component is not followed unless asked.

    Walked one component at a time from descriptors (each lookup relative to its parent's
    O_PATH descriptor), so a deep name costs one lookup per component, never a walk of
    the whole path per component."""
    parts = collections.deque(p for p in rel.split("/") if p not in ("", "."))
    resolved: list[str] = []
    # The descriptor of root and of each resolved component; None for one that is not
    # there, or not a directory (nothing exists below it to look at).
    fds: list[int | None] = [os.open(root, _PATH_FLAGS)]
    links = 0
    try:
        while parts:
            part = parts.popleft()
            if part == "..":
                if resolved:
                    resolved.pop()
                    _close(fds.pop())
                continue
            parent = fds[-1]
            st = None
            if parent is not None:
                try:
                    st = os.stat(part, dir_fd=parent, follow_symlinks=False)
                except (FileNotFoundError, NotADirectoryError):
                    pass
            if st is not None and stat.S_ISLNK(st.st_mode) and (parts or follow_final):
                links += 1
                if links > _MAX_LINKS:
                    raise UnsafeLayer(f"too many levels of symbolic links resolving {rel!r}")
                target = os.readlink(part, dir_fd=parent)
                if target.startswith("/"):
                    _close(*fds[1:])
                    del fds[1:]
                    resolved = []
                parts.extendleft(reversed([p for p in target.split("/")
                                           if p not in ("", ".")]))
                continue
            resolved.append(part)
            fds.append(os.open(part, _PATH_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
                       if st is not None and stat.S_ISDIR(st.st_mode) else None)
    finally:
        _close(*fds)
    return os.path.join(root, *resolved)


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def check_name(name: str, what: str, components: bool = True) -> None:
    """Refuse a member or link name no filesystem here could hold (PATH_MAX, and NAME_MAX
    for each component unless `components` is False: a symlink's target may hold any
    text): a layer of well-formed names never has one, and one of a million components
    would cost a lookup each."""
    if len(name) > _PATH_MAX or (components and max(map(len, name.split("/"))) > _NAME_MAX):
        raise UnsafeLayer(f"{what} {name[:64]!r}... is longer than a path or a name may be "
                          f"({_PATH_MAX} and {_NAME_MAX} characters)")


def _umask() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


@dataclasses.dataclass
class _DirMeta:
    entry: Entry
    xattrs: dict[str, bytes]


class _Dirs:
    """The directories of one unpack known to be real directories (so are their parents),
    by path relative to the root, with a bounded cache of open descriptors."""

    def __init__(self, root: str):
        self.root = root
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.known: set[str] = {""}
        self.children: dict[str, set[str]] = {}  # known directory → its known subdirectories
        self.fds: dict[str, int] = {}
        self.meta: dict[str, _DirMeta] = {}  # directory entries: metadata set at the end

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        os.close(self.root_fd)

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def fd(self, rel: str) -> int:
        """The descriptor of a known directory."""
        if not rel:
            return self.root_fd
        fd = self.fds.get(rel)
        if fd is None:
            fd = self.fds[rel] = os.open(rel, _DIR_FLAGS, dir_fd=self.root_fd)
        return fd

    def parent(self, rel: str) -> tuple[str, int]:
        """Resolve the parent directory `rel` of an entry inside the root (creating missing
        directories, mode 0755 as tar does): its resolved path and descriptor. Called first
        for each entry: descriptors are only closed here (or by `forget`, for what is
        removed), never while an entry holds one."""
        if len(self.fds) >= _MAX_DIR_FDS:
            for old in self.fds.values():
                os.close(old)
            self.fds.clear()
        if rel in self.known:
            return rel, self.fd(rel)
        path = root_path(self.root, rel, follow_final=True)
        _ensure_dir(path, self.root)
        resolved = os.path.relpath(path, self.root)
        if resolved == ".":
            resolved = ""
        # Every component of `resolved` is now a real directory (root_path resolved the
        # symlinks, _ensure_dir checked or created the rest).
        prefix = resolved
        while prefix and prefix not in self.known:
            self.add(prefix)
            prefix = prefix.rpartition("/")[0]
        return resolved, self.fd(resolved)

    def add(self, rel: str) -> None:
        """`rel`, whose parent is known or being made known, is a real directory."""
        self.known.add(rel)
        self.children.setdefault(rel.rpartition("/")[0], set()).add(rel)

    def forget(self, rel: str) -> None:
        """`rel` was removed or replaced: neither it nor anything below it is known. Costs
        what was known below it (the child index), not everything known."""
        if rel not in self.known:
            return
        self.children.get(rel.rpartition("/")[0], set()).discard(rel)
        stack = [rel]
        while stack:
            key = stack.pop()
            self.known.discard(key)
            self.meta.pop(key, None)
            _close(self.fds.pop(key, None))
            stack.extend(self.children.pop(key, ()))


def _remove_at(dirs: _Dirs, parent_rel: str, pfd: int, base: str) -> None:
    """Remove whatever is at `base` in the parent (never following a symlink)."""
    try:
        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        rel = f"{parent_rel}/{base}" if parent_rel else base
        dirs.forget(rel)
        remove_tree(dirs.path(rel))  # never follows symlinks inside the tree; any depth
    else:
        os.unlink(base, dir_fd=pfd)


def _ensure_dir(path: str, root: str) -> None:
    """Create missing parents of an entry (mode 0755, as tar does), one component at a
    time from its parent's descriptor, never following a symlink."""
    rel = os.path.relpath(path, root)
    if rel == ".":
        return
    fd = os.open(root, _PATH_FLAGS)
    try:
        done = []
        for part in rel.split("/"):
            done.append(part)
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    raise UnsafeLayer(f"{'/'.join(done)!r} is not a directory but the "
                                      "layer has entries below it")
            sub = os.open(part, _PATH_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)


def _xattrs(member: Entry) -> dict[str, bytes]:
    out = {}
    if not member.pax:
        return out
    for key, value in member.pax.items():
        if not key.startswith(_XATTR_PREFIX):
            continue
        name = key[len(_XATTR_PREFIX):]
        if name.startswith("trusted.overlay."):
            continue  # overlay's own metadata (redirects, opaque) must come from whiteouts
        out[name] = value.encode("utf-8", "surrogateescape")
    return out


def _set_xattrs(target, xattrs: dict[str, bytes], what: str) -> None:
    """`target`: an open descriptor, or a path (never followed)."""
    for name, value in xattrs.items():
        try:
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            log.warning("cannot set xattr %s on %s: %s", name, what, e.strerror)


class _Applier:
    def __init__(self, reader: TarReader, dest: str):
        self.reader = reader
        self.stats = ApplyStats()
        self.euid, self.egid = os.geteuid(), os.getegid()
        umask = _umask()
        st = os.stat(dest)
        try:
            default_acl = "system.posix_acl_default" in os.listxattr(dest)
        except OSError:
            default_acl = True
        # New files get our owner and their create mode less the umask, unless the root
        # makes them inherit a group (set-gid) or a mode (default ACL): then always set both.
        self.careful = umask is None or bool(st.st_mode & stat.S_ISGID) or default_acl
        # Mode bits creation cannot give: masked by the umask, or set-id/sticky bits.
        self.chmod_bits = 0o7000 | (umask or 0)
        self.dirs = _Dirs(dest)  # last: nothing after it may fail and leak its descriptor

    def close(self) -> None:
        self.dirs.close()

    def run(self) -> ApplyStats:
        stats = self.stats
        for member in self.reader:
            stats.entries += 1
            self.member(member)
        self.finish()
        return stats

    def finish(self) -> None:
        # Deepest first, so setting a child's mtime does not disturb its parent's. Only
        # directories still known are touched: one that was replaced or removed is gone
        # from `meta`, so nothing here follows a symlink.
        dirs = self.dirs
        root_fd = dirs.root_fd
        for rel in sorted(dirs.meta, key=lambda n: n.count("/"), reverse=True):
            m, xattrs = dirs.meta[rel].entry, dirs.meta[rel].xattrs
            t = mtime_ns(m)
            if not rel:
                os.utime(root_fd, ns=(t, t))  # the root keeps its own owner and mode
                continue
            os.chown(rel, m.uid, m.gid, dir_fd=root_fd, follow_symlinks=False)
            # chown clears set-id bits, so the mode goes after it.
            os.chmod(rel, m.mode & 0o7777, dir_fd=root_fd)
            if xattrs:
                _set_xattrs(dirs.path(rel), xattrs, rel)
            os.utime(rel, ns=(t, t), dir_fd=root_fd, follow_symlinks=False)

    def member(self, m: Entry) -> None:
        check_name(m.name, "member name")
        if m.linkname:
            check_name(m.linkname, "link name", components=m.type == LNKTYPE)
        name = clean_name(m.name)
        dirs = self.dirs
        if not name:
            if m.isdir():
                dirs.meta[""] = _DirMeta(m, {})
            return
        parent_rel, _, base = name.rpartition("/")
        parent_rel, pfd = dirs.parent(parent_rel)
        kind = m.type

        if base.startswith(WHITEOUT_PREFIX):
            self.whiteout(m, parent_rel, pfd, base)
            return
        if m.isreg():
            self.regular(m, parent_rel, pfd, base)
        elif m.isdir():
            self.directory(m, parent_rel, pfd, base)
        elif kind == SYMTYPE:
            self.create(parent_rel, pfd, base, os.symlink, m.linkname, base, dir_fd=pfd)
            self.metadata(m, parent_rel, pfd, base, chmod=False)
        elif kind == LNKTYPE:
            self.hardlink(m, parent_rel, pfd, base)
        elif kind == CHRTYPE and m.devmajor == 0 and m.devminor == 0:
            # Already in overlay form.
            self.create(parent_rel, pfd, base, os.mknod, base, stat.S_IFCHR | 0o000,
                        os.makedev(0, 0), dir_fd=pfd)
            self.stats.whiteouts += 1
        elif kind == FIFOTYPE:
            self.create(parent_rel, pfd, base, os.mkfifo, base, 0o600, dir_fd=pfd)
            self.metadata(m, parent_rel, pfd, base, chmod=True)
        elif kind == CHRTYPE or kind == BLKTYPE:
            self.stats.skipped_devices += 1
            log.warning("skipping device node %s (%d:%d): device nodes are never created "
                        "from image layers", m.name, m.devmajor, m.devminor)
        else:
            log.warning("skipping %s: unsupported tar entry type %r", m.name, kind)

    def create(self, parent_rel: str, pfd: int, base: str, make, *args, **kwargs):
        """Create `base` with `make`; whatever was there is replaced (last one wins)."""
        try:
            return make(*args, **kwargs)
        except FileExistsError:
            _remove_at(self.dirs, parent_rel, pfd, base)
            return make(*args, **kwargs)

    def whiteout(self, m: Entry, parent_rel: str, pfd: int, base: str) -> None:
        if base == OPAQUE:
            os.setxattr(pfd, OPAQUE_XATTR, b"y")
            self.stats.whiteouts += 1
            return
        hidden = base[len(WHITEOUT_PREFIX):]
        if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX):
            raise UnsafeLayer(f"invalid whiteout entry {m.name!r}")
        _remove_at(self.dirs, parent_rel, pfd, hidden)
        os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
        self.stats.whiteouts += 1

    def directory(self, m: Entry, parent_rel: str, pfd: int, base: str) -> None:
        rel = f"{parent_rel}/{base}" if parent_rel else base
        dirs = self.dirs
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)  # owner and mode at the end
        except FileExistsError:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(base, dir_fd=pfd)
                os.mkdir(base, 0o700, dir_fd=pfd)
        dirs.add(rel)
        xattrs = _xattrs(m)
        old = dirs.meta.get(rel)
        if old is not None:
            xattrs = {**old.xattrs, **xattrs}  # every entry's xattrs were set, as before
        dirs.meta[rel] = _DirMeta(m, xattrs)

    def regular(self, m: Entry, parent_rel: str, pfd: int, base: str) -> None:
        perm = m.mode & 0o7777
        fd = self.create(parent_rel, pfd, base, os.open, base, _FILE_FLAGS, perm & 0o777,
                         dir_fd=pfd)
        try:
            if m.size:
                write = os.write
                for chunk in self.reader.chunks():
                    n = write(fd, chunk)
                    while n < len(chunk):
                        chunk = chunk[n:]
                        n = write(fd, chunk)
            chown = self.careful or m.uid != self.euid or m.gid != self.egid
            if chown:
                os.fchown(fd, m.uid, m.gid)
            # chown clears set-id bits, so the mode goes after it.
            if chown or perm & self.chmod_bits:
                os.fchmod(fd, perm)
            xattrs = _xattrs(m)
            if xattrs:
                _set_xattrs(fd, xattrs, m.name)
            t = mtime_ns(m)
            os.utime(fd, ns=(t, t))
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += m.size

    def hardlink(self, m: Entry, parent_rel: str, pfd: int, base: str) -> None:
        link_rel = clean_name(m.linkname)
        if not link_rel:
            raise UnsafeLayer(f"hardlink {m.name!r} points at the layer root")
        dirs = self.dirs
        # Whatever is at the name goes first (before the target is looked up: removing a
        # directory closes the descriptors of what was below it).
        _remove_at(dirs, parent_rel, pfd, base)
        src_parent, _, src_base = link_rel.rpartition("/")
        if src_parent in dirs.known:
            src_fd = dirs.fd(src_parent)
        else:
            source = root_path(dirs.root, link_rel)
            src_fd, src_base = None, source
        try:
            sst = os.stat(src_base, dir_fd=src_fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            raise UnsafeLayer(f"hardlink {m.name!r} → {m.linkname!r}: target is not in this "
                              "layer") from None
        if stat.S_ISDIR(sst.st_mode):
            raise UnsafeLayer(f"hardlink {m.name!r} points at a directory")
        try:
            # A hardlink shares its target's inode and metadata.
            os.link(src_base, base, src_dir_fd=src_fd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise UnsafeLayer(f"hardlink {m.name!r} → {m.linkname!r}: target is not in this "
                              "layer") from None

    def metadata(self, m: Entry, parent_rel: str, pfd: int, base: str, chmod: bool) -> None:
        """Owner, mode, xattrs and times of a symlink or fifo just created as `base`."""
        if self.careful or m.uid != self.euid or m.gid != self.egid:
            os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if chmod:
            os.chmod(base, m.mode & 0o7777, dir_fd=pfd)  # a fifo we just made: no link
        xattrs = _xattrs(m)
        if xattrs:
            path = os.path.join(self.dirs.path(parent_rel), base)
            _set_xattrs(path, xattrs, path)
        t = mtime_ns(m)
        os.utime(base, ns=(t, t), dir_fd=pfd, follow_symlinks=False)


def apply(stream: BinaryIO, dest: str) -> ApplyStats:
    """Apply an uncompressed tar stream to the empty directory `dest`."""
    applier = _Applier(TarReader(stream), dest)
    try:
        return applier.run()
    finally:
        applier.close()
