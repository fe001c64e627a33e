"""The kernel's mount table (/proc/self/mountinfo), parsed. The path is injectable for tests."""

import dataclasses
import os
import re

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
            )
        )
    return mounts


class MountTable:
    def __init__(self, path: str = "/proc/self/mountinfo"):
        self._path = path

    def mounts(self) -> list[MountInfo]:
        with open(self._path) as f:
            return parse(f.read())

    def at(self, path: str) -> list[MountInfo]:
        """Every mount stacked on `path`, bottom first."""
        path = os.path.normpath(path)
        return [m for m in self.mounts() if m.mount_point == path]

    def is_mountpoint(self, path: str) -> bool:
        return bool(self.at(path))

    def under(self, prefix: str) -> list[MountInfo]:
        prefix = os.path.normpath(prefix)
        below = prefix.rstrip("/") + "/"  # "/" itself must not become "//"
        return [
            m for m in self.mounts()
            if m.mount_point == prefix or m.mount_point.startswith(below)
        ]
