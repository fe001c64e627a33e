"""`strata pull`, `gc`, `ls`, `df` and `diff`: operator tools over a server's own store,
safe while it runs.

They are built by the same composition root as the server (compose.py). `ls`, `df` and
`diff` only read, in read transactions that never take the write lock a publish needs;
none of the tools touches mounts. `pull` and `gc` share the store as a server does (WAL,
the store lock held shared, layer renames ordered by layers.lock); `gc` removes only what
no publication, stage or in-flight lease holds, re-checked in the deleting transaction.
"""

import contextlib
import json
import logging
import os
import shutil
import sys
import time

from csi import compose, quantity
from csi.config import ENV_PREFIX, Config
from csi.errors import StrataError
from csi.image import reference
from csi.inspect import Summary
from csi.progress import PullDisplay
from csi.store.report import image_rows, sharing
from csi.store.state import Publication, SchemaMismatch
from csi.units import human_bytes
from csi.volumes import canonical


def pull(config: Config, image: str, policy: str) -> int:
    """`strata pull`: the server's own pull path, its progress drawn as `docker pull` draws
    it (progress.py), ending with the digest and whether anything new came."""
    ref = reference.parse(image)  # the CLI refused a bad one already
    tty = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    display = PullDisplay(sys.stdout, tty, shutil.get_terminal_size().columns)
    retries = _Retries(display)
    with _opened(config, lambda c: compose.tool(
            c, on_unpack=lambda layer, seconds, nbytes: display.unpacked(layer.diff_id),
            on_bytes=display.received)) as parts:
        with parts.state.read() as tx:
            known = {i.manifest_digest for i in tx.images()}
        if isinstance(ref, reference.LayoutReference):
            display.note(f"{ref.tag or 'latest'}: Pulling from {ref.path}")
        else:
            display.note(f"{ref.digest or ref.tag}: Pulling from {ref.repository}")
        with retries.installed():
            _, img = parts.puller.pull(image, {}, policy, wait=None, progress=display)
    display.finish()
    fresh = display.fetched and (display.missing or img.manifest_digest not in known)
    display.note(f"Digest: {img.index_digest or img.manifest_digest}")
    display.note(f"Status: {'Downloaded newer image' if fresh else 'Image is up to date'} "
                 f"for {image}")
    display.note(str(ref))
    return 0


class _Retries(logging.Handler):
    """The transport's retries (its log records marked `retry_in`), shown by the display
    as they happen: a tool logs nothing below WARNING otherwise."""

    LOGGER = "csi.image.transport"

    def __init__(self, display: PullDisplay):
        super().__init__(logging.INFO)
        self._display = display

    def emit(self, record: logging.LogRecord) -> None:
        delay = getattr(record, "retry_in", None)
        if delay is None:
            return
        args = record.args if isinstance(record.args, tuple) else ()
        what, error = (args[0], args[1]) if len(args) >= 2 else (record.getMessage(), "")
        self._display.retry(str(what), str(error), delay, getattr(record, "attempt", 0))

    @contextlib.contextmanager
    def installed(self):
        logger = logging.getLogger(self.LOGGER)
        level = logger.level
        logger.setLevel(logging.INFO)  # the records reach us; the log's handler drops them
        logger.addHandler(self)
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)


class NoStore(Exception):
    pass


@contextlib.contextmanager
def _opened(config: Config, open_=compose.reader):
    """The store's parts (read-only unless `open_` says otherwise), closed afterwards.
    Only `strata serve` creates a store: a tool given a root that holds none (a mistyped
    --root) refuses it instead of making a new one there."""
    if not os.path.isfile(os.path.join(config.root, "state.db")):
        raise NoStore(config.root)
    parts = open_(config)
    try:
        yield parts
    finally:
        parts.close()


