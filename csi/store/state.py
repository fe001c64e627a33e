"""The only module that touches SQLite: the store's state in `state.db` (WAL).

Changes are domain operations, each one transaction that keeps the invariants below, never
table CRUD: record or forget a publication (with its layer references), a stage, an image
(with its layers), a layer, a lease. Like containerd's MetaStore, writes run inside
`transaction()` (BEGIN IMMEDIATE, commit or rollback); reads that change nothing (a scrape,
`strata ls`) run inside `read()`, on a connection of their own that never takes the write
lock, so they neither wait for a publish nor make one wait.

Invariants (the schema enforces the first two with foreign keys):
- a reference names a recorded layer, and a recorded layer is deleted only when nothing
  references it; its reference count is not stored but counted, so it cannot drift from the
  publications, stages and leases that hold it;
- an image is recorded only with all of its layers (`image_layers`), and forgetting a layer
  forgets every image containing it: a recorded image is complete on this node;
- recording or forgetting a publication or a stage writes its references in the same
  transaction, and touches the layers' `last_used` (GC's minimum age counts from there).
The schema version lives in PRAGMA user_version.
"""

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator

from csi.image.manifest import Image, LayerDesc

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5

# SQLite's own checkpoint runs inside the COMMIT that takes the WAL past 1,000 pages: that
# commit (a publish's, an unpublish's) copies the WAL into the database and syncs both, which
# cost 5-25 ms every ~230 commits on the bench machine (every ~20 warm publish+unpublish
# cycles: their p99). A thread checkpoints instead, on a connection of its own, nudged every
# CHECKPOINT_EVERY commits. The WAL starts over only at a write that begins once everything
# is copied: under a steady stream of commits the thread's checkpoints never catch up with
# the last one, so the writer still checkpoints itself past BACKSTOP_PAGES (then only what
# the thread has not copied yet); after that the WAL file is cut back to WAL_KEEP_BYTES.
CHECKPOINT_EVERY = 64
BACKSTOP_PAGES = 8_000
WAL_KEEP_BYTES = 4 << 20


def _v4(db: sqlite3.Connection) -> None:
    """A join table replaces the JSON list of layer IDs, which "which images contain this
    layer?" could only answer with LIKE. Images whose layers are not all recorded were
    unusable anyway and are dropped. The images table is rebuilt without the list rather
    than altered (DROP COLUMN needs SQLite 3.35; Debian 11 and RHEL 9 have 3.34), before
    anything references it."""
    known = {r[0] for r in db.execute("SELECT id FROM layers")}
    lists = {digest: json.loads(ids) for digest, ids in
             db.execute("SELECT manifest_digest, layer_ids FROM images")}
    complete = {d: ids for d, ids in lists.items() if set(ids) <= known}
    db.execute("""
CREATE TABLE images_v4 (
    manifest_digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    resolved REAL NOT NULL,
    layers TEXT NOT NULL DEFAULT '[]'  -- JSON layer descriptors (digest, type, size, DiffID)
)""")
    db.executemany("INSERT INTO images_v4 SELECT manifest_digest, name, config_digest, "
                   "resolved, layers FROM images WHERE manifest_digest=?",
                   [(d,) for d in complete])
    db.execute("DROP TABLE images")
    db.execute("ALTER TABLE images_v4 RENAME TO images")
    db.execute("""
CREATE TABLE image_layers (
    manifest_digest TEXT NOT NULL REFERENCES images(manifest_digest) ON DELETE CASCADE,
    position INTEGER NOT NULL,      -- 0 is the base
    layer_id TEXT NOT NULL REFERENCES layers(id),
    PRIMARY KEY (manifest_digest, position)
)""")
    db.execute("CREATE INDEX image_layers_layer ON image_layers(layer_id)")
    db.executemany("INSERT INTO image_layers VALUES (?,?,?)",
                   [(d, i, lid) for d, ids in complete.items() for i, lid in enumerate(ids)])
    db.execute("DELETE FROM image_aliases WHERE manifest_digest NOT IN "
               "(SELECT manifest_digest FROM images)")


