"""Kubelet credential-provider plugins: registry credentials from an executable, per image.

The operator gives strata the kubelet's own files (`--image-credential-provider-config`, a
`CredentialProviderConfig`, read by credconfig.py; `--image-credential-provider-bin-dir`),
so the ECR, GCR/Artifact Registry and ACR plugins that let a node pull without pull secrets
work for image volumes too (docs/credential-providers.md). As the kubelet
(pkg/credentialprovider/plugin):

- A provider runs only for an image one of its `matchImages` matches (credconfig.match_image).
- `<bin-dir>/<name> args…` is exec'd with the provider's `env` added to ours, the
  `CredentialProviderRequest` on stdin, and a minute to answer a
  `CredentialProviderResponse` of the same apiVersion on stdout; its `auth` map (match
  patterns → username/password) is a keyring (auth.py). The plugin's exit ends its run
  (`run_plugin`), whatever children it left holding its pipes. A provider that fails or
  answers garbage gives nothing: the pull goes on without it; why is logged on the node,
  and the PERMISSION_DENIED a registry may then answer names the provider
  (`Provided.notes`), never its stderr.
- Answers are cached by `cacheKeyType` (Image: the image; Registry: its host; Global) for
  `cacheDuration`, else the provider's `defaultCacheDuration`; 0 is not cached. A cached
  answer is used without exec until it expires, looked up by image, registry, then global.

Service-account tokens (KEP-4412, podtokens.py): a provider with `tokenAttributes` is given
the pod's own token for `serviceAccountTokenAudience`, and its answers are cached per
identity. A token that is not the pod's (its claims against the kubelet's pod attributes)
is PERMISSION_DENIED for the whole pull: the provider is not run. A CSI driver cannot read
the service account's annotations: a provider with `requiredServiceAccountAnnotationKeys`
is never run (the kubelet would not run it either without them), and optional ones are
never sent. With `requireServiceAccount` and no token the provider is not run and the
error says why. Tokens and passwords are never logged.
"""

import dataclasses
import json
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping

from csi.errors import InvalidArgument, PermissionDenied
from csi.image.auth import Credentials, Keyring, normalise_key
from csi.image.credconfig import ProviderSpec, load_config, match_image, parse_duration
from csi.image.podtokens import (
    TOKENS_KEY,  # noqa: F401 - where interceptors.py finds it
    Identity,
    _hash,
    audience_token,
    service_account_key,
)
from csi.locks import SingleFlight

log = logging.getLogger(__name__)

CACHE_KEY_TYPES = ("Image", "Registry", "Global")
GLOBAL_KEY = "<global>"  # angle brackets: never an image or registry name
EXEC_TIMEOUT = 60.0  # the kubelet's catch-all for every exec plugin
OUTPUT_LIMIT = 1 << 20  # bytes of a plugin's stdout (and of its stderr) kept: an answer is small
KILL_GRACE = 1.0  # seconds to read what a plugin killed at its timeout said before it died
PIPE_CHUNK = 64 << 10
POLL_INTERVAL = 0.05  # how often a plugin's exit is looked for where there is no pidfd
STDERR_SHOWN = 1000  # characters of a failing plugin's stderr said in the node's log


def registry_of(image: str) -> str:
    """The kubelet's parseRegistry: the image's first path segment (host and port)."""
    return image.split("/", 1)[0]


def cache_key(key_type: str, image: str, sa_key: tuple[str, ...]) -> tuple:
    """Where an answer of `cacheKeyType` is kept (generateCacheKey(base, serviceAccount))."""
    base = {"Image": image, "Registry": registry_of(image), "Global": GLOBAL_KEY}[key_type]
    return (base, sa_key)


# -- running a provider ---------------------------------------------------------------------
class ProviderFailed(Exception):
    """A provider gave no answer: its message is safe for the node's log (no token, no
    password), not for the pod's events (it may hold the plugin's stderr)."""


class _Skipped(Exception):
    """A provider that must not run for this pull, and why."""


@dataclasses.dataclass(frozen=True)
class Answer:
    keyring: Keyring
    key_type: str
    duration: float | None  # seconds; None: the provider's default


