"""Releases: a publication's private state that a lazily detached overlay may still write to,
kept until the kernel lets that overlay go, then deleted.

An unpublish whose unmount stays busy (a process in the pod has a file open or its working
directory there) detaches the overlay lazily (Mounter.detach): it leaves every path at once,
and the kubelet moves on, but the overlay lives on, writing into its upper dir, until the last
process holding it lets go. Deleting the upper then would pull it from under those writes;
keeping it for ever would leak it. So the publication becomes a *release* (state.db's
`released`, which keeps its layers referenced, so GC leaves what the overlay reads), and its
private state is deleted once the kernel says no overlay uses the upper any more.

The kernel's answer is overlayfs's own in-use mark on the upper dir (Mounter.in_use with the
backend's `holder_probe`). The mark is taken when the overlay's superblock is built and
dropped when it is destroyed, which happens only after the last of its holders is gone,
whatever they are: an open file, a working directory, a mapping, a mount in any namespace, a
loop device backed by a file inside. A scan of /proc would miss some of those (file
descriptors in flight, loop devices, io_uring) and can mistake a recycled device number for
the old overlay; the mark belongs to the upper dir itself. Asking costs about a millisecond
and a line in the kernel log, so it is asked only where an overlay can outlive its mount
(after a lazy detach, and at start-up for state no record explains), and then with backoff:
a background thread retries after 1 s, doubling up to a minute, while any release remains.

A reboot ends every overlay: after one, start-up releases everything without asking. The
boot a server last started in is kept in `ROOT/boot_id`.
"""

import logging
import os
import threading
import time
from collections.abc import Callable

from csi.backend import Backend
from csi.mount.syscalls import Mounter
from csi.paths import StorePaths
from csi.store.state import Publication, Release, State

log = logging.getLogger(__name__)

BOOT_ID = "/proc/sys/kernel/random/boot_id"
FIRST_RETRY = 1.0  # seconds after a detach before asking again
MAX_RETRY = 60.0  # backoff cap: one kernel log line a minute per overlay still held