# Each entry upgrades from the version before it (SQL, or a function of the connection for
# what SQL alone cannot do); a fresh database runs them all.
_MIGRATIONS = {
    1: None,  # _SCHEMA below
    2: """
ALTER TABLE images ADD COLUMN layers TEXT NOT NULL DEFAULT '[]';  -- JSON layer descriptors
CREATE TABLE tags (
    name TEXT PRIMARY KEY,          -- canonical reference without digest: registry/repo:tag
    manifest_digest TEXT NOT NULL,
    resolved REAL NOT NULL          -- when the registry last said so (for --tag-ttl)
);
""",
    3: """
CREATE TABLE image_aliases (
    digest TEXT PRIMARY KEY,        -- an index (manifest list) digest a reference named
    manifest_digest TEXT NOT NULL   -- the platform manifest it resolved to on this node
);
""",
    # Version 2 recorded an image named through an index twice, as two identical rows, and
    # which one is the index cannot be told from the rows: record_image folds them the next
    # time that image is recorded, when it can.
    4: _v4,
    # Who a publication is for (the kubelet's podInfoOnMount attributes; empty where it
    # sends none, and for publications recorded before) and what bounds its upper layer.
    5: """
ALTER TABLE publications ADD COLUMN pod_namespace TEXT NOT NULL DEFAULT '';
ALTER TABLE publications ADD COLUMN pod_name TEXT NOT NULL DEFAULT '';
ALTER TABLE publications ADD COLUMN pod_uid TEXT NOT NULL DEFAULT '';
ALTER TABLE publications ADD COLUMN service_account TEXT NOT NULL DEFAULT '';
ALTER TABLE publications ADD COLUMN size_limit INTEGER NOT NULL DEFAULT 0;  -- bytes, 0: none
ALTER TABLE publications ADD COLUMN project_id INTEGER NOT NULL DEFAULT 0;  -- quota, 0: none
-- A publication whose overlay had to be detached lazily (a process in the pod held it):
-- its private state waits here until the kernel lets the overlay go, holding its layers.
CREATE TABLE released (
    key TEXT PRIMARY KEY,           -- the backend's key (volumes/KEY) the overlay may write
    target TEXT NOT NULL,           -- where it was mounted ('' when start-up found it)
    volume_id TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,  -- its image ('' when unknown): its layers stay referenced
    device TEXT NOT NULL,           -- major:minor of the overlay when detached ('' unknown)
    since REAL NOT NULL
);
""",
}

