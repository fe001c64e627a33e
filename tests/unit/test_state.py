"""csi/store/state.py: schema migrations, transactions (write and read-only), and the domain
operations with the invariants they keep: references only to recorded layers, images only
with all their layers, publications and stages recorded and forgotten with their
references."""

import json
import sqlite3
import threading

import pytest

from csi.image.manifest import Image, LayerDesc
from csi.store import state as st
from csi.store.state import ControllerVolume, Layer, Publication, Stage, State, Tag

D1, D2, D3, D4 = ("sha256:" + c * 64 for c in "1234")
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture
def db(tmp_path):
    s = State(str(tmp_path / "state.db"))
    yield s
    s.close()


def layer(lid="aaaa", diff_id=D1, size=4096, created=1.0, last_used=2.0) -> Layer:
    return Layer(lid, diff_id, size, created, last_used)


def image(digest=D3, name="oci:/l:app", n=2, index="") -> Image:
    return Image(name, digest, D2, tuple(LayerDesc(f"sha256:{i:064x}", GZ, 10 + i, f"diff{i}")
                                         for i in range(n)), index_digest=index)


def publication(target="/pods/a/vol", key="k1", readonly=False, **over) -> Publication:
    fields = dict(target=target, volume_id="vol-1", key=key, image="oci:/img:app",
                  manifest_digest=D3, readonly=readonly, staging_path="", access_mode=1,
                  created=10.5)
    fields.update(over)
    return Publication(**fields)


def with_layers(db, *ids) -> None:
    with db.transaction() as tx:
        for i, lid in enumerate(ids):
            tx.record_layer(layer(lid, f"sha256:{lid}{i}"))


def raw(path, sql, *args):
    con = sqlite3.connect(path)
    try:
        rows = con.execute(sql, args).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


# -- schema --------------------------------------------------------------------------------
def test_migrate_sets_user_version_and_tables(db):
    assert raw(db.path, "PRAGMA user_version") == [(st.SCHEMA_VERSION,)]
    tables = {r[0] for r in raw(db.path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"layers", "images", "image_layers", "stages", "publications", "refs",
            "controller_volumes"} <= tables
    columns = {r[1] for r in raw(db.path, "PRAGMA table_info(images)")}
    assert "layer_ids" not in columns, "the JSON list of layer IDs is gone"


def test_wal_mode(db):
    assert raw(db.path, "PRAGMA journal_mode") == [("wal",)]


def test_reopen_keeps_data_and_does_not_migrate_again(tmp_path):
    path = str(tmp_path / "state.db")
    s = State(path)
    with s.transaction() as tx:
        tx.record_layer(layer())
    s.close()
    s = State(path)  # would fail with "table layers already exists" if re-created
    with s.read() as tx:
        assert tx.layer("aaaa") == layer()
    s.close()


def test_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / "state.db")
    raw(path, f"PRAGMA user_version={st.SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer than this strata understands"):
        State(path)


def test_read_only_tools_do_not_upgrade_a_store(tmp_path, monkeypatch):
    path = str(tmp_path / "state.db")
    monkeypatch.setattr(st, "SCHEMA_VERSION", 3)
    State(path).close()
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="schema version 3, this strata reads version"):
        State(path, migrate=False)
    assert raw(path, "PRAGMA user_version") == [(3,)]
    State(path).close()
    State(path, migrate=False).close()


def test_failed_migration_rolls_back(tmp_path, monkeypatch):
    path = str(tmp_path / "state.db")
    monkeypatch.setattr(st, "_SCHEMA", st._SCHEMA + "; CREATE TABLE broken (;")
    with pytest.raises(sqlite3.OperationalError):
        State(path)
    assert raw(path, "PRAGMA user_version") == [(0,)]
    assert raw(path, "SELECT name FROM sqlite_master WHERE type='table'") == []


