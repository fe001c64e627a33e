"""Apply a layer, as the layer store keeps it (overlay form, `layers/ID/fs`), onto a real
tree: what a snapshotting backend does to turn its parent chain's snapshot into the next.

There is no overlay below, so the layer's overlay marks become what they mean:
- a whiteout (the 0:0 character device unpack.py makes of `.wh.NAME`) deletes NAME;
- an opaque directory (`trusted.overlay.opaque=y`, from `.wh..wh..opq`) first loses every
  entry the tree had there, then gets the layer's own;
- every other entry replaces what the tree had at its name (a directory merges into a
  directory), with its owner, mode, times, xattrs (not `trusted.overlay.*`: overlay's own
  marks), and hard links within the layer kept as links.

Regular files are cloned (`FICLONE`: the tree and the layer share the data extents; the
store's filesystem is the tree's), copied where the filesystem cannot clone.
"""

import errno
import fcntl
import os
import shutil
import stat

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTRS = "trusted.overlay."


def apply_layer(layer: str, dest: str) -> None:
    """Apply the layer directory `layer` onto the directory `dest` (the layer's root
    metadata becomes `dest`'s)."""
    links: dict[tuple[int, int], str] = {}  # the layer's inode → its first copy in dest
    _dir(layer, dest, links)


def _dir(src: str, dest: str, links: dict) -> None:
    if _xattr(src, OPAQUE_XATTR) == b"y":
        for name in os.listdir(dest):
            _remove(os.path.join(dest, name))
    with os.scandir(src) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        s, d = e.path, os.path.join(dest, e.name)
        st = e.stat(follow_symlinks=False)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            _remove(d)  # a whiteout: the name is gone, whatever the tree had there
            continue
        if stat.S_ISDIR(st.st_mode):
            if not (os.path.isdir(d) and not os.path.islink(d)):
                _remove(d)
                os.mkdir(d, 0o700)
            _dir(s, d, links)
            continue
        _remove(d)
        first = links.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
        if first is not None:
            os.link(first, d)  # a hard link of the layer's: the metadata came with the first
            continue
        _entry(s, d, st)
        _metadata(s, d, st)
        if st.st_nlink > 1:
            links[(st.st_dev, st.st_ino)] = d
    _metadata(src, dest, os.lstat(src))  # last: the children changed its times


def _entry(src: str, dest: str, st: os.stat_result) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        _clone(src, dest)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dest)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        os.mknod(dest, stat.S_IFMT(mode) | 0o600, st.st_rdev)
    else:
        raise OSError(errno.EINVAL, "unknown file type in a layer", src)


def _clone(src: str, dest: str) -> None:
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        dfd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
                    raise
                with open(sfd, "rb", closefd=False) as fs, open(dfd, "wb", closefd=False) as fd:
                    shutil.copyfileobj(fs, fd, 1 << 20)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _metadata(src: str, dest: str, st: os.stat_result) -> None:
    """Owner, mode, xattrs and times of `src` onto `dest` (a symlink itself: no mode)."""
    link = stat.S_ISLNK(st.st_mode)
    os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
    if not link:
        os.chmod(dest, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
    have = set(os.listxattr(dest, follow_symlinks=False))
    want = {n for n in os.listxattr(src, follow_symlinks=False)
            if not n.startswith(OVERLAY_XATTRS)}
    for name in have - want:
        if not name.startswith(OVERLAY_XATTRS):
            os.removexattr(dest, name, follow_symlinks=False)
    for name in want:
        os.setxattr(dest, name, os.getxattr(src, name, follow_symlinks=False),
                    follow_symlinks=False)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _remove(path: str) -> None:
    """Remove whatever is at `path` (nothing there is fine): a tree is a snapshot's own
    files, never a mount (nothing is mounted in a chain being built)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