class Releases:
    def __init__(self, paths: StorePaths, state: State, backend: Backend, mounter: Mounter,
                 clock=time.time, collect: Callable[[], None] | None = None,
                 on_detach: Callable[[], None] | None = None, boot_id: str = BOOT_ID,
                 proc: str = "/proc", first_retry: float = FIRST_RETRY,
                 max_retry: float = MAX_RETRY):
        """`collect` runs after a release let go of layers (GC); `on_detach` counts each
        lazy detach (metrics)."""
        self._paths = paths
        self._state = state
        self._backend = backend
        self._mounter = mounter
        self._clock = clock
        self._collect = collect
        self._on_detach = on_detach
        self._boot_id = boot_id
        self._proc = proc
        self._first, self._max = first_retry, max_retry
        self._rebooted = self._rebooted_since_last_start()
        self._sweeping = threading.Lock()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._due: float | None = None
        self._delay = first_retry
        self._wakes = 0
        self._warned_unable = False

    # -- the kernel's answer -----------------------------------------------------------
    def held(self, key: str) -> bool:
        """Whether a live view may still write `key`'s private state. Raises OSError when
        the kernel cannot tell."""
        if self._rebooted:
            return False
        probe = self._backend.holder_probe(key)
        if probe is None:
            return False
        if not self._mounter.features.index:
            # index=on is what makes overlayfs refuse an upper in use (Linux 4.13).
            if not self._warned_unable:
                log.warning("this kernel's overlayfs has no index=on, so it cannot say "
                            "when a detached overlay is gone; private state is deleted "
                            "at once, as if nothing held it")
                self._warned_unable = True
            return False
        try:
            return self._mounter.in_use(probe)
        except FileNotFoundError:
            return False  # the upper went meanwhile: nothing left to protect

    # -- an unpublish that stays busy --------------------------------------------------
    def detach(self, pub: Publication) -> None:
        """Detach `pub`'s busy mount lazily and turn the publication into a release, in
        that order: a crash in between leaves a publication whose mount is gone, which
        start-up asks the kernel about like any other state no live mount explains."""
        who = holders(pub.target, self._proc)
        device = _device(pub.target)
        self._mounter.detach(pub.target)
        with self._state.transaction() as tx:
            tx.release_publication(pub.target, device, self._clock())
        if self._on_detach is not None:
            self._on_detach()
        log.warning("volume %s at %s was detached lazily: %s still %s it; its writable "
                    "layer (%s, overlay device %s) is kept until the kernel lets the "
                    "overlay go", pub.volume_id, pub.target,
                    ", ".join(who) if who else "a process", "hold" if len(who) > 1 else "holds",
                    pub.key, device or "unknown")
        self._wake()

    # -- start-up ----------------------------------------------------------------------
    def remove_unless_held(self, key: str, what: str) -> None:
        """Private state whose mount was lost, or that no record names (start-up): removed,
        unless a live overlay still uses it (unmounted lazily behind our back while a
        process held it, or a crash between a lazy detach and its record): then it becomes
        a release. `what` names it in the log."""
        try:
            held = self.held(key)
        except OSError as e:
            log.error("cannot tell whether an overlay still uses the private state of %s: "
                      "%s; keeping it and asking again later", what, e)
            held = True
        if not held:
            log.warning("removing the private state of %s", what)
            self._backend.remove_or_log(key)
            return
        log.warning("the private state of %s is still used by a live overlay; keeping it "
                    "until the kernel lets it go", what)
        with self._state.transaction() as tx:
            tx.record_release(Release(key, since=self._clock()))
        self._wake()

    def settle(self) -> None:
        """End of start-up: release what the kernel has let go, remember this boot, and
        keep asking in the background about the rest."""
        left = self.sweep()
        try:
            with open(self._boot_id) as f:
                boot = f.read().strip()
            tmp = self._paths.boot_id + ".tmp"
            with open(tmp, "w") as f:
                f.write(boot + "\n")
            os.rename(tmp, self._paths.boot_id)
        except OSError as e:
            log.warning("cannot record this boot's ID (%s): the next start asks the kernel "
                        "about every release, as it would within one boot", e)
        self._rebooted = False
        if left:
            self._wake()

    def _rebooted_since_last_start(self) -> bool:
        try:
            with open(self._paths.boot_id) as f:
                last = f.read().strip()
            with open(self._boot_id) as f:
                now = f.read().strip()
        except OSError:  # a store's first start, or no boot ID to compare: ask
            return False
        return bool(last) and last != now

    # -- releasing -----------------------------------------------------------------------
    def sweep(self) -> int:
        """Delete the private state of every release whose overlay the kernel has let go;
        returns how many remain."""
        released = left = 0
        with self._sweeping:
            with self._state.read() as tx:
                pending = tx.releases()
            for r in pending:
                if self._release(r):
                    released += 1
                else:
                    left += 1
        if released and self._collect is not None:
            try:
                self._collect()
            except Exception:
                log.exception("garbage collection after a release failed")
        return left

    def _release(self, r: Release) -> bool:
        try:
            if self.held(r.key):
                log.debug("the overlay of %s (%s) is still held", r.key, r.target or "?")
                return False
        except OSError as e:
            log.error("cannot tell whether the overlay of %s still lives: %s; asking again "
                      "later", r.key, e)
            return False
        with self._state.transaction() as tx:  # the record goes before the files
            tx.forget_release(r.key, self._clock())
        self._backend.remove_or_log(r.key)
        log.info("released the writable layer %s of volume %s (%s): its overlay is gone, "
                 "%.0f s after it was detached", r.key, r.volume_id or "?",
                 r.target or "found at start-up", max(0.0, self._clock() - r.since))
        return True

    # -- the background thread -----------------------------------------------------------
    def _wake(self) -> None:
        """A release was recorded: ask about it soon, and back off from there."""
        with self._cv:
            if self._stopped:
                return
            self._wakes += 1
            self._delay = self._first
            self._due = time.monotonic() + self._delay
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="releases",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (self._due is None
                                             or time.monotonic() < self._due):
                    self._cv.wait(None if self._due is None
                                  else max(0.0, self._due - time.monotonic()))
                if self._stopped:
                    return
                wakes = self._wakes
            try:
                left = self.sweep()
            except Exception:
                log.exception("releasing detached overlays failed; trying again later")
                left = 1
            with self._cv:
                if self._wakes != wakes:
                    continue  # a new release came meanwhile and set its own time
                if left:
                    self._delay = min(self._delay * 2, self._max)
                    self._due = time.monotonic() + self._delay
                else:
                    self._due = None

    def stop(self) -> None:
        """Stop asking (before the state closes); releases left are asked about at the next
        start."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)


def _device(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def holders(target: str, proc: str = "/proc", limit: int = 5) -> list[str]:
    """Processes with their working directory, root or an open file at or below `target`
    ("pid 42 (python3)"), at most `limit`: for the log line that says who kept a volume
    busy. Read from /proc links, which name paths without touching the files (a stat
    could hang on a dead network filesystem); best effort, never a reason to fail."""
    below = target.rstrip("/") + "/"
    found: list[str] = []
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        base = os.path.join(proc, pid)
        links = [os.path.join(base, "cwd"), os.path.join(base, "root")]
        try:
            links += [os.path.join(base, "fd", fd) for fd in os.listdir(os.path.join(base,
                                                                                      "fd"))]
        except OSError:
            pass  # gone, or not ours to read
        for link in links:
            try:
                path = os.readlink(link)
            except OSError:
                continue
            if path == target or path.startswith(below):
                found.append(f"pid {pid} ({_comm(base)})")
                break
        if len(found) >= limit:
            break
    return found


def _comm(base: str) -> str:
    try:
        with open(os.path.join(base, "comm")) as f:
            return f.read().strip()
    except OSError:
        return "?"

