"""Releases: a publication's private state, and the layers it reads, kept for a view that
may outlive its mount until the kernel lets that view go, then deleted.

A view can outlive its mount in this namespace three ways:
- an unpublish whose unmount stays busy (a process in the pod has a file open or its working
  directory there) detaches it lazily (MNT_DETACH): it leaves every path at once, and the
  kubelet moves on, but the view lives on until the last process holding it lets go;
- an unmount that succeeds here while a copy of the mount lives in another mount namespace
  (a pod's containers keep a private copy of the target mount, and so does any process
  that unshared its namespace while the volume was mounted);
- a mount lost behind strata's back (`umount -l` by someone else) while a process holds it.
Deleting the upper then would pull it from under the view's writes; dropping the layer
references would let GC delete what it reads; keeping them for ever would leak them. So the
publication becomes a *release* (state.db's `released`): converted in one transaction, in
which its layer references pass to the release (`release_publication`), and its private
state is deleted, and its references dropped, once the view is gone.

Whether a writable view is gone, the kernel says: overlayfs's own in-use mark on the upper
dir (Mounter.in_use with the backend's `holder_probe`). The mark is taken when the overlay's
superblock is built and dropped when it is destroyed, which happens only after the last of
its holders is gone, whatever they are: an open file, a working directory, a mapping, a
mount in any namespace, a loop device backed by a file inside. A scan of /proc would miss
some of those and can mistake a recycled device number for the old overlay; the mark belongs
to the upper dir itself. Asking costs about a millisecond and a line in the kernel log (on a
serial console, most of that millisecond is the line). It is asked at start-up for state no
live mount explains, for a release with backoff (a background thread retries after 1 s,
doubling up to a minute, while any release remains), and after an unmount of a writable
publication (a copy in another namespace leaves no other trace here) unless a cheaper
question already proved the overlay gone: an unpublish reads, while the target is still
mounted, the device number and root inode there; an overlay's root shows its upper dir's
inode on a device of its own (where upper and lowers share a filesystem), so a match says
the device is this publication's overlay's superblock, and once no superblock has that
device any more (users.superblock_exists, a few microseconds) that overlay is gone. Any
other answer (a superblock has it: the overlay lives on, or a new filesystem took the
freed number; no match; cannot ask) goes on to the kernel's in-use mark.

A read-only view has no upper to ask about. A lazily detached one is released once no
process and no mount namespace shows its device number (csi/mount/users.py: a scan of
/proc, recorded at the detach). A one-layer view is a bind mount of the layer directory,
whose device number is the store filesystem's, shared with every file there: nothing tells
its holders from the store's own users, so its release (and its layers) is kept until the
next boot. A read-only view unmounted cleanly is not asked about (the scan costs a pass
over every process and mount namespace of the node at each unpublish).

Private state that no record names (a publish that crashed between mount(2) and its
record, whose mount start-up had to detach lazily) becomes a release too, but one that
cannot say which layers it reads: while such a release is pending, GC removes nothing
(state.py's `forget_layer`, logged by gc.py).

A reboot ends every view: after one, start-up releases everything without asking. The
boot a server last started in is kept in `ROOT/boot_id`.
"""

import logging
import os
import threading
import time
from collections.abc import Callable

