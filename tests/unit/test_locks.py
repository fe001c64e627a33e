"""csi/locks.py: SingleFlight (one run per key while callers race), KeyedLock, FileLock and
ServeLock.

No assertion here depends on how long anything takes: a test that needs a caller to be
blocked first waits for proof that it is (a counted wait, a contended acquire, a queued
flock(2) in /proc/locks), then checks what it has or has not done.
"""

import os
import subprocess
import sys
import threading
import time
import types

import pytest

from csi import locks
from csi.locks import FileLock, KeyedLock, ServeLock, SingleFlight

TIMEOUT = 10


class Waiters:
    """Counts callers that reached a point where they block (waiting for a flight's result,
    or for a lock somebody else holds)."""

    def __init__(self):
        self._cond = threading.Condition()
        self.n = 0

    def arrived(self):
        with self._cond:
            self.n += 1
            self._cond.notify_all()

    def wait_for(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.n >= n, timeout=TIMEOUT), \
                f"only {self.n} of {n} callers arrived"


@pytest.fixture
def waiters(monkeypatch) -> Waiters:
    """Make SingleFlight's per-call Event report followers that start waiting on it, so a
    test can hold the leader until every caller has joined (no sleeps, no races)."""
    w = Waiters()

    class CountingEvent(threading.Event):
        def wait(self, timeout=None):
            w.arrived()
            return super().wait(timeout)

    class CountingCall(locks._Call):
        def __init__(self):
            super().__init__()
            self.done = CountingEvent()

    monkeypatch.setattr(locks, "_Call", CountingCall)
    return w


def run_threads(n, target):
    results, errors = [None] * n, [None] * n
    barrier = threading.Barrier(n, timeout=TIMEOUT)

    def body(i):
        barrier.wait()
        try:
            results[i] = target(i)
        except BaseException as e:  # noqa: B036 - collected for the test to inspect
            errors[i] = e

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


def join_all(threads):
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "threads hung"


# -- SingleFlight --------------------------------------------------------------------------
N = 8


def test_single_flight_runs_once_for_concurrent_callers(waiters):
    sf = SingleFlight()
    calls, started, release = [], threading.Event(), threading.Event()
    value = object()

    def fn():
        calls.append(threading.get_ident())
        started.set()
        assert release.wait(TIMEOUT)
        return value

    threads, results, errors = run_threads(N, lambda i: sf.do("sha256:x", fn))
    assert started.wait(TIMEOUT)
    waiters.wait_for(N - 1)  # every other caller is waiting on the leader
    release.set()
    join_all(threads)
    assert errors == [None] * N
    assert len(calls) == 1
    assert all(r is value for r in results)


def test_single_flight_shares_the_exception(waiters):
    sf = SingleFlight()
    calls, started, release = [], threading.Event(), threading.Event()

    class UnpackFailed(Exception):
        pass

    def fn():
        calls.append(1)
        started.set()
        assert release.wait(TIMEOUT)
        raise UnpackFailed("corrupt blob")

    threads, results, errors = run_threads(N, lambda i: sf.do("k", fn))
    assert started.wait(TIMEOUT)
    waiters.wait_for(N - 1)
    release.set()
    join_all(threads)
    assert len(calls) == 1
    assert all(isinstance(e, UnpackFailed) for e in errors)
    assert len({id(e) for e in errors}) == 1  # the very same error, not N copies
    assert results == [None] * N


def test_single_flight_key_released_after_success_and_failure():
    sf = SingleFlight()
    assert sf.do("k", lambda: 1) == 1
    assert sf.do("k", lambda: 2) == 2  # a new flight, not the cached result

    def boom():
        raise ValueError("first")

    with pytest.raises(ValueError, match="first"):
        sf.do("k", boom)
    assert sf.do("k", lambda: 3) == 3  # errors are not cached either


def test_single_flight_different_keys_run_concurrently():
    sf = SingleFlight()
    both = threading.Barrier(2, timeout=TIMEOUT)  # breaks if the keys were serialised

    def fn(i):
        both.wait()
        return i

    threads, results, errors = run_threads(2, lambda i: sf.do(f"key-{i}", lambda: fn(i)))
    join_all(threads)
    assert errors == [None, None]
    assert results == [0, 1]


def test_single_flight_sequential_callers_each_run(waiters):
    sf = SingleFlight()
    counter = []
    for _ in range(3):
        sf.do("k", lambda: counter.append(1))
    assert len(counter) == 3
    assert waiters.n == 0  # nobody ever waited