def parse_response(data: bytes, api_version: str, token: str = "",
                   cache_type: str = "") -> Answer:
    """A CredentialProviderResponse, checked as the kubelet checks it. Errors never quote
    the response: it holds passwords."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can go
        raise ProviderFailed("its answer on stdout is not JSON") from None
    if not isinstance(doc, dict):
        raise ProviderFailed("its answer is not a JSON object")
    if doc.get("apiVersion") != api_version:
        raise ProviderFailed(f"its answer's apiVersion is {str(doc.get('apiVersion'))[:80]!r}"
                             f", not the configured {api_version!r}")
    if doc.get("kind") != "CredentialProviderResponse":
        raise ProviderFailed(f"its answer's kind is {str(doc.get('kind'))[:80]!r}, not "
                             "CredentialProviderResponse")
    unknown = set(doc) - {"apiVersion", "kind", "cacheKeyType", "cacheDuration", "auth"}
    if unknown:
        raise ProviderFailed(f"its answer has unknown fields {sorted(unknown)[:5]}")
    key_type = doc.get("cacheKeyType")
    if key_type not in CACHE_KEY_TYPES:
        raise ProviderFailed(f"its answer's cacheKeyType is {str(key_type)[:80]!r}, not one "
                             f"of {', '.join(CACHE_KEY_TYPES)}")
    duration = None
    if doc.get("cacheDuration") is not None:
        try:
            duration = max(0.0, parse_duration(str(doc["cacheDuration"])))
        except ValueError as e:
            raise ProviderFailed(f"its answer's cacheDuration: {e}") from None
    auth = doc.get("auth") or {}
    if not isinstance(auth, dict):
        raise ProviderFailed("its answer's auth is not an object")
    entries = []
    for pattern, entry in auth.items():
        if not isinstance(entry, dict) or set(entry) - {"username", "password"} or not all(
                isinstance(entry.get(k, ""), str) for k in ("username", "password")):
            raise ProviderFailed(f"its answer's auth[{pattern[:200]!r}] is not "
                                 "{username, password}")
        if token and cache_type != "Token" and entry.get("password") == token:
            # The kubelet refuses this too: credentials that are the token itself live only
            # as long as the token, so they may only be cached per token.
            raise ProviderFailed("it answered the service-account token itself as a "
                                 "password, which needs tokenAttributes.cacheType Token")
        entries.append((*normalise_key(pattern),
                        Credentials(entry.get("username", ""), entry.get("password", ""))))
    return Answer(Keyring(entries), key_type, duration)


def run_plugin(argv: list[str], input: bytes, env: dict[str, str],
               timeout: float) -> subprocess.CompletedProcess:
    """Run a plugin in a process group of its own: the request on stdin, its stdout and
    stderr read as they come (at most OUTPUT_LIMIT bytes of each are kept) until it exits.

    The plugin's exit ends the run, not EOF on its pipes: a child it left behind holding
    them (a `setsid cmd &` is out of reach of any killpg) would otherwise keep the pull
    waiting for as long as the child lives. What the plugin wrote before it exited is in
    the pipes already; that is taken, and the pipes are closed. A timeout kills the
    plugin's process group (its children that stayed in it) and raises TimeoutExpired."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        pipes = _Pipes(proc, input)
        try:
            if not pipes.until_exit(time.monotonic() + timeout):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                # What it said before it died (its stderr may say why it hung): briefly.
                pipes.drain(time.monotonic() + KILL_GRACE)
                proc.wait()
                raise subprocess.TimeoutExpired(argv, timeout)
            pipes.drain()  # what it wrote before it exited is in the pipes now
        finally:
            pipes.close()
    finally:
        if proc.poll() is None:  # an exception of ours: leave no plugin behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, pipes.stdout, pipes.stderr)


