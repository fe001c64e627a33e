"""`--backend`: the choice serve records in the store, refuses where it cannot hold, and the
tools read back; and what `ls`/`df` say of each backend."""

import pytest

from csi import compose
from csi.backend.btrfs import BtrfsBackend
from csi.backend.overlay import OverlayBackend
from csi.config import Config
from csi.errors import FailedPrecondition
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.store_cli import backend_line


def make(name, paths):
    return compose.make_backend(name, paths, None, Mounter(), Config(root=paths.root))


def test_btrfs_is_refused_off_btrfs_naming_the_flag(tmp_path):
    paths = StorePaths(str(tmp_path)).make()
    with pytest.raises(FailedPrecondition, match=r"--backend btrfs, but the store root "
                                                  r".* \(--root\) is not on a btrfs"):
        make("btrfs", paths)
    assert compose.recorded_backend(paths) == "overlay", "nothing recorded by a refusal"


def test_the_choice_is_recorded_and_the_tools_build_the_same(tmp_path):
    paths = StorePaths(str(tmp_path)).make()
    assert isinstance(compose.stored_backend(paths), OverlayBackend), "a store from before"
    assert isinstance(make("overlay", paths), OverlayBackend)
    assert compose.recorded_backend(paths) == "overlay"
    with open(compose.backend_file(paths), "w") as f:
        f.write("btrfs\n")  # as serve --backend btrfs records it
    assert isinstance(compose.stored_backend(paths), BtrfsBackend)


def test_a_switch_under_live_publications_is_refused(tmp_path):
    paths = StorePaths(str(tmp_path)).make()
    with open(compose.backend_file(paths), "w") as f:
        f.write("btrfs\n")
    (tmp_path / "volumes" / "k1").mkdir()
    with pytest.raises(FailedPrecondition, match="holds publications of the btrfs backend; "
                                                  "start with --backend btrfs"):
        make("overlay", paths)
    (tmp_path / "volumes" / "k1").rmdir()
    assert isinstance(make("overlay", paths), OverlayBackend), "once they are gone"
    assert compose.recorded_backend(paths) == "overlay"


def test_ls_and_df_say_how_each_backend_shares(tmp_path):
    paths = StorePaths(str(tmp_path))
    assert backend_line(OverlayBackend(paths)) == (
        "Backend: overlay; layers shared by layer (DiffID); page cache shared")
    assert backend_line(BtrfsBackend(paths)) == (
        "Backend: btrfs; layers shared by chain (ChainID: a layer and all under it); "
        "page cache per publication")