_SCHEMA = """
CREATE TABLE layers (
    id TEXT PRIMARY KEY,
    diff_id TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,          -- bytes on disk (st_blocks), for df and sharing metrics
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE images (
    manifest_digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    layer_ids TEXT NOT NULL,        -- JSON list, base first (until v4: image_layers)
    resolved REAL NOT NULL
);
CREATE TABLE stages (
    volume_id TEXT PRIMARY KEY,
    staging_path TEXT NOT NULL,
    image TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    access_mode INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE publications (
    target TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,       -- the backend's name for its private state (volumes/KEY)
    image TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    readonly INTEGER NOT NULL,
    staging_path TEXT NOT NULL,
    access_mode INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX publications_volume ON publications(volume_id);
CREATE TABLE refs (
    layer_id TEXT NOT NULL REFERENCES layers(id),
    holder TEXT NOT NULL,           -- "pub:TARGET", "stage:VOLUME_ID" or "lease:TOKEN"
    PRIMARY KEY (layer_id, holder)
);
CREATE INDEX refs_holder ON refs(holder);
CREATE TABLE controller_volumes (
    name TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL UNIQUE,
    capacity INTEGER NOT NULL,
    parameters TEXT NOT NULL,       -- JSON object
    created REAL NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class Layer:
    id: str
    diff_id: str
    size: int
    created: float
    last_used: float


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """An image as this node holds it: the image (whose layer descriptors let it be used
    again without the network; a version-1 store did not keep them), where each of its
    layers is (layer IDs, base first), and when it was resolved."""

    image: Image
    layer_ids: tuple[str, ...]
    resolved: float

    @property
    def manifest_digest(self) -> str:
        return self.image.manifest_digest

    @property
    def name(self) -> str:
        return self.image.name


@dataclasses.dataclass(frozen=True)
class Tag:
    name: str
    manifest_digest: str
    resolved: float


@dataclasses.dataclass(frozen=True)
class Stage:
    volume_id: str
    staging_path: str
    image: str
    manifest_digest: str
    access_mode: int
    created: float


@dataclasses.dataclass(frozen=True)
class Publication:
    target: str
    volume_id: str
    key: str
    image: str
    manifest_digest: str
    readonly: bool
    staging_path: str
    access_mode: int
    created: float
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    service_account: str = ""
    size_limit: int = 0  # bytes the upper layer may hold; 0: unbounded
    project_id: int = 0  # the filesystem project quota bounding it; 0: none (or a loop fs)

    @property
    def pod(self) -> str:
        """namespace/name, or "" when the kubelet did not say (podInfoOnMount off)."""
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else ""


@dataclasses.dataclass(frozen=True)
class Release:
    """Private state (`key`) that a detached overlay may still write to: deleted only once
    the kernel has let that overlay go. Until then it holds the layers the overlay reads."""

    key: str
    target: str = ""
    volume_id: str = ""
    manifest_digest: str = ""
    device: str = ""  # major:minor of the overlay, for people looking for its holders
    since: float = 0.0


@dataclasses.dataclass(frozen=True)
class ControllerVolume:
    name: str
    volume_id: str
    capacity: int
    parameters: dict
    created: float


# Who holds a reference. A lease is a short-lived reference held while a publish or stage
# is about to record its own, so GC cannot take a layer in between.
def _pub(target: str) -> str:
    return "pub:" + target


def _stage(volume_id: str) -> str:
    return "stage:" + volume_id


def _lease(token: str) -> str:
    return "lease:" + token


def _released(key: str) -> str:
    return "release:" + key


class Reader:
    """Queries, inside a read or a write transaction."""

    def __init__(self, cur: sqlite3.Cursor):
        self._c = cur

    def _one(self, cls, sql: str, *args):
        row = self._c.execute(sql, args).fetchone()
        return cls(*row) if row else None

    def _all(self, cls, sql: str, *args) -> list:
        return [cls(*row) for row in self._c.execute(sql, args).fetchall()]

    # layers
    def layer(self, layer_id: str) -> Layer | None:
        return self._one(Layer, "SELECT * FROM layers WHERE id=?", layer_id)

    def layer_by_diff_id(self, diff_id: str) -> Layer | None:
        return self._one(Layer, "SELECT * FROM layers WHERE diff_id=?", diff_id)

    def layers(self) -> list[Layer]:
        return self._all(Layer, "SELECT * FROM layers ORDER BY created")

    # images
    def image(self, digest: str) -> ImageRecord | None:
        """The image with this manifest digest, or that an index with this digest resolved
        to on this node. Recorded means complete: every layer is recorded."""
        found = self._images("WHERE manifest_digest = coalesce("
                             "(SELECT manifest_digest FROM image_aliases WHERE digest=?), ?)",
                             digest, digest)
        return found[0] if found else None

    def images(self) -> list[ImageRecord]:
        """Each image once, under its platform manifest digest (never an index's)."""
        return self._images("")

    def _images(self, where: str, *args) -> list[ImageRecord]:
        """The images `where` selects, with their layers: two queries however many images
        (a scrape lists them all)."""
        rows = self._c.execute(f"SELECT * FROM images {where} ORDER BY name", args).fetchall()
        ids: dict[str, list[str]] = {}
        for digest, lid in self._c.execute(
                "SELECT manifest_digest, layer_id FROM image_layers WHERE manifest_digest IN "
                f"(SELECT manifest_digest FROM images {where}) ORDER BY position", args):
            ids.setdefault(digest, []).append(lid)
        return [ImageRecord(Image(name, digest, config,
                                  tuple(LayerDesc(*d) for d in json.loads(descs))),
                            tuple(ids.get(digest, ())), resolved)
                for digest, name, config, resolved, descs in rows]

    def tag(self, name: str) -> Tag | None:
        return self._one(Tag, "SELECT * FROM tags WHERE name=?", name)

    # volumes
    def stage(self, volume_id: str) -> Stage | None:
        return self._one(Stage, "SELECT * FROM stages WHERE volume_id=?", volume_id)

    def stages(self) -> list[Stage]:
        return self._all(Stage, "SELECT * FROM stages ORDER BY created")

    def publication(self, target: str) -> Publication | None:
        row = self._c.execute(f"SELECT {_PUBLICATION_COLUMNS} FROM publications "
                              "WHERE target=?", (target,)).fetchone()
        return _publication(row) if row else None

    def publications(self, volume_id: str | None = None) -> list[Publication]:
        if volume_id is None:
            rows = self._c.execute(f"SELECT {_PUBLICATION_COLUMNS} FROM publications "
                                   "ORDER BY created")
        else:
            rows = self._c.execute(f"SELECT {_PUBLICATION_COLUMNS} FROM publications "
                                   "WHERE volume_id=? ORDER BY created", (volume_id,))
        return [_publication(r) for r in rows.fetchall()]

    def release(self, key: str) -> Release | None:
        return self._one(Release, "SELECT * FROM released WHERE key=?", key)

    def releases(self) -> list[Release]:
        """Private state waiting for the kernel to let a detached overlay go, oldest first."""
        return self._all(Release, "SELECT * FROM released ORDER BY since")

    def blind_releases(self) -> list[Release]:
        """Releases that cannot say which layers their view reads (start-up found their
        overlay live with no record of its image): while any is pending, no layer is
        deleted (`forget_layer`)."""
        return self._all(Release, "SELECT * FROM released WHERE manifest_digest='' "
                                  "ORDER BY since")

    # references
    def refcount(self, layer_id: str) -> int:
        return self._c.execute("SELECT COUNT(*) FROM refs WHERE layer_id=?",
                               (layer_id,)).fetchone()[0]

    def refcounts(self) -> dict[str, int]:
        return dict(self._c.execute("SELECT layer_id, COUNT(*) FROM refs GROUP BY layer_id"))

    def referenced(self) -> dict[str, int]:
        """Every layer's ID → 1 if anything references it, else 0. GC's question after every
        unpublish: one index probe per layer, where `refcounts` reads every reference (two
        per live publication of a two-layer image)."""
        return dict(self._c.execute(
            "SELECT id, EXISTS (SELECT 1 FROM refs WHERE refs.layer_id = layers.id) "
            "FROM layers"))

    def holders(self) -> list[tuple[str, str]]:
        """(layer ID, holder) of every reference: for diagnostics and tests."""
        return self._c.execute("SELECT layer_id, holder FROM refs ORDER BY holder").fetchall()

    # controller
    def controller_volume(self, name: str) -> ControllerVolume | None:
        row = self._c.execute("SELECT * FROM controller_volumes WHERE name=?",
                              (name,)).fetchone()
        return _controller_volume(row) if row else None

    def controller_volume_by_id(self, volume_id: str) -> ControllerVolume | None:
        row = self._c.execute("SELECT * FROM controller_volumes WHERE volume_id=?",
                              (volume_id,)).fetchone()
        return _controller_volume(row) if row else None


class Tx(Reader):
    """Domain operations inside one write transaction."""

    def __init__(self, cur: sqlite3.Cursor):
        super().__init__(cur)
        self._after: list = []

    def after_commit(self, fn) -> None:
        """Call `fn()` once this transaction has committed (never if it rolls back). An
        exception from it is logged, not raised: the transaction did commit."""
        self._after.append(fn)

    # -- layers ------------------------------------------------------------------------
    def record_layer(self, layer: Layer) -> None:
        """A layer just unpacked and renamed into place."""
        self._c.execute("INSERT INTO layers VALUES (?,?,?,?,?)", dataclasses.astuple(layer))

    def forget_layer(self, layer_id: str) -> bool:
        """Forget an unreferenced layer and every image containing it (they are no longer
        complete). False, changing nothing, when it is referenced or unknown, or while a
        release that cannot say which layers it reads is pending (any may be one)."""
        if self.layer(layer_id) is None or self.refcount(layer_id):
            return False
        if self._c.execute("SELECT 1 FROM released WHERE manifest_digest='' "
                           "LIMIT 1").fetchone():
            return False
        self._forget_images_with(layer_id)
        self._c.execute("DELETE FROM layers WHERE id=?", (layer_id,))
        return True

    def _forget_images_with(self, layer_id: str) -> None:
        self._c.execute("DELETE FROM images WHERE manifest_digest IN (SELECT manifest_digest "
                        "FROM image_layers WHERE layer_id=?)", (layer_id,))
        self._c.execute("DELETE FROM image_aliases WHERE manifest_digest NOT IN "
                        "(SELECT manifest_digest FROM images)")

    def _touch(self, layer_ids: Iterable[str], now: float) -> None:
        self._c.executemany("UPDATE layers SET last_used=? WHERE id=?",
                            [(now, i) for i in layer_ids])

    # -- images ------------------------------------------------------------------------
    def record_image(self, image: Image, layer_ids: tuple[str, ...] | list[str],
                     now: float) -> None:
        """An image whose layers are all recorded (`layer_ids`, base first). An image named
        through an index (`image.index_digest`) is known by that digest too, so that
        `repo@sha256:<index>` and a tag naming the index resolve locally."""
        digest = image.manifest_digest
        self._c.execute("DELETE FROM images WHERE manifest_digest=?", (digest,))
        self._c.execute("INSERT INTO images VALUES (?,?,?,?,?)", (
            digest, image.name, image.config_digest, now,
            json.dumps([[d.digest, d.media_type, d.size, d.diff_id] for d in image.layers])))
        self._c.executemany("INSERT INTO image_layers VALUES (?,?,?)",
                            [(digest, i, lid) for i, lid in enumerate(layer_ids)])
        if image.index_digest and image.index_digest != digest:
            self._alias(image.index_digest, digest)

    def _alias(self, index: str, manifest_digest: str) -> None:
        """Record that index `index` resolved to `manifest_digest`. A row a version-2 store
        kept under the index digest is folded into the manifest's, with the publications
        and stages that named it."""
        self._c.execute("DELETE FROM images WHERE manifest_digest=?", (index,))
        for table in ("publications", "stages"):
            self._c.execute(f"UPDATE {table} SET manifest_digest=? WHERE manifest_digest=?",
                            (manifest_digest, index))
        self._c.execute("DELETE FROM image_aliases WHERE digest=?", (manifest_digest,))
        self._c.execute("INSERT OR REPLACE INTO image_aliases VALUES (?,?)",
                        (index, manifest_digest))

    def record_tag(self, t: Tag) -> None:
        self._c.execute("INSERT OR REPLACE INTO tags VALUES (?,?,?)", dataclasses.astuple(t))

    # -- leases ------------------------------------------------------------------------
    def lease(self, token: str, layer_id: str) -> None:
        self._c.execute("INSERT OR IGNORE INTO refs VALUES (?,?)", (layer_id, _lease(token)))

    def end_lease(self, token: str) -> None:
        self._c.execute("DELETE FROM refs WHERE holder=?", (_lease(token),))

    # -- stages and publications -------------------------------------------------------
    def _hold(self, holder: str, layer_ids: Iterable[str], now: float) -> None:
        ids = list(dict.fromkeys(layer_ids))
        self._c.executemany("INSERT OR IGNORE INTO refs VALUES (?,?)",
                            [(i, holder) for i in ids])
        self._touch(ids, now)

    def _release(self, holder: str, now: float) -> list[str]:
        released = [r[0] for r in self._c.execute(
            "DELETE FROM refs WHERE holder=? RETURNING layer_id", (holder,)).fetchall()]
        self._touch(released, now)  # --gc-min-age counts from the release
        return released

    def record_stage(self, stage: Stage, layer_ids: Iterable[str], now: float) -> None:
        """The stage, pinning exactly `layer_ids` (a stage re-pulled after start-up found its
        image incomplete replaces its record and its references)."""
        self._c.execute("INSERT OR REPLACE INTO stages VALUES (?,?,?,?,?,?)",
                        dataclasses.astuple(stage))
        self._release(_stage(stage.volume_id), now)
        self._hold(_stage(stage.volume_id), layer_ids, now)

    def forget_stage(self, volume_id: str, now: float) -> list[str]:
        """Forget a stage and release its references; returns the layers it held."""
        self._c.execute("DELETE FROM stages WHERE volume_id=?", (volume_id,))
        return self._release(_stage(volume_id), now)

    def record_publication(self, pub: Publication, layer_ids: Iterable[str],
                           now: float) -> None:
        fields = dataclasses.fields(Publication)
        self._c.execute(f"INSERT INTO publications ({','.join(f.name for f in fields)}) "
                        f"VALUES ({','.join('?' * len(fields))})", dataclasses.astuple(pub))
        self._hold(_pub(pub.target), layer_ids, now)

    def forget_publication(self, target: str, now: float) -> list[str]:
        """Forget a publication and release its references; returns the layers it held."""
        self._c.execute("DELETE FROM publications WHERE target=?", (target,))
        return self._release(_pub(target), now)

    def release_publication(self, target: str, device: str, now: float) -> Release | None:
        """Forget a publication whose overlay was detached but may live on, and keep its
        private state and its layers for that overlay: the references pass to the release.
        None (changing nothing) for an unknown target."""
        pub = self.publication(target)
        if pub is None:
            return None
        release = Release(pub.key, pub.target, pub.volume_id, pub.manifest_digest, device, now)
        self._c.execute("INSERT OR REPLACE INTO released VALUES (?,?,?,?,?,?)",
                        dataclasses.astuple(release))
        self._c.execute("DELETE FROM publications WHERE target=?", (target,))
        self._c.execute("UPDATE OR IGNORE refs SET holder=? WHERE holder=?",
                        (_released(pub.key), _pub(target)))
        self._c.execute("DELETE FROM refs WHERE holder=?", (_pub(target),))
        return release

    def record_release(self, release: Release) -> None:
        """Private state no publication records that a live overlay still uses (start-up
        found it): it holds no layers, since which ones is not known; with no
        `manifest_digest`, it stops every layer's removal until it is forgotten."""
        self._c.execute("INSERT OR IGNORE INTO released VALUES (?,?,?,?,?,?)",
                        dataclasses.astuple(release))

    def forget_release(self, key: str, now: float) -> list[str]:
        """The kernel let the overlay go: forget the release and its references; returns
        the layers it held."""
        self._c.execute("DELETE FROM released WHERE key=?", (key,))
        return self._release(_released(key), now)

    # -- start-up ----------------------------------------------------------------------
    def rebuild_references(self, lost: set[str], keep_leases: bool = False) -> list[str]:
        """References are derived data: rebuild them from the publications, stages and
        releases that exist, forgetting the `lost` layers (recorded, but their directory
        is gone) with the images that contain them. Each holder keeps its image's layers
        that remain (a live overlay may still use them); a holder whose image a lost layer
        took at an earlier start keeps the references it has. Leases are dropped (their
        processes are gone) unless `keep_leases` (another process uses the store). Returns
        a line for each holder whose image is no longer complete (its next use pulls it
        again)."""
        holders = [(_pub(p.target), f"publication at {p.target}", p.manifest_digest)
                   for p in self.publications()]
        holders += [(_stage(s.volume_id), f"stage of {s.volume_id}", s.manifest_digest)
                    for s in self.stages()]
        holders += [(_released(r.key), f"detached overlay of {r.key}", r.manifest_digest)
                    for r in self.releases() if r.manifest_digest]
        had: dict[str, list[str]] = {}
        for lid, holder in self.holders():
            had.setdefault(holder, []).append(lid)
        held = {}
        for holder, _, digest in holders:
            image = self.image(digest)
            held[holder] = list(image.layer_ids) if image is not None else had.get(holder, [])
        if keep_leases:
            self._c.execute("DELETE FROM refs WHERE holder NOT LIKE 'lease:%'")
        else:
            self._c.execute("DELETE FROM refs")
        for lid in lost:
            self._forget_images_with(lid)
            self._c.execute("DELETE FROM refs WHERE layer_id=?", (lid,))  # a kept lease's
            self._c.execute("DELETE FROM layers WHERE id=?", (lid,))
        incomplete = []
        for holder, what, digest in holders:
            if lost & set(held[holder]):
                incomplete.append(f"{what}: image {digest} is no longer complete on this node")
            self._c.executemany("INSERT OR IGNORE INTO refs VALUES (?,?)",
                                [(lid, holder) for lid in held[holder] if lid not in lost])
        return incomplete

    # -- controller --------------------------------------------------------------------
    def record_controller_volume(self, v: ControllerVolume) -> None:
        self._c.execute("INSERT INTO controller_volumes VALUES (?,?,?,?,?)",
                        (v.name, v.volume_id, v.capacity, json.dumps(v.parameters,
                                                                     sort_keys=True), v.created))

    def forget_controller_volume(self, volume_id: str) -> None:
        self._c.execute("DELETE FROM controller_volumes WHERE volume_id=?", (volume_id,))


_PUBLICATION_COLUMNS = ",".join(f.name for f in dataclasses.fields(Publication))


def _publication(row) -> Publication:
    return Publication(*row[:5], bool(row[5]), *row[6:])


def _controller_volume(row) -> ControllerVolume:
    return ControllerVolume(row[0], row[1], row[2], json.loads(row[3]), row[4])


class SchemaMismatch(RuntimeError):
    """state.db is of a schema version this strata cannot (or, read-only, may not) use."""


def schema_version(path: str) -> int | None:
    """The schema version of the database at `path` (None: there is none yet), read without
    opening it as a State: a server checks it before deciding whether it may upgrade."""
    if not os.path.exists(path):
        return None
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA foreign_keys=ON")
    return db


class _Checkpointer:
    """A thread that copies the WAL into the database when nudged, on its own connection:
    PASSIVE, so it never waits for a reader or the writer, nor makes one wait (the writer
    appends to the WAL meanwhile). Durability is the WAL's either way: a commit is in the WAL
    before COMMIT returns, whenever it reaches the database file."""

    def __init__(self, path: str):
        self._path = path
        self._cv = threading.Condition()
        self._due = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.runs = 0  # checkpoints made (tests)

    def nudge(self) -> None:
        """Never raises: it runs after a COMMIT, which must not then look failed. Without
        a thread (a pids limit) the writer's backstop checkpoints, and the next nudge
        tries to start one again."""
        with self._cv:
            if self._stopped:
                return
            self._due = True
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="state-checkpoint",
                                          daemon=True)
                try:
                    thread.start()
                except RuntimeError as e:
                    log.warning("cannot start the checkpoint thread for %s: %s",
                                self._path, e)
                    return
                self._thread = thread
            self._cv.notify()

    def _run(self) -> None:
        db = None
        try:
            db = _connect(self._path)
            while True:
                with self._cv:
                    while not self._due and not self._stopped:
                        self._cv.wait()
                    if self._stopped:
                        return
                    self._due = False
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.runs += 1
                except sqlite3.Error as e:  # the writer's backstop checkpoints meanwhile
                    log.warning("checkpoint of %s failed: %s", self._path, e)
        except sqlite3.Error as e:
            log.warning("cannot open %s to checkpoint it: %s", self._path, e)
        finally:
            if db is not None:
                db.close()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)


