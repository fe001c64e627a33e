"""A fault-injecting HTTP/1.1 proxy for registry tests.

`FaultProxy("127.0.0.1:5000")` listens on a free 127.0.0.1 port and relays every request to
the (plain HTTP) upstream: point a client at `proxy.url` instead of the registry. The Host
header is passed through, so the registry's upload `Location`s point back at the proxy; an
absolute-form request line (the client using it as an HTTP proxy) works too. Range and all
other end-to-end headers go upstream unchanged.

Faults are rules matched in the order added, on method and path regexes (`re.search`; path
includes the query string); each fires `times` times (None = forever) and is then spent:

    with FaultProxy(reg.host) as proxy:
        proxy.fail(503, times=2, path=r"/blobs/")           # a burst of 503s
        proxy.fail(429, headers={"Retry-After": "1"})        # rate limited once
        proxy.cut_after(100, path=r"/blobs/")                # full Content-Length, 100 bytes
        proxy.corrupt(path=r"/blobs/")                       # same length, bytes flipped
        proxy.hang(5)                                        # read the request, say nothing
        proxy.redirect_blobs_to(reg.url)                     # 307 to another server
        proxy.redirect_to(other.url, path=r"^/v2/.+/manifests/",  # any path, renamed
                          rewrite=(r"^/v2/", "/v2/prod/"))
        proxy.partial_from_zero(path=r"/blobs/")             # 206, but from byte 0
        ...
        proxy.counts["/v2/library/app/blobs/sha256:..."]     # requests per path (no query)
        proxy.log                                            # every request, in order

Request bodies (Content-Length or chunked) and response bodies are buffered whole: fine for
test-sized images.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import http.server
import json
import re
import socket
import threading
import time
import urllib.parse

from tests.loopback import Loopback

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect", "content-length",
})
BLOB_PATH = r"^/v2/.+/blobs/[a-z0-9]+:[a-f0-9]+(\?.*)?$"


@dataclasses.dataclass
class Rule:
    action: str                     # "fail" | "cut" | "corrupt" | "hang" | "delay" | "redirect"
                                    # | "partial0"
    method: str | None = None       # regex on the method, None = any
    path: str | None = None         # regex searched in the path (with query), None = any
    times: int | None = 1           # how many more times it fires; None = forever
    status: int = 503
    headers: dict[str, str] | None = None
    body: bytes | None = None
    nbytes: int = 0                 # cut: body bytes sent before the connection is closed
    seconds: float = 0.0            # hang / delay
    location: str = ""              # redirect: base URL the path is appended to
    rewrite: tuple[str, str] | None = None  # redirect: (regex, replacement) applied to the path
    offset: int | None = None       # corrupt: which byte (default: the middle one)
    hits: int = 0                   # how many times it fired
    fired: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False,
                                               compare=False)  # set when it first fires

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and not re.fullmatch(self.method, method):
            return False
        return self.path is None or re.search(self.path, path) is not None


@dataclasses.dataclass
class LogEntry:
    method: str
    path: str                       # as requested (origin-form, with query)
    headers: dict[str, str]
    fault: str | None = None        # the rule's action, if one fired
    status: int | None = None       # None when no status line was sent (hang)
    body_bytes: int = 0             # response body bytes sent (before a cut)
    time: float = 0.0


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False          # server_close() joins the handlers
    block_on_close = True

    def handle_error(self, request, client_address):  # a client going away is not news
        pass


class FaultProxy(Loopback):
    def __init__(self, upstream: str, *, upstream_timeout: float = 30.0,
                 idle_timeout: float | None = 60.0):
        up = upstream.split("://", 1)[-1].rstrip("/")
        host, _, port = up.rpartition(":")
        self.upstream_host, self.upstream_port = host, int(port)
        self.upstream_timeout = upstream_timeout
        self.idle_timeout = idle_timeout  # an idle client connection is dropped after it
        self.rules: list[Rule] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.log: list[LogEntry] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- rules
    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail(self, status: int, times: int | None = 1, headers: dict[str, str] | None = None,
             *, method: str | None = None, path: str | None = None,
             body: bytes | None = None) -> Rule:
        """Answer `status` (with `headers`, e.g. {"Retry-After": "1"}) instead of relaying.
        The default body is a registry-style JSON error."""
        return self.add(Rule("fail", method, path, times, status=status, headers=headers,
                             body=body))

    def cut_after(self, nbytes: int, times: int | None = 1, *, method: str | None = None,
                  path: str | None = None) -> Rule:
        """Relay status and headers (with the full Content-Length), then only `nbytes` of the
        body, then close the connection."""
        return self.add(Rule("cut", method, path, times, nbytes=nbytes))

    def corrupt(self, times: int | None = 1, *, method: str | None = None,
                path: str | None = None, offset: int | None = None) -> Rule:
        """Relay the response with one body byte inverted (same length)."""
        return self.add(Rule("corrupt", method, path, times, offset=offset))

    def hang(self, seconds: float, times: int | None = 1, *, method: str | None = None,
             path: str | None = None) -> Rule:
        """Read the request, send nothing for `seconds` (or until stop()), then close the
        connection. hang(0) is a connection dropped right after the request."""
        return self.add(Rule("hang", method, path, times, seconds=seconds))

    def delay(self, seconds: float, times: int | None = 1, *, method: str | None = None,
              path: str | None = None) -> Rule:
        """Wait `seconds` before relaying normally."""
        return self.add(Rule("delay", method, path, times, seconds=seconds))

    def redirect_blobs_to(self, other_url: str, times: int | None = None, *,
                          status: int = 307) -> Rule:
        """Answer blob GET/HEADs with a redirect to `other_url` + the same path (as registries
        backed by object storage do)."""
        return self.redirect_to(other_url, times, method="GET|HEAD", path=BLOB_PATH,
                                status=status)

    def redirect_to(self, other_url: str, times: int | None = None, *,
                    method: str | None = None, path: str | None = None, status: int = 307,
                    rewrite: tuple[str, str] | None = None) -> Rule:
        """Answer with a redirect to `other_url` + the path, first rewritten by
        `re.sub(*rewrite, path)` when given: registry.k8s.io sends `/v2/NAME/...` to
        `https://REGION-docker.pkg.dev/v2/k8s-artifacts-prod/images/NAME/...`."""
        return self.add(Rule("redirect", method, path, times, status=status,
                             location=other_url.rstrip("/"), rewrite=rewrite))

    def partial_from_zero(self, times: int | None = 1, *, method: str | None = None,
                          path: str | None = None) -> Rule:
        """Relay the request without its Range header and answer 206 Partial Content with
        the whole body and `Content-Range: bytes 0-LAST/SIZE`, whatever offset was asked
        for (a cache that mishandles Range)."""
        return self.add(Rule("partial0", method, path, times))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def requests_to(self, pattern: str, method: str | None = None) -> list[LogEntry]:
        with self._lock:
            return [e for e in self.log if re.search(pattern, e.path)
                    and (method is None or e.method == method)]

    def _take(self, method: str, path: str, entry: LogEntry) -> Rule | None:
        with self._lock:
            self.counts[urllib.parse.urlsplit(path).path] += 1
            self.log.append(entry)
            for rule in self.rules:
                if rule.matches(method, path):
                    if rule.times is not None:
                        rule.times -= 1
                    rule.hits += 1
                    rule.fired.set()
                    entry.fault = rule.action
                    return rule
        return None

    # -- lifecycle
    def start(self) -> FaultProxy:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server(("127.0.0.1", 0), _handler(self))
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fault-proxy",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # wake handlers blocked reading an idle keep-alive connection
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def _error_body(status: int) -> bytes:
    code = {401: "UNAUTHORIZED", 404: "NOT_FOUND", 429: "TOOMANYREQUESTS"}.get(
        status, "UNAVAILABLE")
    return json.dumps({"errors": [{"code": code, "message": f"injected {status}",
                                   "detail": None}]}).encode()


def _handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = proxy.idle_timeout

        def log_message(self, format, *args):
            pass

        def setup(self):
            super().setup()
            with proxy._lock:
                proxy._conns.add(self.connection)

        def finish(self):
            with proxy._lock:
                proxy._conns.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    line = self.rfile.readline(65537)
                    if not line:
                        raise ConnectionError("truncated chunked body")
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline(65537)
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n > 0 else b""

        def _send(self, status: int, headers: list[tuple[str, str]], body: bytes,
                  entry: LogEntry, length: int | None = None, cut: int | None = None) -> None:
            data = body if cut is None else body[:cut]
            entry.status, entry.body_bytes = status, len(data)  # before the client can look
            self.send_response_only(status)
            for k, v in headers:
                self.send_header(k, v)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            if data:
                self.wfile.write(data)
            self.wfile.flush()
            if cut is not None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def _relay(self) -> None:
            method, path = self.command, self.path
            if "://" in path[:10]:  # absolute-form: used as a real HTTP proxy
                u = urllib.parse.urlsplit(path)
                path = u.path + ("?" + u.query if u.query else "")
            body = self._read_body()
            entry = LogEntry(method, path, dict(self.headers.items()), time=time.time())
            rule = proxy._take(method, path, entry)
            action = rule.action if rule else None
            if action == "hang":
                proxy._stopping.wait(rule.seconds)
                self.close_connection = True
                return
            if action == "fail":
                data = _error_body(rule.status) if rule.body is None else rule.body
                hdrs = [("Content-Type", "application/json"), *(rule.headers or {}).items()]
                self._send(rule.status, hdrs, b"" if method == "HEAD" else data, entry,
                           length=len(data))
                return
            if action == "redirect":
                to = re.sub(*rule.rewrite, path, count=1) if rule.rewrite else path
                hdrs = [("Location", rule.location + to), ("Content-Type", "text/plain")]
                self._send(rule.status, hdrs, b"", entry, length=0)
                return
            if action == "delay":
                if proxy._stopping.wait(rule.seconds):
                    self.close_connection = True
                    return
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                              timeout=proxy.upstream_timeout)
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() not in HOP_BY_HOP and not (
                            action == "partial0" and k.lower() == "range"):
                        conn.putheader(k, v)
                if body or method in ("POST", "PUT", "PATCH"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
                status, up_headers = resp.status, resp.getheaders()
            except (OSError, http.client.HTTPException) as e:
                msg = json.dumps({"errors": [{"code": "UNAVAILABLE",
                                              "message": f"fault proxy: upstream: {e}"}]})
                self._send(502, [("Content-Type", "application/json")], msg.encode(), entry,
                           length=len(msg))
                return
            finally:
                conn.close()
            hdrs = [(k, v) for k, v in up_headers if k.lower() not in HOP_BY_HOP]
            length: int | None = len(data)
            if method == "HEAD":
                cl = [v for k, v in up_headers if k.lower() == "content-length"]
                length = int(cl[0]) if cl else None
            elif status in (204, 304) or status < 200:
                length = None
            if action == "partial0" and status == 200 and data:
                status = 206
                hdrs = [(k, v) for k, v in hdrs if k.lower() != "content-range"]
                hdrs.append(("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}"))
            if action == "corrupt" and data:
                at = len(data) // 2 if rule.offset is None else rule.offset % len(data)
                data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
            self._send(status, hdrs, data, entry, length=length,
                       cut=rule.nbytes if action == "cut" else None)

        def _guarded(self) -> None:
            try:
                self._relay()
            except (ConnectionError, TimeoutError, ValueError):
                self.close_connection = True

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _guarded

    return Handler
