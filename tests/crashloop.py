"""A randomized kill -9 loop against a real `strata serve`: the harness of
tests/integration/test_crash.py and of `make crash`.

Each round issues 1-4 concurrent CSI calls (ephemeral publish (some with a `sizeLimit`, on a
loop-mounted filesystem of their own, some read-only), unpublish, stage, staged publish,
unstage) chosen against a model of what the kubelet wants (which targets hold
which image, which volumes are staged), SIGKILLs the server at a random moment (most within
the first 30 ms, when the calls are mid-flight), starts it again and retries every call that
has not answered OK, as the kubelet does, until it does. The server runs with
`--gc-policy immediate --gc-min-age 0`, so that layer GC races the publishes.

After every round the node must look exactly as the model says: each published pod's target
is mounted, shows its image's content and the files the pod wrote after its publish
succeeded; nothing else of the store is mounted, and exactly the size-limited publications
have their filesystem mounted and a loop device attached; the records (publications, stages) are the
model's; tmp/ is empty, volumes/ holds the uppers of the recorded publications only, layers/
the recorded layers only, and no recorded layer is unreferenced. The last round is followed
by one more kill and restart, and then everything is unpublished and unstaged: no mount, no
upper, nothing in tmp/, no layer, no target dir may be left.

A failing round stops the loop; `Tally.problems` says what was wrong, and the seed (printed
with the tally) replays the same sequence of calls and kill moments.
"""

import collections
import dataclasses
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable

import grpc

from csi.image.build import LayerBuilder, write_image
from csi.mount.loop import LoopControl
from csi.mount.mountinfo import MountTable
from csi.store.state import State
from tests.conftest import Csi, StrataProcess, unmount_all_under

SERVER_ARGS = ("--gc-policy", "immediate", "--gc-min-age", "0", "--log-level", "INFO")
MAX_PODS = 8  # published at once
MAX_STAGED = 3
# Now and then the node drains: only unpublishes and unstages until nothing is left, so
# that GC takes every layer, the base too, and the next publishes unpack them again while
# the kills land (a node that always holds a pod of the base would only ever churn the
# small top layers).
DRAIN_SHARE = 0.08
EARLY_KILL = 0.030  # seconds: most kills land while the calls are still running
LATE_KILL = 0.600
EARLY_SHARE = 0.8
# A node's plugin can crash again while it repairs the last crash: in this share of rounds
# the restart is killed too, within this long after it logged its kernel probe (its repairs
# and its first GC run in the next few tens of ms, before it serves).
STARTUP_KILL_SHARE = 0.15
STARTUP_WINDOW = 0.015
# The kubelet stops retrying a publish when its pod is deleted meanwhile, and unpublishes
# the target instead: this share of interrupted publishes is abandoned that way.
ABANDON_SHARE = 0.2
PUBLISHES = ("publish", "staged-publish")
RETRY_FOR = 120.0  # seconds a call is retried after the restart before it is a problem
# Answers a live server may give a call that a retry then completes: the kubelet retries
# them. Anything else (INTERNAL, ALREADY_EXISTS, FAILED_PRECONDITION ...) is a problem.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}
INTERRUPTED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
MARKER = "pod.txt"
LIMIT = "16Mi"  # a size-limited pod's sizeLimit: its upper is an ext4 image on a loop device
LIMITED_SHARE = 0.25  # of ephemeral publishes
READONLY_SHARE = 0.15
MOTD = "etc/motd"


# -- images ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TestImage:
    name: str
    ref: str
    files: dict[str, bytes | None]  # what the merged view must show; None: must be absent


