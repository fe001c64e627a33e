"""The only module that touches SQLite: the store's state in `state.db` (WAL).

Records are frozen dataclasses. Every change happens inside `transaction()` (BEGIN
IMMEDIATE, commit or rollback), like containerd's MetaStore.WithTransaction. A layer's
reference count is not stored: it is the number of `refs` rows naming it, so it cannot drift
from the publications and stages that hold it. The schema version lives in PRAGMA user_version.
"""

import contextlib
import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Iterator

SCHEMA_VERSION = 3

# Each entry upgrades from the version before it; a fresh database runs them all.
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
    # which one is the index cannot be told from the rows: put_alias folds them the next
    # time that image is recorded, when it can.
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
    layer_ids TEXT NOT NULL,        -- JSON list, base first
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
    key TEXT NOT NULL UNIQUE,       -- volumes/KEY holds upper/ and work/
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
    holder TEXT NOT NULL,           -- "pub:TARGET" or "stage:VOLUME_ID"
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
    manifest_digest: str
    name: str
    config_digest: str
    layer_ids: tuple[str, ...]
    resolved: float
    # (digest, media_type, size, diff_id) per layer, base first: enough to rebuild the
    # image without the network when every layer is still on the node.
    layers: tuple[tuple[str, str, int, str], ...] = ()


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


@dataclasses.dataclass(frozen=True)
class ControllerVolume:
    name: str
    volume_id: str
    capacity: int
    parameters: dict
    created: float


def pub_holder(target: str) -> str:
    return "pub:" + target


def stage_holder(volume_id: str) -> str:
    return "stage:" + volume_id


def lease_holder(token: str) -> str:
    """A short-lived reference held while a publish or stage is about to record its own."""
    return "lease:" + token


