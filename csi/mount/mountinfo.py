"""The kernel's mount table (/proc/self/mountinfo), parsed. The path is injectable for tests.

"Is this path a mount point?" is asked on every publish and unpublish. Parsing mountinfo
costs time in proportion to the node's mounts (about 30 ms with a thousand publications), so
the live table answers it with statx(2)'s STATX_ATTR_MOUNT_ROOT (Linux 5.8) in constant time,
and falls back to mountinfo where the kernel or libc cannot say.
"""

import dataclasses
import os
import re

from csi.statx import mount_id, mount_root  # noqa: F401 - part of this module's answers

_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclasses.dataclass(frozen=True)
class MountInfo:
    mount_id: int
    parent_id: int
    mount_point: str
    root: str
    fstype: str
    source: str
    options: str
    super_options: str
    device: str = ""  # "major:minor" of the superblock: shared by every bind of one mount
    optional: tuple[str, ...] = ()  # propagation: "shared:N" (peer group), "master:N", ...

    @property
    def peer_group(self) -> str:
        """"shared:N" for a shared mount (its propagated copies carry the same), else ""."""
        return next((f for f in self.optional if f.startswith("shared:")), "")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \040, \011, \012, \134.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split(" ")
        sep = fields.index("-", 6)  # optional fields end at the lone "-"
        mounts.append(
            MountInfo(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                options=fields[5],
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
                device=fields[2],
                optional=tuple(fields[6:sep]),
            )
        )
    return mounts


LIVE = "/proc/self/mountinfo"


class MountTable:
    def __init__(self, path: str = LIVE):
        self._path = path

    def mounts(self) -> list[MountInfo]:
        with open(self._path) as f:
            return parse(f.read())

    def at(self, path: str) -> list[MountInfo]:
        """Every mount stacked on `path`, bottom first."""
        path = os.path.normpath(path)
        return [m for m in self.mounts() if m.mount_point == path]

    def is_mountpoint(self, path: str) -> bool:
        if self._path == LIVE:
            answer = mount_root(path)
            if answer is not None:
                return answer
        return bool(self.at(path))

    def under(self, prefix: str) -> list[MountInfo]:
        prefix = os.path.normpath(prefix)
        below = prefix.rstrip("/") + "/"  # "/" itself must not become "//"
        return [
            m for m in self.mounts()
            if m.mount_point == prefix or m.mount_point.startswith(below)
        ]


def mount_of(path: str, mounts: list[MountInfo]) -> MountInfo | None:
    """The mount `path` is on, from one reading of the table: by statx mount ID, which sees
    through stacked and hidden mounts; else (Linux < 5.8) the longest mount point covering
    the path, the topmost of those stacked there."""
    real = os.path.realpath(path)
    try:
        mid = mount_id(real)
    except FileNotFoundError:
        return None
    found = next((m for m in mounts if m.mount_id == mid), None)
    if found is not None:
        return found
    covering = [m for m in mounts
                if real == m.mount_point or real.startswith(m.mount_point.rstrip("/") + "/")]
    longest = max((len(m.mount_point) for m in covering), default=0)
    return next((m for m in reversed(covering) if len(m.mount_point) == longest), None)