def _layers(rng: random.Random) -> dict[str, tuple[LayerBuilder, dict[str, bytes | None]]]:
    """Four layers and what each changes. The base holds a few hundred files, so that an
    unpack takes long enough for a kill to land in the middle of it."""
    base, files = LayerBuilder(), {}
    for d in ("etc", "base", "base/d0", "base/d1"):
        base.dir(d)
    for i in range(300):
        name, data = f"base/d{i % 2}/f{i:03d}", rng.randbytes(rng.randrange(64, 4096))
        base.file(name, data)
        files[name] = data
    for name, data in ((MOTD, b"motd\n"), ("layer", b"base\n")):
        base.file(name, data)
        files[name] = data
    layers = {"base": (base, files)}
    for letter in "abc":
        layer = LayerBuilder().file(f"{letter}.txt", f"layer {letter}\n").file(
            "layer", f"{letter}\n")
        changes = {f"{letter}.txt": f"layer {letter}\n".encode(), "layer": f"{letter}\n".encode()}
        if letter == "a":  # a whiteout: the base's file is gone from every image above a
            layer.whiteout("base/d0/f000")
            changes["base/d0/f000"] = None
        if letter == "c":
            layer.file("base/d1/f001", b"replaced by c\n")
            changes["base/d1/f001"] = b"replaced by c\n"
        layers[letter] = (layer, changes)
    return layers


def build_images(root: str) -> list[TestImage]:
    """base, base+a, base+a+b, base+c in one OCI layout: every image shares the base layer,
    two share layer a."""
    layers = _layers(random.Random(1))
    layout = os.path.join(root, "layout")
    images = []
    for chain in ("base", "base+a", "base+a+b", "base+c"):
        names = chain.split("+")
        tag = chain.replace("+", "-")
        write_image(layout, tag, [layers[n][0] for n in names])
        files: dict[str, bytes | None] = {}
        for n in names:
            files.update(layers[n][1])
        for letter in "abc":
            files.setdefault(f"{letter}.txt", None)
        images.append(TestImage(chain, f"oci:{layout}:{tag}", files))
    return images


# -- the kubelet's wishes --------------------------------------------------------------------
@dataclasses.dataclass
class Pod:
    name: str
    volume_id: str
    target: str
    image: TestImage
    staging: str = ""  # the staged volume's path; "" for an inline ephemeral volume
    size_limit: str = ""
    readonly: bool = False


@dataclasses.dataclass
class Staged:
    volume_id: str
    path: str
    image: TestImage


@dataclasses.dataclass
class Model:
    published: dict[str, Pod] = dataclasses.field(default_factory=dict)  # by target
    staged: dict[str, Staged] = dataclasses.field(default_factory=dict)  # by volume ID
    gone: dict[str, Pod] = dataclasses.field(default_factory=dict)  # unpublished, by target


@dataclasses.dataclass
class Call:
    kind: str  # publish, staged-publish, unpublish, stage, unstage
    pod: Pod | None = None
    staged: Staged | None = None
    done: bool = False
    attempts: int = 0

    def __str__(self) -> str:
        what = self.pod.target if self.pod else self.staged.volume_id
        return f"{self.kind} {what}"


# -- the tally -------------------------------------------------------------------------------
@dataclasses.dataclass
class Tally:
    seed: int
    rounds: int = 0
    calls: int = 0
    calls_by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    interrupted: int = 0  # calls still running when the server was killed, not answered
    completed_before_kill: int = 0  # answered OK before it
    retries: int = 0  # the same request sent again after an error or a kill
    answers: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kills: int = 0
    early_kills: int = 0
    restarts: int = 0
    startup_kills: int = 0  # restarts killed again before they served
    drains: int = 0  # times the node was emptied (every layer collected)
    abandoned: int = 0  # interrupted publishes whose pod went away: unpublished instead
    max_published: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    ended_by: str = ""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["calls_by_kind"] = dict(self.calls_by_kind)
        d["answers"] = dict(self.answers)
        return d

    def __str__(self) -> str:
        lines = [f"kill -9 loop, seed {self.seed}: {self.rounds} rounds in {self.seconds:.1f}s "
                 f"({self.ended_by})",
                 f"  calls {self.calls} {dict(self.calls_by_kind)}",
                 f"  interrupted by a kill {self.interrupted}, answered before it "
                 f"{self.completed_before_kill}, retries {self.retries}",
                 f"  answers other than OK {dict(self.answers)}",
                 f"  kills {self.kills} ({self.early_kills} within {EARLY_KILL * 1000:.0f} ms "
                 f"of the calls, {self.startup_kills} during start-up), restarts "
                 f"{self.restarts}",
                 f"  publishes abandoned for an unpublish {self.abandoned}, most pods "
                 f"published at once {self.max_published}, drains {self.drains}",
                 f"  problems {len(self.problems)}"]
        lines += [f"    {p}" for p in self.problems]
        if self.problems:
            lines.append(f"  replay: STRATA_CRASH_SEED={self.seed}")
        return "\n".join(lines)


