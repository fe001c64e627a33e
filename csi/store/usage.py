"""Disk usage of a directory tree: bytes allocated (st_blocks) and inodes, hardlinks once."""

import os
import stat


def usage(path: str) -> tuple[int, int]:
    """(bytes, inodes) used under `path`, not following symlinks or crossing mounts."""
    seen: set[tuple[int, int]] = set()
    total = inodes = 0
    try:
        root_dev = os.lstat(path).st_dev
    except FileNotFoundError:
        return 0, 0
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            continue  # removed while we walked (a racing unpublish): it uses nothing now
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
            inodes += 1
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev == root_dev:
                    stack.append(e.path)
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_blocks * 512
            inodes += 1
    return total, inodes
