"""Image pulls as the kubelet does them: reference rules, pull policies, pull secrets, and
its deadline.

`Puller.pull()` turns the `image` attribute into an image whose layers are all on the node.
For a registry image the work runs as a background job keyed by (image, policy,
credentials): a kubelet gives NodePublish about two minutes and then retries the same call,
so when the wait runs out the RPC answers ABORTED ("still pulling") and the retry joins the
job that is still running instead of starting again. Blobs are single-flight in the blob
store too, so racing pods and retries download each blob once.

Credentials, in the kubelet's order: the pod's pull secrets, then what the node's
credential-provider plugins answer for the image (credprovider.py), then the node's
--registry-config; each is tried until the registry accepts one. A job is shared only by
pulls that would present the same credentials.

Policies (`pullPolicy` volume attribute): IfNotPresent (default; a digest never needs the
network once present, a tag is re-resolved at most every --tag-ttl, and when that refresh
fails for any reason the copy on the node is used, since the kubelet's IfNotPresent would
not have asked the registry at all), Always (resolve the tag at each publish, reuse
unchanged layers), Never (only what the node has, else FAILED_PRECONDITION).

A credential provider that takes the pod's service-account token (KEP-4412) grants images
by identity, so an image it covers is authorised per pod: the registry is asked with that
pod's own credentials at every publish, as Always does (and Never, which would ask no one,
is refused), and a pull started with one pod's credentials is never handed to another's.
That question goes to the origin registry, never to a --registry-mirror (a pull-through
cache or a P2P mirror serves whoever asks what it holds); the layers may then come
through the mirrors.

A tag is recorded against the digest it named: an index's for a multi-arch image, whose
platform manifest is the image record. A HEAD's Docker-Content-Digest is compared with that.
"""

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator

from csi.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    StrataError,
)
from csi.image import reference
from csi.image.auth import CredentialChain, Keyring
from csi.image.credprovider import EXEC_TIMEOUT, CredentialProviders, Provided
from csi.image.layout import OciLayout
from csi.image.manifest import Image, LayerDesc
from csi.image.podtokens import Identity
from csi.image.registry import RegistryClient
from csi.image.resolver import check_layout_allowed
from csi.store.blobs import BlobStore
from csi.store.layers import LayerStore, Lease, committed
from csi.store.state import State, Tag
from csi.units import human_bytes

log = logging.getLogger(__name__)

POLICIES = ("IfNotPresent", "Always", "Never")  # the kubelet's imagePullPolicy values
DEFAULT_POLICY = "IfNotPresent"


def policy(value: str | None) -> str:
    """A `pullPolicy` attribute checked; None (not given) is the kubelet's default. An
    empty string is given, and not a policy."""
    value = DEFAULT_POLICY if value is None else value
    if value not in POLICIES:
        raise InvalidArgument(f"pullPolicy {value!r} is not one of {', '.join(POLICIES)}")
    return value


class LocalSource:
    """An image whose layers are all on the node: no blob is ever needed."""

    def __init__(self, name: str):
        self.name = name

    def open_blob(self, layer: LayerDesc):
        raise Aborted(f"image {self.name}: layer {layer.diff_id} was collected while being "
                      "published; retry")


class Progress:
    """What a pull tells whoever watches it, from the pull's own thread (`strata pull` draws
    it as `docker pull` does; the server watches nothing). This class watches nothing."""

    def resolved(self, image: Image, missing: list[LayerDesc]) -> None:
        """The image's layers are known: `missing` will be fetched and unpacked, in this
        order; the others are in the store already."""

    def fetching(self, layer: LayerDesc) -> None:
        """A missing layer's blob is being obtained (downloaded, unless a copy is cached)."""

    def unpacking(self, layer: LayerDesc, downloading: bool = False) -> None:
        """Unpacking the layer into the store has started; its blob is `downloading`
        still (the unpack reads it as it arrives), else here already."""


class _Watched:
    """A blob source telling a Progress when a layer's blob is asked for and when its
    unpack starts reading it. The layer store asks for the blobs of several layers at
    once, from several threads."""

    def __init__(self, source, progress: Progress):
        self._source, self._progress = source, progress

    def open_blob(self, layer: LayerDesc):
        self._progress.fetching(layer)
        return _FirstRead(self._source.open_blob(layer),
                          lambda blob: self._progress.unpacking(
                              layer, downloading=getattr(blob, "downloading", False)))

    def committed(self, layer: LayerDesc) -> None:
        committed(self._source, layer)