def test_version_3_store_survives_the_join_table_migration(tmp_path, monkeypatch):
    """v3 kept an image's layer IDs as a JSON list. v4 moves them to image_layers, in
    order, and drops images whose layers are not all recorded (unusable anyway)."""
    path = str(tmp_path / "state.db")
    monkeypatch.setattr(st, "SCHEMA_VERSION", 3)
    State(path).close()
    raw(path, "INSERT INTO layers VALUES ('base', ?, 1, 0, 0)", D1)
    raw(path, "INSERT INTO layers VALUES ('top', ?, 1, 0, 0)", D2)
    descs = json.dumps([[D1, GZ, 5, D1], [D2, GZ, 6, D2]])
    raw(path, "INSERT INTO images VALUES (?, 'app', ?, '[\"base\", \"top\"]', 1.0, ?)",
        D3, D2, descs)
    raw(path, "INSERT INTO images VALUES (?, 'broken', ?, '[\"base\", \"gone\"]', 1.0, '[]')",
        D4, D2)
    raw(path, "INSERT INTO image_aliases VALUES (?, ?)", "sha256:" + "9" * 64, D4)
    monkeypatch.undo()
    s = State(path)
    try:
        assert raw(path, "PRAGMA user_version") == [(st.SCHEMA_VERSION,)]
        with s.read() as tx:
            (rec,) = tx.images()
            assert rec.layer_ids == ("base", "top") and rec.manifest_digest == D3
            assert [d.size for d in rec.image.layers] == [5, 6]
        assert raw(path, "SELECT * FROM image_aliases") == [], "its alias went with it"
        assert raw(path, "PRAGMA foreign_key_check") == []
        assert raw(path, "SELECT sql FROM sqlite_master WHERE name='images'")[0][0].count(
            "layer_ids") == 0
    finally:
        s.close()


def test_version_4_store_keeps_its_publications_and_gains_pod_identity(tmp_path,
                                                                        monkeypatch):
    """A live publication recorded by a v4 strata survives the upgrade (its pod unknown,
    its upper unbounded), and new ones record the pod and the limit."""
    path = str(tmp_path / "state.db")
    monkeypatch.setattr(st, "SCHEMA_VERSION", 4)
    State(path).close()
    raw(path, "INSERT INTO layers VALUES ('base', ?, 1, 0, 0)", D1)
    raw(path, "INSERT INTO publications VALUES ('/pods/old/vol', 'v-old', 'k-old', 'img', ?, "
        "0, '', 1, 5.0)", D3)
    raw(path, "INSERT INTO refs VALUES ('base', 'pub:/pods/old/vol')")
    monkeypatch.undo()
    s = State(path)
    try:
        assert raw(path, "PRAGMA user_version") == [(st.SCHEMA_VERSION,)]
        new = publication("/pods/new/vol", key="k-new", pod_namespace="ns", pod_name="web-0",
                          pod_uid="u-1", service_account="sa", size_limit=1 << 20,
                          project_id=7)
        with s.transaction() as tx:
            tx.record_publication(new, ["base"], 6.0)
        with s.read() as tx:
            old = tx.publication("/pods/old/vol")
            assert (old.key, old.readonly, old.created) == ("k-old", False, 5.0)
            assert (old.pod, old.pod_uid, old.size_limit, old.project_id) == ("", "", 0, 0)
            assert tx.publication("/pods/new/vol") == new
            assert new.pod == "ns/web-0"
            assert tx.refcount("base") == 2
    finally:
        s.close()


# -- transactions --------------------------------------------------------------------------
def test_transaction_commits(db):
    with db.transaction() as tx:
        tx.record_layer(layer())
    # visible to another connection, so really committed
    assert raw(db.path, "SELECT id FROM layers") == [("aaaa",)]


def test_transaction_rolls_back_on_exception(db):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with db.transaction() as tx:
            tx.record_layer(layer())
            tx.record_publication(publication(), ["aaaa"], 3.0)
            assert tx.layer("aaaa") is not None  # visible inside the transaction
            raise Boom()
    with db.read() as tx:
        assert tx.layers() == []
        assert tx.refcounts() == {}
        assert tx.publications() == []
    assert raw(db.path, "SELECT COUNT(*) FROM layers") == [(0,)]


def test_a_failed_commit_rolls_back_and_leaves_the_connection_usable(db):
    # A deferred foreign-key check fails at COMMIT itself (as SQLITE_FULL would).
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as tx:
            tx._c.execute("PRAGMA defer_foreign_keys=ON")
            tx.lease("tok", "no-such-layer")
    with db.transaction() as tx:  # "cannot start a transaction within a transaction"?
        assert tx.refcounts() == {}
        tx.record_layer(layer())
    assert raw(db.path, "SELECT COUNT(*) FROM layers") == [(1,)]


