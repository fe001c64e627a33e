"""How strata speaks HTTP to registries: connections (TLS verified against the system CAs
plus `--registry-ca`, or plain HTTP), bodies read under a wall-clock deadline at a minimum
rate, retries with exponential backoff and jitter on 429, 5xx and dropped connections
(honouring Retry-After), and where a redirect points. It knows neither credentials
(tokens.py) nor the Distribution API (registry.py).

The monotonic clock, `sleep` and the jitter's random source are constructor arguments, so
a test decides how much time passes instead of waiting for it.
"""

import dataclasses
import email.message
import email.utils
import http.client
import json
import logging
import random
import ssl
import time
import urllib.parse
from typing import BinaryIO

from csi.errors import DataLoss, Internal, InvalidArgument, Unavailable, is_no_space, no_space
from csi.image.manifest import MAX_MANIFEST_BYTES

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}
REDIRECT_STATUS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 10  # Go's http.Client default, which containerd and docker use
CHUNK = 1 << 20
ERROR_BODY = 64 << 10  # of a response that is not the content: enough for its message
USER_AGENT = "strata-csi"


@dataclasses.dataclass(frozen=True)
class Options:
    ca_files: tuple[str, ...] = ()
    insecure: frozenset[str] = frozenset()  # HOST:PORT served over plain HTTP
    # (registry, mirror URL), tried in order; registry.mirror_endpoint reads the URL
    mirrors: tuple[tuple[str, str], ...] = ()
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 4
    backoff: float = 0.5
    backoff_max: float = 10.0
    # A transfer slower than this fails (and is retried, resuming): a registry that trickles
    # a byte every few seconds would otherwise never trip the per-read timeout.
    min_rate: float = 64 * 1024  # bytes per second


@dataclasses.dataclass(frozen=True)
class Reply:
    """A response read whole. Its headers stay a Message: Go registries send
    "Www-Authenticate", and lookups must ignore case."""

    status: int
    headers: email.message.Message
    body: bytes

    def discard(self) -> None:
        pass

    def close(self) -> None:
        pass


class Response:
    """A response whose body is still on the wire: `Transport.read` it, or take its
    `error_body()` when the status says it is not the content."""

    def __init__(self, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse):
        self._conn, self.raw = conn, raw
        self.status, self.headers = raw.status, raw.headers

    def error_body(self) -> bytes:
        return self.raw.read(ERROR_BODY)

    def discard(self) -> None:
        """Done with a challenge or a redirect: what little body it has, then the socket."""
        try:
            self.raw.read(ERROR_BODY)
        finally:
            self.close()

    def close(self) -> None:
        self.raw.close()  # a response cut short still holds the socket
        self._conn.close()

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Retry(Exception):
    def __init__(self, why: str, delay: float | None = None):
        super().__init__(why)
        self.delay = delay


def location(scheme: str, host: str, target: str, to: str, what: str) -> tuple[str, str, str]:
    """Where a redirect from scheme://host/target to `to` goes: (scheme, host, path?query)."""
    u = urllib.parse.urlsplit(urllib.parse.urljoin(f"{scheme}://{host}{target}", to))
    if u.scheme not in ("http", "https") or not u.netloc:
        raise Unavailable(f"{what}: redirected to an unusable location {to!r}")
    return u.scheme, u.netloc, (u.path or "/") + (f"?{u.query}" if u.query else "")