# -- KeyedLock -----------------------------------------------------------------------------
class WrappedLock:
    """A threading.Lock whose acquire() a test changes; `with` takes the plain lock."""

    def __init__(self):
        self._lock = threading.Lock()

    def release(self):
        self._lock.release()

    def __enter__(self):
        self._lock.acquire()

    def __exit__(self, *exc):
        self._lock.release()


@pytest.fixture
def contended(monkeypatch) -> Waiters:
    """Make KeyedLock's per-key locks report an acquire() that finds the lock taken, so a
    test knows a holder is queued behind another instead of hoping a sleep was long enough.
    (KeyedLock's own mutex is taken with `with`, which is not counted.)"""
    w = Waiters()

    class ReportingLock(WrappedLock):
        def acquire(self, blocking=True, timeout=-1):
            if self._lock.acquire(False):
                return True
            w.arrived()
            return self._lock.acquire(blocking, timeout)

    monkeypatch.setattr(locks, "threading", types.SimpleNamespace(Lock=ReportingLock))
    return w


def hold_in_thread(kl: KeyedLock, *keys):
    entered, release = threading.Event(), threading.Event()

    def body():
        with kl.hold(*keys):
            entered.set()
            release.wait(TIMEOUT)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, entered, release


def test_keyed_lock_serialises_the_same_key(contended):
    kl = KeyedLock()
    t1, in1, rel1 = hold_in_thread(kl, "vol:a")
    assert in1.wait(TIMEOUT)
    t2, in2, rel2 = hold_in_thread(kl, "vol:a")
    contended.wait_for(1)  # the second holder found the key taken and queued for it
    assert not in2.is_set()
    rel1.set()
    assert in2.wait(TIMEOUT)
    rel2.set()
    join_all([t1, t2])


def test_keyed_lock_multi_key_hold_blocks_each_key(contended):
    kl = KeyedLock()
    t1, in1, rel1 = hold_in_thread(kl, "vol:a", "target:/x")
    assert in1.wait(TIMEOUT)
    t2, in2, rel2 = hold_in_thread(kl, "target:/x")
    t3, in3, rel3 = hold_in_thread(kl, "vol:other")
    assert in3.wait(TIMEOUT)  # an unrelated key is free
    contended.wait_for(1)  # only target:/x is taken: this is t2, queued behind t1
    assert not in2.is_set()
    rel1.set()
    assert in2.wait(TIMEOUT)
    rel2.set()
    rel3.set()
    join_all([t1, t2, t3])


def test_keyed_lock_different_keys_concurrently():
    kl = KeyedLock()
    inside = threading.Barrier(3, timeout=TIMEOUT)  # all three must be inside at once

    def body(i):
        with kl.hold(f"k{i}"):
            inside.wait()
        return i

    threads, results, errors = run_threads(3, body)
    join_all(threads)
    assert errors == [None] * 3
    assert results == [0, 1, 2]


class SlowLock(WrappedLock):
    """A lock that pauses after each acquisition, so that two holders taking the same keys
    in opposite orders would each get their first key before the other's second: the classic
    deadlock, made certain for an implementation that does not order its keys."""

    def acquire(self, *args):
        got = self._lock.acquire(*args)
        time.sleep(0.02)
        return got


def test_keyed_lock_no_deadlock_with_keys_in_different_order(monkeypatch):
    monkeypatch.setattr(locks, "threading", types.SimpleNamespace(Lock=SlowLock))
    kl = KeyedLock()
    orders = [("a", "b"), ("b", "a"), ("b", "c"), ("c", "a")]  # a cycle if taken as given
    done = []

    def body(i):
        for _ in range(2):
            with kl.hold(*orders[i]):
                done.append(i)

    threads, _, errors = run_threads(4, body)
    join_all(threads)
    assert errors == [None] * 4
    assert sorted(done) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_keyed_lock_repeated_key_in_one_hold_does_not_self_deadlock():
    kl = KeyedLock()
    t, entered, release = hold_in_thread(kl, "a", "a")
    assert entered.wait(TIMEOUT)
    release.set()
    join_all([t])


def test_keyed_lock_mutual_exclusion_under_contention():
    kl = KeyedLock()
    inside = [0]
    max_inside = [0]

    def body(i):
        for _ in range(300):
            with kl.hold("same"):
                inside[0] += 1
                max_inside[0] = max(max_inside[0], inside[0])
                inside[0] -= 1

    threads, _, errors = run_threads(4, body)
    join_all(threads)
    assert errors == [None] * 4
    assert max_inside[0] == 1


def test_keyed_lock_released_on_exception_and_entries_dropped():
    kl = KeyedLock()
    with pytest.raises(RuntimeError):
        with kl.hold("x", "y"):
            raise RuntimeError
    t, entered, release = hold_in_thread(kl, "x")
    assert entered.wait(TIMEOUT)  # not left locked by the failed holder
    release.set()
    join_all([t])
    assert kl._locks == {}  # "dropped when nobody holds or waits for it"


