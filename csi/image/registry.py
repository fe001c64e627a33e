"""A client for the OCI Distribution API (Docker Registry HTTP API v2).

Resolves a reference to an image (manifest, index → the node's platform, config DiffIDs)
and streams blobs, with the registry semantics a kubelet pull has: the WWW-Authenticate
challenge flow (anonymous or credentialed bearer tokens, scoped per repository and cached
until they expire; or basic auth), redirects of any request (registry.k8s.io sends its API
calls to another registry; blobs go to object storage) that never carry our credentials to
another host, `Range` resume of a cut download, and mirrors tried before the origin.
Connections, deadlines and retries are transport.Transport's. Every error names the image
and the registry's text.
"""

import base64
import dataclasses
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.parse
from typing import BinaryIO

from csi.digest import VerifyingReader, sha256_digest
from csi.errors import (
    DataLoss,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StrataError,
    Unavailable,
)
from csi.image import manifest as mf
from csi.image.auth import Credentials
from csi.image.reference import RegistryReference
from csi.image.transport import (
    MAX_REDIRECTS,
    REDIRECT_STATUS,
    RETRY_STATUS,
    USER_AGENT,
    Options,
    Reply,
    Transport,
    location,
    registry_error,
)

log = logging.getLogger(__name__)

ACCEPT = ", ".join([mf.OCI_INDEX, mf.OCI_MANIFEST, mf.DOCKER_LIST, mf.DOCKER_MANIFEST])
SCHEMA1 = {"application/vnd.docker.distribution.manifest.v1+json",
           "application/vnd.docker.distribution.manifest.v1+prettyjws"}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str  # HOST[:PORT], IPv6 bracketed
    mirror: bool = False

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}"


def _repository_in(path: str) -> str:
    """The repository an API path names (`/v2/NAME/manifests/REF`), or ""."""
    m = re.fullmatch(r"/v2/(.+)/(?:manifests|blobs)/[^/]+", urllib.parse.urlsplit(path).path)
    return m.group(1) if m else ""


@dataclasses.dataclass(frozen=True)
class _Hop:
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

    def redirect(self, to: str, what: str) -> "_Hop":
        scheme, host, target = location(self.scheme, self.host, self.target, to, what)
        if self.own and (scheme, host) == (self.scheme, self.host):
            return dataclasses.replace(self, target=target,
                                       repo=_repository_in(target) or self.repo)
        return _Hop(scheme, host, target, _repository_in(target) or self.repo, None, own=False)


def _basic(creds: Credentials) -> str:
    return base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


