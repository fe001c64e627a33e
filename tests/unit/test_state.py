"""csi/store/state.py: schema migration, the transaction helper and record round-trips."""

import sqlite3
import threading

import pytest

from csi.store import state as st
from csi.store.state import (
    ControllerVolume,
    ImageRecord,
    Layer,
    Publication,
    Stage,
    State,
    pub_holder,
    stage_holder,
)

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


@pytest.fixture
def db(tmp_path):
    s = State(str(tmp_path / "state.db"))
    yield s
    s.close()


def layer(lid="aaaa", diff_id=D1, size=4096, created=1.0, last_used=2.0) -> Layer:
    return Layer(lid, diff_id, size, created, last_used)


def publication(target="/pods/a/vol", key="k1", readonly=False, **over) -> Publication:
    fields = dict(target=target, volume_id="vol-1", key=key, image="oci:/img:app",
                  manifest_digest=D3, readonly=readonly, staging_path="", access_mode=1,
                  created=10.5)
    fields.update(over)
    return Publication(**fields)


def raw(path, sql):
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# -- schema --------------------------------------------------------------------------------
def test_migrate_sets_user_version_and_tables(db):
    assert raw(db.path, "PRAGMA user_version") == [(st.SCHEMA_VERSION,)]
    tables = {r[0] for r in raw(db.path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"layers", "images", "stages", "publications", "refs",
            "controller_volumes"} <= tables


def test_wal_mode(db):
    assert raw(db.path, "PRAGMA journal_mode") == [("wal",)]


def test_reopen_keeps_data_and_does_not_migrate_again(tmp_path):
    path = str(tmp_path / "state.db")
    s = State(path)
    with s.transaction() as tx:
        tx.put_layer(layer())
    s.close()
    s = State(path)  # would fail with "table layers already exists" if re-created
    with s.transaction() as tx:
        assert tx.layer("aaaa") == layer()
    s.close()


def test_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / "state.db")
    raw(path, f"PRAGMA user_version={st.SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer than this strata understands"):
        State(path)


def test_failed_migration_rolls_back(tmp_path, monkeypatch):
    path = str(tmp_path / "state.db")
    monkeypatch.setattr(st, "_SCHEMA", st._SCHEMA + "; CREATE TABLE broken (;")
    with pytest.raises(sqlite3.OperationalError):
        State(path)
    assert raw(path, "PRAGMA user_version") == [(0,)]
    assert raw(path, "SELECT name FROM sqlite_master WHERE type='table'") == []


# -- transactions --------------------------------------------------------------------------
def test_transaction_commits(db, tmp_path):
    with db.transaction() as tx:
        tx.put_layer(layer())
    # visible to another connection, so really committed
    assert raw(db.path, "SELECT id FROM layers") == [("aaaa",)]


def test_transaction_rolls_back_on_exception(db):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with db.transaction() as tx:
            tx.put_layer(layer())
            tx.add_refs("pub:/t", ["aaaa"])
            tx.put_publication(publication())
            assert tx.layer("aaaa") is not None  # visible inside the transaction
            raise Boom()
    with db.transaction() as tx:
        assert tx.layers() == []
        assert tx.refcounts() == {}
        assert tx.publications() == []
    assert raw(db.path, "SELECT COUNT(*) FROM layers") == [(0,)]


def test_a_failed_commit_rolls_back_and_leaves_the_connection_usable(db):
    # A deferred foreign-key check fails at COMMIT itself (as SQLITE_FULL would).
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as tx:
            tx._c.execute("PRAGMA defer_foreign_keys=ON")
            tx.add_refs("pub:/t", ["no-such-layer"])
    with db.transaction() as tx:  # "cannot start a transaction within a transaction"?
        assert tx.refcounts() == {}
        tx.put_layer(layer())
    assert raw(db.path, "SELECT COUNT(*) FROM layers") == [(1,)]


def test_transaction_usable_after_rollback(db):
    with pytest.raises(ValueError):
        with db.transaction():
            raise ValueError
    with db.transaction() as tx:
        tx.put_layer(layer())
    with db.transaction() as tx:
        assert len(tx.layers()) == 1


def test_integrity_error_rolls_back_whole_transaction(db):
    with db.transaction() as tx:
        tx.put_stage(Stage("v", "/s", "img", D1, 1, 1.0))
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as tx:
            tx.put_layer(layer())
            tx.put_stage(Stage("v", "/s2", "img", D1, 1, 2.0))  # duplicate primary key
    with db.transaction() as tx:
        assert tx.layers() == []
        assert tx.stage("v").staging_path == "/s"