class _Dropping:
    """A registry's blob source that removes each layer's compressed blob as soon as the
    layer unpacked from it is recorded (it is only a cache then): the unlink of a big
    file overlaps the other layers' unpacks instead of ending the pull. Another pull
    reading the same blob keeps its open descriptor (or its download's), so it reads on."""

    def __init__(self, source, remove):
        self._source, self._remove = source, remove

    def open_blob(self, layer: LayerDesc):
        return self._source.open_blob(layer)

    def committed(self, layer: LayerDesc) -> None:
        self._remove(layer.digest)


class _FirstRead:
    """A blob stream that calls `first(stream)` at its first read: the unpack has a slot
    (--max-parallel-unpacks) and starts."""

    def __init__(self, blob, first):
        self._blob, self._first = blob, first

    def read(self, n: int = -1) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            first(self._blob)
        return self._blob.read(n)

    def drain(self) -> None:
        self.read(0)
        self._blob.drain()

    def close(self) -> None:
        self._blob.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Job:
    def __init__(self):
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished = 0.0
        self.missing = 0  # layers the pull had to bring (store cache misses)
        self.delivered = False  # someone has been told how it ended


class Puller:
    # A failed job nobody heard about yet stays this long, so that a kubelet retry arriving
    # after a pull failed in the background gets that failure instead of a fresh attempt
    # answering ABORTED again. Once told, the next call tries afresh.
    RETAIN = 30.0

    def __init__(self, state: State, layers: LayerStore, blobs: BlobStore,
                 client: RegistryClient | None = None, node_keyring: Keyring | None = None,
                 tag_ttl: float = 300.0, clock=time.time, on_pull=None, keep_blobs=False,
                 max_waiting: int = 48, layout_roots: tuple[str, ...] = (), on_layers=None,
                 providers: CredentialProviders | None = None):
        """`on_layers(present, pulled)` counts, for each pull answered, the image's layers
        that were in the store already and those that had to be pulled (metrics).
        `providers`: the credential-provider plugins; by default the client's."""
        self._state = state
        self._layers = layers
        self._blobs = blobs
        self._client = client or RegistryClient()
        self._node_keyring = node_keyring or Keyring()
        self._providers = providers or self._client.credential_providers
        self._tag_ttl = tag_ttl
        self._clock = clock
        self._on_pull = on_pull or (lambda result, seconds: None)
        self._on_layers = on_layers or (lambda present, pulled: None)
        self._keep_blobs = keep_blobs
        self._layout_roots = layout_roots
        self._mu = threading.Lock()
        self._jobs: dict[tuple, _Job] = {}
        # RPC threads waiting on pulls are bounded, so Probe and unpublish always get one.
        self._waiting = threading.BoundedSemaphore(max_waiting)

    def pull(self, image: str, secrets: dict | None = None, pull_policy: str = "",
             wait: float | None = None, identity: Identity | None = None,
             progress: Progress | None = None):
        """(source, Image) with every layer present and the image recorded. Raises Aborted
        when `wait` seconds pass while a registry pull is still running (it goes on; the
        next call joins it). `identity`: the pod it is for, and its service-account tokens
        for the credential providers that take them. `progress` watches the pull this call
        starts (not one it joins)."""
        deadline = None if wait is None else time.monotonic() + wait
        pull_policy = policy(pull_policy or None)  # a staged volume's publish names none
        ref = reference.parse(image)
        if isinstance(ref, reference.LayoutReference):
            check_layout_allowed(ref, self._layout_roots)
            source = OciLayout(ref)
            img = source.resolve()
            missing = self._make_present(source, img, report=False, progress=progress)
            self._on_layers(len(img.layers) - missing, missing)
            return source, img
        asked = self._authorised_per_pod(ref, pull_policy)
        # What the node has answers without a job: a digest never changes, and a tag is
        # trusted for --tag-ttl (Never trusts it forever). Always asks the registry even
        # for a digest it has, as the kubelet's pull would: with the pod's own credentials,
        # so a pod without access cannot use a private image another pod brought.
        if asked != "Always":
            local = self._local(ref, max_age=None if asked == "Never" else self._tag_ttl)
            if local is not None:
                self._on_pull("present", None)
                self._on_layers(len(local.layers), 0)
                return LocalSource(str(ref)), local
            if asked == "Never":
                self._on_pull("failed_precondition", None)
                raise FailedPrecondition(f"image {ref} is not on this node and pullPolicy is "
                                         "Never")
        provided = self._provide(ref, identity, deadline)
        chain = CredentialChain([Keyring.from_secrets(secrets or {}), *provided.keyrings,
                                 self._node_keyring])
        key = (str(ref), asked, chain.fingerprint(ref.registry, ref.repository))
        now = time.monotonic()
        with self._mu:
            for k in [k for k, j in self._jobs.items()
                      if j.done.is_set() and now - j.finished > self.RETAIN]:
                del self._jobs[k]
            job = self._jobs.get(key)
            if job is None or (job.done.is_set() and (job.error is None or job.delivered)):
                job = self._jobs[key] = _Job()
                threading.Thread(target=self._run,
                                 args=(job, ref, chain, asked, progress, provided.gated),
                                 name=f"pull {ref}", daemon=True).start()
        if not self._waiting.acquire(blocking=False):
            raise Aborted(f"image {ref}: too many publishes are waiting on pulls; retry")
        try:
            finished = job.done.wait(None if deadline is None
                                     else max(0.0, deadline - time.monotonic()))
        finally:
            self._waiting.release()
        if not finished:
            raise Aborted(f"image {ref}: still pulling after "
                          f"{time.monotonic() - job.started:.0f}s; the pull goes on and the "
                          "next attempt joins it")
        if job.error is not None:
            job.delivered = True
            if isinstance(job.error, PermissionDenied) and provided.notes:
                # Why the registry saw no better credentials (a provider that failed or
                # was not run for this pod), in the error the pod's events show.
                raise PermissionDenied(f"{job.error}; {'; '.join(provided.notes)}") \
                    from job.error
            raise job.error
        self._on_layers(len(job.result[1].layers) - job.missing, job.missing)
        return job.result

    def _authorised_per_pod(self, ref: reference.RegistryReference, pull_policy: str) -> str:
        """The policy a pull follows: the one asked for, or Always for an image a provider
        that takes service-account tokens covers (the registry decides by identity, so no
        pod may use a copy another pod's identity brought). Never is refused for those:
        it would ask no one."""
        if self._providers is None or not self._providers.gated(ref.name):
            return pull_policy
        if pull_policy == "Never":
            self._on_pull("failed_precondition", None)
            raise FailedPrecondition(
                f"image {ref}: pullPolicy Never cannot be used for an image a credential "
                "provider grants by the pod's service account: only the registry can say "
                "whether this pod may use it (docs/credential-providers.md)")
        return "Always"

    def _provide(self, ref: reference.RegistryReference, identity: Identity | None,
                 deadline: float | None) -> Provided:
        """What the credential providers answer for the image, within what is left of the
        RPC's wait (at most the kubelet's minute)."""
        if self._providers is None:
            return Provided()
        timeout = EXEC_TIMEOUT if deadline is None else \
            min(EXEC_TIMEOUT, deadline - time.monotonic())
        try:
            return self._providers.provide(ref.name, identity, timeout)
        except PermissionDenied:  # a token that is not the pod's: no pull at all
            self._on_pull("permission_denied", None)
            raise

    def _run(self, job: _Job, ref, keyring: CredentialChain, policy: str,
             progress: Progress | None, gated: bool = False) -> None:
        started = time.monotonic()
        try:
            source, image, job.missing = self._pull(ref, keyring, policy, progress, gated)
            job.result = source, image
            outcome = "present" if isinstance(job.result[0], LocalSource) else "pulled"
        except BaseException as e:
            job.error = e
            outcome = e.code.name.lower() if isinstance(e, StrataError) else "error"
            if not isinstance(e, StrataError):
                log.exception("pull of %s failed", ref)
        finally:
            job.finished = time.monotonic()
            job.done.set()
        self._on_pull(outcome, time.monotonic() - started)

    def _pull(self, ref: reference.RegistryReference, keyring: CredentialChain, policy: str,
              progress: Progress | None = None, gated: bool = False):
        """`gated`: the image is authorised per pod (a token-taking provider covers it), so
        the question goes to the origin with the pod's credentials, never to a mirror,
        which answers anyone what it holds; only content may come through mirrors."""
        known = self._local(ref, max_age=None)
        if known is None:
            return self._fetch(ref, keyring, progress, gated)
        # An image we have: ask (HEAD) whether the tag moved, or for a digest whether these
        # credentials may read it, before fetching anything. A tag names the index of a
        # multi-arch image, and that is what the HEAD answers with.
        recorded = ref.digest or known.index_digest or known.manifest_digest
        try:
            if self._client.head_digest(ref, keyring.lookup, origin_only=gated) == recorded:
                if not ref.digest:
                    self._record_tag(ref, recorded)
                log.info("image %s: the registry confirms %s", ref, recorded)
                return LocalSource(str(ref)), known, 0
            return self._fetch(ref, keyring, progress, gated)
        except StrataError as e:
            if policy != "IfNotPresent":
                raise
            # The image is on the node, so the kubelet's IfNotPresent would never have asked
            # the registry: an expired pull secret, a deleted tag or a registry that is down
            # only means the tag is not refreshed this time.
            log.warning("image %s: refreshing the tag failed (%s); using the copy on this "
                        "node", ref, e)
            return LocalSource(str(ref)), known, 0

    def _fetch(self, ref: reference.RegistryReference, keyring: CredentialChain,
               progress: Progress | None = None, gated: bool = False):
        started = time.monotonic()
        img, source = self._client.resolve(ref, keyring.lookup, self._blobs,
                                           authorise_at_origin=gated)
        missing = self._make_present(
            source if self._keep_blobs else _Dropping(source, self._blobs.remove), img,
            started=started, progress=progress)
        if not ref.digest:  # only once the layers are in place
            self._record_tag(ref, img.index_digest or img.manifest_digest)
        if not self._keep_blobs:
            # Those unpacked here went as each was recorded; these are the blobs of layers
            # another pull or process unpacked meanwhile (unlinks of missing files: cheap).
            for layer in img.layers:
                self._blobs.remove(layer.digest)
        return source, img, missing

    @contextlib.contextmanager
    def acquire(self, source, image: Image) -> Iterator[Lease]:
        """Hold every layer of `image` (leased, so GC cannot take one) until the block ends
        or the caller hands the lease over, having made them present; the image is
        (re)recorded with them where the lease ends: the one place an image is recorded.
        A publish hands it over in the transaction recording the publication, so a warm
        publish writes two transactions (the lease; the publication with the image record
        and the lease's end) where it wrote four. Yields the Lease (layer IDs base
        first)."""
        with self._layers.acquire(source, image.layers) as lease:
            lease.on_end(lambda tx: tx.record_image(image, lease.layer_ids, self._clock()))
            yield lease

    def _make_present(self, source, image: Image, started: float | None = None,
                      report: bool = True, progress: Progress | None = None) -> int:
        """Make every layer present; returns how many were missing before. The pull's
        progress is logged at INFO when layers are fetched (and, with `report`, when none
        were: a registry pull is news either way)."""
        started = time.monotonic() if started is None else started
        with self._state.read() as tx:
            missing = [la for la in image.layers if tx.layer_by_diff_id(la.diff_id) is None]
            recorded = tx.image(image.manifest_digest) is not None
        if not missing and recorded and progress is None and not report:
            # A warm layout image: every layer present, the image recorded; the caller's own
            # acquire leases the layers and records the image again (index alias included),
            # so doing both here too would only cost two more commits per publish.
            return 0
        nbytes = sum(la.size for la in missing)
        if missing:
            log.info("pulling %s: %d of %d layers to fetch, %s", image.name,
                     len(missing), len(image.layers), human_bytes(nbytes),
                     extra={"image": image.name, "layers": len(missing), "bytes": nbytes})
        if progress is not None:
            progress.resolved(image, missing)
            source = _Watched(source, progress)
        with self.acquire(source, image):
            pass
        if missing or report:
            seconds = time.monotonic() - started
            log.info("pulled %s (%s) in %.2fs", image.name, image.manifest_digest, seconds,
                     extra={"image": image.name, "digest": image.manifest_digest,
                            "layers": len(missing), "bytes": nbytes,
                            "seconds": round(seconds, 3)})
        return len(missing)

    def _record_tag(self, ref: reference.RegistryReference, digest: str) -> None:
        with self._state.transaction() as tx:
            tx.record_tag(Tag(_tag_name(ref), digest, self._clock()))

    def _local(self, ref: reference.RegistryReference, max_age: float | None) -> Image | None:
        """The image from records alone (a recorded image is complete on the node: the
        state's invariant), for a tag only while its resolution is younger than max_age.
        An image recorded by a version-1 store lacks its layer descriptors: not usable."""
        with self._state.read() as tx:
            digest = ref.digest
            if not digest:
                tag = tx.tag(_tag_name(ref))
                if tag is None or (max_age is not None
                                   and self._clock() - tag.resolved > max_age):
                    return None
                digest = tag.manifest_digest
            rec = tx.image(digest)
        if rec is None or not rec.image.layers:
            return None
        return dataclasses.replace(
            rec.image, name=str(ref),
            index_digest=digest if digest != rec.manifest_digest else "")


def _tag_name(ref: reference.RegistryReference) -> str:
    return f"{ref.name}:{ref.tag}"
