"""Fixtures of the backend conformance suite: one harness per backend flavour.

A flavour is a backend class and the kernel it is shown (the probed `Features`, possibly
narrowed). Adding a backend, or a way of running one, is one entry in FLAVOURS; every test
of test_conformance.py then runs against it.
"""

import contextlib
import dataclasses
import io
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator

import pytest

from csi.backend import Backend
from csi.backend.btrfs import BtrfsBackend
from csi.backend.overlay import OverlayBackend
from csi.image.build import LayerBuilder
from csi.mount.features import Features, probe
from csi.mount.spec import Mount
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.store.unpack import apply
from tests.conftest import unmount_all_under


@dataclasses.dataclass(frozen=True)
class Flavour:
    name: str
    backend: Callable[[StorePaths, Features], Backend]
    # What the backend and the executor are told the kernel can do, from what it can.
    features: Callable[[Features], Features] = lambda probed: probed
    # The store's filesystem: "" for the test's tmp_path, else a name of tests/storefs.py's
    # STORES (the session's loop-mounted filesystems), or QUOTA_BTRFS / SIMPLE_QUOTA_BTRFS
    # (a btrfs of this suite's own with full or simple quotas enabled: they slow every
    # commit of the shared one).
    store_fs: str = ""
    # Where the writes of a key can be read after its view is unmounted: the flavour knows
    # its backend's layout (overlay: the upper dir; a snapshot: the snapshot itself).
    written: Callable[["Harness", str], str | None] = (
        lambda h, key: d.upper if (d := h.backend.dirs(key)) is not None else None)


class LimitedOverlay(OverlayBackend):
    """The overlay backend with every writable view size-limited (the loop mechanism: a
    filesystem image per key), as a pod with a `sizeLimit` gets it. The suite's tests ask
    for no limit; this flavour gives each one, so every promise is checked through it."""

    LIMIT = 64 << 20

    def prepare(self, key, chain, target, size_limit=0):
        return super().prepare(key, chain, target, size_limit or self.LIMIT)


QUOTA_BTRFS = "btrfs-quota"
SIMPLE_QUOTA_BTRFS = "btrfs-squota"


class LimitedBtrfs(BtrfsBackend):
    """The btrfs backend with every writable view size-limited, on the session's btrfs,
    which has no quotas: each one is the loop mechanism's overlay over a chain subvolume,
    as a pod with a `sizeLimit` gets it there."""

    LIMIT = 64 << 20

    def prepare(self, key, chain, target, size_limit=0):
        return super().prepare(key, chain, target, size_limit or self.LIMIT)


FLAVOURS = [
    Flavour("overlay", OverlayBackend),
    Flavour("overlay-limited", LimitedOverlay),
    # A kernel before 6.8: chains whose absolute lowerdirs overflow a page must take the
    # backend's relative-lowerdir fallback, since the executor cannot pass them one by one.
    Flavour("overlay-no-lowerdir+", OverlayBackend,
            lambda probed: dataclasses.replace(probed, lowerdir_plus=False)),
    # Snapshots of chain subvolumes, with the store on the session's btrfs.
    Flavour("btrfs", BtrfsBackend, store_fs="btrfs",
            written=lambda h, key: p if os.path.isdir(p := h.paths.volume_part(key, "fs"))
            else None),
    # Size-limited on a btrfs without quotas: overlays with their upper in a loop filesystem.
    Flavour("btrfs-limited-noquota", LimitedBtrfs, store_fs="btrfs"),
    # Size-limited on a btrfs with quotas: snapshots with a qgroup limit.
    Flavour("btrfs-limited-qgroup", LimitedBtrfs, store_fs=QUOTA_BTRFS,
            written=lambda h, key: p if os.path.isdir(p := h.paths.volume_part(key, "fs"))
            else None),
    # Size-limited on a btrfs with simple quotas: snapshots in a limited group of their own.
    Flavour("btrfs-limited-squota", LimitedBtrfs, store_fs=SIMPLE_QUOTA_BTRFS,
            written=lambda h, key: p if os.path.isdir(p := h.paths.volume_part(key, "fs"))
            else None),
]


