"""What a registry request may carry, and to whom: the WWW-Authenticate challenge flow.

A Bearer challenge is answered with a token from the realm it names: fetched with the pull
secret's basic credentials (or anonymously), or for an identity token exchanged by POST as
an OAuth2 refresh token. Tokens are cached by (scheme, host, scope, credentials) until a
little before they expire, by the injected monotonic clock. A Basic challenge makes the
host remembered as one that takes each caller's own basic credentials.

`Authenticator.follow` is the one loop every registry request goes through, API call or
blob: answer a challenge (once per host), follow redirects, and never let credentials
follow a redirect to another host or scheme (`Hop`).
"""

import base64
import dataclasses
import json
import re
import threading
import time
import urllib.parse

from csi.errors import PermissionDenied, Unavailable
from csi.image.auth import Credentials
from csi.image.transport import (
    MAX_REDIRECTS,
    REDIRECT_STATUS,
    USER_AGENT,
    Reply,
    Response,
    Transport,
    location,
    registry_error,
)

MAX_TOKENS = 256  # past this, expired tokens are dropped from the cache
EARLY = 10.0  # seconds before its expiry a token is fetched afresh, so none expires in flight


def _repository_in(path: str) -> str:
    """The repository an API path names (`/v2/NAME/manifests/REF`), or ""."""
    m = re.fullmatch(r"/v2/(.+)/(?:manifests|blobs)/[^/]+", urllib.parse.urlsplit(path).path)
    return m.group(1) if m else ""


@dataclasses.dataclass(frozen=True)
class Hop:
    """Where a registry call has got to through redirects, and what it may present there.
    At the endpoint itself: the caller's credentials and repository. Anywhere else (another
    host, or the endpoint over another scheme): no credentials of ours, ever; a host that
    challenges gets an anonymous token for the repository its own URL names, as containerd
    does (the CRI plugin hands a pull secret only to the host it was matched to), e.g.
    registry.k8s.io → `REGION-docker.pkg.dev/v2/k8s-artifacts-prod/images/NAME`."""

    scheme: str
    host: str
    target: str  # path and query
    repo: str
    creds: Credentials | None
    own: bool = True

    def redirect(self, to: str, what: str) -> "Hop":
        scheme, host, target = location(self.scheme, self.host, self.target, to, what)
        if self.own and (scheme, host) == (self.scheme, self.host):
            return dataclasses.replace(self, target=target,
                                       repo=_repository_in(target) or self.repo)
        return Hop(scheme, host, target, _repository_in(target) or self.repo, None, own=False)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


def _basic(creds: Credentials) -> str:
    return base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