def _range_starts_at(content_range: str, offset: int) -> bool:
    """Whether a 206's `Content-Range: bytes START-END/TOTAL` starts at `offset`."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*", content_range, re.IGNORECASE)
    return m is not None and int(m.group(1)) == offset


class RegistryClient:
    def __init__(self, options: Options | None = None, *, clock=time.monotonic,
                 sleep=time.sleep, rng=random.random, on_bytes=None):
        self.options = options or Options()
        self.transport = Transport(self.options, clock, sleep, rng, on_bytes)
        self._clock = clock
        # Tokens by (scheme, host, scope, credentials), and the origins that asked for basic
        # auth. Pull threads share them: every access holds the lock.
        self._tokens: dict[tuple, tuple[str, float]] = {}
        self._basic_hosts: set[tuple[str, str]] = set()
        self._tokens_lock = threading.Lock()

    def endpoints(self, ref: RegistryReference) -> list[Endpoint]:
        out = []
        for registry, url in self.options.mirrors:
            if registry == ref.registry:
                u = urllib.parse.urlsplit(url if "://" in url else "https://" + url)
                out.append(Endpoint(u.scheme, u.netloc, mirror=True))
        host = ref.api_host
        out.append(Endpoint("http" if host in self.options.insecure else "https", host))
        return out

    @staticmethod
    def _token_key(hop: _Hop) -> tuple:
        return (hop.scheme, hop.host, f"repository:{hop.repo}:pull",
                hop.creds.fingerprint() if hop.creds else "")

    def _forget_token(self, hop: _Hop) -> None:
        with self._tokens_lock:
            self._tokens.pop(self._token_key(hop), None)

    def _auth_header(self, hop: _Hop) -> dict:
        with self._tokens_lock:
            token = self._tokens.get(self._token_key(hop))
            basic = (hop.scheme, hop.host) in self._basic_hosts
        if token and token[1] > self._clock():
            return {"Authorization": f"Bearer {token[0]}"}
        if hop.creds is not None and basic:
            return {"Authorization": f"Basic {_basic(hop.creds)}"}
        return {}

    def _authenticate(self, hop: _Hop, challenge: str, what: str) -> None:
        repo, creds = hop.repo, hop.creds
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if creds is None:
                raise PermissionDenied(f"{what}: {hop.host} requires credentials and no pull "
                                       "secret or node config has any for it")
            # Remember only that the host wants basic auth: each request sends its own
            # caller's credentials, never another pod's.
            with self._tokens_lock:
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
            reply = self._request(
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
            reply = self._request(realm.scheme, realm.netloc, "GET", target, headers,
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
        except (ValueError, KeyError, TypeError, AttributeError):
            raise Unavailable(f"{what}: the token service sent no token") from None
        now = self._clock()
        with self._tokens_lock:
            if len(self._tokens) > 256:  # keep the cache bounded: drop what has expired
                for k in [k for k, v in self._tokens.items() if v[1] <= now]:
                    del self._tokens[k]
            # Refresh a little early so a token never expires in flight.
            self._tokens[self._token_key(hop)] = (token, now + max(1.0, expires - 10))

    def _request(self, scheme, host, method, target, headers, what,
                 body: bytes | None = None) -> Reply:
        """A request to the token service, following redirects (a token service that
        moved): 301/302/303 turn a POST into a GET as every HTTP client does; our
        Authorization never goes to another host or scheme, nor does a form holding a
        refresh token."""
        origin = (scheme, host)
        for _ in range(MAX_REDIRECTS + 1):
            reply = self.transport.call(scheme, host, method, target, headers, what, body)
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

    def _registry_call(self, ep: Endpoint, method: str, path: str, repo: str,
                       creds: Credentials | None, what: str, headers=None) -> Reply:
        """A registry API call with authentication, following redirects; returns the last
        response."""
        hop = _Hop(ep.scheme, ep.host, path, repo, creds)
        authenticated: set[tuple[str, str]] = set()
        redirects = 0
        while True:
            h = {**(headers or {}), **self._auth_header(hop)}
            reply = self.transport.call(hop.scheme, hop.host, method, hop.target, h, what)
            challenge = reply.headers.get("WWW-Authenticate")
            if (reply.status == 401 and challenge
                    and (hop.scheme, hop.host) not in authenticated):
                # No credentials yet, or a cached token the registry no longer accepts
                # (revoked, rotated key, clock skew): authenticate afresh, once per host.
                self._forget_token(hop)
                self._authenticate(hop, challenge, what)
                authenticated.add((hop.scheme, hop.host))
                continue
            to = reply.headers.get("Location")
            if reply.status not in REDIRECT_STATUS or not to:
                return reply
            redirects += 1
            if redirects > MAX_REDIRECTS:
                raise Unavailable(f"{what}: more than {MAX_REDIRECTS} redirects")
            hop = hop.redirect(to, what)

    @staticmethod
    def _check(status: int, body: bytes, what: str) -> None:
        if status == 200:
            return
        text = registry_error(body)
        if status == 404:
            raise NotFound(f"{what}: not found: {text}")
        if status in (401, 403):
            raise PermissionDenied(f"{what}: access denied: {text}")
        if status == 400:
            raise InvalidArgument(f"{what}: {text}")
        raise Unavailable(f"{what}: HTTP {status}: {text}")

    # -- the API -----------------------------------------------------------------------
    def manifest(self, ep: Endpoint, ref: RegistryReference, reference: str,
                 creds: Credentials | None) -> tuple[str, str, bytes]:
        """(digest, media type, body) of a manifest or index, verified."""
        what = f"image {ref}: manifest {reference} from {ep}"
        reply = self._registry_call(
            ep, "GET", f"/v2/{ref.repository}/manifests/{reference}", ref.repository, creds,
            what, {"Accept": ACCEPT})
        body = reply.body
        self._check(reply.status, body, what)
        digest = sha256_digest(body)
        claimed = reply.headers.get("Docker-Content-Digest")
        if reference.startswith("sha256:") and digest != reference:
            raise DataLoss(f"{what}: content has digest {digest}, not the one asked for")
        if claimed and claimed.startswith("sha256:") and claimed != digest:
            raise DataLoss(f"{what}: content has digest {digest}, the registry says {claimed}")
        media = reply.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            doc_media = json.loads(body).get("mediaType", "")
            schema = json.loads(body).get("schemaVersion")
        except (ValueError, AttributeError):
            raise InvalidArgument(f"{what}: the manifest is not JSON") from None
        if media in SCHEMA1 or schema == 1:
            raise InvalidArgument(f"{what}: Docker schema 1 manifests are not supported; "
                                  "push the image as OCI or Docker schema 2")
        return digest, doc_media or media, body

    def blob_bytes(self, ep: Endpoint, ref: RegistryReference, desc: mf.Descriptor,
                   creds: Credentials | None, what: str) -> bytes:
        """A small blob (an image config), verified."""
        reply = self.transport.retrying(
            lambda: self._follow(ep, ref, desc.digest, desc.size, creds, what, 0, None), what)
        got = sha256_digest(reply.body)
        if got != desc.digest:
            raise DataLoss(f"{what}: digest mismatch: expected {desc.digest}, got {got}")
        return reply.body

    def _follow(self, ep, ref, digest, size, creds, what, offset, out):
        """GET a blob, following redirects to blob storage: into `out` from `offset`
        (streamed), or whole into the returned body when `out` is None; never more than
        `size` bytes. A retryable status is returned for the caller's retry loop; other
        failures raise."""
        hop = _Hop(ep.scheme, ep.host, f"/v2/{ref.repository}/blobs/{digest}",
                   ref.repository, creds)
        authenticated: set[tuple[str, str]] = set()
        redirects = 0
        while True:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            headers.update(self._auth_header(hop))
            resp = self.transport.open(hop.scheme, hop.host, "GET", hop.target, headers)
            try:
                challenge = resp.headers.get("WWW-Authenticate")
                if (resp.status == 401 and challenge
                        and (hop.scheme, hop.host) not in authenticated):
                    resp.error_body()
                    self._forget_token(hop)
                    self._authenticate(hop, challenge, what)
                    authenticated.add((hop.scheme, hop.host))
                    continue
                if resp.status in REDIRECT_STATUS and resp.headers.get("Location"):
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise Unavailable(f"{what}: more than {MAX_REDIRECTS} redirects")
                    # Blob storage gets a signed URL, never our registry credentials; nor
                    # does the registry itself over a downgraded scheme.
                    hop = hop.redirect(resp.headers["Location"], what)
                    resp.error_body()
                    continue
                if resp.status not in (200, 206):
                    body = resp.error_body()
                    if resp.status in RETRY_STATUS:
                        return Reply(resp.status, resp.headers, body)
                    self._check(resp.status, body, what)
                if out is None:
                    return Reply(resp.status, resp.headers,
                                 self.transport.read(resp, size, what))
                if offset and resp.status == 206 and not _range_starts_at(
                        resp.headers.get("Content-Range", ""), offset):
                    # Partial content, but not from where we asked (containerd refuses such
                    # an answer too): appending it would corrupt the blob. Ask for all of it.
                    log.info("%s: asked for bytes from %d, got Content-Range %r; starting "
                             "over", what, offset, resp.headers.get("Content-Range"))
                    out.seek(0)
                    out.truncate()
                    offset = 0
                    continue
                if resp.status == 200 and offset:
                    out.seek(0)
                    out.truncate()  # the server ignored Range: start over
                    offset = 0
                self.transport.read(resp, size - offset, what, out)
                return Reply(resp.status, resp.headers, b"")
            finally:
                resp.close()

    def fetch_blob(self, ep: Endpoint, ref: RegistryReference, digest: str, size: int,
                   creds: Credentials | None, offset: int, out: BinaryIO) -> None:
        """Append blob bytes from `offset` to `out`, resuming with Range after a cut."""
        what = f"image {ref}: blob {digest} from {ep}"

        def once() -> Reply:
            reply = self._follow(ep, ref, digest, size, creds, what, out.tell(), out)
            if reply.status not in RETRY_STATUS and out.tell() < size:
                raise http.client.IncompleteRead(b"", size - out.tell())
            return reply

        self.transport.retrying(once, what)

    def head_digest(self, ref: RegistryReference, creds_for) -> str | None:
        """What the tag points at now, from a HEAD request (no manifest body, no config);
        None when no endpoint says (the caller then resolves in full)."""
        for ep in self.endpoints(ref):
            creds = creds_for(ep.host if ep.mirror else ref.registry, ref.repository)
            what = f"image {ref}: HEAD manifest {ref.reference} from {ep}"
            try:
                reply = self._registry_call(
                    ep, "HEAD", f"/v2/{ref.repository}/manifests/{ref.reference}",
                    ref.repository, creds, what, {"Accept": ACCEPT})
            except StrataError as e:
                log.info("%s: %s", what, e)
                continue
            ok = reply.status == 200
            digest = reply.headers.get("Docker-Content-Digest", "") if ok else ""
            if ok and not digest and ref.digest:
                digest = ref.digest  # by digest, a 200 is the answer: the header is optional
            if digest.startswith("sha256:"):
                return digest
        return None

    # -- resolving an image ------------------------------------------------------------
    def resolve(self, ref: RegistryReference, creds_for) -> tuple[mf.Image, "RegistrySource"]:
        """Resolve on the first endpoint that has the image: mirrors, then the origin. The
        source may fetch blobs from that endpoint and, should it fail, the later ones."""
        candidates = [(ep, creds_for(ep.host if ep.mirror else ref.registry, ref.repository))
                      for ep in self.endpoints(ref)]
        for i, (ep, creds) in enumerate(candidates):
            try:
                image = self._resolve_at(ep, ref, creds)
            except StrataError as e:
                if not ep.mirror:
                    raise
                log.warning("mirror %s failed for %s (%s); trying the next endpoint", ep,
                            ref, e)
                continue
            return image, RegistrySource(self, ref, candidates[i:])
        raise AssertionError("unreachable: the origin is always the last endpoint")

    def _resolve_at(self, ep: Endpoint, ref: RegistryReference,
                    creds: Credentials | None) -> mf.Image:
        digest, media, body = self.manifest(ep, ref, ref.reference, creds)
        image = self._narrow(ep, ref, creds, digest, media, body, depth=0, check=False)
        if image is None:
            raise mf.no_platform(f"image {ref}")
        return dataclasses.replace(
            image, index_digest=digest if digest != image.manifest_digest else "")

    def _narrow(self, ep: Endpoint, ref: RegistryReference, creds: Credentials | None,
                digest: str, media: str, body: bytes, depth: int,
                check: bool) -> mf.Image | None:
        """The image a manifest describes, an index narrowed to the node's platform (best
        entry first); None when nothing in it is for the node. `check`: the manifest came
        from an index entry naming no platform, so its config must say it is for the node
        (containerd's images.Manifest does the same)."""
        if media in mf.INDEX_TYPES or "manifests" in json.loads(body):
            if depth >= 4:
                raise InvalidArgument(f"image {ref}: indexes nested more than 4 deep")
            entries = mf.parse_index(body, f"image {ref} index {digest}")
            for entry in mf.platform_candidates(entries):
                d, m, b = self.manifest(ep, ref, entry.digest, creds)
                image = self._narrow(ep, ref, creds, d, m, b, depth + 1,
                                     check=entry.platform == ("", "", ""))
                if image is not None:
                    return image
            return None
        config_desc, layers = mf.parse_manifest(body, f"image {ref} manifest {digest}")
        config = self.blob_bytes(ep, ref, config_desc, creds,
                                 f"image {ref}: config {config_desc.digest}")
        if check:
            plat = mf.config_platform(config, f"image {ref} config")
            if not mf.runs_on(plat):
                log.info("image %s: index entry %s names no platform and its config says "
                         "%s; skipped", ref, digest, "/".join(p for p in plat if p) or "none")
                return None
        diff_ids = mf.parse_config_diff_ids(config, f"image {ref} config")
        if len(diff_ids) != len(layers):
            raise InvalidArgument(f"image {ref}: {len(layers)} layers but {len(diff_ids)} "
                                  "diff_ids in the config")
        return mf.Image(
            name=str(ref), manifest_digest=digest, config_digest=config_desc.digest,
            layers=tuple(mf.LayerDesc(d.digest, d.media_type, d.size, diff)
                         for d, diff in zip(layers, diff_ids, strict=True)))


class RegistrySource:
    """Blobs of one resolved image, downloaded into a blob store on first use, from the
    endpoint that resolved it or, failing that, the ones after it (a mirror's origin)."""

    def __init__(self, client: RegistryClient, ref: RegistryReference,
                 candidates: list[tuple[Endpoint, Credentials | None]]):
        self.client, self.ref, self.candidates = client, ref, candidates
        self.blobs = None  # a BlobStore, set by whoever uses the source

    def open_blob(self, layer: mf.LayerDesc) -> VerifyingReader:
        def fetch(offset: int, out: BinaryIO) -> None:
            for i, (ep, creds) in enumerate(self.candidates):
                try:
                    self.client.fetch_blob(ep, self.ref, layer.digest, layer.size, creds,
                                           out.tell(), out)
                    return
                except (DataLoss, ResourceExhausted, Internal):
                    raise
                except StrataError as e:
                    if i == len(self.candidates) - 1:
                        raise
                    log.warning("%s: %s; trying %s", ep, e, self.candidates[i + 1][0])

        path = self.blobs.get(layer.digest, layer.size, fetch,
                              f"image {self.ref}: layer {layer.digest}")

        f = open(path, "rb")

        def evict():
            # Verified when it was stored, so it rotted since (a crash before the data
            # reached the disk): drop it, and the next attempt downloads it again. Only
            # the file we read: another process may have just put a good one in its place.
            log.warning("image %s: cached blob %s is corrupt; removing it", self.ref,
                        layer.digest)
            self.blobs.remove(layer.digest, inode=os.fstat(f.fileno()).st_ino)

        return VerifyingReader(f, layer.digest, layer.size,
                               f"image {self.ref}: layer {layer.digest}", on_mismatch=evict)