class Harness:
    """A fresh store under `base` with its backend, and a mounter told the same features.

    Targets (`target(name)`) and anything else a test mounts live under `base`; the fixture
    unmounts all of it and removes every key the backend still lists, whatever happened."""

    def __init__(self, flavour: Flavour, base: str, store_base: str = ""):
        self.flavour = flavour
        self.base = base
        self.paths = StorePaths(os.path.join(store_base or base, "store")).make()
        self.features = flavour.features(probe(self.paths.tmp))
        self.backend = flavour.backend(self.paths, self.features)
        self.mounter = Mounter(features=self.features)
        # Deterministic IDs, as short as the layer store's (16 hex digits): two stores of
        # one test hold layers of the same IDs, which a recognizer must still tell apart.
        self._ids = itertools.count()

    def make_layer(self, builder: LayerBuilder) -> str:
        """Unpack `builder`'s tar into `layers/ID/fs` the way the layer store does: into a
        fresh directory under tmp/, then renamed into place. Returns the layer ID."""
        lid = f"{next(self._ids):016x}"
        work = tempfile.mkdtemp(prefix=f"unpack-{lid}-", dir=self.paths.tmp)
        fs = os.path.join(work, "fs")
        os.mkdir(fs, 0o755)
        apply(io.BytesIO(builder.tar_bytes()), fs)
        os.rename(work, self.paths.layer(lid))
        return lid

    def written(self, key: str) -> str | None:
        """Where `key`'s writes can be read (None: a read-only view, or no such key)."""
        return self.flavour.written(self, key)

    def layer_dirs(self, chain: list[str]) -> list[str]:
        """The layer store's directories of `chain`, and the backend's own (which may be
        made from them on the first view): what no write through a view may change."""
        mine = [d for d in self.backend.lowers(chain) if os.path.isdir(d)]
        return [self.paths.layer_fs(lid) for lid in dict.fromkeys(chain)] + \
            [d for d in mine if d not in {self.paths.layer_fs(lid) for lid in chain}]

    def target(self, name: str) -> str:
        """An empty directory to mount on."""
        path = os.path.join(self.base, "mnt", name)
        os.makedirs(path)
        return path

    @contextlib.contextmanager
    def mounted(self, plan: Mount) -> Iterator[str]:
        """Carry out `plan`, yield its target, and unmount it whatever the block does."""
        self.mounter.mount(plan)
        try:
            yield plan.target
        finally:
            self.mounter.unmount(plan.target)

    def restarted(self) -> Backend:
        """A new instance on the same store: what start-up builds and asks."""
        return self.flavour.backend(self.paths, self.features)


@pytest.fixture(params=FLAVOURS, ids=lambda f: f.name)
def flavour(request) -> Flavour:
    return request.param


@pytest.fixture
def make_harness(flavour, tmp_path, request) -> Iterator[Callable[[str], Harness]]:
    """Harnesses of this test's flavour, each a store of its own under tmp_path/NAME (or,
    for a flavour on a filesystem of its own, a fresh directory there). After the test,
    pass or fail: everything mounted under tmp_path is unmounted, then every key left is
    removed; views a test left mounted fail its clean-up."""
    made: list[Harness] = []
    store_base = ""
    if flavour.store_fs in (QUOTA_BTRFS, SIMPLE_QUOTA_BTRFS):
        fixture = "quota_btrfs" if flavour.store_fs == QUOTA_BTRFS else "squota_btrfs"
        store_base = tempfile.mkdtemp(prefix="conformance-",
                                      dir=request.getfixturevalue(fixture))
    elif flavour.store_fs:
        from tests.storefs import store_fs
        fs = store_fs(request.getfixturevalue("store_filesystems"), flavour.store_fs)
        store_base = tempfile.mkdtemp(prefix="conformance-", dir=fs.root)

    def make(name: str) -> Harness:
        h = Harness(flavour, str(tmp_path / name),
                    os.path.join(store_base, name) if store_base else "")
        made.append(h)
        return h

    try:
        yield make
    finally:
        left = unmount_all_under(str(tmp_path))
        for h in made:
            for key in h.backend.keys():
                h.backend.remove(key)
        if store_base:
            wipe_btrfs_store(store_base)
    # A key's own mounts (a limited key's filesystem) are its state, which the backend
    # removes with the key; any other mount is a view the test forgot.
    left = [m for m in left if not any(m.startswith(h.paths.volumes + os.sep) for h in made)]
    assert not left, f"the test left mounts behind: {left}"


@pytest.fixture(scope="session")
def quota_btrfs(tmp_path_factory) -> Iterator[str]:
    """A loop-mounted btrfs with quotas enabled, for the qgroup flavour: where a size limit
    on the btrfs backend is a qgroup limit on the snapshot."""
    from tests.storefs import btrfs_with_quotas

    with btrfs_with_quotas(tmp_path_factory.mktemp("conformance-btrfs-quota")) as root:
        yield root


@pytest.fixture(scope="session")
def squota_btrfs(tmp_path_factory) -> Iterator[str]:
    """A loop-mounted btrfs with simple quotas, for the squota flavour: where a size limit
    on the btrfs backend is a limit on the snapshot's group."""
    from tests.storefs import btrfs_with_quotas

    with btrfs_with_quotas(tmp_path_factory.mktemp("conformance-btrfs-squota"),
                           simple=True) as root:
        yield root


def wipe_btrfs_store(base: str) -> None:
    """Delete stores under `base` on btrfs: their subvolumes (read-only chains too) by
    ioctl, then the rest."""
    import shutil

    from csi.mount import btrfs
    for top, dirs, _ in os.walk(base):
        for d in list(dirs):
            path = os.path.join(top, d)
            if btrfs.is_subvolume(path):
                btrfs.delete(path)
                dirs.remove(d)
    shutil.rmtree(base)


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness("store")
