"""Reads a publication's upper directory against its layers, like `docker diff`.

Every entry in the upper layer is one of: A (added: exists in no lower layer), C (changed:
a lower entry copied up on first write, or a directory whose contents changed), D (deleted:
an overlay whiteout, a 0:0 character device, hiding the lower entry).
"""

import os
import stat
from collections.abc import Sequence


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _in_lowers(rel: str, lowers: Sequence[str]) -> bool:
    for lower in lowers:  # nearest first: the first hit decides
        p = os.path.join(lower, rel)
        try:
            st = os.lstat(p)
        except (FileNotFoundError, NotADirectoryError):
            continue
        return not _is_whiteout(st)
    return False


def diff(upper: str, lowers: Sequence[str]) -> list[tuple[str, str]]:
    """[(kind, /path)] sorted by path; `lowers` nearest first."""
    out = []
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, upper)
            st = os.lstat(p)
            if _is_whiteout(st):
                if _in_lowers(rel, lowers):
                    out.append(("D", "/" + rel))
            elif _in_lowers(rel, lowers):
                out.append(("C", "/" + rel))
            else:
                out.append(("A", "/" + rel))
    return sorted(out, key=lambda e: e[1])
