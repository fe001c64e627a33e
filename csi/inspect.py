"""Reads a publication's upper directory against its layers, like `docker diff`.

Every entry in the upper layer is one of: A (added: exists in no lower layer), C (changed:
a lower entry copied up on first write, or a directory whose contents changed), D (deleted:
an overlay whiteout, a 0:0 character device, hiding the lower entry).
"""

import os
import stat
from collections.abc import Sequence

OPAQUE = "trusted.overlay.opaque"


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _in_lowers(rel: str, lowers: Sequence[str]) -> bool:
    """Whether `rel` exists in the merged view of `lowers` (nearest first), resolving it one
    component at a time as overlayfs does: a whiteout or a non-directory hides everything
    below it, and an opaque directory hides the layers under it."""
    parts = rel.split("/")
    layers = list(lowers)
    for depth in range(len(parts)):
        prefix = os.path.join(*parts[: depth + 1])
        last = depth == len(parts) - 1
        found = []
        for lower in layers:
            p = os.path.join(lower, prefix)
            try:
                st = os.lstat(p)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if _is_whiteout(st):
                break
            if last:
                return True
            if not stat.S_ISDIR(st.st_mode):
                break
            found.append(lower)
            if _opaque(p):
                break
        if not found:
            return False
        layers = found
    return False


def _under_opaque(upper: str, rel: str) -> bool:
    """An opaque directory in the upper layer (deleted, then re-created) hides all lowers."""
    parts = rel.split("/")[:-1]
    return any(_opaque(os.path.join(upper, *parts[: i + 1])) for i in range(len(parts)))


def diff(upper: str, lowers: Sequence[str]) -> list[tuple[str, str]]:
    """[(kind, /path)] sorted by path; `lowers` nearest first."""
    out = []
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, upper)
            st = os.lstat(p)
            below = not _under_opaque(upper, rel) and _in_lowers(rel, lowers)
            if _is_whiteout(st):
                if below:
                    out.append(("D", "/" + rel))
            elif below:
                out.append(("C", "/" + rel))
            else:
                out.append(("A", "/" + rel))
    return sorted(out, key=lambda e: e[1])
