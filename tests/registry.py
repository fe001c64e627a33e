"""Building blocks for registry tests: a real `docker-registry` (distribution v2.8) process,
optionally behind TLS and htpasswd or token auth, or as a pull-through cache of another
registry under a path prefix, a Docker-token-flow token server, `push()` of an OCI layout
with skopeo, and `registry_get()` for raw requests.

Only the standard library plus the `openssl`, `htpasswd` (apache2-utils), `docker-registry`
and `skopeo` command-line tools. Every process, thread, socket and temp dir is released by
`stop()`, which is idempotent and also runs from `__exit__` and on a failed `start()`.

    with Registry(tls=True, auth="token", users={"alice": "secret"}) as reg:
        digest = push(layout, "v1", reg, "library/app", "v1", creds=("alice", "secret"))
        status, headers, body = registry_get(reg, "/v2/library/app/manifests/v1",
                                             creds=("alice", "secret"))
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from tests.loopback import Loopback

SERVICE = "strata-test-registry"
ISSUER = "strata-test-token-issuer"

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])

ALL_ACTIONS = ("pull", "push", "delete", "*")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv: list[str], cwd: str | None = None, input: bytes | None = None) -> bytes:
    r = subprocess.run(argv, cwd=cwd, input=input, capture_output=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {' '.join(argv)}\n"
                           f"{r.stderr.decode(errors='replace')}")
    return r.stdout


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- key material (openssl CLI) ------------------------------------------------------------
_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[signer]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
subjectKeyIdentifier = hash
"""

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    ca_file: str
    cert_file: str
    key_file: str


def make_tls(directory: str) -> TLSFiles:
    """A CA (EC P-256) and a server certificate it signed for 127.0.0.1 and localhost."""
    os.makedirs(directory, exist_ok=True)
    cnf = os.path.join(directory, "openssl.cnf")
    with open(cnf, "w") as f:
        f.write(_OPENSSL_CNF)
    ca_key, ca_crt = (os.path.join(directory, n) for n in ("ca.key", "ca.crt"))
    key, csr, crt = (os.path.join(directory, n) for n in ("server.key", "server.csr",
                                                          "server.crt"))
    _run(["openssl", "req", "-x509", "-config", cnf, "-extensions", "ca", *_EC, "-nodes",
          "-keyout", ca_key, "-out", ca_crt, "-days", "30", "-subj", "/CN=strata test CA"])
    _run(["openssl", "req", "-new", "-config", cnf, *_EC, "-nodes", "-keyout", key,
          "-out", csr, "-subj", "/CN=127.0.0.1"])
    _run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
          "-set_serial", str(secrets.randbits(63)), "-days", "30", "-extfile", cnf,
          "-extensions", "server", "-out", crt])
    return TLSFiles(ca_crt, crt, key)


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    return ctx


# -- token server --------------------------------------------------------------------------
@dataclasses.dataclass
class TokenRequest:
    """One request the token server saw (in arrival order, in `TokenServer.requests`)."""
    method: str
    path: str
    user: str | None          # authenticated user; None when anonymous
    service: str | None
    scopes: list[str]         # as requested, e.g. ["repository:library/app:pull,push"]
    status: int
    granted: list[dict]       # the JWT "access" claim issued (empty on failure)
    headers: dict[str, str]


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """`repository:NAME:pull,push` -> ("repository", NAME, ["pull", "push"]). NAME may hold
    colons (a registry host with a port), so split the type off the left and actions off the
    right."""
    type_, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not type_ or not name:
        return None
    return type_, name, [a for a in actions.split(",") if a]


