"""csi/store/state.py: releases, the private state of lazily detached overlays. A release
takes over its publication's layer references, keeps them across a rebuild at start-up, and
gives them up when forgotten."""

import pytest

from csi.store import state as st
from csi.store.state import Release, State
from tests.unit.test_state import D3, image, publication, raw, with_layers


@pytest.fixture
def db(tmp_path):
    s = State(str(tmp_path / "state.db"))
    yield s
    s.close()


def published(db, target="/pods/a/vol", key="k1"):
    with db.transaction() as tx:
        tx.record_image(image(D3, n=2), ["base", "top"], 1.0)
        tx.record_publication(publication(target, key=key), ["base", "top"], 2.0)


def test_a_fresh_store_has_the_released_table(db):
    columns = [r[1] for r in raw(db.path, "PRAGMA table_info(released)")]
    assert columns == ["key", "target", "volume_id", "manifest_digest", "device", "since"]


def test_a_version_4_store_gains_it(tmp_path, monkeypatch):
    path = str(tmp_path / "state.db")
    monkeypatch.setattr(st, "SCHEMA_VERSION", 4)
    State(path).close()
    monkeypatch.undo()
    s = State(path)
    try:
        with s.read() as tx:
            assert tx.releases() == []
    finally:
        s.close()


def test_releasing_a_publication_passes_its_references_to_the_release(db):
    with_layers(db, "base", "top")
    published(db)
    with db.transaction() as tx:
        r = tx.release_publication("/pods/a/vol", "0:55", 5.0)
    assert r == Release("k1", "/pods/a/vol", "vol-1", D3, "0:55", 5.0)
    with db.read() as tx:
        assert tx.publication("/pods/a/vol") is None
        assert tx.releases() == [r] and tx.release("k1") == r
        assert sorted(tx.holders()) == [("base", "release:k1"), ("top", "release:k1")]
    with db.transaction() as tx:
        assert tx.release_publication("/pods/unknown", "", 6.0) is None


def test_references_of_a_release_survive_a_rebuild_and_go_with_it(db):
    with_layers(db, "base", "top")
    published(db)
    with db.transaction() as tx:
        tx.release_publication("/pods/a/vol", "0:55", 5.0)
        tx.record_release(Release("k-found", since=6.0))  # found at start-up: holds nothing
        assert tx.rebuild_references(set()) == []
        assert sorted(tx.holders()) == [("base", "release:k1"), ("top", "release:k1")]
    with db.transaction() as tx:
        assert sorted(tx.forget_release("k1", 9.0)) == ["base", "top"]
        assert tx.forget_release("k-found", 9.0) == []
        assert tx.holders() == [] and tx.releases() == []
        assert tx.layer("base").last_used == 9.0, "GC's minimum age counts from the release"
        assert tx.forget_layer("base"), "nothing holds it any more"


def test_recording_a_found_release_twice_keeps_the_first(db):
    with db.transaction() as tx:
        tx.record_release(Release("k", since=1.0))
        tx.record_release(Release("k", since=2.0))
        assert tx.releases() == [Release("k", since=1.0)]


def test_a_lost_layer_leaves_a_release_the_rest(db):
    with_layers(db, "base", "top")
    published(db)
    with db.transaction() as tx:
        tx.release_publication("/pods/a/vol", "", 5.0)
        lines = tx.rebuild_references({"top"})
        assert lines == [f"detached overlay of k1: image {D3} is no longer complete on this "
                         "node"]
        assert tx.holders() == [("base", "release:k1")]


def test_a_release_that_cannot_name_its_layers_stops_every_layer_s_removal(db):
    with_layers(db, "base", "top")
    with db.transaction() as tx:
        tx.record_release(Release("k-found", since=6.0))  # start-up found it: no image
        tx.release_publication("/nowhere", "", 6.0)  # unknown: changes nothing
        assert tx.blind_releases() == [Release("k-found", since=6.0)]
        assert not tx.forget_layer("base"), "unreferenced, but the release may read it"
    with db.transaction() as tx:
        tx.forget_release("k-found", 9.0)
        assert tx.blind_releases() == []
        assert tx.forget_layer("base")


def test_a_release_of_a_known_publication_is_not_blind(db):
    with_layers(db, "base", "top", "spare")
    published(db)
    with db.transaction() as tx:
        tx.release_publication("/pods/a/vol", "0:55", 5.0)
        assert tx.blind_releases() == []
        assert tx.forget_layer("spare"), "what the release does not hold may go"
        assert not tx.forget_layer("base")