def run(command, config: Config, *args) -> int:
    """A tool's exit code: 0, or 1 with the reason on stderr (stdout is what it answers),
    never a traceback for what the operator can act on."""
    name = f"strata {command.__name__}"
    try:
        return command(config, *args)
    except NoStore as e:
        print(f"{name}: no store at {e} (--root, {ENV_PREFIX}ROOT or `root` in the config "
              f"file): start `strata serve --root {e}` first, or check the path",
              file=sys.stderr)
    except SchemaMismatch as e:
        print(f"{name}: {e}", file=sys.stderr)
    except StrataError as e:
        print(f"{name}: {e.code.name}: {e}", file=sys.stderr)
    except OSError as e:  # the store's files: permissions, a full or read-only disk
        print(f"{name}: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return 1


def gc(config: Config) -> int:
    with _opened(config, compose.tool) as parts:
        result = parts.gc.collect()
    print(f"removed {len(result.removed)} layers, freed {human_bytes(result.freed_bytes)}")
    for lid in result.removed:
        print(f"  {lid}")
    return 0


def _snapshot(parts: compose.Parts):
    with parts.state.read() as tx:
        return (tx.layers(), tx.images(), tx.publications(), tx.stages(), tx.refcounts())


def ls(config: Config) -> int:
    with _opened(config) as parts:
        layers, images, pubs, stages, refs = _snapshot(parts)
        by_digest = {i.manifest_digest: i for i in images}
        changes = {p.key: _summary(parts, p, by_digest.get(p.manifest_digest)) for p in pubs}
        backend = parts.backend
    print(f"{'IMAGE':<48} {'DIGEST':<19} {'LAYERS':>6} {'SIZE':>10} {'PODS':>5} {'STAGED':>6}")
    for r in image_rows(layers, images, pubs, stages):
        print(f"{r.name[-48:]:<48} {r.manifest_digest[7:19]:<19} {r.layers:>6} "
              f"{human_bytes(r.size):>10} {r.publications:>5} {r.stages:>6}")
    print()
    print(f"{'LAYER':<17} {'DIFFID':<19} {'SIZE':>10} {'REFS':>5}  LAST USED")
    for x in layers:
        print(f"{x.id:<17} {x.diff_id[7:19]:<19} {human_bytes(x.size):>10} "
              f"{refs.get(x.id, 0):>5}  {_ago(x.last_used)}")
    print()
    print(f"{'POD':<32} {'VOLUME':<24} {'UPPER':>10} {'CREATED':>7} {'COPIED':>7} "
          f"{'DELETED':>7} {'LIMIT':>10} {'BY':<18}  TARGET")
    for p in pubs:
        s = changes[p.key]
        if s is None:
            upper, counts = ("ro" if p.readonly else "-"), ("-", "-", "-")
        else:
            upper = human_bytes(s.upper_bytes)
            counts = (s.created, s.copied_up + s.metacopy, s.deleted)
        # A limit is the sizeLimit quantity the pod spec wrote (8Mi), not a measured size.
        limit = quantity.human(p.size_limit) if p.size_limit else "-"
        print(f"{(p.pod or '-')[-32:]:<32} {p.volume_id[-24:]:<24} {upper:>10} "
              + " ".join(f"{c:>7}" for c in counts)
              + f" {limit:>10} {bounded_by(p, parts.backend):<18}  {p.target}")
    print()
    print(backend_line(backend))
    return 0


def backend_line(backend) -> str:
    """`docker info`'s "Storage Driver:" line, with what its sharing means: by layer
    (DiffID) or by chain (ChainID), and whether pods of one image share page cache."""
    unit = ("chain (ChainID: a layer and all under it)" if backend.shared_by == "chain"
            else "layer (DiffID)")
    cache = "shared" if backend.shares_page_cache else "per publication"
    return f"Backend: {backend.name}; layers shared by {unit}; page cache {cache}"


def _summary(parts: compose.Parts, pub: Publication, image) -> Summary | None:
    """What a writable publication changed; None for a read-only one, or one whose changes
    cannot be read here (its image record gone, its own filesystem not mounted)."""
    if pub.readonly or image is None:
        return None
    try:
        return parts.backend.summarize(pub.key, image.layer_ids)
    except OSError as e:  # one publication's trouble (EMFILE, EIO) is not every row's
        print(f"strata ls: cannot read what {pub.target} changed: {e}", file=sys.stderr)
        return None


def bounded_by(p: Publication, backend=None) -> str:
    """What enforces a publication's sizeLimit: a project quota (its ID, from the record),
    a btrfs qgroup (the backend says), or a loop filesystem (what a limited publication
    bounded by neither has)."""
    if not p.size_limit:
        return "-"
    if p.project_id:
        return f"project {p.project_id}"
    return backend.limit_kind(p.key) if backend is not None else "loop"


def df(config: Config) -> int:
    with _opened(config) as parts:
        layers, images, pubs, stages, refs = _snapshot(parts)
        uppers = sum(parts.backend.usage(p.key).bytes for p in pubs)
        backend = parts.backend
    share = sharing(layers, images, pubs)
    active = [x for x in layers if refs.get(x.id, 0)]
    reclaim = share.physical_bytes - sum(x.size for x in active)
    pct = f" ({100 * reclaim / share.physical_bytes:.0f}%)" if share.physical_bytes else ""
    size = human_bytes
    print(f"{'TYPE':<14} {'TOTAL':>6} {'ACTIVE':>6} {'SIZE':>10} {'RECLAIMABLE':>16}")
    print(f"{'Layers':<14} {len(layers):>6} {len(active):>6} {size(share.physical_bytes):>10} "
          f"{size(reclaim) + pct:>16}")
    in_use = {p.manifest_digest for p in pubs} | {s.manifest_digest for s in stages}
    print(f"{'Images':<14} {len(images):>6} {len(in_use & {i.manifest_digest for i in images}):>6}")
    print(f"{'Upper layers':<14} {len(pubs):>6} {len(pubs):>6} {size(uppers):>10} {size(0):>16}")
    print()
    print(f"{len(pubs)} publications would take {size(share.logical_bytes)} as private copies; "
          f"shared layers hold them in {size(share.logical_bytes - share.saved_bytes)}: "
          f"{size(share.saved_bytes)} saved")
    print(backend_line(backend))
    return 0


# `strata diff --json`: Docker's API shape (GET /containers/ID/changes: Path, and Kind
# 0 modified, 1 added, 2 deleted), plus the letter `docker diff` prints.
KINDS = {"C": 0, "A": 1, "D": 2}


def diff(config: Config, what: str, as_json: bool = False) -> int:
    """`strata diff TARGET|VOLUME_ID`: what a publication changed, as `docker diff` prints
    it (docs/diff.md)."""
    with _opened(config) as parts:
        with parts.state.read() as tx:
            pub, error = _publication_of(tx, what)
            image = tx.image(pub.manifest_digest) if pub else None
        if pub is not None and image is None:
            error = f"the image of the publication at {pub.target} is not in the store"
        if error:
            print(f"strata diff: {error}", file=sys.stderr)
            return 1
        changes = None if pub.readonly else parts.backend.changes(pub.key, image.layer_ids)
        if changes is None and not pub.readonly:
            print(f"strata diff: the writable layer of {pub.target} is not readable here",
                  file=sys.stderr)
            return 1
        if changes is None:  # stderr: stdout stays what a script parses
            print(f"strata diff: {pub.target} is a read-only publication: nothing can change",
                  file=sys.stderr)
            changes = []
    if as_json:
        print(json.dumps([{"Path": p, "Kind": KINDS[k], "Change": k} for k, p in changes]))
        return 0
    sys.stdout.flush()
    for kind, path in changes:  # a name is bytes, printed as they are, as Docker does
        sys.stdout.buffer.write(os.fsencode(f"{kind} {path}\n"))
    sys.stdout.buffer.flush()
    return 0


def _publication_of(tx, what: str) -> tuple[Publication | None, str]:
    """The publication `what` names: a target path (absolute, or one that exists), else a
    volume ID published exactly once."""
    if os.path.isabs(what) or os.path.exists(what):
        pub = tx.publication(canonical(os.path.abspath(what)))
        return pub, "" if pub else f"nothing is published at {what}"
    pubs = tx.publications(volume_id=what)
    if not pubs:
        return None, (f"no publication of a volume {what!r} (and no such target path); "
                      "`strata ls` lists them")
    if len(pubs) > 1:
        return None, (f"volume {what} is published at {len(pubs)} targets; name one: "
                      + ", ".join(p.target for p in pubs))
    return pubs[0], ""


def _ago(t: float) -> str:
    s = max(0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit} ago"
    return f"{s:.0f}s ago"