class TokenServer(Loopback):
    """Docker token-flow auth server (https://distribution.github.io/distribution/spec/auth/
    token/): `GET /token?service=S&scope=repository:NAME:ACTIONS` (scope may repeat), with
    optional Basic auth, answers `{"token", "access_token", "expires_in", "issued_at"}`.
    `POST /token` with an OAuth2 form is accepted too: the password grant, and the
    refresh-token grant for the identity tokens in `refresh_tokens` (token -> user), which
    is how `docker login` to an OAuth registry stores `identitytoken`.

    Tokens are RS256 JWTs signed by a fresh self-signed RSA key (via `openssl dgst`), with
    `x5c` = [the certificate]; the registry trusts them through `rootcertbundle = cert_file`.
    Known users get every action they ask for; anonymous callers get only `pull` when
    `anonymous_pull`, else 401; wrong passwords get 401. Every request is recorded in
    `requests` (thread-safe to read after the fact).
    """

    def __init__(self, users: dict[str, str] | None = None, *, anonymous_pull: bool = False,
                 ttl: int = 300, service: str = SERVICE, issuer: str = ISSUER,
                 tls: TLSFiles | None = None, workdir: str | None = None):
        self.users = dict(users or {})
        self.anonymous_pull = anonymous_pull
        self.ttl = ttl
        self.service = service
        self.issuer = issuer
        self.tls = tls
        self.requests: list[TokenRequest] = []
        self.fail_next: list[int] = []  # statuses to answer the next requests with, in order
        self.refresh_tokens: dict[str, str] = {}  # OAuth2 refresh token -> user
        self._lock = threading.Lock()
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="strata-token-")
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.key_file = os.path.join(self.workdir, "token-signer.key")
        self.cert_file = os.path.join(self.workdir, "token-signer.crt")
        self._x5c: list[str] = []

    # -- lifecycle
    def start(self) -> TokenServer:
        if self._server is not None:
            return self
        try:
            cnf = os.path.join(self.workdir, "token-openssl.cnf")
            with open(cnf, "w") as f:
                f.write(_OPENSSL_CNF)
            _run(["openssl", "req", "-x509", "-config", cnf, "-extensions", "signer",
                  "-newkey", "rsa:2048", "-nodes", "-keyout", self.key_file,
                  "-out", self.cert_file, "-days", "30", "-subj", "/CN=" + self.issuer])
            with open(self.cert_file) as f:
                der = ssl.PEM_cert_to_DER_cert(f.read())
            self._x5c = [base64.b64encode(der).decode()]
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _token_handler(self))
            server.daemon_threads = True
            if self.tls is not None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(self.tls.cert_file, self.tls.key_file)
                server.socket = ctx.wrap_socket(server.socket, server_side=True)
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever, name="token-server",
                                            kwargs={"poll_interval": 0.05}, daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            if self._thread is not None:
                server.shutdown()
                self._thread.join(10)
                self._thread = None
            server.server_close()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def url(self) -> str:
        return ("https" if self.tls else "http") + "://" + self.host

    @property
    def realm(self) -> str:
        return self.url + "/token"

    # -- tokens
    def grant(self, user: str | None, scopes: list[str]) -> list[dict]:
        """The `access` claim for `user` (None = anonymous) asking for `scopes`."""
        access = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            type_, name, actions = parsed
            allowed = [a for a in actions if a in ALL_ACTIONS] if user is not None else \
                [a for a in actions if a == "pull"]
            if allowed:
                access.append({"type": type_, "name": name, "actions": allowed})
        return access

    def issue(self, access: list[dict], subject: str = "", ttl: int | None = None,
              issuer: str | None = None, audience: str | None = None,
              now: float | None = None) -> str:
        """Sign a JWT with the given `access` claim (no request recorded). The overrides
        make invalid tokens for negative tests (wrong issuer/audience, expired)."""
        now = int(time.time() if now is None else now)
        header = {"typ": "JWT", "alg": "RS256", "x5c": self._x5c}
        claims = {
            "iss": self.issuer if issuer is None else issuer,
            "sub": subject,
            "aud": self.service if audience is None else audience,
            "exp": now + (self.ttl if ttl is None else ttl),
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         b64url(json.dumps(claims, separators=(",", ":")).encode()))
        sig = _run(["openssl", "dgst", "-sha256", "-sign", self.key_file],
                   input=signing_input.encode())
        return signing_input + "." + b64url(sig)

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def _check_basic(self, header: str | None) -> tuple[bool, str | None]:
        """(ok, user): (True, None) when anonymous; (False, _) on bad credentials."""
        if not header:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        return (self.users.get(user) == password and user in self.users), user

    def _take_failure(self) -> int | None:
        with self._lock:
            return self.fail_next.pop(0) if self.fail_next else None


