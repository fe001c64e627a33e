"""The OCI Distribution API (Docker Registry HTTP API v2): what strata asks a registry.

A reference resolves to an image (manifest.resolve: manifest, index → the node's platform,
config DiffIDs) on the first endpoint that has it: mirrors, then the origin. A mirror is read
as containerd reads a hosts.toml `[host."URL"]` (`mirror_endpoint`): its API root is the URL's
path + `/v2`, and every request to it names the origin registry in `?ns=`. Manifests are
digest-checked and Docker schema 1 refused; blobs stream into the blob store (and from it,
as they arrive, into the unpacker) with `Range` resume of a cut download, from the endpoint
that resolved the image or, failing that, the ones after it; a HEAD tells what a tag points
at now. Every request goes through tokens.Authenticator (challenges, redirects, which
credentials go where) over transport.Transport (connections, deadlines, retries: the
origin's only, as a mirror gets one attempt per request before the next endpoint is
tried). Every error names the image and the registry's text.

`creds_for(host, repository)` says what a pull may present to a host: one Credentials or
None (a Keyring's lookup), or several in order of preference (a CredentialChain's); as
the kubelet does, each is tried in turn until the registry serves the image: the next
after a refusal (401/403) or a 404 (NEXT_CREDENTIALS), not after a failure of the
registry itself.
"""

import dataclasses
import http.client
import json
import logging
import posixpath
import random
import re
import time
import urllib.parse
from typing import BinaryIO, Protocol

from csi.digest import sha256_digest
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
from csi.image.credprovider import CredentialProviders
from csi.image.reference import DOCKER_HUB, DOCKER_HUB_API, RegistryReference
from csi.image.tokens import Authenticator, Hop
from csi.image.transport import RETRY_STATUS, Options, Reply, Transport, registry_error

log = logging.getLogger(__name__)

API_ROOT = "/v2"  # where the Distribution API hangs on a registry's host
ACCEPT = ", ".join([mf.OCI_INDEX, mf.OCI_MANIFEST, mf.DOCKER_LIST, mf.DOCKER_MANIFEST])
SCHEMA1 = {"application/vnd.docker.distribution.manifest.v1+json",
           "application/vnd.docker.distribution.manifest.v1+prettyjws"}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where a registry's Distribution API is served: the origin at `/v2`, or a mirror at
    its `root` (PATH/v2), asked on behalf of the origin registry `ns`."""

    scheme: str
    host: str  # HOST[:PORT], IPv6 bracketed
    mirror: bool = False
    root: str = API_ROOT  # the API root's path, never ending in "/"
    ns: str = ""  # the `?ns=` every request carries: the registry a mirror stands in for

    def target(self, api_path: str) -> str:
        """The request target of an API path as the spec writes it (`/v2/NAME/blobs/D`):
        moved under this endpoint's root, with its `ns` query added to any the path has."""
        if not (api_path == API_ROOT or api_path.startswith(API_ROOT + "/")):
            raise ValueError(f"not a Distribution API path: {api_path!r}")
        target = self.root + api_path[len(API_ROOT):]
        if self.ns:
            target += ("&" if "?" in target else "?") + urllib.parse.urlencode({"ns": self.ns})
        return target

    def __str__(self) -> str:
        prefix = self.root[:-len(API_ROOT)] if self.root.endswith(API_ROOT) else self.root
        return f"{self.scheme}://{self.host}{prefix}"


def mirror_endpoint(registry: str, url: str) -> Endpoint:
    """The endpoint of `--registry-mirror REGISTRY=URL`, as containerd reads the same URL in
    a hosts.toml `[host."URL"]` (remotes/docker/config/hosts.go): https unless a scheme is
    given; the API root is the URL's path, cleaned, + `/v2`, or the path as it is when it
    already ends in `/v2`. Requests carry `?ns=REGISTRY` (containerd's `addNamespace`: a
    P2P mirror such as Spegel or Dragonfly serves many registries on one address and tells
    them apart by it), except where the mirror is the registry's own host. ValueError
    says why a URL is refused."""
    u = urllib.parse.urlsplit(url if "://" in url else "https://" + url)
    if u.scheme not in ("http", "https"):
        raise ValueError(f"the scheme must be http or https, not {u.scheme!r}")
    u.port  # noqa: B018 - a ValueError for a port that is no number or out of range
    if not u.hostname:
        raise ValueError("no host")
    if u.username is not None or u.query or u.fragment or "?" in url or "#" in url:
        # Credentials for a mirror are looked up by its host, as for any registry.
        raise ValueError("a mirror URL has no user, query or fragment")
    if any(c.isspace() or not c.isprintable() for c in u.path):
        raise ValueError("the path holds whitespace or control characters")
    # Go's path.Clean, which containerd applies: no "//", ".", ".." or trailing "/".
    path = "/" + posixpath.normpath("/" + u.path).lstrip("/") if u.path else ""
    path = path.rstrip("/")
    if not path.endswith(API_ROOT):
        if f"{API_ROOT}/" in path + "/":
            # containerd would call /PATH/v2/x/v2; what was meant is its override_path
            # (a Harbor proxy project's /v2/PROJECT), which strata does not have.
            raise ValueError(f"{API_ROOT} inside the path: the API root is the path + "
                             f"{API_ROOT} (give the path before {API_ROOT}, or one ending in "
                             f"it)")
        path += API_ROOT
    # containerd's RegistryHost.isProxy: docker.io's own API host is no mirror of it.
    own = u.netloc == registry or (registry == DOCKER_HUB and u.netloc == DOCKER_HUB_API)
    return Endpoint(u.scheme, u.netloc, mirror=True, root=path, ns="" if own else registry)


