"""The registry client's transport limits against a misbehaving HTTP server on loopback."""

import errno
import os
import socket
import threading

import pytest

from csi.errors import DataLoss, Internal, InvalidArgument, ResourceExhausted, Unavailable
from csi.image.manifest import MAX_MANIFEST_BYTES
from csi.image.reference import parse
from csi.image.registry import Endpoint, RegistryClient
from csi.image.transport import Options, registry_error


class Server:
    """Answers every connection with `head` then `body`: at once, or with `pace` (a
    semaphore) one byte each time it is released."""

    def __init__(self, head: bytes, body: bytes, pace: threading.Semaphore | None = None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.head, self.body, self.pace = head, body, pace
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(self.head)
                    if self.pace is not None:
                        for b in self.body:
                            self.pace.acquire()
                            if self.stop.is_set():
                                break
                            conn.sendall(bytes([b]))
                    else:
                        conn.sendall(self.body)
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        if self.pace is not None:
            self.pace.release()  # a paced sender waiting for its next byte: it is over
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def server():
    servers = []
    yield lambda *a, **kw: servers.append(Server(*a, **kw)) or servers[-1]
    for s in servers:
        s.close()


def test_a_trickling_registry_times_out(server):
    """One byte a second never trips a 30 s read timeout; the deadline for the whole
    transfer (30 s, plus 1000 bytes at 100 bytes/s) must. The registry sends its next byte
    each time the client looks at its clock, and each look finds a second gone: so every
    read gets one byte, and no real second passes."""
    pace = threading.Semaphore(0)
    now = 0.0

    def clock() -> float:
        nonlocal now
        now += 1.0
        pace.release()
        return now

    srv = server(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"x" * 1000, pace=pace)
    client = RegistryClient(Options(read_timeout=30, min_rate=100, retries=0), clock=clock)
    with pytest.raises(Unavailable, match="slower than 100 bytes/s"):
        client.manifest(Endpoint("http", srv.host), parse(f"{srv.host}/a:1"), "1", None)
    assert 41 < now <= 42, "it gave up at the first look past the deadline (1 + 30 + 10)"


def test_a_blob_longer_than_its_descriptor_is_data_loss(server, tmp_path):
    srv = server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"y" * 100)
    client = RegistryClient(Options(retries=0))
    with open(tmp_path / "blob", "ab") as out, pytest.raises(DataLoss, match="more than"):
        client.fetch_blob(Endpoint("http", srv.host), parse(f"{srv.host}/a:1"),
                          "sha256:" + "0" * 64, 10, None, 0, out)
    assert (tmp_path / "blob").stat().st_size <= 10 + 65536  # stopped at the first chunk


def test_malformed_error_bodies_do_not_crash():
    assert registry_error(b'{"errors": 5}') == '{"errors": 5}'
    assert registry_error(b'{"errors": [5]}') == '{"errors": [5]}'
    assert registry_error(b"\xff\xfe") != ""


@pytest.mark.parametrize("framing", ["content-length", "until-close"])
def test_a_manifest_over_the_limit_is_invalid_argument(server, framing):
    """Too large to accept is not corruption: INVALID_ARGUMENT naming image and limit."""
    body = b'{"schemaVersion": 2, "pad": "' + b"x" * MAX_MANIFEST_BYTES + b'"}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n"
    head += (f"Content-Length: {len(body)}\r\n" if framing == "content-length"
             else "Connection: close\r\n").encode() + b"\r\n"
    srv = server(head, body)
    client = RegistryClient(Options(retries=0))
    with pytest.raises(InvalidArgument) as e:
        client.manifest(Endpoint("http", srv.host), parse(f"{srv.host}/team/app:1"), "1", None)
    assert f"image {srv.host}/team/app:1" in str(e.value)
    assert str(MAX_MANIFEST_BYTES) in str(e.value)


@pytest.mark.parametrize("err,expected", [(errno.EIO, Internal), (errno.EROFS, Internal),
                                          (errno.ENOSPC, ResourceExhausted)])
def test_a_store_that_cannot_write_is_not_a_registry_failure(server, err, expected):
    """A failing write to the blob cache is the node's problem: no retries against the
    registry, and not UNAVAILABLE (which would blame the registry)."""
    srv = server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"y" * 100)
    client = RegistryClient(Options(retries=3, backoff=0.001))

    class Broken:  # stands for the partial file on a failing disk
        writes = 0

        def write(self, data):
            Broken.writes += 1
            raise OSError(err, os.strerror(err))

        def tell(self):
            return 0

        def truncate(self, n):
            pass

    with pytest.raises(expected, match="store"):
        client.fetch_blob(Endpoint("http", srv.host), parse(f"{srv.host}/a:1"),
                          "sha256:" + "0" * 64, 100, None, 0, Broken())
    assert Broken.writes == 1, "not retried"