def test_transaction_usable_after_rollback(db):
    with pytest.raises(ValueError):
        with db.transaction():
            raise ValueError
    with db.transaction() as tx:
        tx.record_layer(layer())
    with db.read() as tx:
        assert len(tx.layers()) == 1


def test_transactions_from_threads_are_serialised(db):
    with_layers(db, "aaaa")

    def bump():
        for _ in range(20):
            with db.transaction() as tx:
                n = len(tx.publications())
                tx.record_publication(publication(f"/t{threading.get_ident()}-{n}",
                                                  f"k{threading.get_ident()}-{n}"),
                                      ["aaaa"], 1.0)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    with db.read() as tx:
        assert len(tx.publications()) == 80 and tx.refcount("aaaa") == 80


def test_a_read_does_not_take_the_write_lock(db):
    """A scrape or `strata ls` must not make a publish wait, nor wait for one: a read runs
    while another connection holds the write lock, and sees the last commit."""
    with_layers(db, "aaaa")
    writer = sqlite3.connect(db.path, isolation_level=None, timeout=0)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO layers VALUES ('bbbb', 'x', 1, 0, 0)")
        with db.read() as tx:  # timeout=30 would hang here if it needed the lock
            assert [x.id for x in tx.layers()] == ["aaaa"]
        writer.execute("COMMIT")
        with db.read() as tx:
            assert {x.id for x in tx.layers()} == {"aaaa", "bbbb"}
    finally:
        writer.close()