class Authenticator:
    def __init__(self, transport: Transport, clock=time.monotonic):
        self._transport = transport
        self._clock = clock
        # Tokens by (scheme, host, scope, credentials), and the origins that asked for basic
        # auth. Pull threads share them: every access holds the lock.
        self._tokens: dict[tuple, tuple[str, float]] = {}
        self._basic_hosts: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def follow(self, hop: Hop, what: str, send) -> Reply | Response:
        """`send(hop, authorization headers)` makes one request (a Reply or an open
        Response); this calls it until the answer is neither a challenge it may still
        answer nor a redirect, and returns that answer for the caller to close."""
        authenticated: set[tuple[str, str]] = set()
        redirects = 0
        while True:
            resp = send(hop, self._header(hop))
            try:
                challenge = resp.headers.get("WWW-Authenticate")
                if (resp.status == 401 and challenge
                        and (hop.scheme, hop.host) not in authenticated):
                    # No credentials yet, or a cached token the registry no longer accepts
                    # (revoked, rotated key, clock skew): authenticate afresh, once per host.
                    resp.discard()
                    self._forget(hop)
                    self._authenticate(hop, challenge, what)
                    authenticated.add((hop.scheme, hop.host))
                    continue
                to = resp.headers.get("Location")
                if resp.status not in REDIRECT_STATUS or not to:
                    return resp
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise Unavailable(f"{what}: more than {MAX_REDIRECTS} redirects")
                # Blob storage gets a signed URL, never our registry credentials; nor does
                # the registry itself over a downgraded scheme.
                hop = hop.redirect(to, what)
                resp.discard()
            except BaseException:
                resp.close()
                raise

    @staticmethod
    def _key(hop: Hop) -> tuple:
        return (hop.scheme, hop.host, f"repository:{hop.repo}:pull",
                hop.creds.fingerprint() if hop.creds else "")

    def _forget(self, hop: Hop) -> None:
        with self._lock:
            self._tokens.pop(self._key(hop), None)

    def _header(self, hop: Hop) -> dict:
        with self._lock:
            token = self._tokens.get(self._key(hop))
            basic = (hop.scheme, hop.host) in self._basic_hosts
        if token and token[1] > self._clock():
            return {"Authorization": f"Bearer {token[0]}"}
        if hop.creds is not None and basic:
            return {"Authorization": f"Basic {_basic(hop.creds)}"}
        return {}

    def _authenticate(self, hop: Hop, challenge: str, what: str) -> None:
        repo, creds = hop.repo, hop.creds
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if creds is None:
                raise PermissionDenied(f"{what}: {hop.host} requires credentials and no pull "
                                       "secret or node config has any for it")
            # Remember only that the host wants basic auth: each request sends its own
            # caller's credentials, never another pod's.
            with self._lock:
                self._basic_hosts.add((hop.scheme, hop.host))
            return
        if scheme != "bearer" or "realm" not in params:
            raise PermissionDenied(f"{what}: unsupported authentication challenge {challenge!r}")
        # Our repository, plus the pull scopes the challenge names (containerd asks for both):
        # a registry we were redirected to may call the repository something else.
        scopes = [f"repository:{repo}:pull"]
        scopes += [x for x in params.get("scope", "").split()
                   if x not in scopes and re.fullmatch(r"repository:[^:\s]+:pull", x)]
        service = [("service", params["service"])] if params.get("service") else []
        realm = urllib.parse.urlsplit(params["realm"])
        if creds is not None and creds.identity_token:
            # An identity token (docker config's `identitytoken`, what `docker login` keeps
            # for OAuth registries such as ACR) is an OAuth2 refresh token: exchange it by
            # POST, as docker and containerd do; the password grant is never tried with it.
            form = urllib.parse.urlencode([("scope", " ".join(scopes)), *service,
                                           ("grant_type", "refresh_token"),
                                           ("refresh_token", creds.identity_token),
                                           ("client_id", USER_AGENT)]).encode()
            reply = self._token_request(
                realm.scheme, realm.netloc, "POST",
                (realm.path or "/") + (f"?{realm.query}" if realm.query else ""),
                {"Content-Type": "application/x-www-form-urlencoded"},
                f"{what}: token from {realm.netloc}", body=form)
        else:
            headers = {}
            if creds is not None:
                headers["Authorization"] = f"Basic {_basic(creds)}"
            target = (realm.path or "/") + "?" + "&".join(
                q for q in (realm.query, urllib.parse.urlencode(
                    [*(("scope", x) for x in scopes), *service])) if q)
            reply = self._token_request(realm.scheme, realm.netloc, "GET", target, headers,
                                        f"{what}: token from {realm.netloc}")
        if reply.status in (401, 403):
            raise PermissionDenied(f"{what}: the token service refused "
                                   f"{'our credentials' if creds else 'anonymous access'}: "
                                   f"{registry_error(reply.body)}")
        if reply.status != 200:
            raise Unavailable(f"{what}: token service answered {reply.status}: "
                              f"{registry_error(reply.body)}")
        try:
            doc = json.loads(reply.body)
            token = doc.get("token") or doc["access_token"]
            expires = float(doc.get("expires_in") or 60)
            if not isinstance(token, str) or not token:
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise Unavailable(f"{what}: the token service sent no token") from None
        now = self._clock()
        with self._lock:
            if len(self._tokens) > MAX_TOKENS:
                for k in [k for k, v in self._tokens.items() if v[1] <= now]:
                    del self._tokens[k]
            self._tokens[self._key(hop)] = (token, now + max(1.0, expires - EARLY))

    def _token_request(self, scheme, host, method, target, headers, what,
                       body: bytes | None = None) -> Reply:
        """A request to the token service, following redirects (a token service that
        moved): 301/302/303 turn a POST into a GET as every HTTP client does; our
        Authorization never goes to another host or scheme, nor does a form holding a
        refresh token."""
        origin = (scheme, host)
        for _ in range(MAX_REDIRECTS + 1):
            reply = self._transport.call(scheme, host, method, target, headers, what, body)
            to = reply.headers.get("Location")
            if reply.status not in REDIRECT_STATUS or not to:
                return reply
            scheme, host, target = location(scheme, host, target, to, what)
            if reply.status in (301, 302, 303) and method == "POST":
                method, body = "GET", None
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            if (scheme, host) != origin:
                if body is not None:
                    raise Unavailable(f"{what}: the token service redirected our credentials "
                                      f"to {scheme}://{host}; not followed")
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise Unavailable(f"{what}: more than {MAX_REDIRECTS} redirects")
