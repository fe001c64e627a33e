"""`strata gc`, `strata ls`, `strata df`: operator tools over the server's own store.

They open state.db like the server does (WAL: safe to read while it runs) and never touch
tmp/ or mounts. `gc` removes only what no publication, stage or in-flight lease holds,
re-checked in the deleting transaction.
"""

import os

from csi.config import Config
from csi.locks import StoreUsers
from csi.store.gc import Collector
from csi.store.layers import LayerStore, lower_dirs
from csi.store.report import human, image_rows, sharing
from csi.store.state import State
from csi.tree import usage


def _open(config: Config) -> State:
    return State(os.path.join(config.root, "state.db"))


def pull(config: Config, image: str, policy: str) -> int:
    """`strata pull`: the server's own pull path, printing progress like `docker pull`."""
    import threading
    import time

    from csi.errors import StrataError
    from csi.server import build_puller

    for sub in ("tmp", "layers", "blobs"):
        os.makedirs(os.path.join(config.root, sub), mode=0o700, exist_ok=True)
    users = StoreUsers(config.root).share()  # a server starting meanwhile keeps our tmp/
    state = _open(config)
    progress = {"bytes": 0, "layers": 0}
    layers = LayerStore(config.root, state, on_unpack=lambda layer, s, n: progress.update(
        layers=progress["layers"] + 1))
    puller = build_puller(config, state, layers, on_bytes=lambda n: progress.update(
        bytes=progress["bytes"] + n))
    done = threading.Event()

    def report():
        while not done.wait(0.5):
            print(f"  {human(progress['bytes'])} downloaded, {progress['layers']} layers "
                  "unpacked", flush=True)

    ticker = threading.Thread(target=report, daemon=True)
    started = time.monotonic()
    print(f"pulling {image}", flush=True)
    ticker.start()
    try:
        _, img = puller.pull(image, {}, policy, wait=None)
    except StrataError as e:
        print(f"strata pull: {e.code.name}: {e}")
        return 1
    finally:
        done.set()
        ticker.join()
        state.close()
        users.close()
    print(f"{img.name}: {len(img.layers)} layers present, {human(progress['bytes'])} "
          f"downloaded, {progress['layers']} layers unpacked in "
          f"{time.monotonic() - started:.1f}s")
    print(f"digest: {img.manifest_digest}")
    return 0


def gc(config: Config) -> int:
    users = StoreUsers(config.root).share()
    state = _open(config)
    try:
        result = Collector(LayerStore(config.root, state), config.gc).collect()
    finally:
        state.close()
        users.close()
    print(f"removed {len(result.removed)} layers, freed {human(result.freed_bytes)}")
    for lid in result.removed:
        print(f"  {lid}")
    return 0


def _snapshot(config: Config):
    state = _open(config)
    try:
        with state.transaction() as tx:
            return (tx.layers(), tx.images(), tx.publications(), tx.stages(), tx.refcounts())
    finally:
        state.close()


def ls(config: Config) -> int:
    layers, images, pubs, stages, refs = _snapshot(config)
    print(f"{'IMAGE':<48} {'DIGEST':<19} {'LAYERS':>6} {'SIZE':>10} {'PODS':>5} {'STAGED':>6}")
    for r in image_rows(layers, images, pubs, stages):
        print(f"{r.name[-48:]:<48} {r.manifest_digest[7:19]:<19} {r.layers:>6} "
              f"{human(r.size):>10} {r.publications:>5} {r.stages:>6}")
    print()
    print(f"{'LAYER':<17} {'DIFFID':<19} {'SIZE':>10} {'REFS':>5}  LAST USED")
    for x in layers:
        print(f"{x.id:<17} {x.diff_id[7:19]:<19} {human(x.size):>10} {refs.get(x.id, 0):>5}  "
              f"{_ago(x.last_used)}")
    return 0


def df(config: Config) -> int:
    layers, images, pubs, stages, refs = _snapshot(config)
    share = sharing(layers, images, pubs)
    active = [x for x in layers if refs.get(x.id, 0)]
    reclaim = share.physical_bytes - sum(x.size for x in active)
    uppers = sum(usage(os.path.join(config.root, "volumes", p.key))[0] for p in pubs)
    pct = f" ({100 * reclaim / share.physical_bytes:.0f}%)" if share.physical_bytes else ""
    print(f"{'TYPE':<14} {'TOTAL':>6} {'ACTIVE':>6} {'SIZE':>10} {'RECLAIMABLE':>16}")
    print(f"{'Layers':<14} {len(layers):>6} {len(active):>6} {human(share.physical_bytes):>10} "
          f"{human(reclaim) + pct:>16}")
    in_use = {p.manifest_digest for p in pubs} | {s.manifest_digest for s in stages}
    print(f"{'Images':<14} {len(images):>6} {len(in_use & {i.manifest_digest for i in images}):>6}")
    print(f"{'Upper layers':<14} {len(pubs):>6} {len(pubs):>6} {human(uppers):>10} {'0 B':>16}")
    print()
    print(f"{len(pubs)} publications would take {human(share.logical_bytes)} as private copies; "
          f"shared layers hold them in {human(share.logical_bytes - share.saved_bytes)}: "
          f"{human(share.saved_bytes)} saved")
    return 0


def diff(config: Config, target: str) -> int:
    """`strata diff TARGET`: what a publication changed, like `docker diff`."""
    from csi.inspect import diff as classify
    from csi.volumes import canonical

    state = _open(config)
    try:
        with state.transaction() as tx:
            pub = tx.publication(canonical(os.path.abspath(target)))
            image = tx.image(pub.manifest_digest) if pub else None
    finally:
        state.close()
    if pub is None or image is None:
        print(f"strata diff: nothing is published at {target}")
        return 1
    upper = os.path.join(config.root, "volumes", pub.key, "upper")
    if not os.path.isdir(upper):
        print(f"{target} is a read-only publication: nothing can change")
        return 0
    for kind, path in classify(upper, lower_dirs(config.root, image.layer_ids)):
        print(f"{kind} {path}")
    return 0


def _ago(t: float) -> str:
    import time

    s = max(0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit} ago"
    return f"{s:.0f}s ago"