def test_a_read_holds_no_lock_a_writer_waits_on(db):
    with_layers(db, "aaaa")
    with db.read() as tx:
        tx.layers()
        other = sqlite3.connect(db.path, isolation_level=None, timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")  # would raise "database is locked"
            other.execute("COMMIT")
        finally:
            other.close()


def test_reads_cannot_write(db):
    with db.read() as tx:
        assert not hasattr(tx, "record_layer")


# -- layers --------------------------------------------------------------------------------
def test_layer_round_trip_and_lookup(db):
    a, b = layer("aaaa", D1, created=1.0), layer("bbbb", D2, size=1, created=0.5)
    with db.transaction() as tx:
        tx.record_layer(a)
        tx.record_layer(b)
    with db.read() as tx:
        assert tx.layer("aaaa") == a
        assert tx.layer_by_diff_id(D2) == b
        assert tx.layer("nope") is None and tx.layer_by_diff_id(D3) is None
        assert tx.layers() == [b, a]  # ordered by created


def test_a_layer_is_recorded_once(db):
    with_layers(db, "aaaa")
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as tx:
            tx.record_layer(layer("aaaa", D4))


def test_forget_layer_only_when_unreferenced(db):
    with_layers(db, "aaaa", "bbbb")
    with db.transaction() as tx:
        tx.lease("tok", "aaaa")
        assert tx.forget_layer("aaaa") is False
        assert tx.forget_layer("nope") is False
        assert tx.forget_layer("bbbb") is True
    with db.read() as tx:
        assert [x.id for x in tx.layers()] == ["aaaa"]


def test_the_schema_refuses_to_delete_a_referenced_layer(db):
    with_layers(db, "aaaa")
    with db.transaction() as tx:
        tx.lease("tok", "aaaa")
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as tx:
            tx._c.execute("DELETE FROM layers WHERE id='aaaa'")


def test_a_reference_to_an_unknown_layer_is_refused(db):
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as tx:
            tx.record_publication(publication(), ["no-such-layer"], 1.0)
    with db.read() as tx:
        assert tx.publications() == [], "nothing of the publication stays"


# -- images --------------------------------------------------------------------------------
def test_image_round_trip_keeps_layer_order(db):
    with_layers(db, "base", "mid", "top", "x")
    with db.transaction() as tx:
        tx.record_image(image(D3, "oci:/l:app", 3), ("base", "mid", "top"), 3.25)
        tx.record_image(image(D1, "oci:/l:aaa", 1), ("x",), 1.0)
    with db.read() as tx:
        got = tx.image(D3)
        assert got.layer_ids == ("base", "mid", "top") and got.resolved == 3.25
        assert got.image == image(D3, "oci:/l:app", 3)
        assert tx.image(D2) is None
        assert [i.name for i in tx.images()] == ["oci:/l:aaa", "oci:/l:app"]  # by name


def test_an_image_needs_all_its_layers_recorded(db):
    with_layers(db, "base")
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as tx:
            tx.record_image(image(), ("base", "missing"), 1.0)
    with db.read() as tx:
        assert tx.images() == []


def test_recording_an_image_again_replaces_its_layers(db):
    with_layers(db, "a", "b", "c")
    with db.transaction() as tx:
        tx.record_image(image(n=2), ("a", "b"), 1.0)
        tx.record_image(image(n=2), ("a", "c"), 2.0)
    with db.read() as tx:
        assert tx.image(D3).layer_ids == ("a", "c") and tx.image(D3).resolved == 2.0


def test_a_layer_listed_twice_in_an_image(db):
    with_layers(db, "a", "b")
    with db.transaction() as tx:
        tx.record_image(image(n=3), ("a", "b", "a"), 1.0)
    with db.read() as tx:
        assert tx.image(D3).layer_ids == ("a", "b", "a")


def test_forgetting_a_layer_forgets_the_images_containing_it(db):
    with_layers(db, "base", "top1", "base2", "top2")
    with db.transaction() as tx:
        tx.record_image(image(D1, "a"), ("base", "top1"), 1.0)
        tx.record_image(image(D2, "b"), ("base2", "top2"), 1.0)  # "base" prefixes "base2"
        assert tx.forget_layer("base")
    with db.read() as tx:
        assert [i.name for i in tx.images()] == ["b"]
        assert tx.layer("top1") is not None, "the image's other layers stay"


def test_an_index_digest_is_an_alias_not_a_second_image(db):
    with_layers(db, "base", "top")
    with db.transaction() as tx:
        tx.record_image(image(D3, "reg/app:1", index=D4), ("base", "top"), 1.0)
    with db.read() as tx:
        assert tx.image(D4) == tx.image(D3) and tx.image(D3) is not None
        assert len(tx.images()) == 1, "listed once"
    with db.transaction() as tx:
        tx.forget_layer("top")
    with db.read() as tx:
        assert tx.image(D4) is None
    assert raw(db.path, "SELECT * FROM image_aliases") == []


def test_version_2_duplicates_are_folded_when_the_image_is_next_recorded(tmp_path,
                                                                        monkeypatch):
    """v2 kept an image named through an index as two identical rows, and a warm publish
    by tag recorded the index's. Which row is the index cannot be told from the rows, so
    the migration folds nothing; the next record of that image knows, and folds them."""
    path = str(tmp_path / "state.db")
    monkeypatch.setattr(st, "SCHEMA_VERSION", 2)
    State(path).close()
    raw(path, "INSERT INTO layers VALUES ('base', ?, 1, 0, 0)", D1)
    raw(path, "INSERT INTO layers VALUES ('top', ?, 1, 0, 0)", D2)
    for digest in (D4, D3):  # v2: once under the index D4, once under the manifest D3
        raw(path, "INSERT INTO images VALUES (?,?,?,?,?,?)",
            digest, "reg/app:1", D2, '["base", "top"]', 1.0, "[]")
    raw(path, "INSERT INTO publications VALUES ('/t', 'v', 'k', 'img', ?, 0, '', 1, 1.0)", D4)
    monkeypatch.undo()
    s = State(path)
    try:
        assert raw(path, "PRAGMA user_version") == [(st.SCHEMA_VERSION,)]
        with s.transaction() as tx:
            assert len(tx.images()) == 2  # untouched until known
            tx.record_image(image(D3, "reg/app:1", index=D4), ("base", "top"), 2.0)
        with s.read() as tx:
            assert [i.manifest_digest for i in tx.images()] == [D3]
            assert tx.image(D4).manifest_digest == D3
            assert [p.manifest_digest for p in tx.publications()] == [D3]
    finally:
        s.close()


def test_tag_round_trip(db):
    with db.transaction() as tx:
        tx.record_tag(Tag("reg/app:1", D3, 5.0))
        tx.record_tag(Tag("reg/app:1", D4, 6.0))
    with db.read() as tx:
        assert tx.tag("reg/app:1") == Tag("reg/app:1", D4, 6.0)
        assert tx.tag("reg/app:2") is None


# -- publications and stages ---------------------------------------------------------------
def test_referenced_says_which_layers_anything_holds_by_index(db):
    """GC asks after every unpublish: the answer must not read every reference (two per
    live publication), only probe the index once per layer."""
    with_layers(db, "aaaa", "bbbb", "cccc")
    with db.transaction() as tx:
        for i in range(3):
            tx.record_publication(publication(target=f"/t{i}", key=f"k{i}"), ["aaaa", "cccc"],
                                  7.0)
    ran = []
    db._ro.set_trace_callback(ran.append)
    with db.read() as tx:
        assert tx.referenced() == {"aaaa": 1, "bbbb": 0, "cccc": 1}
    db._ro.set_trace_callback(None)
    [query] = [sql for sql in ran if "refs" in sql]
    plan = " ".join(row[-1] for row in db._ro.execute("EXPLAIN QUERY PLAN " + query))
    assert "SEARCH refs" in plan and "SCAN refs" not in plan, plan


def test_a_publication_is_recorded_and_forgotten_with_its_references(db):
    with_layers(db, "aaaa", "bbbb")
    p = publication(readonly=True, staging_path="/stage/x", access_mode=2)
    with db.transaction() as tx:
        tx.record_publication(p, ["aaaa", "bbbb", "aaaa"], 7.0)
    with db.read() as tx:
        assert tx.publication(p.target) == p and tx.publication(p.target).readonly is True
        assert tx.refcounts() == {"aaaa": 1, "bbbb": 1}
        assert tx.layer("aaaa").last_used == 7.0, "touched"
        assert tx.publication("/other") is None
    with db.transaction() as tx:
        assert sorted(tx.forget_publication(p.target, 9.0)) == ["aaaa", "bbbb"]
        assert tx.forget_publication("/unknown", 9.0) == []
    with db.read() as tx:
        assert tx.publications() == [] and tx.refcounts() == {}
        assert tx.layer("bbbb").last_used == 9.0, "GC's minimum age counts from the release"


def test_publications_filter_and_order(db):
    with_layers(db, "aaaa")
    p1 = publication("/t1", "k1", created=3.0)
    p2 = publication("/t2", "k2", volume_id="vol-2", created=1.0)
    p3 = publication("/t3", "k3", created=2.0)
    with db.transaction() as tx:
        for p in (p1, p2, p3):
            tx.record_publication(p, ["aaaa"], 1.0)
    with db.read() as tx:
        assert tx.publications() == [p2, p3, p1]
        assert tx.publications("vol-1") == [p3, p1]
        assert tx.publications("vol-x") == []
        assert tx.refcount("aaaa") == 3


def test_publication_key_and_target_are_unique(db):
    with_layers(db, "aaaa")
    with db.transaction() as tx:
        tx.record_publication(publication("/t1", "k1"), ["aaaa"], 1.0)
    for dup in (publication("/t2", "k1"), publication("/t1", "k2")):  # same key: one upper
        with pytest.raises(sqlite3.IntegrityError):
            with db.transaction() as tx:
                tx.record_publication(dup, ["aaaa"], 1.0)
    with db.read() as tx:
        assert tx.refcount("aaaa") == 1


def test_a_stage_pins_exactly_its_layers(db):
    with_layers(db, "aaaa", "bbbb", "cccc")
    s = Stage("vol-1", "/var/lib/kubelet/staging/x", "oci:/l:app", D3, 7, 5.5)
    with db.transaction() as tx:
        tx.record_stage(s, ["aaaa", "bbbb"], 1.0)
    with db.read() as tx:
        assert tx.stage("vol-1") == s and tx.stages() == [s]
        assert tx.refcounts() == {"aaaa": 1, "bbbb": 1}
    with db.transaction() as tx:  # re-pulled after its image was lost: replaced
        tx.record_stage(Stage("vol-1", s.staging_path, s.image, D4, 7, 5.5), ["cccc"], 2.0)
    with db.read() as tx:
        assert tx.stage("vol-1").manifest_digest == D4
        assert tx.refcounts() == {"cccc": 1}
    with db.transaction() as tx:
        assert tx.forget_stage("vol-1", 3.0) == ["cccc"]
    with db.read() as tx:
        assert tx.stage("vol-1") is None and tx.refcounts() == {}


def test_holders_are_told_apart(db):
    """A publication's target and a stage's volume ID may be the same string."""
    with_layers(db, "aaaa")
    with db.transaction() as tx:
        tx.record_publication(publication("vol-1", "k"), ["aaaa"], 1.0)
        tx.record_stage(Stage("vol-1", "/s", "img", D3, 1, 1.0), ["aaaa"], 1.0)
        tx.lease("vol-1", "aaaa")
    with db.read() as tx:
        assert tx.refcount("aaaa") == 3
    with db.transaction() as tx:
        tx.end_lease("vol-1")
        tx.forget_stage("vol-1", 2.0)
    with db.read() as tx:
        assert tx.holders() == [("aaaa", "pub:vol-1")]


def test_leases(db):
    with_layers(db, "aaaa", "bbbb")
    with db.transaction() as tx:
        tx.lease("t1", "aaaa")
        tx.lease("t1", "aaaa")  # idempotent
        tx.lease("t1", "bbbb")
        tx.lease("t2", "aaaa")
    with db.read() as tx:
        assert tx.refcounts() == {"aaaa": 2, "bbbb": 1}
    with db.transaction() as tx:
        tx.end_lease("t1")
    with db.read() as tx:
        assert tx.refcounts() == {"aaaa": 1}


def test_after_commit_runs_only_once_committed_and_cannot_unmake_the_commit(db, caplog):
    with_layers(db, "aaaa")
    ran = []
    with pytest.raises(RuntimeError):
        with db.transaction() as tx:
            tx.lease("t1", "aaaa")
            tx.after_commit(lambda: ran.append("rolled back"))
            raise RuntimeError("the caller failed")
    assert ran == []

    def boom():
        raise ValueError("a hook failed")

    with db.transaction() as tx:
        tx.lease("t1", "aaaa")
        tx.after_commit(boom)
        tx.after_commit(lambda: ran.append("committed"))
    assert ran == ["committed"]  # the failing hook neither raised nor stopped the next
    assert "a hook failed" in caplog.text
    with db.read() as tx:
        assert tx.refcounts() == {"aaaa": 1}


def test_controller_volume_round_trip(db):
    v = ControllerVolume("pvc-1", "strata-abc", 1 << 30, {"image": "oci:/l:app", "b": "2"}, 4.0)
    with db.transaction() as tx:
        tx.record_controller_volume(v)
    with db.read() as tx:
        assert tx.controller_volume("pvc-1") == v
        assert tx.controller_volume_by_id("strata-abc") == v
        assert tx.controller_volume("pvc-2") is None
    with db.transaction() as tx:
        tx.forget_controller_volume("strata-abc")
    with db.read() as tx:
        assert tx.controller_volume("pvc-1") is None


# -- start-up: references rebuilt ----------------------------------------------------------
def _rebuild_fixture(db):
    with_layers(db, "base", "top", "other")
    with db.transaction() as tx:
        tx.record_image(image(D3, "app"), ("base", "top"), 1.0)
        tx.record_publication(publication("/p", "k"), ["base", "top"], 1.0)
        tx.record_stage(Stage("v", "/s", "app", D3, 1, 1.0), ["base", "top"], 1.0)
        tx.lease("crashed", "other")


def test_rebuild_drops_stale_references_and_dead_leases(db):
    _rebuild_fixture(db)
    raw(db.path, "INSERT INTO refs VALUES ('other', 'pub:/no/such/target')")
    raw(db.path, "DELETE FROM refs WHERE holder='stage:v'")  # a lost reference
    with db.transaction() as tx:
        assert tx.rebuild_references(set()) == []
    with db.read() as tx:
        assert tx.holders() == [("base", "pub:/p"), ("top", "pub:/p"),
                                ("base", "stage:v"), ("top", "stage:v")]


def test_rebuild_can_keep_another_processes_leases(db):
    _rebuild_fixture(db)
    with db.transaction() as tx:
        tx.rebuild_references(set(), keep_leases=True)
    with db.read() as tx:
        assert ("other", "lease:crashed") in tx.holders()
    with db.transaction() as tx:  # a kept lease on a lost layer goes with the layer
        tx.rebuild_references({"other"}, keep_leases=True)
    with db.read() as tx:
        assert tx.layer("other") is None and ("other", "lease:crashed") not in tx.holders()


def test_rebuild_forgets_a_lost_layer_and_its_images_but_keeps_the_rest_held(db):
    _rebuild_fixture(db)
    with db.transaction() as tx:
        lines = tx.rebuild_references({"top"})
    assert len(lines) == 2 and all("no longer complete" in x for x in lines)
    with db.read() as tx:
        assert tx.layer("top") is None and tx.images() == []
        assert tx.refcounts() == {"base": 2}, "base is still under a live overlay"
    with db.transaction() as tx:  # at the next start the holders keep what they had
        assert tx.rebuild_references(set()) == []
    with db.read() as tx:
        assert tx.refcounts() == {"base": 2}


# -- checkpoints off the commit path ----------------------------------------------------
def _wait(condition, what: str) -> None:
    import time

    deadline = time.monotonic() + 60  # a bound on a wait for an event, not a measurement
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def test_commits_do_not_checkpoint_below_the_backstop(db):
    assert db._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == st.BACKSTOP_PAGES


def test_a_thread_copies_the_wal_into_the_database_every_so_many_commits(tmp_path):
    s = State(str(tmp_path / "state.db"))
    try:
        for i in range(st.CHECKPOINT_EVERY):
            with s.transaction() as tx:
                tx.record_tag(Tag(f"r/x:{i}", D1, float(i)))
        _wait(lambda: s._checkpointer.runs >= 1, "a checkpoint")
        # What was copied is in the database file itself: a reader that ignores the WAL
        # (immutable=1 opens the file as it is on disk) sees every tag.
        db = sqlite3.connect(f"file:{tmp_path / 'state.db'}?immutable=1", uri=True)
        try:
            assert db.execute("SELECT COUNT(*) FROM tags").fetchone()[0] == st.CHECKPOINT_EVERY
        finally:
            db.close()
    finally:
        s.close()
    assert not [t for t in threading.enumerate() if t.name == "state-checkpoint"]


def test_close_without_a_checkpoint_starts_no_thread(tmp_path):
    s = State(str(tmp_path / "state.db"))
    with s.transaction() as tx:
        tx.record_tag(Tag("r/x:1", D1, 1.0))
    s.close()
    assert s._checkpointer._thread is None
    again = State(str(tmp_path / "state.db"))
    try:
        with again.read() as tx:
            assert tx.tag("r/x:1") is not None
    finally:
        again.close()


def test_a_checkpoint_thread_that_cannot_start_fails_no_commit(tmp_path, monkeypatch):
    """No thread (a pids limit) when a commit nudges the checkpointer: that commit still
    returns normally (the layer store would otherwise discard the files of a layer it had
    just recorded), the next nudge tries again, and close() works."""
    s = State(str(tmp_path / "state.db"))
    real = threading.Thread.start

    def refused(self):
        raise RuntimeError("can't start new thread")

    try:
        monkeypatch.setattr(threading.Thread, "start", refused)
        for i in range(st.CHECKPOINT_EVERY):
            with s.transaction() as tx:
                tx.record_tag(Tag(f"r/x:{i}", D1, float(i)))
        assert s._checkpointer._thread is None
        monkeypatch.setattr(threading.Thread, "start", real)
        for i in range(st.CHECKPOINT_EVERY):
            with s.transaction() as tx:
                tx.record_tag(Tag(f"r/y:{i}", D1, float(i)))
        _wait(lambda: s._checkpointer.runs >= 1, "a checkpoint once threads are back")
        with s.read() as tx:
            assert tx.tag(f"r/x:{st.CHECKPOINT_EVERY - 1}") is not None
    finally:
        monkeypatch.setattr(threading.Thread, "start", real)
        s.close()
