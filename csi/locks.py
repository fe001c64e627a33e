"""Per-key locks and single-flight (one unpack per layer however many requests race for it),
and the file locks by which strata processes share a store."""

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class KeyedLock:
    """A lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self):
        self._mu = threading.Lock()
        self._locks: dict[str, list] = {}  # key -> [lock, users]

    @contextlib.contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        # Sorted acquisition: two requests naming the same keys cannot deadlock.
        ordered = sorted(set(keys))
        entries = []
        with self._mu:
            for k in ordered:
                entry = self._locks.setdefault(k, [threading.Lock(), 0])
                entry[1] += 1
                entries.append((k, entry))
        acquired = []
        try:
            for _, entry in entries:
                entry[0].acquire()
                acquired.append(entry)
            yield
        finally:
            for entry in reversed(acquired):
                entry[0].release()
            with self._mu:
                for k, entry in entries:
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._locks[k]


class _Call:
    def __init__(self):
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class SingleFlight:
    """`do(key, fn)`: the first caller runs fn; callers arriving while it runs wait and share
    its result or its exception (Go's x/sync/singleflight)."""

    def __init__(self):
        self._mu = threading.Lock()
        self._calls: dict[str, _Call] = {}

    def do(self, key: str, fn: Callable[[], T], share_errors: bool = True) -> T:
        """With `share_errors=False` a waiter whose leader failed runs `fn` itself: a caller
        then only ever sees its own failure (one image's corrupt blob must not fail another
        image that merely shares the layer)."""
        while True:
            with self._mu:
                call = self._calls.get(key)
                leader = call is None
                if leader:
                    call = self._calls[key] = _Call()
            if leader:
                break
            call.done.wait()
            if call.error is None:
                return call.result
            if share_errors:
                raise call.error
        try:
            call.result = fn()
            return call.result
        except BaseException as e:
            call.error = e
            raise
        finally:
            with self._mu:
                del self._calls[key]
            call.done.set()


class FileLock:
    """A lock between threads *and* processes (`strata gc` beside `strata serve`): a thread
    lock, then flock(2) on a file that lives as long as the store."""

    def __init__(self, path: str):
        self._path = path
        self._mu = threading.Lock()
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))

    def __enter__(self) -> "FileLock":
        self._mu.acquire()
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._mu.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.close(self._fd)  # closing drops the flock
        finally:
            self._mu.release()


class StoreUsers:
    """Which processes use a store: each one (`strata serve`, `strata pull`, `strata gc`)
    holds a shared flock on `store.lock` for as long as it runs. Start-up may empty tmp/
    and delete unrecorded layer directories only when it can take the lock exclusively;
    otherwise another process may be mid-unpack there."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def alone(self) -> bool:
        """Take the lock exclusively if nobody else holds it (then call share())."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def share(self) -> "StoreUsers":
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        return self

    def close(self) -> None:
        """Let go of the store (closing drops the flock); again is a no-op."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class ServeLock:
    """The serving role on a store: an exclusive flock on `serve.lock`, held by one
    `strata serve` from before its start-up repairs until it has stopped serving. Two servers
    on one store would each repair what the other is doing (start-up unmounts mounts it
    has no record of, and deletes unrecorded layers and uppers), and answer the kubelet
    from two views of the store. The holder writes who it is into the file, so that a
    server kept out can say whom it waits for. Tools (`strata pull`, `gc`, `ls`) do not
    take it: they work beside a server (see StoreUsers).

    The kernel drops the lock when the holder's descriptor closes, however the holder
    ends (kill -9 included); the file, and a stale holder line in it, stay."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def try_take(self) -> bool:
        """Take the role if nobody holds it, and say so in the file."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, me.encode(), 0)
        return True

    def holder(self) -> str:
        """Who holds the role, as the holder wrote it: the pid is in the holder's pid
        namespace (in Kubernetes the host is its pod's name)."""
        try:
            with open(self.path, "rb") as f:
                who = json.loads(f.read(4096))
            return f"pid {int(who['pid'])} on host {who['host']}, serving since {who['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a server that did not say who it is"

    def close(self) -> None:
        """Let go of the role (closing drops the flock); again is a no-op."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class StoreServed(RuntimeError):
    """Another `strata serve` holds the store's serving role."""