def test_singleflight_waiters_can_refuse_a_shared_error(waiters):
    """share_errors=False: a waiter whose leader failed runs its own fn and gets its own
    result (one image's corrupt blob must not fail another image sharing the layer)."""
    sf = SingleFlight()
    leader_in, release = threading.Event(), threading.Event()
    results = {}

    def bad():
        leader_in.set()
        assert release.wait(TIMEOUT)
        raise ValueError("corrupt blob")

    def run_bad():
        try:
            sf.do("layer", bad, share_errors=False)
        except ValueError as e:
            results["bad"] = e

    def run_good():
        results["good"] = sf.do("layer", lambda: "ok", share_errors=False)

    leader = threading.Thread(target=run_bad, daemon=True)
    leader.start()
    assert leader_in.wait(TIMEOUT)
    waiter = threading.Thread(target=run_good, daemon=True)
    waiter.start()
    waiters.wait_for(1)  # it joined the failing flight rather than starting its own
    release.set()
    join_all([leader, waiter])
    assert isinstance(results["bad"], ValueError)
    assert results["good"] == "ok"


# -- FileLock ------------------------------------------------------------------------------
# A process that takes the lock with flock(2), says so, and keeps it until told to let go.
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""
# A process that asks for the lock without waiting and says whether it got it.
PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("busy")
else:
    print("free")
"""


def probe(path: str) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, path], capture_output=True, text=True,
                          check=True, timeout=TIMEOUT).stdout.strip()


def queued_behind(holder_pid: int) -> set[int]:
    """PIDs whose flock(2) request is queued behind a lock `holder_pid` holds, from the
    kernel's own account in /proc/locks: each held lock's line is followed by one `->` line,
    under the same number, per request it blocks."""
    holders, queued = {}, {}
    with open("/proc/locks") as f:
        for line in f:
            num, *fields = line.split()
            if fields[:2] == ["->", "FLOCK"]:
                queued.setdefault(num, set()).add(int(fields[4]))
            elif fields[0] == "FLOCK":
                holders[num] = int(fields[3])
    return {pid for num, pids in queued.items() if holders.get(num) == holder_pid
            for pid in pids}


def test_file_lock_held_here_excludes_another_process(tmp_path):
    path = str(tmp_path / "store.lock")
    lock = FileLock(path)
    with lock:
        assert probe(path) == "busy"
    assert probe(path) == "free"  # and leaving the block let go of it


def test_file_lock_waits_for_another_process_to_release(tmp_path):
    path = str(tmp_path / "store.lock")
    lock = FileLock(path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    entered, leave = threading.Event(), threading.Event()

    def take():
        with lock:
            entered.set()
            leave.wait(TIMEOUT)

    waiter = threading.Thread(target=take, daemon=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter.start()
        # Proof that the waiter is blocked in flock(2) behind the other process, not merely
        # slow to start; the deadline only bounds a hang.
        deadline = time.monotonic() + TIMEOUT
        while os.getpid() not in queued_behind(holder.pid):
            assert time.monotonic() < deadline, "FileLock never queued behind the holder"
            assert not entered.is_set(), "FileLock was taken while another process held it"
            time.sleep(0.01)
        assert not entered.is_set()
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert entered.wait(TIMEOUT), "FileLock not taken after the other process let go"
        leave.set()
        join_all([waiter])
    finally:
        leave.set()
        holder.stdin.close()  # EOF: the holder exits, if it has not yet
        try:
            holder.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        holder.stdout.close()


def test_serve_lock_has_one_holder_that_says_who_it_is(tmp_path):
    path = str(tmp_path / "serve.lock")
    first, second = ServeLock(path), ServeLock(path)  # two descriptions: two flock owners
    try:
        assert first.try_take()
        assert probe(path) == "busy"
        assert not second.try_take()
        who = second.holder()
        assert who.startswith(f"pid {os.getpid()} on host ") and "serving since" in who
        first.close()
        first.close()  # again: nothing
        assert second.try_take(), "closing lets go"
    finally:
        first.close()
        second.close()
    assert probe(path) == "free"


@pytest.mark.parametrize("content", [b"", b"garbage", b'{"pid": "x"}', b"[1, 2]"])
def test_serve_lock_holder_that_did_not_say(tmp_path, content):
    path = tmp_path / "serve.lock"
    path.write_bytes(content)
    lock = ServeLock(str(path))
    try:
        assert lock.holder() == "a server that did not say who it is"
    finally:
        lock.close()