class _Pipes:
    """A plugin's three pipes, non-blocking, driven by one selector: the request written
    as the plugin reads it, stdout kept from its start and stderr to its end, each at
    most OUTPUT_LIMIT bytes (stdout one more, so that an oversize answer shows)."""

    def __init__(self, proc: subprocess.Popen, data: bytes):
        self._proc = proc
        self._sel = selectors.DefaultSelector()
        self._out, self._err = bytearray(), bytearray()
        self._bufs = {proc.stdout.fileno(): self._out, proc.stderr.fileno(): self._err}
        self._data = memoryview(data)
        self._pidfd = None
        try:  # readable when the plugin exits: no polling (Linux ≥ 5.3)
            self._pidfd = os.pidfd_open(proc.pid)
            self._sel.register(self._pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):
            pass
        for f in (proc.stdout, proc.stderr):
            os.set_blocking(f.fileno(), False)
            self._sel.register(f.fileno(), selectors.EVENT_READ)
        self._stdin = proc.stdin.fileno()  # kept: fileno() fails once the file is closed
        if data:
            os.set_blocking(self._stdin, False)
            self._sel.register(self._stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()

    @property
    def stdout(self) -> bytes:
        return bytes(self._out)

    @property
    def stderr(self) -> bytes:
        return bytes(self._err)

    def until_exit(self, deadline: float) -> bool:
        """Move bytes until the plugin exits (True) or the deadline passes (False)."""
        while self._proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for key, _ in self._sel.select(left if self._pidfd is not None
                                           else min(left, POLL_INTERVAL)):
                if key.fd != self._pidfd:  # the pidfd only wakes the loop
                    self._move(key.fd)
        return True

    def drain(self, deadline: float | None = None) -> None:
        """Read until EOF on both pipes, or the deadline; with none, only what is there
        now, waiting for nothing (a child still writing gets OUTPUT_LIMIT bytes more at
        most). For after the plugin is gone."""
        if self._pidfd is not None and self._pidfd in self._sel.get_map():
            self._sel.unregister(self._pidfd)  # readable for good now: it would spin
        read = 0
        while self._sel.get_map() and read <= OUTPUT_LIMIT:
            left = 0.0 if deadline is None else deadline - time.monotonic()
            if deadline is not None and left <= 0:
                return
            ready = self._sel.select(left)
            if not ready and deadline is None:
                return
            for key, _ in ready:
                read += self._move(key.fd)

    def _move(self, fd: int) -> int:
        if fd == self._stdin:
            self._write()
            return 0
        return self._read(fd)

    def _write(self) -> None:
        try:
            n = os.write(self._stdin, self._data[:PIPE_CHUNK])
        except BlockingIOError:
            return
        except OSError:  # EPIPE: it stopped reading; what it answers will say
            n = len(self._data)
        self._data = self._data[n:]
        if not self._data:
            self._sel.unregister(self._stdin)
            self._proc.stdin.close()

    def _read(self, fd: int) -> int:
        try:
            chunk = os.read(fd, PIPE_CHUNK)
        except BlockingIOError:
            return 0
        if not chunk:
            self._sel.unregister(fd)
            return 0
        buf = self._bufs[fd]
        if buf is self._out:
            buf += chunk[:OUTPUT_LIMIT + 1 - len(buf)]
        else:
            buf += chunk
            del buf[:-OUTPUT_LIMIT]
        return len(chunk)

    def close(self) -> None:
        self._sel.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
        for f in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            try:
                f.close()
            except OSError:
                pass


def _scrub(text: str, *secrets: str) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


class Provider:
    """One configured plugin, its cache of answers, and one exec per image (and token) while
    pulls race for it (the kubelet's singleflight)."""

    def __init__(self, spec: ProviderSpec, bin_dir: str, clock=time.monotonic,
                 environ: Mapping[str, str] | None = None,
                 run: Callable = run_plugin):
        self.spec = spec
        self.path = os.path.join(bin_dir, spec.name)
        self._clock = clock
        self._environ = environ
        self._run = run
        self._cache: dict[tuple, tuple[float, Keyring]] = {}
        self._lock = threading.Lock()
        self._flight = SingleFlight()

    def matches(self, image: str) -> bool:
        return any(match_image(p, image) for p in self.spec.match_images)

    def cached(self, image: str, sa_key: tuple[str, ...]) -> Keyring | None:
        """A cached answer for `image` and this identity (image, then registry, then
        global), if one has not expired; expired ones are dropped on the way."""
        now = self._clock()
        with self._lock:
            for k in [k for k, (expires, _) in self._cache.items() if expires <= now]:
                del self._cache[k]
            for key_type in CACHE_KEY_TYPES:
                hit = self._cache.get(cache_key(key_type, image, sa_key))
                if hit is not None:
                    return hit[1]
        return None

    def provide(self, image: str, token: str, sa_key: tuple[str, ...],
                timeout: float = EXEC_TIMEOUT) -> Keyring:
        """The provider's credentials for `image`, cached or from an exec. Raises
        ProviderFailed."""
        found = self.cached(image, sa_key)
        if found is not None:
            return found
        flight = "\0".join((image, _hash(token)))
        return self._flight.do(flight, lambda: self._exec_and_cache(image, token, sa_key,
                                                                    timeout))

    def _exec_and_cache(self, image: str, token: str, sa_key: tuple[str, ...],
                        timeout: float) -> Keyring:
        found = self.cached(image, sa_key)  # a racing exec may have just answered
        if found is not None:
            return found
        answer = self.exec(image, token, timeout)
        duration = self.spec.default_cache_duration if answer.duration is None \
            else answer.duration
        if duration > 0:
            with self._lock:
                self._cache[cache_key(answer.key_type, image, sa_key)] = (
                    self._clock() + duration, answer.keyring)
        return answer.keyring

    def exec(self, image: str, token: str = "", timeout: float = EXEC_TIMEOUT) -> Answer:
        """Run the plugin once: `path args…` with the request on stdin."""
        request = {"apiVersion": self.spec.api_version, "kind": "CredentialProviderRequest",
                   "image": image}
        if token:
            request["serviceAccountToken"] = token
        # The kubelet runs plugins with its own environment plus the provider's `env`
        # (kubernetes#102750: without HOME, PATH… cloud SDKs fail).
        env = dict(os.environ if self._environ is None else self._environ)
        env.update(self.spec.env)
        started = time.monotonic()
        try:
            done = self._run([self.path, *self.spec.args], json.dumps(request).encode(), env,
                             max(1.0, timeout))
        except subprocess.TimeoutExpired:
            raise ProviderFailed(f"it did not answer within {max(1.0, timeout):.0f}s") from None
        except OSError as e:
            raise ProviderFailed(f"cannot run {self.path}: {e.strerror}") from None
        seconds = time.monotonic() - started
        if done.returncode != 0:
            stderr = _scrub(done.stderr.decode(errors="replace").strip(), token)
            raise ProviderFailed(f"it exited with status {done.returncode} after {seconds:.1f}s"
                                 + (f": {stderr[-STDERR_SHOWN:]}" if stderr else ""))
        if len(done.stdout) > OUTPUT_LIMIT:
            raise ProviderFailed(f"its answer is larger than {OUTPUT_LIMIT >> 20} MiB")
        tokens = self.spec.tokens
        return parse_response(done.stdout, self.spec.api_version, token,
                              tokens.cache_type if tokens else "")


# -- every provider, for one pull ------------------------------------------------------------
@dataclasses.dataclass
class Provided:
    """What the providers gave one pull: their keyrings in configuration order, what went
    wrong (said when the registry then refuses), and whether a provider that works with
    service-account tokens covers the image (then each pod's own access must be checked)."""

    keyrings: list[Keyring] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    gated: bool = False


class MissingPlugin(InvalidArgument):
    """The bin dir lacks a configured provider's executable (or is not a directory)."""


class CredentialProviders:
    """The configured providers. `load()` checks what the kubelet checks at its start: the
    config, the bin dir, and an executable for every provider."""

    def __init__(self, providers: list[Provider]):
        self.providers = providers

    @classmethod
    def load(cls, config_path: str, bin_dir: str, clock=time.monotonic,
             environ: Mapping[str, str] | None = None) -> "CredentialProviders":
        specs = load_config(config_path)
        if not os.path.isdir(bin_dir):
            raise MissingPlugin(f"{bin_dir} is not a directory" if os.path.exists(bin_dir)
                                else f"{bin_dir} does not exist")
        for spec in specs:
            path = os.path.join(bin_dir, spec.name)
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise MissingPlugin(f"{path}: no executable for provider {spec.name!r} (named "
                                    f"in {config_path})")
            if spec.tokens is not None and spec.tokens.required_annotation_keys:
                log.warning("credential provider %s requires service account annotations "
                            "(%s), which a CSI driver cannot read: it will never run for "
                            "strata (docs/credential-providers.md)", spec.name,
                            ", ".join(spec.tokens.required_annotation_keys))
        log.info("credential providers: %s", ", ".join(
            f"{s.name} for {', '.join(s.match_images)}" for s in specs))
        return cls([Provider(s, bin_dir, clock, environ) for s in specs])

    def gated(self, image: str) -> bool:
        """Whether a provider that takes the pod's service-account token covers `image`."""
        return any(p.spec.tokens is not None and p.matches(image) for p in self.providers)

    def provide(self, image: str, identity: Identity | None = None,
                timeout: float = EXEC_TIMEOUT) -> Provided:
        """Run (or reuse the cached answer of) every provider whose matchImages cover
        `image`, in configuration order. Never raises for a provider's failure: that is a
        note, and a line in the log. A service-account token that is not the pod's is
        PermissionDenied: the pull stops there."""
        out = Provided()
        identity = identity or Identity()
        for p in self.providers:
            if not p.matches(image):
                continue
            out.gated |= p.spec.tokens is not None
            try:
                token, sa_key = self._token(p.spec, identity)
                out.keyrings.append(p.provide(image, token, sa_key, timeout))
            except PermissionDenied as e:
                # A pod presenting a token that names someone else: no provider runs and no
                # cached answer is looked up for it. Logged with the pod, never the token.
                log.warning("credential provider %s refused for %s (pod %s/%s): %s",
                            p.spec.name, image, identity.namespace, identity.pod, e,
                            extra={"image": image, "provider": p.spec.name})
                raise PermissionDenied(f"image {image}: credential provider {p.spec.name} "
                                       f"was not run: {e}") from None
            except _Skipped as e:  # strata's own words about the configuration
                why = f"credential provider {p.spec.name} was not run: {e}"
                log.warning("%s; pulling without its credentials", why,
                            extra={"image": image, "provider": p.spec.name})
                out.notes.append(why)
            except (ProviderFailed, InvalidArgument) as e:
                # The node's log has why; the note goes into the status the pod's events
                # show, to whoever wrote the pod: the plugin's stderr (a cloud SDK's error
                # may name accounts, roles, endpoints) and what it answered stay out of it.
                log.warning("credential provider %s failed for %s: %s; pulling without its "
                            "credentials", p.spec.name, image, e,
                            extra={"image": image, "provider": p.spec.name})
                out.notes.append(f"credential provider {p.spec.name} failed for {image} (see "
                                 "the strata log on the node)")
        return out

    @staticmethod
    def _token(spec: ProviderSpec, identity: Identity) -> tuple[str, tuple[str, ...]]:
        """(token, service account cache key) for a provider; ("", ()) without tokens."""
        attrs = spec.tokens
        if attrs is None:
            return "", ()
        if attrs.required_annotation_keys:
            raise _Skipped("it requires service account annotations (requiredServiceAccount"
                           f"AnnotationKeys: {', '.join(attrs.required_annotation_keys)}), "
                           "which a CSI driver cannot read")
        try:
            token = audience_token(identity.tokens, attrs.audience)
        except InvalidArgument as e:
            raise _Skipped(str(e)) from None
        if not token:
            if attrs.require_service_account:
                raise _Skipped(
                    f"it requires the pod's service-account token for audience "
                    f"{attrs.audience!r} (tokenAttributes.requireServiceAccount) and the "
                    "request carried none; the CSIDriver must list that audience in "
                    "tokenRequests, and tokens come only with NodePublishVolume")
            return "", ()
        return token, service_account_key(attrs, token, identity)


