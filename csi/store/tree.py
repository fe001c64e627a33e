"""Removing directory trees of any depth.

`shutil.rmtree` recurses once per level and fails with RecursionError on trees about a
thousand levels deep, which a hostile layer or a pod's writes can make in a few kilobytes.
This removal keeps its depth at two: the subdirectories of each directory it empties are
first moved up to the top of the tree (by dir fd, never following a symlink), so neither
recursion, open descriptors nor path lengths grow with the tree.
"""

import errno
import logging
import os
import stat

log = logging.getLogger(__name__)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str, ignore_errors: bool = False) -> None:
    try:
        _remove_tree(path)
    except OSError as e:
        if not ignore_errors:
            raise
        log.warning("cannot remove %s: %s", path, e)


def _remove_tree(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    top = os.open(path, _DIR)
    counter = 0
    try:
        while True:
            with os.scandir(top) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            if not entries:
                break
            for name, is_dir in entries:
                if not is_dir:
                    os.unlink(name, dir_fd=top)
                    continue
                sub = os.open(name, _DIR, dir_fd=top)
                try:
                    with os.scandir(sub) as it:
                        children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
                    for child, child_is_dir in children:
                        if not child_is_dir:
                            os.unlink(child, dir_fd=sub)
                            continue
                        while True:  # hoist the subdirectory to the top, under a free name
                            counter += 1
                            try:
                                os.rename(child, f".rm-{counter}", src_dir_fd=sub,
                                          dst_dir_fd=top)
                                break
                            except OSError as e:
                                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY,
                                                   errno.ENOTDIR, errno.EISDIR):
                                    raise
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=top)
    finally:
        os.close(top)
    os.rmdir(path)