def _token_handler(ts: TokenServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            pass

        def _send(self, status: int, body: dict, extra: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _answer(self, params: dict[str, list[str]], user: str | None, ok: bool) -> None:
            url = urllib.parse.urlsplit(self.path)
            scopes = [s for v in params.get("scope", []) for s in v.split(" ") if s]
            service = (params.get("service") or [None])[0]
            rec = TokenRequest(self.command, url.path, user if ok else None, service, scopes,
                               0, [], dict(self.headers.items()))
            forced = ts._take_failure()
            # Record before answering: a client that has its answer must find its request
            # in `requests` (recording after the send raced with the test's next line).
            if url.path != "/token":
                rec.status = 404
                ts._record(rec)
                self._send(404, {"errors": [{"code": "NOT_FOUND"}]})
            elif forced is not None:
                rec.status = forced
                ts._record(rec)
                self._send(forced, {"errors": [{"code": "INJECTED", "message": "injected"}]})
            elif not ok or (user is None and not ts.anonymous_pull):
                rec.status = 401
                ts._record(rec)
                self._send(401, {"errors": [{"code": "UNAUTHORIZED",
                                             "message": "authentication required"}]},
                           {"WWW-Authenticate": 'Basic realm="strata-test-token"'})
            else:
                rec.status = 200
                rec.granted = ts.grant(user, scopes)
                token = ts.issue(rec.granted, subject=user or "")
                issued = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                ts._record(rec)
                self._send(200, {"token": token, "access_token": token,
                                 "expires_in": ts.ttl, "issued_at": issued})

        def do_GET(self):
            params = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            ok, user = ts._check_basic(self.headers.get("Authorization"))
            self._answer(params, user, ok)

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(self.rfile.read(n).decode(errors="replace"))
            ok, user = ts._check_basic(self.headers.get("Authorization"))
            grant = (form.get("grant_type") or [""])[0]
            if grant == "password":
                user = (form.get("username") or [""])[0]
                ok = user in ts.users and ts.users[user] == (form.get("password") or [""])[0]
            elif grant == "refresh_token":
                # RFC 6749 §6, with the client_id the distribution spec requires
                user = ts.refresh_tokens.get((form.get("refresh_token") or [""])[0])
                ok = user is not None and bool((form.get("client_id") or [""])[0])
            self._answer(form, user, ok)

    return Handler


# -- the registry --------------------------------------------------------------------------
_ACCESS = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) HTTP/[0-9.]+" (\d+) \S+ '
                     r'"[^"]*" "([^"]*)"$', re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Access:
    """One line of a registry's access log."""
    method: str
    target: str  # path and query, as the client sent them
    status: int
    agent: str   # User-Agent


class Registry:
    """A real `docker-registry serve` process on 127.0.0.1 with its own config and storage in
    a temp dir (never the packaged system service).

    `tls`: serve HTTPS with a server cert for 127.0.0.1/localhost signed by a fresh CA
    (`ca_file`). `auth`: None, "htpasswd" (bcrypt file made by `htpasswd -B`; distribution
    2.8 does NOT require TLS for it) or "token" (a `TokenServer`, its requests in
    `token_requests`). `anonymous_pull` applies to "token" only. A `token_server` may be
    passed in (not started, or started) and `realm` overridden, e.g. to put a FaultProxy in
    front of the token server.

    `proxy`: a pull-through cache of the registry at that URL (distribution's
    `proxy.remoteurl`): it fetches what it is asked for from there, answers, and stores it.
    Offline this needs nothing unusual, only the upstream already up: 2.8 asks
    `remoteurl/v2/` for its auth challenges at start-up and exits when that fails. Pushes
    to a proxy are refused. `prefix` (`/PATH/`): serve the API at `/PATH/v2/` instead of
    `/v2/` (`http.prefix`), as a cache behind a path-routing ingress is; `api_url` is then
    where clients find it, and `push()` (skopeo takes no path) cannot reach it.
    """

    def __init__(self, *, tls: bool = False, auth: str | None = None,
                 users: dict[str, str] | None = None, anonymous_pull: bool = False,
                 token_ttl: int = 300, token_server: TokenServer | None = None,
                 realm: str | None = None, ready_timeout: float = 20.0,
                 proxy: str | None = None, prefix: str = ""):
        if auth not in (None, "htpasswd", "token"):
            raise ValueError(f"auth must be None, 'htpasswd' or 'token', not {auth!r}")
        if prefix and not (prefix.startswith("/") and prefix.endswith("/") and prefix != "/"):
            raise ValueError(f"prefix must be /PATH/ (distribution's http.prefix), not "
                             f"{prefix!r}")
        self.proxy = proxy
        self.prefix = prefix
        self.tls = tls
        self.auth = auth
        self.users = dict(users if users is not None else {"alice": "secret"})
        self.anonymous_pull = anonymous_pull
        self.token_ttl = token_ttl
        self.token_server = token_server
        self._own_token_server = token_server is None
        self._realm = realm
        self.ready_timeout = ready_timeout
        self.workdir: str | None = None
        self.tls_files: TLSFiles | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log: object | None = None

    # -- properties
    @property
    def host(self) -> str:
        assert self.port is not None, "registry not started"
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return ("https" if self.tls else "http") + "://" + self.host

    @property
    def api_url(self) -> str:
        """Where its API root `/v2/` hangs: `url`, plus the `prefix` when it has one."""
        return self.url + self.prefix.rstrip("/")

    @property
    def ca_file(self) -> str | None:
        return self.tls_files.ca_file if self.tls_files else None

    @property
    def cert_dir(self) -> str | None:
        """A directory with only `ca.crt` (for skopeo's --*-cert-dir / containers certs.d)."""
        return os.path.join(self.workdir, "certs.d") if self.tls_files and self.workdir else None

    @property
    def data_dir(self) -> str:
        assert self.workdir is not None
        return os.path.join(self.workdir, "storage")

    @property
    def log_file(self) -> str:
        assert self.workdir is not None
        return os.path.join(self.workdir, "registry.log")

    @property
    def realm(self) -> str | None:
        if self.auth != "token":
            return None
        if self._realm:
            return self._realm
        assert self.token_server is not None
        return self.token_server.realm

    @property
    def service(self) -> str | None:
        return self.token_server.service if self.token_server else None

    @property
    def token_requests(self) -> list[TokenRequest]:
        return self.token_server.requests if self.token_server else []

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl_context(self.ca_file) if self.tls else None

    def blob_path(self, digest: str) -> str:
        """Where the filesystem driver keeps a blob (to corrupt or delete it behind the
        registry's back)."""
        algo, _, hexd = digest.partition(":")
        return os.path.join(self.data_dir, "docker", "registry", "v2", "blobs", algo,
                            hexd[:2], hexd, "data")

    def holds_blob(self, repo: str, digest: str) -> bool:
        """Whether the registry serves `digest` in `repo` from its own storage: the blob and
        the repository's link to it, which the filesystem driver writes last (a pull-through
        proxy stores what it relayed in the background, after answering)."""
        algo, _, hexd = digest.partition(":")
        link = os.path.join(self.data_dir, "docker", "registry", "v2", "repositories", repo,
                            "_layers", algo, hexd, "link")
        return os.path.exists(link) and os.path.exists(self.blob_path(digest))

    def access_log(self) -> list[Access]:
        """The requests it logged, in order (distribution writes a combined-format access
        line to stdout whatever the log level). A line is written once its response is
        done, so a client can finish before its line appears: wait for it."""
        with open(self.log_file, "rb") as f:
            text = f.read().decode(errors="replace")
        return [Access(m[1], m[2], int(m[3]), m[4]) for m in _ACCESS.finditer(text)]

    # -- lifecycle
    def start(self) -> Registry:
        if self.proc is not None:
            return self
        try:
            self._prepare()
            for attempt in range(3):
                self.port = free_port()
                self._write_config()
                self._spawn()
                try:
                    self.wait_ready(self.ready_timeout)
                    return self
                except RuntimeError as e:
                    self._kill()
                    if "address already in use" in str(e) and attempt < 2:
                        continue
                    raise
            raise AssertionError("unreachable")
        except BaseException:
            self.stop()
            raise

    def _prepare(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="strata-registry-")
        os.makedirs(self.data_dir)
        if self.tls:
            self.tls_files = make_tls(os.path.join(self.workdir, "tls"))
            os.makedirs(self.cert_dir)
            shutil.copy(self.tls_files.ca_file, os.path.join(self.cert_dir, "ca.crt"))
        if self.auth == "htpasswd":
            path = os.path.join(self.workdir, "htpasswd")
            lines = [_run(["htpasswd", "-nbB", u, p]).decode().strip()
                     for u, p in self.users.items()]
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
        elif self.auth == "token":
            if self.token_server is None:
                self.token_server = TokenServer(
                    self.users, anonymous_pull=self.anonymous_pull, ttl=self.token_ttl,
                    tls=self.tls_files, workdir=os.path.join(self.workdir, "token"))
                os.makedirs(self.token_server.workdir)
            self.token_server.start()

    def _write_config(self) -> None:
        assert self.workdir is not None
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  formatter: text",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.data_dir}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.prefix:
            lines.append(f"  prefix: {self.prefix}")
        if self.tls_files:
            lines += ["  tls:",
                      f"    certificate: {self.tls_files.cert_file}",
                      f"    key: {self.tls_files.key_file}"]
        if self.auth == "htpasswd":
            lines += ["auth:", "  htpasswd:", "    realm: strata-test",
                      f"    path: {os.path.join(self.workdir, 'htpasswd')}"]
        elif self.auth == "token":
            assert self.token_server is not None
            lines += ["auth:", "  token:",
                      f"    realm: {self.realm}",
                      f"    service: {self.token_server.service}",
                      f"    issuer: {self.token_server.issuer}",
                      f"    rootcertbundle: {self.token_server.cert_file}"]
        if self.proxy:
            # distribution 2.8 asks `remoteurl/v2/` for its auth challenges once, at
            # start-up, and refuses to start when that fails: the origin must be up first.
            lines += ["proxy:", f"  remoteurl: {self.proxy}"]
        lines += ["health:", "  storagedriver:", "    enabled: false"]
        with open(os.path.join(self.workdir, "config.yml"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def _spawn(self) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry not found (apt-get install docker-registry)")
        self._log = open(self.log_file, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self.proc = subprocess.Popen(
            [binary, "serve", os.path.join(self.workdir, "config.yml")],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.workdir, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll GET /v2/ until it answers (401 counts as up); RuntimeError with the log tail
        if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}; "
                                   f"log tail:\n{_tail(self.log_file)}")
            try:
                status, _, _ = registry_get(self, "/v2/", timeout=2, base_url=self.api_url)
                if status in (200, 401):
                    return
                last = f"HTTP {status}"
            except (OSError, urllib.error.URLError) as e:
                last = e
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry not ready after {timeout}s ({last}); "
                                   f"log tail:\n{_tail(self.log_file)}")
            time.sleep(0.05)

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def stop(self) -> None:
        """Terminate the registry, stop an own token server, remove the temp dir.
        Idempotent; never raises for an already-dead process."""
        try:
            self._kill()
        finally:
            if self.token_server is not None and self._own_token_server:
                self.token_server.stop()
                self.token_server = None
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None
            self.tls_files = None

    def log_tail(self, n: int = 4000) -> str:
        return _tail(self.log_file, n) if self.workdir else ""

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- conveniences
    def token(self, scopes: list[str], user: str | None = "alice") -> str:
        """A valid token minted directly (no request recorded)."""
        assert self.token_server is not None, "not a token-auth registry"
        return self.token_server.issue(self.token_server.grant(user, scopes), user or "")


# -- HTTP helpers --------------------------------------------------------------------------
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def http_request(url: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                 data: bytes | None = None, ca_file: str | None = None,
                 context: ssl.SSLContext | None = None, follow_redirects: bool = True,
                 timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One request with urllib; HTTP errors are returned, not raised. Header names in the
    result are lower-cased (the last value wins; use `Registry.log_tail` for more)."""
    if context is None and url.startswith("https:"):
        context = ssl_context(ca_file)
    handlers: list = [urllib.request.HTTPSHandler(context=context)]
    if not follow_redirects:
        handlers.append(_NoRedirect())
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _basic(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def registry_get(registry: Registry, path: str, token: str | None = None,
                 creds: tuple[str, str] | None = None, *, method: str = "GET",
                 headers: dict[str, str] | None = None, data: bytes | None = None,
                 follow_redirects: bool = True, timeout: float = 30.0,
                 base_url: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """`(status, headers, body)` of one request to `registry` (or to `base_url`, e.g. a
    FaultProxy in front of it). `token` sends `Bearer`; `creds` sends Basic, or, on a token
    registry, first fetches a token for the repository in `path` (pull, or pull,push for
    writes) and sends that. Manifest paths get an Accept header for every manifest type
    unless one is given."""
    hdrs = dict(headers or {})
    if "/manifests/" in path and not any(k.lower() == "accept" for k in hdrs):
        hdrs["Accept"] = MANIFEST_ACCEPT
    if token is None and creds is not None and registry.auth == "token":
        scopes = []
        repo = _repo_of(path)
        if repo:
            actions = "pull" if method in ("GET", "HEAD") else "pull,push,delete"
            scopes.append(f"repository:{repo}:{actions}")
        token = get_token(registry, scopes, creds)
    if token is not None:
        hdrs["Authorization"] = "Bearer " + token
    elif creds is not None:
        hdrs["Authorization"] = _basic(creds)
    url = (base_url or registry.url) + path
    return http_request(url, method=method, headers=hdrs, data=data,
                        context=registry.ssl_context() if url.startswith("https:") else None,
                        follow_redirects=follow_redirects, timeout=timeout)


def _repo_of(path: str) -> str | None:
    """`/v2/NAME/(manifests|blobs|tags)/...` -> NAME."""
    p = urllib.parse.urlsplit(path).path
    if not p.startswith("/v2/"):
        return None
    parts = p[4:].split("/")
    for i, part in enumerate(parts):
        if part in ("manifests", "blobs", "tags") and i > 0:
            return "/".join(parts[:i])
    return None


def get_token(registry: Registry, scopes: list[str], creds: tuple[str, str] | None = None,
              realm: str | None = None) -> str:
    """Fetch a token from the realm over HTTP like a client would (recorded by the token
    server). Raises RuntimeError unless the answer is 200."""
    query = [("service", registry.service or "")] + [("scope", s) for s in scopes]
    url = (realm or registry.realm or "") + "?" + urllib.parse.urlencode(query)
    hdrs = {"Authorization": _basic(creds)} if creds else {}
    status, _, body = http_request(url, headers=hdrs, context=registry.ssl_context())
    if status != 200:
        raise RuntimeError(f"token request failed: HTTP {status}: {body[:200]!r}")
    return json.loads(body)["token"]


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = value.strip().partition(" ")
    params: dict[str, str] = {}
    i = 0
    while i < len(rest):
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip(" ,")
        i = eq + 1
        if i < len(rest) and rest[i] == '"':
            end = i + 1
            buf = []
            while end < len(rest) and rest[end] != '"':
                if rest[end] == "\\" and end + 1 < len(rest):
                    end += 1
                buf.append(rest[end])
                end += 1
            params[key.lower()] = "".join(buf)
            i = end + 1
        else:
            end = rest.find(",", i)
            end = len(rest) if end < 0 else end
            params[key.lower()] = rest[i:end].strip()
            i = end + 1
    return scheme.lower(), params


# -- pushing with skopeo -------------------------------------------------------------------
_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


def push(layout_dir: str, tag: str, registry: Registry, repo: str, dest_tag: str,
         creds: tuple[str, str] | None = None, format: str = "oci",
         timeout: float = 120.0) -> str:
    """Copy `oci:layout_dir:tag` to `registry`/`repo`:`dest_tag` with skopeo; returns the
    pushed manifest digest. With format="oci" (the layout's own type) skopeo copies manifest,
    config and (gzip/zstd/uncompressed) layer blobs byte for byte (`--preserve-digests`
    makes that a hard requirement), so the digest equals the one `write_image` returned.
    format="v2s2" converts the manifest to Docker schema 2 (new manifest digest; layer blobs
    are still copied unchanged; zstd layers cannot be converted and fail)."""
    if format not in ("oci", "v2s2"):
        raise ValueError(f"format must be 'oci' or 'v2s2', not {format!r}")
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise RuntimeError("skopeo not found (apt-get install skopeo)")
    with tempfile.TemporaryDirectory(prefix="strata-push-") as tmp:
        policy = os.path.join(tmp, "policy.json")
        with open(policy, "w") as f:
            json.dump(_POLICY, f)
        digestfile = os.path.join(tmp, "digest")
        argv = [skopeo, "--policy", policy, "--registries.d", tmp, "--tmpdir", tmp,
                "copy", "--quiet", "--retry-times", "0", "--digestfile", digestfile,
                "--format", format, "--dest-authfile", os.path.join(tmp, "auth.json")]
        if format == "oci":
            argv.append("--preserve-digests")
        if registry.tls:
            argv += ["--dest-tls-verify=true", "--dest-cert-dir", registry.cert_dir]
        else:
            argv.append("--dest-tls-verify=false")
        if creds is not None:
            argv += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
        else:
            argv.append("--dest-no-creds")
        argv += [f"oci:{layout_dir}:{tag}", f"docker://{registry.host}/{repo}:{dest_tag}"]
        env = dict(os.environ, REGISTRY_AUTH_FILE=os.path.join(tmp, "auth.json"))
        r = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, env=env,
                           timeout=timeout, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"skopeo copy failed ({r.returncode}):\n"
                               f"{r.stderr.decode(errors='replace')}\n"
                               f"registry log tail:\n{registry.log_tail()}")
        with open(digestfile) as f:
            return f.read().strip()


# -- raw uploads (for documents skopeo would not write: indexes, foreign configs) ----------
def upload_blob(registry: Registry, repo: str, data: bytes,
                creds: tuple[str, str] | None = None) -> str:
    """Push one blob with a monolithic upload (POST, then PUT ?digest=); returns its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, headers, body = registry_get(registry, f"/v2/{repo}/blobs/uploads/", creds=creds,
                                         method="POST", data=b"")
    if status != 202:
        raise RuntimeError(f"blob upload refused: HTTP {status}: {body[:200]!r}")
    u = urllib.parse.urlsplit(urllib.parse.urljoin(registry.url + "/", headers["location"]))
    query = "&".join(q for q in (u.query, urllib.parse.urlencode({"digest": digest})) if q)
    status, _, body = registry_get(registry, f"{u.path}?{query}", creds=creds, method="PUT",
                                   data=data,
                                   headers={"Content-Type": "application/octet-stream"})
    if status != 201:
        raise RuntimeError(f"blob upload refused: HTTP {status}: {body[:200]!r}")
    return digest


def put_manifest(registry: Registry, repo: str, reference: str, doc: dict,
                 creds: tuple[str, str] | None = None) -> tuple[str, bytes]:
    """PUT a manifest or index (its `mediaType` as Content-Type) under `reference`;
    returns (digest, the bytes sent)."""
    data = json.dumps(doc).encode()
    status, _, body = registry_get(registry, f"/v2/{repo}/manifests/{reference}", creds=creds,
                                   method="PUT", data=data,
                                   headers={"Content-Type": doc["mediaType"]})
    if status != 201:
        raise RuntimeError(f"manifest PUT refused: HTTP {status}: {body[:200]!r}")
    return "sha256:" + hashlib.sha256(data).hexdigest(), data
