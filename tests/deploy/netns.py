"""A network namespace of its own for a process under test, as a pod has one.

The DaemonSet has strata listen for metrics on 0.0.0.0:9808: on a node that is the pod's
own network, so the test runs `strata serve` in a fresh network namespace (only its
loopback, brought up) and the address and port stay exactly the manifest's, without
touching this machine's port 9808 or any other interface. Filesystem paths, unix sockets
and mounts are shared with the test as usual: only the network is the pod's.

Linux keeps namespaces per thread: one worker thread of this process enters the new
namespace (unshare(2)) and stays there, so that sockets it makes belong to it
(`PodNetwork.inside`); `command()` prefixes an argv with `nsenter` to start a process in it.
`forward(port)` relays 127.0.0.1:PORT inside to 127.0.0.1:PORT outside, for servers of the
test (a registry) that the process must reach as it would reach a registry from a pod.
"""

import ctypes
import fcntl
import os
import shutil
import socket
import struct
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914  # linux/sockios.h
IFF_UP = 0x1
IFREQ = struct.Struct("16sH14x")  # struct ifreq: the name and ifr_flags of the union

NSENTER = shutil.which("nsenter")


def _enter_new_namespace() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # `ip link set lo up`
        _, flags = IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, IFREQ.pack(b"lo", 0)))
        fcntl.ioctl(s, SIOCSIFFLAGS, IFREQ.pack(b"lo", flags | IFF_UP))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:  # either end closed: the relay is over
        pass


class PodNetwork:
    def __init__(self):
        self._inside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pod-netns",
                                          initializer=_enter_new_namespace)
        self.path = self.inside(
            lambda: f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net")
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def inside(self, fn, *args):
        """fn(*args) run in the namespace (sockets it makes belong to it)."""
        return self._inside.submit(fn, *args).result()

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run in the namespace (nsenter execs it: the process ID is argv's)."""
        return [NSENTER, f"--net={self.path}", "--", *argv]

    def get(self, url: str, timeout: float = 10) -> tuple[int, str]:
        """An HTTP GET from inside, as a scrape from the pod's own network would be."""
        def fetch():
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        return self.inside(fetch)

    def forward(self, port: int) -> None:
        """Relay connections to 127.0.0.1:port inside to 127.0.0.1:port outside."""
        def listen():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(64)
            return s

        listener = self.inside(listen)
        self._keep(listener)
        # Started from this thread, outside: the connections it opens are made outside.
        threading.Thread(target=self._accept, args=(listener, port), daemon=True,
                         name=f"forward-{port}").start()

    def _keep(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.append(s)

    def _accept(self, listener: socket.socket, port: int) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed by close()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                conn.close()
                continue
            for s in (conn, upstream):
                self._keep(s)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._inside.shutdown(wait=True)
