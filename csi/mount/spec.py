"""Mount plans as data. Pure functions, no I/O: the executor in syscalls.py carries them out.

A writable view of an image is an overlay whose lowerdirs are the image's layers, nearest
(topmost) first, with a private upperdir/workdir. A read-only view needs no upper: overlay
accepts lowerdirs alone only when there are at least two, so a one-layer image is a
read-only bind mount instead (containerd's overlay snapshotter does the same).
"""

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Mount:
    type: str
    source: str
    target: str
    options: tuple[str, ...] = ()

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def overlay(lowers: Sequence[str], upper: str, work: str, target: str) -> Mount:
    """A writable overlay: `lowers` nearest first; writes copy up into `upper`."""
    if not lowers:
        raise ValueError("an overlay needs at least one lower layer")
    return Mount(
        type="overlay",
        source="overlay",
        target=target,
        options=(f"lowerdir={':'.join(lowers)}", f"upperdir={upper}", f"workdir={work}"),
    )


def view(lowers: Sequence[str], target: str) -> Mount:
    """A read-only view of a layer stack (nearest first)."""
    if not lowers:
        raise ValueError("a view needs at least one layer")
    if len(lowers) == 1:
        return Mount(type="bind", source=lowers[0], target=target, options=("rbind", "ro"))
    return Mount(
        type="overlay", source="overlay", target=target,
        options=(f"lowerdir={':'.join(lowers)}", "ro"),
    )


def readonly(m: Mount) -> Mount:
    return m if m.readonly else dataclasses.replace(m, options=m.options + ("ro",))