class Tx:
    """Queries and changes inside one transaction."""

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

    def put_layer(self, layer: Layer) -> None:
        self._c.execute("INSERT OR REPLACE INTO layers VALUES (?,?,?,?,?)",
                        dataclasses.astuple(layer))

    def delete_layer(self, layer_id: str) -> None:
        self._c.execute("DELETE FROM layers WHERE id=?", (layer_id,))

    def touch_layers(self, layer_ids: list[str], now: float) -> None:
        self._c.executemany("UPDATE layers SET last_used=? WHERE id=?",
                            [(now, i) for i in layer_ids])

    # images
    def image(self, digest: str) -> ImageRecord | None:
        """The image with this manifest digest, or that an index with this digest resolved
        to on this node."""
        row = self._c.execute(
            "SELECT * FROM images WHERE manifest_digest = coalesce("
            "(SELECT manifest_digest FROM image_aliases WHERE digest=?), ?)",
            (digest, digest)).fetchone()
        return _image(row) if row else None

    def images(self) -> list[ImageRecord]:
        """Each image once, under its platform manifest digest (never an index's)."""
        return [_image(r) for r in self._c.execute("SELECT * FROM images ORDER BY name")]

    def put_alias(self, digest: str, manifest_digest: str) -> None:
        """Record that index `digest` resolved to `manifest_digest`. A row a version-2 store
        kept under the index digest is folded into the manifest's, with the publications
        and stages that named it."""
        self._c.execute("DELETE FROM images WHERE manifest_digest=?", (digest,))
        for table in ("publications", "stages"):
            self._c.execute(f"UPDATE {table} SET manifest_digest=? WHERE manifest_digest=?",
                            (manifest_digest, digest))
        self._c.execute("DELETE FROM image_aliases WHERE digest=?", (manifest_digest,))
        self._c.execute("INSERT OR REPLACE INTO image_aliases VALUES (?,?)",
                        (digest, manifest_digest))

    def delete_images_with_layer(self, layer_id: str) -> None:
        self._c.execute("DELETE FROM images WHERE layer_ids LIKE ?", (f'%"{layer_id}"%',))
        self._c.execute("DELETE FROM image_aliases WHERE manifest_digest NOT IN "
                        "(SELECT manifest_digest FROM images)")

    def put_image(self, img: ImageRecord) -> None:
        self._c.execute("INSERT OR REPLACE INTO images VALUES (?,?,?,?,?,?)",
                        (img.manifest_digest, img.name, img.config_digest,
                         json.dumps(list(img.layer_ids)), img.resolved,
                         json.dumps([list(x) for x in img.layers])))

    # tags
    def tag(self, name: str) -> Tag | None:
        return self._one(Tag, "SELECT * FROM tags WHERE name=?", name)

    def put_tag(self, t: Tag) -> None:
        self._c.execute("INSERT OR REPLACE INTO tags VALUES (?,?,?)", dataclasses.astuple(t))

    # stages
    def stage(self, volume_id: str) -> Stage | None:
        return self._one(Stage, "SELECT * FROM stages WHERE volume_id=?", volume_id)

    def stages(self) -> list[Stage]:
        return self._all(Stage, "SELECT * FROM stages ORDER BY created")

    def put_stage(self, s: Stage) -> None:
        self._c.execute("INSERT INTO stages VALUES (?,?,?,?,?,?)", dataclasses.astuple(s))

    def delete_stage(self, volume_id: str) -> None:
        self._c.execute("DELETE FROM stages WHERE volume_id=?", (volume_id,))

    # publications
    def publication(self, target: str) -> Publication | None:
        row = self._c.execute("SELECT * FROM publications WHERE target=?", (target,)).fetchone()
        return _pub(row) if row else None

    def publications(self, volume_id: str | None = None) -> list[Publication]:
        if volume_id is None:
            rows = self._c.execute("SELECT * FROM publications ORDER BY created")
        else:
            rows = self._c.execute("SELECT * FROM publications WHERE volume_id=? "
                                   "ORDER BY created", (volume_id,))
        return [_pub(r) for r in rows.fetchall()]

    def put_publication(self, p: Publication) -> None:
        self._c.execute("INSERT INTO publications VALUES (?,?,?,?,?,?,?,?,?)",
                        dataclasses.astuple(p))

    def delete_publication(self, target: str) -> None:
        self._c.execute("DELETE FROM publications WHERE target=?", (target,))

    # references
    def add_refs(self, holder: str, layer_ids: list[str]) -> None:
        self._c.executemany("INSERT OR IGNORE INTO refs VALUES (?,?)",
                            [(i, holder) for i in layer_ids])

    def drop_refs(self, holder: str) -> list[str]:
        """Drop a holder's references; returns the layer IDs it held."""
        return [r[0] for r in self._c.execute(
            "DELETE FROM refs WHERE holder=? RETURNING layer_id", (holder,))]

    def drop_all_refs(self) -> None:
        self._c.execute("DELETE FROM refs")

    def delete_layer_refs(self, layer_id: str) -> None:
        self._c.execute("DELETE FROM refs WHERE layer_id=?", (layer_id,))

    def refcount(self, layer_id: str) -> int:
        return self._c.execute("SELECT COUNT(*) FROM refs WHERE layer_id=?",
                               (layer_id,)).fetchone()[0]

    def holders(self) -> list[tuple[str, str]]:
        return self._c.execute("SELECT layer_id, holder FROM refs").fetchall()

    def refcounts(self) -> dict[str, int]:
        return dict(self._c.execute("SELECT layer_id, COUNT(*) FROM refs GROUP BY layer_id"))

    # controller
    def controller_volume(self, name: str) -> ControllerVolume | None:
        row = self._c.execute("SELECT * FROM controller_volumes WHERE name=?",
                              (name,)).fetchone()
        return _cvol(row) if row else None

    def controller_volume_by_id(self, volume_id: str) -> ControllerVolume | None:
        row = self._c.execute("SELECT * FROM controller_volumes WHERE volume_id=?",
                              (volume_id,)).fetchone()
        return _cvol(row) if row else None

    def put_controller_volume(self, v: ControllerVolume) -> None:
        self._c.execute("INSERT INTO controller_volumes VALUES (?,?,?,?,?)",
                        (v.name, v.volume_id, v.capacity, json.dumps(v.parameters,
                                                                     sort_keys=True), v.created))

    def delete_controller_volume(self, volume_id: str) -> None:
        self._c.execute("DELETE FROM controller_volumes WHERE volume_id=?", (volume_id,))


def _image(row) -> ImageRecord:
    return ImageRecord(row[0], row[1], row[2], tuple(json.loads(row[3])), row[4],
                       tuple(tuple(x) for x in json.loads(row[5])))


def _pub(row) -> Publication:
    return Publication(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7],
                       row[8])


def _cvol(row) -> ControllerVolume:
    return ControllerVolume(row[0], row[1], row[2], json.loads(row[3]), row[4])


class State:
    """One connection, serialised by a lock: gRPC worker threads share it. Other processes
    (`strata ls`) open their own; WAL lets them read while the server writes."""

    def __init__(self, path: str, clock=time.time):
        self.path = path
        self.clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL is durable across crashes
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            # The version is read inside the write lock: two processes opening a fresh
            # database at once must not both create the schema.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RuntimeError(f"{self.path}: schema version {version} is newer than "
                                       f"this strata understands ({SCHEMA_VERSION})")
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    script = _MIGRATIONS[v] or _SCHEMA
                    for stmt in script.split(";"):
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
            try:
                yield Tx(cur)
                cur.execute("COMMIT")
            except BaseException:
                # Also when COMMIT itself fails (SQLITE_FULL, IOERR): a transaction left
                # open would make every later BEGIN fail on this shared connection.
                if self._db.in_transaction:
                    cur.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