class State:
    """Two connections, each serialised by its own lock (gRPC worker threads share them):
    one for write transactions, one for reads; and a checkpointer's (_Checkpointer). Other
    processes (`strata ls`) open their own; WAL lets every reader go on while one process
    writes."""

    def __init__(self, path: str, clock=time.time, migrate: bool = True):
        """`migrate=False` (the read-only tools) refuses a store of another schema version
        instead of upgrading it: an older server may still be using it."""
        self.path = path
        self.clock = clock
        self._lock = threading.RLock()
        self._db = _connect(path)
        self._read_lock = threading.Lock()
        self._ro = None
        self._commits = 0
        self._checkpointer = _Checkpointer(path)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives crashes
            self._db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
            if migrate:
                self._migrate()
            elif (version := self._version()) != SCHEMA_VERSION:
                raise SchemaMismatch(f"{path} has schema version {version}, this strata "
                                   f"reads version {SCHEMA_VERSION}: start this version's "
                                   "`strata serve` on it to upgrade it")
            self._ro = _connect(path)
        except BaseException:
            self.close()
            raise

    def _version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        # The common case (up to date) takes no write lock, so that `strata ls` beside a
        # busy server never waits. An upgrade re-reads the version inside the write lock:
        # two processes opening an old or fresh database at once must not both migrate.
        if self._version() == SCHEMA_VERSION:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                version = self._version()
                if version > SCHEMA_VERSION:
                    raise SchemaMismatch(f"{self.path}: schema version {version} is newer than "
                                       f"this strata understands ({SCHEMA_VERSION})")
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    step = _MIGRATIONS[v] or _SCHEMA
                    if callable(step):
                        step(self._db)
                        continue
                    for stmt in step.split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            tx = Tx(cur)
            try:
                yield tx
                cur.execute("COMMIT")
                self._commits += 1
            except BaseException:
                # Also when COMMIT itself fails (SQLITE_FULL, IOERR): a transaction left
                # open would make every later BEGIN fail on this shared connection.
                if self._db.in_transaction:
                    cur.execute("ROLLBACK")
                raise
            # Committed: nothing from here on may make the caller think otherwise.
            for fn in tx._after:
                try:
                    fn()
                except Exception:
                    log.exception("after the commit of a transaction")
            if self._commits % CHECKPOINT_EVERY == 0:
                self._checkpointer.nudge()

    @contextlib.contextmanager
    def read(self) -> Iterator[Reader]:
        """A consistent snapshot for reading (BEGIN DEFERRED: a WAL read lock only)."""
        with self._read_lock:
            cur = self._ro.cursor()
            cur.execute("BEGIN")
            try:
                yield Reader(cur)
            finally:
                cur.execute("ROLLBACK")  # nothing was written; ends the snapshot

    def close(self) -> None:
        self._checkpointer.stop()  # the last connection to close checkpoints what is left
        with self._lock, self._read_lock:
            for db in (self._db, self._ro):
                if db is not None:
                    db.close()