def registry_error(body: bytes) -> str:
    """The registry's own error text (distribution's {"errors": [{code, message}]})."""
    try:
        errors = json.loads(body).get("errors") or []
        text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                         for e in errors)
    except Exception:  # anything malformed: fall back to the raw text
        text = ""
    return text or body[:200].decode("utf-8", "replace").strip()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:  # an HTTP-date is wall-clock time, not the monotonic clock's
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Transport:
    def __init__(self, options: Options | None = None, clock=time.monotonic, sleep=time.sleep,
                 rng=random.random, on_bytes=None):
        self.options = options or Options()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._on_bytes = on_bytes or (lambda n: None)
        self._ssl: ssl.SSLContext | None = None

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            for ca in self.options.ca_files:
                ctx.load_verify_locations(cafile=ca)
            self._ssl = ctx
        return self._ssl

    def open(self, scheme: str, host: str, method: str, target: str, headers: dict,
             body: bytes | None = None) -> Response:
        """One request, without retries; the caller reads and closes the response."""
        u = urllib.parse.urlsplit(f"//{host}")
        port = u.port
        hostname = u.hostname or host
        if scheme == "https":
            conn = http.client.HTTPSConnection(hostname, port, context=self._context(),
                                               timeout=self.options.connect_timeout)
        else:
            conn = http.client.HTTPConnection(hostname, port,
                                              timeout=self.options.connect_timeout)
        try:
            conn.connect()
            conn.sock.settimeout(self.options.read_timeout)
            conn.request(method, target, body=body,
                         headers={"User-Agent": USER_AGENT, **headers})
            return Response(conn, conn.getresponse())
        except BaseException:
            conn.close()
            raise

    def read(self, resp: Response, limit: int, what: str, out: BinaryIO | None = None,
             too_large=None) -> bytes:
        """The body, read as it arrives under a wall-clock deadline (read timeout plus
        `limit` at the minimum rate). Streamed into `out` when given. More than `limit`
        bytes is DataLoss (a blob longer than its descriptor), or `too_large` when given
        (a manifest over the size strata accepts)."""
        def oversize(got: str) -> Exception:
            if too_large is None:
                return DataLoss(f"{what}: {got} than the {limit} bytes expected; discarded")
            return too_large(f"{what}: larger than {limit} bytes, the most strata accepts "
                             "for a manifest")

        raw = resp.raw
        if raw.length is not None and raw.length > limit:
            raise oversize(f"Content-Length {raw.length}, more")
        expected = min(limit, raw.length) if raw.length is not None else limit
        deadline = self._clock() + self.options.read_timeout + expected / self.options.min_rate
        chunks, got = [], 0
        while chunk := raw.read1(CHUNK):
            got += len(chunk)
            if got > limit:
                raise oversize("more")
            if out is None:
                chunks.append(chunk)
            else:
                try:
                    out.write(chunk)
                except OSError as e:  # the store, not the network: no retry, no UNAVAILABLE
                    if is_no_space(e):
                        raise no_space(what) from e
                    raise Internal(f"{what}: cannot write to the store: {e}") from e
                self._on_bytes(len(chunk))
            if self._clock() > deadline:
                raise TimeoutError(f"transfer slower than {self.options.min_rate:.0f} bytes/s")
        if raw.length:  # the connection closed before Content-Length bytes came
            raise http.client.IncompleteRead(b"", raw.length)
        return b"".join(chunks)

    def call(self, scheme: str, host: str, method: str, target: str, headers: dict, what: str,
             body: bytes | None = None, retries: int | None = None) -> Reply:
        """One request with retries (`retries`, else the options'), its whole body read.
        For tokens and manifests: a body over the manifest limit is refused as
        INVALID_ARGUMENT (it is not corrupt, only more than strata accepts, as containerd
        refuses manifests over 4 MiB)."""
        def once() -> Reply:
            with self.open(scheme, host, method, target, headers, body) as resp:
                data = self.read(resp, MAX_MANIFEST_BYTES, what, too_large=InvalidArgument)
                return Reply(resp.status, resp.headers, data)

        return self.retrying(once, what, host, retries)

    def _backoff(self, attempt: int, hint: float | None) -> float:
        if hint is not None:
            return min(hint, self.options.backoff_max * 6)
        base = min(self.options.backoff_max, self.options.backoff * (2 ** attempt))
        return base * (0.5 + self._rng())  # jitter: 0.5x-1.5x

    def retrying(self, fn, what: str, host: str = "", retries: int | None = None) -> Reply:
        """fn() again after a retryable status or a failed connection, at most `retries`
        (else the options') more times; UNAVAILABLE with the last reason once they are
        spent. What no retry can mend fails at once, saying what to do: a certificate not
        trusted, a registry that speaks plain HTTP (`host`, when given, is the one the hint
        names)."""
        retries = self.options.retries if retries is None else retries
        last = ""
        for attempt in range(retries + 1):
            try:
                reply = fn()
                if reply.status in RETRY_STATUS:
                    raise _Retry(f"HTTP {reply.status}: {registry_error(reply.body)}",
                                 _retry_after(reply.headers.get("Retry-After")))
                return reply
            except _Retry as e:
                last, hint = str(e), e.delay
            except (OSError, http.client.HTTPException) as e:
                if isinstance(e, ssl.SSLCertVerificationError):
                    raise Unavailable(f"{what}: TLS verification failed: {e.verify_message}; "
                                      "add the registry's CA with --registry-ca") from None
                if advice := _plain_http(e, host):
                    raise Unavailable(f"{what}: {advice}") from None
                if is_no_space(e):
                    raise no_space(what) from e
                last, hint = f"{type(e).__name__}: {e}", None
            except ValueError as e:  # e.g. a redirect to a URL with a malformed port
                raise Unavailable(f"{what}: malformed response: {e}") from None
            if attempt < retries:
                delay = self._backoff(attempt, hint)
                # `retry_in` marks the record as a retry (`strata pull` shows it as one)
                log.info("%s: %s; retrying in %.1fs", what, last, delay,
                         extra={"attempt": attempt + 1, "retry_in": round(delay, 3)})
                self._sleep(delay)
        n = retries + 1
        raise Unavailable(f"{what}: {last} (after {n} attempt{'s' if n > 1 else ''})")


# What OpenSSL says when the answer to our ClientHello is not TLS but plain HTTP ("HTTP/1.1
# 400 …" read as a TLS record): a wrong version number (3.0, 3.1), a record layer failure
# (later releases), an unknown protocol (1.x). No retry can mend it.
PLAIN_HTTP_REASONS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL"}


def _plain_http(e: BaseException, host: str) -> str:
    """What to do when a TLS handshake met a plain-HTTP registry; "" for any other error."""
    if not isinstance(e, ssl.SSLError):
        return ""
    text = str(e).lower()
    if e.reason not in PLAIN_HTTP_REASONS and "record layer failure" not in text \
            and "wrong version number" not in text:
        return ""
    return (f"{f'registry {host}' if host else 'the registry'} answered plain HTTP to "
            f"HTTPS ({e.reason or e}): add --insecure-registry {host or 'HOST:PORT'} (or "
            "STRATA_INSECURE_REGISTRY, or insecure-registry in the config file); for a "
            "mirror, write its URL with http://")