from csi.backend import Backend
from csi.mount import users
from csi.mount.syscalls import Mounter
from csi.mount.users import comm, device_of
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
                 max_retry: float = MAX_RETRY, starting: bool = False):
        """`collect` runs after a release let go of layers (GC); `on_detach` counts each
        lazy detach (metrics). `starting`: made for start-up, which records releases
        before it is done (reconcile): the background thread waits for `settle()`, so that
        no sweep, and no GC after one, runs beside the rest of start-up."""
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
        self._starting = starting
        self._stopped = False
        self._due: float | None = None
        self._delay = first_retry
        self._wakes = 0
        self._warned_unable = False

    # -- the kernel's answer -----------------------------------------------------------
    def held(self, key: str, device: str = "", root_inode: int | None = None) -> bool:
        """Whether a live view may still write `key`'s private state or read its layers.
        A writable key is asked about through its upper (the kernel's answer); a view
        without one through `device`, its major:minor when it left the mount table ("":
        unknown, and then nothing can be asked: not held). `root_inode`: the inode number
        the view's root showed, read with `device` while it was mounted (see the module
        docstring). Raises OSError when the kernel cannot tell."""
        if self._rebooted:
            return False
        return self._held(key, device, None, root_inode)

    def _held(self, key: str, device: str, seen: dict | None,
              root_inode: int | None = None) -> bool:
        """`held` after the reboot rule; `seen`, when given, is one scan of /proc already
        made for the devices of every view pending (a sweep's)."""
        probe = self._backend.holder_probe(key)
        if probe is None:
            return self._view_held(key, device, seen)
        if root_inode is not None and _overlay_gone(probe.target, device, root_inode):
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

    def _snapshot(self, key: str) -> tuple[users.Device | None, users.Bind | None]:
        """A key whose view binds a snapshot of its own (`backend.snapshot`, btrfs):
        that subvolume's own device (what cwd, fd and maps show) and how mountinfo shows a
        bind of it in any namespace (the superblock's device and the path inside, as
        users.find matches it). (None, None) for a key without one."""
        fs = self._backend.snapshot(key)
        if fs is None or not os.path.isdir(fs):
            return None, None
        own = device_of(fs)
        if own == device_of(os.path.dirname(fs)):
            return None, None  # a plain directory: the snapshot was never made
        return (users.parse(own),
                users.bind_of(fs, self._mounter.table.mounts()))

    def _view_held(self, key: str, device: str, seen: dict | None) -> bool:
        own, bind = self._snapshot(key)
        dev = users.parse(device) or own
        if dev is None:
            return False
        if self._is_store_device(dev):
            # A one-layer view: a bind mount of the layer directory, whose device is the
            # store's filesystem's, shared with every file there. Nothing in /proc tells
            # this view's holders from the store's own users: kept until the next boot.
            return True
        if seen is None:
            seen = users.find({dev}, self._proc, {dev: bind} if bind else None)
        if dev in seen:
            log.debug("the view on device %s is still used: %s", device, seen[dev])
            return True
        return False

    def _is_store_device(self, dev: users.Device) -> bool:
        return users.parse(device_of(self._paths.layers)) == dev

    # -- a view that leaves the mount table --------------------------------------------
    def detach(self, pub: Publication) -> None:
        """Turn `pub` into a release, then detach its busy mount lazily: in that order, so
        that a live view is never without a record. A crash in between (or a detach that
        fails) leaves a release whose mount is still there: the kubelet's retry of the
        unpublish, or start-up, detaches it (`finish_detach`)."""
        who = holders(pub.target, self._proc)
        device = device_of(pub.target)
        with self._state.transaction() as tx:
            tx.release_publication(pub.target, device, self._clock())
        self._detach(pub.target)
        if self._on_detach is not None:
            self._on_detach()
        log.warning("volume %s at %s was detached lazily: %s still %s it; its %s (%s, "
                    "device %s) %s kept until %s", pub.volume_id, pub.target,
                    ", ".join(who) if who else "a process", "hold" if len(who) > 1 else "holds",
                    "layers" if pub.readonly else "writable layer", pub.key, device or "unknown",
                    "are" if pub.readonly else "is", self._until(pub, device))
        self._wake()

    def _detach(self, target: str) -> None:
        try:
            self._mounter.detach(target)
        except OSError:
            if self._mounter.table.is_mountpoint(target):
                raise
            # gone meanwhile: detached is what we wanted

    def _until(self, pub: Publication, device: str) -> str:
        if not pub.readonly:
            return "the kernel lets the overlay go"
        dev = users.parse(device)
        if dev is not None and self._is_store_device(dev):
            return "the next boot (a one-layer view: its holders cannot be told apart)"
        return "no process and no mount namespace uses it"

    def end(self, pub: Publication, device: str = "", root_inode: int | None = None) -> bool:
        """A publication whose mount has left this namespace, unmounted cleanly or lost
        behind our back: forgotten, and its private state deleted, unless a live view still
        uses it (a copy of the mount in another namespace; a lazy detach by someone else):
        then it becomes a release, its references passing to it in the same transaction.
        Decided before the record changes, so that the layers the view reads stay
        referenced throughout. `device`: the view's major:minor, read before it left ("":
        unknown), and `root_inode` the inode number its root showed then. True when kept.

        Only a writable view is asked about: a read-only one would cost a scan of /proc
        at every unpublish (see the module docstring), so it is forgotten at once."""
        try:
            held = not pub.readonly and self.held(pub.key, device, root_inode)
        except OSError as e:
            log.error("cannot tell whether a view still uses the private state of volume "
                      "%s (%s): %s; keeping it and asking again later", pub.volume_id,
                      pub.key, e)
            held = True
        if not held:
            with self._state.transaction() as tx:
                tx.forget_publication(pub.target, self._clock())
            self._backend.remove_or_log(pub.key)
            return False
        with self._state.transaction() as tx:
            tx.release_publication(pub.target, device, self._clock())
        log.warning("volume %s left %s, but its overlay lives on (a copy of the mount in "
                    "another mount namespace, or a mount detached behind strata's back); "
                    "its writable layer (%s) and layers are kept until the kernel lets the "
                    "overlay go", pub.volume_id, pub.target, pub.key)
        self._wake()
        return True

    def finish_detach(self, target: str) -> bool:
        """A release whose mount is still at `target` (and no publication there): the
        detach that followed its record was interrupted (a crash; a failed MNT_DETACH).
        Unmount it now, lazily if busy. True when there was one."""
        with self._state.read() as tx:
            if tx.publication(target) is not None:
                return False
            found = [r for r in tx.releases() if r.target == target]
        if not found or not self._mounter.table.is_mountpoint(target):
            return False
        now = device_of(target)
        r = next((r for r in found if not r.device or r.device == now), None)
        if r is None:  # someone else's mount on a path we once used
            log.warning("%s is mounted, but not with a view released from it (device %s, "
                        "not %s): left alone", target, now,
                        ", ".join(r.device for r in found))
            return False
        log.warning("volume %s at %s is released but still mounted (its detach was "
                    "interrupted); unmounting it now", r.volume_id, target)
        self._mounter.unmount(target)  # lazily, when busy
        self._wake()
        return True

    # -- start-up ----------------------------------------------------------------------
    def remove_unless_held(self, key: str, what: str) -> None:
        """Private state that no record names (start-up): removed, unless a live overlay
        still uses it (an unrecorded mount that had to be detached lazily): then it becomes
        a release that cannot say which layers it reads, and GC pauses until it goes.
        `what` names it in the log."""
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
                    "until the kernel lets it go; which layers it reads is not recorded, so "
                    "garbage collection pauses until then", what)
        with self._state.transaction() as tx:
            tx.record_release(Release(key, since=self._clock()))
        self._wake()

    def settle(self) -> None:
        """End of start-up: release what the kernel has let go, remember this boot, and
        keep asking in the background about the rest (the first wake since start-up)."""
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
        with self._cv:
            self._starting = False
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
        """Delete the private state of every release whose view is gone; returns how many
        remain."""
        released = left = 0
        with self._sweeping:
            with self._state.read() as tx:
                pending = tx.releases()
            seen = self._scan(pending)
            for r in pending:
                if self._release(r, seen):
                    released += 1
                else:
                    left += 1
        if released and self._collect is not None:
            try:
                self._collect()
            except Exception:
                log.exception("garbage collection after a release failed")
        return left

    def _scan(self, pending: list[Release]) -> dict:
        """One pass over /proc for the devices of every pending view without an upper
        (most sweeps have none, and then nothing is scanned)."""
        if self._rebooted:
            return {}
        devs, binds = set(), {}
        for r in pending:
            if self._backend.holder_probe(r.key) is not None:
                continue
            own, bind = self._snapshot(r.key)
            dev = users.parse(r.device) or own
            if dev is not None and not self._is_store_device(dev):
                devs.add(dev)
                if bind is not None:
                    binds[dev] = bind
        return users.find(devs, self._proc, binds) if devs else {}

    def _release(self, r: Release, seen: dict) -> bool:
        try:
            if not self._rebooted and self._held(r.key, r.device, seen):
                log.debug("the view of %s (%s) is still held", r.key, r.target or "?")
                return False
        except OSError as e:
            log.error("cannot tell whether the view of %s still lives: %s; asking again "
                      "later", r.key, e)
            return False
        with self._state.transaction() as tx:  # the record goes before the files
            tx.forget_release(r.key, self._clock())
        self._backend.remove_or_log(r.key)
        log.info("released %s of volume %s (%s): its view is gone, %.0f s after it left "
                 "the mount table", r.key, r.volume_id or "?",
                 r.target or "found at start-up", max(0.0, self._clock() - r.since))
        return True

    # -- the background thread -----------------------------------------------------------
    def _wake(self) -> None:
        """A release was recorded: ask about it soon, and back off from there."""
        with self._cv:
            if self._stopped or self._starting:
                return  # settle() sweeps, then wakes the thread for what is left
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


def _overlay_gone(upper: str, device: str, root_inode: int) -> bool:
    """Whether the overlay over `upper` that showed `device` and `root_inode` at its root
    is certainly gone: the root showed the upper's inode on a device other than the
    upper's own (so `device` was that overlay's superblock's), and no superblock has that
    device now. False whenever that cannot be shown."""
    dev = users.parse(device)
    if dev is None:
        return False
    try:
        st = os.lstat(upper)
    except OSError:
        return False  # the probe that follows knows what a missing upper means
    if st.st_ino != root_inode or (os.major(st.st_dev), os.minor(st.st_dev)) == dev:
        return False
    return users.superblock_exists(dev) is False


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
                found.append(f"pid {pid} ({comm(base)})")
                break
        if len(found) >= limit:
            break
    return found