@dataclasses.dataclass(frozen=True)
class ClientOptions(Options):
    """The transport's options, and the kubelet credential-provider plugins whose answers
    pulls present besides the pull secrets (credprovider.py)."""

    credential_providers: CredentialProviders | None = dataclasses.field(default=None,
                                                                         compare=False)


def offers(creds_for, host: str, repository: str) -> list[Credentials | None]:
    """What `creds_for` offers for `host`, in order; [None] (anonymous) when nothing."""
    found = creds_for(host, repository)
    if found is None or isinstance(found, Credentials):
        return [found]
    return list(found) or [None]


# What makes a pull try its next credentials: a refusal, or a 404, which a registry may
# answer to credentials that may not see a private repository rather than reveal that it
# exists (the kubelet moves on after any failed pull). Anything else is the registry's own
# trouble (unreachable, 5xx after the retries), which other credentials would meet too.
NEXT_CREDENTIALS = (PermissionDenied, NotFound)


def _all_failed(errors: list[StrataError]) -> StrataError:
    """The first credentials' error (the kubelet's order), saying how the others fared."""
    first = errors[0]
    if len(errors) < 2:
        return first
    how = " or ".join(sorted({"refused" if isinstance(e, PermissionDenied) else "not found"
                              for e in errors[1:]}))
    return type(first)(f"{first} (and the {len(errors) - 1} other credentials for it: {how})")


class Blobs(Protocol):
    """The blob store a source downloads into (csi.store.blobs.BlobStore): `open` streams
    a blob as it downloads, verified by its last read."""

    def open(self, digest: str, size: int, fetch, what: str) -> BinaryIO: ...

    def remove(self, digest: str, inode: int | None = None) -> None: ...