def test_transactions_from_threads_are_serialised(db):
    with db.transaction() as tx:
        tx.put_layer(layer())

    def bump():
        for _ in range(20):
            with db.transaction() as tx:
                cur = tx.layer("aaaa")
                tx.put_layer(layer(size=cur.size + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    with db.transaction() as tx:
        assert tx.layer("aaaa").size == 4096 + 80  # no lost update


# -- records -------------------------------------------------------------------------------
def test_layer_round_trip_and_lookup(db):
    a, b = layer("aaaa", D1, created=1.0), layer("bbbb", D2, size=1, created=0.5)
    with db.transaction() as tx:
        tx.put_layer(a)
        tx.put_layer(b)
    with db.transaction() as tx:
        assert tx.layer("aaaa") == a
        assert tx.layer_by_diff_id(D2) == b
        assert tx.layer("nope") is None and tx.layer_by_diff_id(D3) is None
        assert tx.layers() == [b, a]  # ordered by created


def test_put_layer_replaces(db):
    with db.transaction() as tx:
        tx.put_layer(layer(size=1))
        tx.put_layer(layer(size=2))
    with db.transaction() as tx:
        assert [x.size for x in tx.layers()] == [2]


def test_touch_and_delete_layers(db):
    with db.transaction() as tx:
        tx.put_layer(layer("aaaa", D1))
        tx.put_layer(layer("bbbb", D2))
        tx.touch_layers(["aaaa", "missing"], 99.0)
    with db.transaction() as tx:
        assert tx.layer("aaaa").last_used == 99.0
        assert tx.layer("bbbb").last_used == 2.0
        tx.delete_layer("bbbb")
    with db.transaction() as tx:
        assert [x.id for x in tx.layers()] == ["aaaa"]


def test_image_round_trip_keeps_layer_order(db):
    img = ImageRecord(D3, "oci:/l:app", D2, ("base", "mid", "top"), 3.25)
    other = ImageRecord(D1, "oci:/l:aaa", D2, ("x",), 1.0)
    with db.transaction() as tx:
        tx.put_image(img)
        tx.put_image(other)
    with db.transaction() as tx:
        got = tx.image(D3)
        assert got == img and isinstance(got.layer_ids, tuple)
        assert tx.image(D2) is None
        assert tx.images() == [other, img]  # ordered by name


def test_stage_round_trip(db):
    s = Stage("vol-1", "/var/lib/kubelet/staging/x", "oci:/l:app", D3, 7, 5.5)
    with db.transaction() as tx:
        tx.put_stage(s)
    with db.transaction() as tx:
        assert tx.stage("vol-1") == s
        assert tx.stages() == [s]
        tx.delete_stage("vol-1")
    with db.transaction() as tx:
        assert tx.stage("vol-1") is None


def test_publication_round_trip_with_bool(db):
    p = publication(readonly=True, staging_path="/stage/x", access_mode=2)
    with db.transaction() as tx:
        tx.put_publication(p)
    with db.transaction() as tx:
        got = tx.publication(p.target)
        assert got == p
        assert got.readonly is True
        assert tx.publication("/other") is None


def test_publications_filter_and_order(db):
    p1 = publication("/t1", "k1", created=3.0)
    p2 = publication("/t2", "k2", volume_id="vol-2", created=1.0)
    p3 = publication("/t3", "k3", created=2.0)
    with db.transaction() as tx:
        for p in (p1, p2, p3):
            tx.put_publication(p)
    with db.transaction() as tx:
        assert tx.publications() == [p2, p3, p1]
        assert tx.publications("vol-1") == [p3, p1]
        assert tx.publications("vol-x") == []
        tx.delete_publication("/t3")
    with db.transaction() as tx:
        assert tx.publications("vol-1") == [p1]


def test_two_readonly_publications_coexist(db):
    a = publication("/pods/a/vol", "key-a", readonly=True)
    b = publication("/pods/b/vol", "key-b", readonly=True)
    with db.transaction() as tx:
        tx.put_publication(a)
        tx.put_publication(b)
        tx.put_layer(layer())
        tx.add_refs(pub_holder(a.target), ["aaaa"])
        tx.add_refs(pub_holder(b.target), ["aaaa"])
    with db.transaction() as tx:
        assert {p.key for p in tx.publications("vol-1")} == {"key-a", "key-b"}
        assert tx.refcounts() == {"aaaa": 2}


def test_publication_key_and_target_are_unique(db):
    with db.transaction() as tx:
        tx.put_publication(publication("/t1", "k1"))
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as tx:
            tx.put_publication(publication("/t2", "k1"))  # same key: would share an upper
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as tx:
            tx.put_publication(publication("/t1", "k2"))


def test_controller_volume_round_trip(db):
    v = ControllerVolume("pvc-1", "strata-abc", 1 << 30, {"image": "oci:/l:app", "b": "2"}, 4.0)
    with db.transaction() as tx:
        tx.put_controller_volume(v)
    with db.transaction() as tx:
        assert tx.controller_volume("pvc-1") == v
        assert tx.controller_volume_by_id("strata-abc") == v
        assert tx.controller_volume("pvc-2") is None
        tx.delete_controller_volume("strata-abc")
    with db.transaction() as tx:
        assert tx.controller_volume("pvc-1") is None


# -- references ----------------------------------------------------------------------------
def test_holder_names():
    assert pub_holder("/pods/x") == "pub:/pods/x"
    assert stage_holder("vol-1") == "stage:vol-1"
    assert pub_holder("vol-1") != stage_holder("vol-1")


def test_refs_add_drop_refcounts(db):
    with db.transaction() as tx:
        tx.put_layer(layer("aaaa", D1))
        tx.put_layer(layer("bbbb", D2))
        tx.put_layer(layer("cccc", D3))
        tx.add_refs(pub_holder("/t1"), ["aaaa", "bbbb"])
        tx.add_refs(pub_holder("/t2"), ["aaaa"])
        tx.add_refs(stage_holder("v"), ["aaaa", "bbbb"])
        tx.add_refs(pub_holder("/t1"), ["aaaa"])  # idempotent per (layer, holder)
    with db.transaction() as tx:
        assert tx.refcounts() == {"aaaa": 3, "bbbb": 2}  # cccc unreferenced: absent
        tx.drop_refs(pub_holder("/t1"))
    with db.transaction() as tx:
        assert tx.refcounts() == {"aaaa": 2, "bbbb": 1}
        tx.drop_refs(pub_holder("/unknown"))
        tx.delete_layer_refs("aaaa")
    with db.transaction() as tx:
        assert tx.refcounts() == {"bbbb": 1}
        tx.drop_all_refs()
    with db.transaction() as tx:
        assert tx.refcounts() == {}


def test_ref_to_unknown_layer_is_refused(db):
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as tx:
            tx.add_refs(pub_holder("/t"), ["no-such-layer"])


def test_referenced_layer_cannot_be_deleted(db):
    with db.transaction() as tx:
        tx.put_layer(layer())
        tx.add_refs(stage_holder("v"), ["aaaa"])
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as tx:
            tx.delete_layer("aaaa")
    with db.transaction() as tx:
        assert tx.layer("aaaa") is not None


def test_refcount_and_holders(db):
    with db.transaction() as tx:
        tx.put_layer(layer("aaaa", D1))
        tx.put_layer(layer("bbbb", D2))
        tx.add_refs(pub_holder("/t"), ["aaaa", "bbbb"])
        tx.add_refs(st.lease_holder("tok"), ["aaaa"])
    with db.transaction() as tx:
        assert tx.refcount("aaaa") == 2
        assert tx.refcount("bbbb") == 1
        assert tx.refcount("zzzz") == 0
        assert sorted(tx.holders()) == [("aaaa", "lease:tok"), ("aaaa", "pub:/t"),
                                        ("bbbb", "pub:/t")]


def test_lease_holder_is_distinct_from_other_holders():
    assert st.lease_holder("x") == "lease:x"
    assert st.lease_holder("x") not in (pub_holder("x"), stage_holder("x"))


def test_delete_images_with_layer(db):
    a = ImageRecord(D1, "a", D3, ("base", "top1"), 1.0)
    b = ImageRecord(D2, "b", D3, ("base2", "top2"), 1.0)  # "base" is a prefix of "base2"
    with db.transaction() as tx:
        tx.put_image(a)
        tx.put_image(b)
        tx.delete_images_with_layer("base")
    with db.transaction() as tx:
        assert tx.images() == [b]
        tx.delete_images_with_layer("top2")
    with db.transaction() as tx:
        assert tx.images() == []


D4 = "sha256:" + "4" * 64


def test_an_index_digest_is_an_alias_not_a_second_image(db):
    img = ImageRecord(D3, "reg/app:1", D2, ("base", "top"), 1.0)
    with db.transaction() as tx:
        tx.put_image(img)
        tx.put_alias(D4, D3)  # the index D4 resolved to the platform manifest D3
    with db.transaction() as tx:
        assert tx.image(D4) == img and tx.image(D3) == img
        assert tx.images() == [img], "listed once"
        tx.delete_images_with_layer("top")
    with db.transaction() as tx:
        assert tx.image(D4) is None
        assert raw(db.path, "SELECT * FROM image_aliases") == []


def test_version_2_duplicates_are_folded_when_the_image_is_next_recorded(tmp_path,
                                                                        monkeypatch):
    """v2 kept an image named through an index as two identical rows, and a warm publish
    by tag recorded the index's. Which row is the index cannot be told from the rows, so
    the migration folds nothing; the next record of that image knows, and folds them."""
    path = str(tmp_path / "state.db")
    monkeypatch.setattr(st, "SCHEMA_VERSION", 2)
    s = State(path)
    with s.transaction() as tx:
        for digest in (D4, D3):  # v2: once under the index D4, once under the manifest D3
            tx._c.execute("INSERT INTO images VALUES (?,?,?,?,?,?)",
                          (digest, "reg/app:1", D2, '["base", "top"]', 1.0, "[]"))
        tx.put_publication(publication(manifest_digest=D4))
    s.close()
    monkeypatch.undo()
    s = State(path)
    try:
        assert raw(path, "PRAGMA user_version") == [(st.SCHEMA_VERSION,)]
        with s.transaction() as tx:
            assert len(tx.images()) == 2  # untouched until known
            tx.put_image(ImageRecord(D3, "reg/app:1", D2, ("base", "top"), 2.0))
            tx.put_alias(D4, D3)
        with s.transaction() as tx:
            assert [i.manifest_digest for i in tx.images()] == [D3]
            assert tx.image(D4).manifest_digest == D3
            assert [p.manifest_digest for p in tx.publications()] == [D3]
    finally:
        s.close()
