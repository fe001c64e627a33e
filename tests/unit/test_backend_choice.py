"""`--backend`: the choice serve records in the store, refuses where it cannot hold, and the
tools read back; and what `ls`/`df` say of each backend."""

import pytest

from csi import compose
from csi.backend.btrfs import BtrfsBackend, chain_ids
from csi.backend.overlay import OverlayBackend
from csi.config import Config
from csi.errors import FailedPrecondition
from csi.image.manifest import Image
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.store.state import Layer, Publication, Release, Stage, State
from csi.store_cli import backend_line


def make(name, paths, state=None):
    return compose.make_backend(name, paths, None, Mounter(), Config(root=paths.root), state)


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


@pytest.mark.parametrize("record", ["read-only publication", "stage", "release"])
def test_a_switch_is_refused_while_the_state_records_a_view(tmp_path, record):
    """A btrfs read-only view binds a chain and has no volumes/KEY: the state database
    is what says it lives (switching would drop the chain from under its mount)."""
    paths = StorePaths(str(tmp_path)).make()
    with open(compose.backend_file(paths), "w") as f:
        f.write("btrfs\n")
    (tmp_path / "chains").mkdir()
    state = State(paths.state_db)
    try:
        with state.transaction() as tx:
            if record == "stage":
                tx.record_stage(Stage("v", "/s", "img", "sha256:" + "0" * 64, 1, 0), (), 0)
            elif record == "release":
                tx.record_release(Release("k1"))
            else:
                tx.record_publication(Publication("/t", "v", "k1", "img", "sha256:" + "0" * 64,
                                                  True, "", 1, 0), (), 0)
        assert not list((tmp_path / "volumes").iterdir())
        with pytest.raises(FailedPrecondition, match="holds publications of the btrfs"):
            make("overlay", paths, state)
        assert (tmp_path / "chains").is_dir(), "the chains stay while a view reads them"
        assert compose.recorded_backend(paths) == "btrfs"
    finally:
        state.close()


def test_the_chains_that_recorded_views_bind(tmp_path):
    """What the btrfs collector keeps besides keys on disk: the top chain of each recorded
    publication's (read-only ones too) and release's image; None (keep every chain) while
    a release cannot say which image it reads."""
    state = State(str(tmp_path / "state.db"))
    try:
        chains = compose.recorded_chains(state)
        assert chains() == set()
        digest = "sha256:" + "3" * 64
        with state.transaction() as tx:
            for lid in ("base", "top"):
                tx.record_layer(Layer(lid, "sha256:" + lid, 1, 0, 0))
            tx.record_image(Image("img", digest, "sha256:" + "2" * 64, ()), ("base", "top"), 0)
            tx.record_publication(Publication("/t", "v", "k1", "img", digest, True, "", 1, 0),
                                  ("base", "top"), 0)
        assert chains() == {chain_ids(["base", "top"])[-1]}
        with state.transaction() as tx:
            tx.record_release(Release("k2"))  # no image: blind
        assert chains() is None
    finally:
        state.close()


def test_ls_and_df_say_how_each_backend_shares(tmp_path):
    paths = StorePaths(str(tmp_path))
    assert backend_line(OverlayBackend(paths)) == (
        "Backend: overlay; layers shared by layer (DiffID); page cache shared")
    assert backend_line(BtrfsBackend(paths)) == (
        "Backend: btrfs; layers shared by chain (ChainID: a layer and all under it); "
        "page cache per publication")
