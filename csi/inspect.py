"""Reads a publication's upper directory against its layers, like `docker diff`.

Every entry in the upper layer is one of: A (added: exists in no lower layer), C (changed:
a lower entry copied up on first write, or a directory whose contents changed), D (deleted:
an overlay whiteout, a 0:0 character device, hiding the lower entry).
"""

import dataclasses
import os
import stat
from collections.abc import Iterator, Sequence

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


def entries(upper: str, lowers: Sequence[str]) -> Iterator[tuple[str, str, os.stat_result]]:
    """(kind, /path, lstat) for every entry of the upper layer; `lowers` nearest first."""
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, upper)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue  # the pod deleted it while we looked
            below = not _under_opaque(upper, rel) and _in_lowers(rel, lowers)
            if _is_whiteout(st):
                if below:
                    yield "D", "/" + rel, st
            else:
                yield ("C" if below else "A"), "/" + rel, st


def diff(upper: str, lowers: Sequence[str]) -> list[tuple[str, str]]:
    """[(kind, /path)] sorted by path; `lowers` nearest first."""
    return sorted(((kind, path) for kind, path, _ in entries(upper, lowers)),
                  key=lambda e: e[1])


@dataclasses.dataclass(frozen=True)
class CopyUp:
    """What a publication's writes cost, counting files (not the directories around them):
    lower files copied up on first write, files created, lower entries deleted."""

    copied_files: int = 0
    copied_bytes: int = 0
    created_files: int = 0
    created_bytes: int = 0
    deleted: int = 0

    def __add__(self, other: "CopyUp") -> "CopyUp":
        return CopyUp(self.copied_files + other.copied_files,
                      self.copied_bytes + other.copied_bytes,
                      self.created_files + other.created_files,
                      self.created_bytes + other.created_bytes,
                      self.deleted + other.deleted)


@dataclasses.dataclass(frozen=True)
class Summary:
    """One publication's upper layer, counted: entries by change (a hardlinked inode once),
    and allocated bytes (st_blocks). `deleted` counts the lower entries hidden, by
    whiteouts or by opaque directories; `renamed` the directories a rename redirected;
    `modified_dirs` lower directories copied up because something inside them changed."""

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

    def __add__(self, other: "Summary") -> "Summary":
        return Summary(*(a + b for a, b in zip(dataclasses.astuple(self),
                                               dataclasses.astuple(other), strict=True)))


def summarize(upper: str, lowers: Sequence[str]) -> Summary:
    """The upper layer `upper` over `lowers` (nearest first), counted."""
    cu = copy_up(upper, lowers)
    inodes, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in inodes:
                inodes.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return Summary(created=cu.created_files, copied_up=cu.copied_files, deleted=cu.deleted,
                   upper_bytes=total, upper_inodes=len(inodes),
                   copied_up_bytes=cu.copied_bytes, created_bytes=cu.created_bytes)


def copy_up(upper: str, lowers: Sequence[str]) -> CopyUp:
    counts = dict.fromkeys(("copied_files", "copied_bytes", "created_files", "created_bytes",
                            "deleted"), 0)
    for kind, _, st in entries(upper, lowers):
        if kind == "D":
            counts["deleted"] += 1
        elif not stat.S_ISDIR(st.st_mode):
            prefix = "copied" if kind == "C" else "created"
            counts[prefix + "_files"] += 1
            counts[prefix + "_bytes"] += st.st_blocks * 512
    return CopyUp(**counts)
