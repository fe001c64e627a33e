"""Safe tar apply: turns one layer's tar stream into a directory in overlay form.

All path safety lives here. Every member name is cleaned as if rooted at "/" (so absolute
names and `..` are contained, as containerd's archive.Apply does), then joined with
`root_path()`, which resolves symlinked parents *inside* the layer root. Nothing is ever
opened through a symlink, hardlink targets are bounded the same way, device nodes are never
created (except the 0:0 character device that *is* an overlay whiteout), and xattrs in the
`trusted.overlay.` namespace are dropped, since they would steer overlayfs itself.

OCI whiteouts become overlay whiteouts: `.wh.NAME` → a 0:0 character device named NAME;
`.wh..wh..opq` → `trusted.overlay.opaque=y` on the directory. Directory mtimes are set last,
after their contents stopped changing them. Duplicate entries: the last one wins.
"""

import dataclasses
import errno
import logging
import os
import posixpath
import stat
import tarfile
from typing import BinaryIO

from csi.errors import InvalidArgument
from csi.tree import remove_tree

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_COPY_CHUNK = 1 << 20
_MAX_LINKS = 40


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
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    return "" if cleaned == "." else cleaned


def root_path(root: str, rel: str, follow_final: bool = False) -> str:
    """Join `rel` to `root`, resolving symlinks as if `root` were "/" (chroot semantics):
    absolute link targets restart at root and `..` stops at root, so the result is always
    inside root. The final component is not followed unless asked."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if (parts or follow_final) and os.path.islink(candidate):
            links += 1
            if links > _MAX_LINKS:
                raise UnsafeLayer(f"too many levels of symbolic links resolving {rel!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _remove(path: str) -> None:
    """Remove whatever is at `path` (never following a symlink)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(path)  # never follows symlinks inside the tree; any depth
    else:
        os.unlink(path)


def _ensure_dir(path: str, root: str) -> None:
    """Create missing parents of an entry (mode 0755, as tar does)."""
    if os.path.isdir(path) and not os.path.islink(path):
        return
    rel = os.path.relpath(path, root)
    cur = root
    for part in rel.split("/"):
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(f"{os.path.relpath(cur, root)!r} is not a directory but the "
                              "layer has entries below it")


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    out = {}
    for key, value in member.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        name = key[len("SCHILY.xattr."):]
        if name.startswith("trusted.overlay."):
            continue  # overlay's own metadata (redirects, opaque) must come from whiteouts
        out[name] = value.encode("utf-8", "surrogateescape")
    return out


def _set_metadata(path: str, m: tarfile.TarInfo, is_link: bool) -> None:
    os.lchown(path, m.uid, m.gid)
    if not is_link:
        # chown clears set-id bits, so the mode goes after it.
        os.chmod(path, m.mode & 0o7777)
    for name, value in _xattrs(m).items():
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            log.warning("cannot set xattr %s on %s: %s", name, path, e.strerror)


def _mtime(path: str, m: tarfile.TarInfo) -> None:
    t = max(0.0, float(m.mtime))
    os.utime(path, (t, t), follow_symlinks=False)


def apply(stream: BinaryIO, dest: str) -> ApplyStats:
    """Apply an uncompressed tar stream to the empty directory `dest`."""
    stats = ApplyStats()
    dirs: dict[str, tarfile.TarInfo] = {}  # cleaned name -> its last entry (last one wins)
    try:
        tf = tarfile.open(fileobj=stream, mode="r|", errorlevel=2)
    except tarfile.ReadError as e:
        raise InvalidArgument(f"not a tar archive: {e}") from None
    with tf:
        try:
            for member in tf:
                stats.entries += 1
                _apply_member(tf, member, dest, stats, dirs)
        except tarfile.TarError as e:
            raise InvalidArgument(f"malformed layer tar: {e}") from None
    # Deepest first, so setting a child's mtime does not disturb its parent's. Paths are
    # resolved again inside the root: a later entry may have replaced a parent with a symlink.
    for name in sorted(dirs, key=lambda n: n.count("/"), reverse=True):
        path = root_path(dest, name) if name else dest
        if os.path.isdir(path) and not os.path.islink(path):
            _mtime(path, dirs[name])
    return stats


def _apply_member(tf: tarfile.TarFile, m: tarfile.TarInfo, dest: str, stats: ApplyStats,
                  dirs: dict) -> None:
    name = clean_name(m.name)
    if not name:
        if m.isdir():
            dirs[""] = m  # the root keeps its own mode; only mtime is applied
        return
    parent_rel, base = posixpath.split(name)
    parent = root_path(dest, parent_rel, follow_final=True)
    _ensure_dir(parent, dest)

    if base.startswith(WHITEOUT_PREFIX):
        if base == OPAQUE:
            os.setxattr(parent, OPAQUE_XATTR, b"y")
            stats.whiteouts += 1
            return
        hidden = base[len(WHITEOUT_PREFIX):]
        if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX):
            raise UnsafeLayer(f"invalid whiteout entry {m.name!r}")
        target = os.path.join(parent, hidden)
        _remove(target)
        os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        stats.whiteouts += 1
        return

    path = os.path.join(parent, base)
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None and not (m.isdir() and stat.S_ISDIR(existing.st_mode)):
        _remove(path)

    if m.isdir():
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            os.mkdir(path, 0o700)
        _set_metadata(path, m, is_link=False)
        dirs[os.path.relpath(path, dest)] = m
        return
    if m.isreg():
        if m.size < 0:
            raise UnsafeLayer(f"{m.name!r} has a negative size")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as out:
            src = tf.extractfile(m)
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
        stats.files += 1
        stats.bytes += m.size
    elif m.issym():
        os.symlink(m.linkname, path)
    elif m.islnk():
        link_rel = clean_name(m.linkname)
        if not link_rel:
            raise UnsafeLayer(f"hardlink {m.name!r} points at the layer root")
        source = root_path(dest, link_rel)
        try:
            sst = os.lstat(source)
        except FileNotFoundError:
            raise UnsafeLayer(f"hardlink {m.name!r} → {m.linkname!r}: target is not in this "
                              "layer") from None
        if stat.S_ISDIR(sst.st_mode):
            raise UnsafeLayer(f"hardlink {m.name!r} points at a directory")
        os.link(source, path, follow_symlinks=False)
        return  # a hardlink shares its target's inode and metadata
    elif m.ischr() and m.devmajor == 0 and m.devminor == 0:
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))  # already in overlay form
        stats.whiteouts += 1
        return
    elif m.isfifo():
        os.mkfifo(path, 0o600)
    elif m.ischr() or m.isblk():
        stats.skipped_devices += 1
        log.warning("skipping device node %s (%d:%d): device nodes are never created from "
                    "image layers", m.name, m.devmajor, m.devminor)
        return
    else:
        log.warning("skipping %s: unsupported tar entry type %r", m.name, m.type)
        return
    _set_metadata(path, m, is_link=m.issym())
    _mtime(path, m)