def _range_starts_at(content_range: str, offset: int) -> bool:
    """Whether a 206's `Content-Range: bytes START-END/TOTAL` starts at `offset`."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*", content_range, re.IGNORECASE)
    return m is not None and int(m.group(1)) == offset


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


class RegistryClient:
    def __init__(self, options: Options | None = None, *, clock=time.monotonic,
                 sleep=time.sleep, rng=random.random, on_bytes=None):
        self.options = options or Options()
        self.credential_providers = self.options.credential_providers \
            if isinstance(self.options, ClientOptions) else None
        self.transport = Transport(self.options, clock, sleep, rng, on_bytes)
        self.auth = Authenticator(self.transport, clock)

    def endpoints(self, ref: RegistryReference) -> list[Endpoint]:
        out = [mirror_endpoint(registry, url) for registry, url in self.options.mirrors
               if registry == ref.registry]
        host = ref.api_host
        out.append(Endpoint("http" if host in self.options.insecure else "https", host))
        return out

    @staticmethod
    def _retries(ep: Endpoint) -> int | None:
        """How often a failed request to `ep` is tried again: the options' for the origin;
        never for a mirror. containerd moves to the next host at once; retrying a dead
        mirror with backoff would hold every pull for its whole budget (some 7.5 s with
        the defaults, a minute when its packets are dropped) before the origin is tried."""
        return 0 if ep.mirror else None

    def _call(self, ep: Endpoint, method: str, path: str, repo: str,
              creds: Credentials | None, what: str, headers: dict) -> Reply:
        """An API call whose body is read whole, each request retried on its own (once
        only at a mirror)."""
        once = {"retries": 0} if ep.mirror else {}

        def send(hop: Hop, auth: dict) -> Reply:
            return self.transport.call(hop.scheme, hop.host, method, hop.target,
                                       {**headers, **auth}, what, **once)

        return self.auth.follow(Hop(ep.scheme, ep.host, ep.target(path), repo, creds), what,
                                send)

    def manifest(self, ep: Endpoint, ref: RegistryReference, reference: str,
                 creds: Credentials | None) -> tuple[str, str, bytes]:
        """(digest, media type, body) of a manifest or index, verified."""
        what = f"image {ref}: manifest {reference} from {ep}"
        reply = self._call(ep, "GET", f"/v2/{ref.repository}/manifests/{reference}",
                           ref.repository, creds, what, {"Accept": ACCEPT})
        body = reply.body
        _check(reply.status, body, what)
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
        except (ValueError, AttributeError, RecursionError):  # nested deeper than json goes
            raise InvalidArgument(f"{what}: the manifest is not JSON") from None
        if media in SCHEMA1 or schema == 1:
            raise InvalidArgument(f"{what}: Docker schema 1 manifests are not supported; "
                                  "push the image as OCI or Docker schema 2")
        return digest, doc_media or media, body

    def blob_bytes(self, ep: Endpoint, ref: RegistryReference, desc: mf.Descriptor,
                   creds: Credentials | None, what: str) -> bytes:
        """A small blob (an image config), verified."""
        reply = self.transport.retrying(
            lambda: self._get_blob(ep, ref, desc.digest, desc.size, creds, what, 0, None), what,
            retries=self._retries(ep))
        got = sha256_digest(reply.body)
        if got != desc.digest:
            raise DataLoss(f"{what}: digest mismatch: expected {desc.digest}, got {got}")
        return reply.body

    def _get_blob(self, ep: Endpoint, ref: RegistryReference, digest: str, size: int,
                  creds: Credentials | None, what: str, offset: int,
                  out: BinaryIO | None) -> Reply:
        """GET a blob, following redirects to blob storage: into `out` from `offset`
        (streamed), or whole into the reply's body when `out` is None; never more than
        `size` bytes. A retryable status is returned for the caller's retry loop (which
        starts again at the endpoint: a signed storage URL may have expired); other
        failures raise."""
        def send(hop: Hop, auth: dict):
            nonlocal offset
            while True:
                resp = self.transport.open(
                    hop.scheme, hop.host, "GET", hop.target,
                    {**({"Range": f"bytes={offset}-"} if offset else {}), **auth})
                if not (offset and resp.status == 206 and not _range_starts_at(
                        resp.headers.get("Content-Range", ""), offset)):
                    return resp
                # Partial content, but not from where we asked (containerd refuses such an
                # answer too): appending it would corrupt the blob. Ask for all of it.
                log.info("%s: asked for bytes from %d, got Content-Range %r; starting over",
                         what, offset, resp.headers.get("Content-Range"))
                resp.close()
                out.seek(0)
                out.truncate()
                offset = 0

        hop = Hop(ep.scheme, ep.host, ep.target(f"/v2/{ref.repository}/blobs/{digest}"),
                  ref.repository, creds)
        with self.auth.follow(hop, what, send) as resp:
            if resp.status not in (200, 206):
                body = resp.error_body()
                if resp.status in RETRY_STATUS:
                    return Reply(resp.status, resp.headers, body)
                _check(resp.status, body, what)
            if out is None:
                return Reply(resp.status, resp.headers, self.transport.read(resp, size, what))
            if resp.status == 200 and offset:
                out.seek(0)
                out.truncate()  # the server ignored Range: start over
                offset = 0
            self.transport.read(resp, size - offset, what, out)
            return Reply(resp.status, resp.headers, b"")

    def fetch_blob(self, ep: Endpoint, ref: RegistryReference, digest: str, size: int,
                   creds: Credentials | None, offset: int, out: BinaryIO) -> None:
        """Append blob bytes from `offset` to `out`, resuming with Range after a cut."""
        what = f"image {ref}: blob {digest} from {ep}"

        def once() -> Reply:
            reply = self._get_blob(ep, ref, digest, size, creds, what, out.tell(), out)
            if reply.status not in RETRY_STATUS and out.tell() < size:
                raise http.client.IncompleteRead(b"", size - out.tell())
            return reply

        if not ep.mirror:
            self.transport.retrying(once, what)
            return
        # A mirror gets one attempt per request. A download cut after bytes arrived is
        # resumed there with Range, as a new request (containerd's reader reopens a cut
        # body too), at most `retries` times and only while each attempt brings bytes.
        for resumed in range(self.options.retries + 1):
            before = out.tell()
            try:
                self.transport.retrying(once, what, retries=0)
                return
            except Unavailable:
                if out.tell() == before or resumed == self.options.retries:
                    raise
            log.info("%s: cut after %d bytes; resuming at the mirror", what, out.tell())

    def head_digest(self, ref: RegistryReference, creds_for,
                    origin_only: bool = False) -> str | None:
        """What the tag points at now, from a HEAD request (no manifest body, no config);
        None when no endpoint says (the caller then resolves in full). `origin_only`: ask
        the origin alone (a mirror cannot say whether these credentials may read it)."""
        for ep in self.endpoints(ref)[-1:] if origin_only else self.endpoints(ref):
            for creds in offers(creds_for, ep.host if ep.mirror else ref.registry,
                                ref.repository):
                what = f"image {ref}: HEAD manifest {ref.reference} from {ep}"
                try:
                    reply = self._call(ep, "HEAD",
                                       f"/v2/{ref.repository}/manifests/{ref.reference}",
                                       ref.repository, creds, what, {"Accept": ACCEPT})
                except NEXT_CREDENTIALS as e:
                    log.info("%s: %s", what, e)
                    continue  # the next credentials may do
                except StrataError as e:
                    log.info("%s: %s", what, e)
                    break
                if reply.status in (401, 403, 404):  # as NEXT_CREDENTIALS
                    continue
                ok = reply.status == 200
                digest = reply.headers.get("Docker-Content-Digest", "") if ok else ""
                if ok and not digest and ref.digest:
                    digest = ref.digest  # by digest, a 200 is the answer: the header is optional
                if digest.startswith("sha256:"):
                    return digest
                break  # this endpoint answered; what it said is not a digest
        return None

    # -- resolving an image ------------------------------------------------------------
    def resolve(self, ref: RegistryReference, creds_for, blobs: Blobs,
                authorise_at_origin: bool = False) -> tuple[mf.Image, "RegistrySource"]:
        """Resolve on the first endpoint that has the image: mirrors, then the origin, each
        with the first credentials it accepts. The source downloads into `blobs` from that
        endpoint and, should it fail, the later ones.

        `authorise_at_origin`: the origin must say that these credentials may read the
        image (one whose access a credential provider grants per pod): it resolves there,
        and only the blobs, which the manifest names by digest, may then come from the
        mirrors first. A mirror answers with its own credentials, or none: a pull-through
        cache or a P2P mirror serves whoever asks what it holds."""
        candidates = [(ep, offers(creds_for, ep.host if ep.mirror else ref.registry,
                                  ref.repository)) for ep in self.endpoints(ref)]
        if authorise_at_origin:
            origin, offered = candidates[-1]
            image, creds = self._resolve_with(origin, ref, offered)
            content = [(ep, o[0]) for ep, o in candidates[:-1]] + [(origin, creds)]
            return image, RegistrySource(self, ref, content, blobs)
        for i, (ep, offered) in enumerate(candidates):
            try:
                image, creds = self._resolve_with(ep, ref, offered)
            except StrataError as e:
                if not ep.mirror:
                    raise
                log.warning("mirror %s failed for %s (%s); trying the next endpoint", ep,
                            ref, e)
                continue
            later = [(other, o[0]) for other, o in candidates[i + 1:]]
            return image, RegistrySource(self, ref, [(ep, creds), *later], blobs)
        raise AssertionError("unreachable: the origin is always the last endpoint")

    def _resolve_with(self, ep: Endpoint, ref: RegistryReference,
                      offered: list[Credentials | None]) -> tuple[mf.Image, Credentials | None]:
        """The image, and the first of the offered credentials the endpoint lets read it
        (NEXT_CREDENTIALS: what makes it try the next)."""
        errors: list[StrataError] = []
        for n, creds in enumerate(offered, 1):
            try:
                return self._resolve_at(ep, ref, creds), creds
            except NEXT_CREDENTIALS as e:
                errors.append(e)
                if n < len(offered):
                    log.info("image %s: %s: credentials %d of %d: %s; trying the next",
                             ref, ep, n, len(offered), e)
        raise _all_failed(errors)

    def _resolve_at(self, ep: Endpoint, ref: RegistryReference,
                    creds: Credentials | None) -> mf.Image:
        root = self.manifest(ep, ref, ref.reference, creds)
        image = mf.resolve(
            str(ref), f"image {ref}", root,
            lambda desc: self.manifest(ep, ref, desc.digest, creds),
            lambda desc: self.blob_bytes(ep, ref, desc, creds,
                                         f"image {ref}: config {desc.digest}"))
        return dataclasses.replace(
            image, index_digest=root[0] if root[0] != image.manifest_digest else "")


class RegistrySource:
    """Blobs of one resolved image, downloaded into a blob store on first use, from the
    endpoint that resolved it or, failing that, the ones after it (a mirror's origin)."""

    def __init__(self, client: RegistryClient, ref: RegistryReference,
                 candidates: list[tuple[Endpoint, Credentials | None]], blobs: Blobs):
        self.client, self.ref, self.candidates = client, ref, candidates
        self._blobs = blobs

    def open_blob(self, layer: mf.LayerDesc) -> BinaryIO:
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

        # Streamed: the unpacker reads the bytes as they arrive, the blob store hashes
        # them once as it writes them, and the last read says whether they matched.
        return self._blobs.open(layer.digest, layer.size, fetch,
                                f"image {self.ref}: layer {layer.digest}")