# -- the loop --------------------------------------------------------------------------------
class CrashLoop:
    def __init__(self, base: str, images: list[TestImage], seed: int):
        self.base = base
        self.images = images
        self.rng = random.Random(seed)
        self.tally = Tally(seed)
        self.model = Model()
        self.pods_dir = os.path.join(base, "pods")
        self.staging_dir = os.path.join(base, "staging")
        os.makedirs(self.pods_dir, exist_ok=True)
        os.makedirs(self.staging_dir, exist_ok=True)
        self.server = StrataProcess(base, extra_args=SERVER_ARGS)
        self._serial = 0
        self._draining = False

    @property
    def root(self) -> str:
        return self.server.root

    # -- the server ------------------------------------------------------------------------
    def start(self) -> None:
        for sock in (self.server.node_sock, self.server.ctrl_sock):
            try:  # a killed server leaves its sockets; waiting for them must mean the new one
                os.unlink(sock)
            except FileNotFoundError:
                pass
        self.server.start(timeout=60)

    def kill(self) -> None:
        """SIGKILL. Our channels stay open until the calls in flight have failed
        (close_channels): closing them first would cancel those calls, not the kill."""
        proc = self.server.proc
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.server.proc = None

    def restart(self) -> None:
        """Start again; in some rounds kill the start itself first, mid-repair."""
        if self.rng.random() < STARTUP_KILL_SHARE and self._kill_during_start():
            self.tally.kills += 1
            self.tally.startup_kills += 1
            self.tally.restarts += 1
            self.start()
        elif self.server.proc is None:
            self.start()
        self.tally.restarts += 1

    def _kill_during_start(self) -> bool:
        """Start in a thread and SIGKILL it a moment after it logged its kernel probe (the
        line compose.node logs just before reconcile), while it repairs. False if it was
        serving by then, or never logged that line: it is left running."""
        delay = self.rng.uniform(0, STARTUP_WINDOW)
        try:
            offset = os.path.getsize(self.server.log)
        except FileNotFoundError:
            offset = 0
        failed: list[BaseException] = []

        def start() -> None:
            try:
                self.start()
            except BaseException as e:  # the kill below, as a start that failed
                failed.append(e)

        thread = threading.Thread(target=start)
        thread.start()
        while thread.is_alive() and "kernel features" not in _read_from(self.server.log,
                                                                            offset):
            time.sleep(0.001)
        time.sleep(delay)
        hit = thread.is_alive() and not os.path.exists(self.server.node_sock)
        if hit:
            self.server.proc.send_signal(signal.SIGKILL)
        thread.join()
        if hit or failed:
            self.close_channels()
            if self.server.proc is not None:
                self.server.proc.kill()  # a start that failed on its own is stopped too
                self.server.proc.wait()
                self.server.proc = None
        if failed and not hit:
            raise failed[0]
        return hit

    def close_channels(self) -> None:
        if self.server.csi is not None:
            self.server.csi.close()
            self.server.csi = None

    def close(self) -> None:
        """Stop the server and unmount whatever is left, pass or fail."""
        try:
            self.server.stop()
        finally:
            unmount_all_under(self.base)

    # -- choosing calls --------------------------------------------------------------------
    def _name(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}{self._serial:05d}"

    def _new_pod(self, image: TestImage, volume_id: str = "", staging: str = "") -> Pod:
        name = self._name("pod")
        parent = os.path.join(self.pods_dir, name, "volumes", "kubernetes.io~csi", "vol")
        os.makedirs(parent)  # the kubelet makes the parent; the driver the target
        pod = Pod(name, volume_id or f"csi-{name}", os.path.join(parent, "mount"), image,
                  staging)
        if not staging:
            kind = self.rng.random()
            if kind < LIMITED_SHARE:
                pod.size_limit = LIMIT
            elif kind < LIMITED_SHARE + READONLY_SHARE:
                pod.readonly = True
        return pod

    def choose(self) -> list[Call]:
        """1-4 calls the kubelet could issue at once: never two on one pod, and a volume
        being staged or unstaged gets no other call in the same round (the kubelet stages
        before it publishes and unstages after the last unpublish)."""
        m, rng = self.model, self.rng
        if self._draining and not m.published and not m.staged:
            self._draining = False
        elif not self._draining and rng.random() < DRAIN_SHARE:
            self._draining = True
            self.tally.drains += 1
        calls: list[Call] = []
        for _ in range(rng.randint(1, 4)):
            call = self._choose_one(calls)
            if call is None:
                break
            calls.append(call)
        return calls

    def _choose_one(self, calls: list[Call]) -> Call | None:
        m, rng = self.model, self.rng
        busy_pods = {c.pod.target for c in calls if c.pod}
        staging = {c.staged.volume_id for c in calls if c.kind in ("stage", "unstage")}
        using = {c.pod.volume_id for c in calls if c.pod and c.pod.staging}
        live = len(m.published) + sum(c.kind in PUBLISHES for c in calls)
        staged = [s for s in m.staged.values() if s.volume_id not in staging]
        published = [p for p in m.published.values() if p.target not in busy_pods]
        idle = [s for s in staged if s.volume_id not in using and not any(
            p.staging and p.volume_id == s.volume_id for p in m.published.values())]
        stages = len(m.staged) + sum(c.kind == "stage" for c in calls)
        grow = not self._draining
        options = [  # (weight, kind, candidates)
            (3 * (grow and live < MAX_PODS), "publish", self.images),
            (3 * (grow and live < MAX_PODS), "staged-publish", staged),
            (4 if self._draining or live >= MAX_PODS // 2 else 2, "unpublish", published),
            (1 * (grow and stages < MAX_STAGED), "stage", self.images),
            (1, "unstage", idle),
        ]
        options = [o for o in options if o[0] and o[2]]
        if not options:
            return None
        _, kind, candidates = rng.choices(options, weights=[o[0] for o in options])[0]
        pick = rng.choice(candidates)
        if kind == "publish":
            return Call(kind, pod=self._new_pod(pick))
        if kind == "staged-publish":
            return Call(kind, pod=self._new_pod(pick.image, pick.volume_id, pick.path),
                        staged=pick)
        if kind == "unpublish":
            return Call(kind, pod=pick)
        if kind == "stage":
            vid = self._name("pv")
            path = os.path.join(self.staging_dir, vid, "globalmount")
            os.makedirs(path)  # the kubelet makes the staging dir
            return Call(kind, staged=Staged(vid, path, pick))
        return Call(kind, staged=pick)
    # -- issuing them ----------------------------------------------------------------------
    def _issue(self, csi: Csi, call: Call) -> None:
        p, s = call.pod, call.staged
        if call.kind == "publish":
            limit = {"sizeLimit": p.size_limit} if p.size_limit else {}
            csi.publish(p.volume_id, p.target, p.image.ref, readonly=p.readonly, **limit)
        elif call.kind == "staged-publish":
            csi.publish(p.volume_id, p.target, staging=p.staging, ephemeral=False)
        elif call.kind == "unpublish":
            csi.unpublish(p.volume_id, p.target)
        elif call.kind == "stage":
            csi.stage(s.volume_id, s.path, s.image.ref)
        elif call.kind == "unstage":
            csi.unstage(s.volume_id, s.path)
        else:
            raise ValueError(call.kind)

    def _succeeded(self, call: Call) -> None:
        """What the pod does once its publish answered OK: write a file of its own, and
        change one of the image's (a copy-up into its upper)."""
        call.done = True
        if call.kind in ("publish", "staged-publish") and not call.pod.readonly:
            p = call.pod
            with open(os.path.join(p.target, MARKER), "w") as f:
                f.write(p.name)
            with open(os.path.join(p.target, MOTD), "a") as f:
                f.write(p.name + "\n")

    def _attempt(self, csi: Csi, call: Call) -> grpc.StatusCode | None:
        call.attempts += 1
        try:
            self._issue(csi, call)
        except grpc.RpcError as e:
            return e.code()
        self._succeeded(call)
        return None

    def _retry(self, call: Call, problems: list[str]) -> None:
        """As the kubelet does: the same request again until it answers OK."""
        deadline = time.monotonic() + RETRY_FOR
        delay = 0.01
        while True:
            self.tally.retries += call.attempts > 0  # a first try (teardown) is no retry
            code = self._attempt(self.server.csi, call)
            if code is None:
                return
            self.tally.answers[code.name] += 1
            if code not in RETRYABLE:
                problems.append(f"{call}: retry answered {code.name}")
            if time.monotonic() > deadline:
                problems.append(f"{call}: not OK after {call.attempts} attempts ({code.name})")
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def round(self) -> None:
        calls = self.choose()
        self.tally.rounds += 1
        self.tally.calls += len(calls)
        self.tally.calls_by_kind.update(c.kind for c in calls)
        problems: list[str] = []
        csi = self.server.csi

        def first(call: Call) -> None:
            code = self._attempt(csi, call)
            if code is None:
                return
            if killed.is_set() and code in INTERRUPTED:
                return  # retried below
            self.tally.answers[code.name] += 1
            if code not in RETRYABLE:
                problems.append(f"{call}: answered {code.name}")

        killed = threading.Event()
        threads = [threading.Thread(target=first, args=(c,)) for c in calls]
        early = self.rng.random() < EARLY_SHARE
        delay = self.rng.uniform(0, EARLY_KILL) if early else \
            self.rng.uniform(EARLY_KILL, LATE_KILL)
        for t in threads:
            t.start()
        time.sleep(delay)
        killed.set()
        running = [c for c, t in zip(calls, threads, strict=True) if t.is_alive()]
        self.kill()
        for t in threads:
            t.join()
        self.close_channels()
        self.tally.kills += 1
        self.tally.early_kills += early
        # Interrupted: still running at the kill and never answered OK.
        self.tally.interrupted += sum(not c.done for c in running)
        self.tally.completed_before_kill += sum(c.done for c in calls)
        self.restart()
        pending = []
        for c in calls:
            if not c.done and c.kind in PUBLISHES and self.rng.random() < ABANDON_SHARE:
                c = Call("unpublish", pod=c.pod)
                self.tally.abandoned += 1
            pending.append(c)
        retries = [threading.Thread(target=self._retry, args=(c, problems))
                   for c in pending if not c.done]
        for t in retries:
            t.start()
        for t in retries:
            t.join()
        for c in pending:
            if c.done:
                self._apply(c)
        self.tally.max_published = max(self.tally.max_published, len(self.model.published))
        problems += self.check()
        self.tally.problems += [f"round {self.tally.rounds}: {p}" for p in problems]

    def _apply(self, call: Call) -> None:
        m = self.model
        if call.kind in ("publish", "staged-publish"):
            m.published[call.pod.target] = call.pod
        elif call.kind == "unpublish":
            m.published.pop(call.pod.target, None)  # absent: its publish was abandoned
            m.gone[call.pod.target] = call.pod
        elif call.kind == "stage":
            m.staged[call.staged.volume_id] = call.staged
        elif call.kind == "unstage":
            del m.staged[call.staged.volume_id]

    # -- checking the node -----------------------------------------------------------------
    def check(self, final: bool = False) -> list[str]:
        """Differences between the node and the model (empty: none)."""
        problems = self._check_pods() + self._check_records()
        problems += self._check_store(final)
        return problems

    def _check_pods(self) -> list[str]:
        problems = []
        table = MountTable()
        volumes = os.path.join(self.root, "volumes") + "/"
        ours = {m.mount_point for m in table.mounts()
                if (m.source == f"strata:{self.root}" or m.mount_point.startswith(
                    self.base.rstrip("/") + "/")) and not m.mount_point.startswith(volumes)}
        want = set(self.model.published)
        for mp in sorted(ours - want):
            problems.append(f"{mp} is mounted but no pod should have it")
        for target, pod in sorted(self.model.published.items()):
            if target not in ours:
                problems.append(f"{target} ({pod.name}, {pod.image.name}) is not mounted")
                continue
            problems += self._check_content(pod)
        for target, pod in sorted(self.model.gone.items()):
            if os.path.lexists(target):
                problems.append(f"{target} ({pod.name}) was unpublished but its target dir "
                                "is still there")
        return problems

    def _check_content(self, pod: Pod) -> list[str]:
        expected = dict(pod.image.files)
        if not pod.readonly:
            expected[MOTD] = expected[MOTD] + pod.name.encode() + b"\n"
            expected[MARKER] = pod.name.encode()
        problems = []
        for rel, data in sorted(expected.items()):
            path = os.path.join(pod.target, rel)
            try:
                with open(path, "rb") as f:
                    got = f.read()
            except FileNotFoundError:
                got = None
            if got != data:
                problems.append(f"{pod.name} ({pod.image.name}): {rel} is "
                                f"{_short(got)}, expected {_short(data)}")
        return problems

    def _check_records(self) -> list[str]:
        st = State(os.path.join(self.root, "state.db"), migrate=False)
        try:
            with st.read() as tx:
                pubs = {p.target: p for p in tx.publications()}
                stages = {s.volume_id: s.staging_path for s in tx.stages()}
        finally:
            st.close()
        problems = []
        if set(pubs) != set(self.model.published):
            problems.append(f"recorded publications {sorted(pubs)} are not the pods' "
                            f"{sorted(self.model.published)}")
        want = {v: s.path for v, s in self.model.staged.items()}
        if stages != want:
            problems.append(f"recorded stages {stages} are not the model's {want}")
        return problems

    def _check_store(self, final: bool) -> list[str]:
        st = State(os.path.join(self.root, "state.db"), migrate=False)
        try:
            with st.read() as tx:
                pubs, stages = tx.publications(), tx.stages()
                keys = {p.key for p in pubs if not p.readonly}
                limited = {p.key for p in pubs if p.size_limit}
                layers = {x.id for x in tx.layers()}
                refs = tx.refcounts()
                held: dict[str, set[str]] = {}
                for lid, holder in tx.holders():
                    held.setdefault(holder, set()).add(lid)
                chains = {img.manifest_digest: set(img.layer_ids) for img in tx.images()}
        finally:
            st.close()
        problems = []
        # Each publication and stage holds a reference on every layer of its image, which
        # is recorded and complete; no lease outlives the call that took it.
        holders = [(f"pub:{p.target}", p.manifest_digest) for p in pubs]
        holders += [(f"stage:{x.volume_id}", x.manifest_digest) for x in stages]
        for holder, digest in holders:
            if digest not in chains:
                problems.append(f"{holder}: its image {digest} is not recorded")
            elif held.get(holder, set()) != chains[digest]:
                problems.append(f"{holder} references {sorted(held.get(holder, ()))}, its "
                                f"image has {sorted(chains[digest])}")
        leases = sorted(h for h in held if h.startswith("lease:"))
        if leases:
            problems.append(f"leases left: {leases}")
        for digest, chain in sorted(chains.items()):
            if not chain <= layers:
                problems.append(f"image {digest} is recorded but its layers "
                                f"{sorted(chain - layers)} are not")
        tmp = [n for n in os.listdir(os.path.join(self.root, "tmp"))
               if not (n.startswith("blob-") and n.endswith(".partial"))]
        if tmp:
            problems.append(f"tmp/ holds {sorted(tmp)}")
        volumes = set(os.listdir(os.path.join(self.root, "volumes")))
        if volumes != keys:
            problems.append(f"volumes/ holds {sorted(volumes - keys)} that no publication "
                            f"records, and lacks {sorted(keys - volumes)}")
        dirs = set(os.listdir(os.path.join(self.root, "layers")))
        if dirs != layers:
            problems.append(f"layers/ holds {sorted(dirs - layers)} unrecorded, and lacks "
                            f"{sorted(layers - dirs)} recorded")
        problems += self._check_bounds(limited)
        unreferenced = sorted(lid for lid in layers if not refs.get(lid))
        if unreferenced:  # immediate GC with no minimum age
            problems.append(f"layers {unreferenced} are recorded but nobody references them")
        if final and (layers or dirs):
            problems.append(f"layers left after everything was unpublished: {sorted(dirs)}")
        return problems

    def _check_bounds(self, limited: set[str]) -> list[str]:
        """Exactly the size-limited publications have their filesystem mounted (at
        volumes/KEY/fs) and a loop device attached to its image."""
        volumes = os.path.join(self.root, "volumes")
        mounted = {os.path.relpath(m.mount_point, volumes).split("/")[0]
                   for m in MountTable().under(volumes)}
        devices = {os.path.relpath(d.backing_file, volumes).split("/")[0]
                   for d in LoopControl().attached()
                   if d.backing_file.startswith(volumes + "/")}
        problems = []
        if mounted != limited:
            problems.append(f"filesystems mounted under volumes/ for {sorted(mounted)}, the "
                            f"size-limited publications are {sorted(limited)}")
        if devices != limited:
            problems.append(f"loop devices attached for {sorted(devices)}, the size-limited "
                            f"publications are {sorted(limited)}")
        return problems

    # -- the whole run ---------------------------------------------------------------------
    def run(self, rounds: int, budget: float | None = None,
            progress: Callable[[Tally], None] | None = None) -> Tally:
        """`rounds` rounds or `budget` seconds, whichever ends first; then the final
        restart and teardown. Stops at the first round that finds a problem."""
        started = time.monotonic()
        self.tally.ended_by = f"{rounds} rounds"
        self.start()
        for _ in range(rounds):
            self.round()
            if self.tally.problems:
                self.tally.ended_by = "a problem"
                break
            if progress is not None:
                progress(self.tally)
            if budget is not None and time.monotonic() - started > budget:
                self.tally.ended_by = f"the {budget:.0f}s budget"
                break
        if not self.tally.problems:  # else the node is left as the problem found it
            self.finish()
        self.tally.seconds = time.monotonic() - started
        return self.tally

    def finish(self) -> None:
        """One more kill and restart, then the kubelet tears everything down."""
        self.kill()
        self.close_channels()
        self.tally.kills += 1
        self.restart()
        problems = self.check()
        calls = [Call("unpublish", pod=p) for p in self.model.published.values()]
        for call in calls:
            self._retry(call, problems)
            self._apply(call)
        calls = [Call("unstage", staged=s) for s in self.model.staged.values()]
        for call in calls:
            self._retry(call, problems)
            self._apply(call)
        problems += self.check(final=True)
        self.server.stop()
        if MountTable().under(self.base) or any(
                m.source == f"strata:{self.root}" for m in MountTable().mounts()):
            problems.append("mounts left after the server stopped")
        self.tally.problems += [f"teardown: {p}" for p in problems]


def _short(data: bytes | None) -> str:
    if data is None:
        return "absent"
    return repr(data if len(data) <= 40 else data[:37] + b"...")


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return ""


def write_tally(tally: Tally, path: str) -> None:
    with open(path, "w") as f:
        json.dump(tally.as_dict(), f, indent=1)
