"""Kubelet credential-provider plugins: registry credentials from an executable, per image.

The operator gives strata the kubelet's own files (`--image-credential-provider-config`, a
`CredentialProviderConfig` of `kubelet.config.k8s.io/v1`, YAML or JSON, or a directory of
them; `--image-credential-provider-bin-dir`), so the ECR, GCR/Artifact Registry and ACR
plugins that let a node pull without pull secrets work for image volumes too
(docs/credential-providers.md). As the kubelet (pkg/credentialprovider/plugin):

- A provider runs only for an image one of its `matchImages` matches (`match_image`: a glob
  per dot-separated host label, `*` never crossing a dot; the port equal when either names
  one; the pattern's path a string prefix of the image's). The image is the repository as
  the kubelet names it: "docker.io/library/nginx", no tag or digest.
- `<bin-dir>/<name> args…` is exec'd with the provider's `env` added to ours, the
  `CredentialProviderRequest` on stdin, and a minute to answer a
  `CredentialProviderResponse` of the same apiVersion on stdout; its `auth` map (match
  patterns → username/password) is a keyring (auth.py). A provider that fails or answers
  garbage gives nothing: the pull goes on without it, and its failure is logged and said
  in the PERMISSION_DENIED a registry may then answer (`Provided.notes`).
- Answers are cached by `cacheKeyType` (Image: the image; Registry: its host; Global) for
  `cacheDuration`, else the provider's `defaultCacheDuration`; 0 is not cached. A cached
  answer is used without exec until it expires, looked up by image, registry, then global.

Service-account tokens (KEP-4412). A provider with `tokenAttributes` wants the pod's own
token for `serviceAccountTokenAudience`. The kubelet mints it; a CSI driver gets what the
CSIDriver's `tokenRequests` asked for in NodePublishVolume: `volume_context` (or `secrets`,
with `serviceAccountTokenInSecrets: true`) key TOKENS_KEY holds JSON
`{"<audience>": {"token": "…", "expirationTimestamp": "…"}}` (`Identity.tokens`). The token
goes in the request as `serviceAccountToken`, and into the cache key as the kubelet forms
it, so that an answer for one identity never serves another: (namespace, service account
name, its UID, annotations) and, with `cacheType: Token`, the token's hash. Those come
from the token's own claims (the kubelet put it there, minted by the API server); where a
UID is missing the token's hash is always part of the key. A CSI driver cannot read the
service account's annotations: a provider with `requiredServiceAccountAnnotationKeys` is
never run (the kubelet would not run it either without them), and optional ones are never
sent. With `requireServiceAccount` and no token the provider is not run and the error says
why. Tokens and passwords are never logged.
"""

import base64
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping

import yaml

from csi.errors import InvalidArgument
from csi.image.auth import Credentials, Keyring, normalise_key
from csi.locks import SingleFlight

log = logging.getLogger(__name__)

CONFIG_KIND = "CredentialProviderConfig"
CONFIG_API_VERSIONS = ("kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1beta1",
                       "kubelet.config.k8s.io/v1alpha1")
PLUGIN_V1 = "credentialprovider.kubelet.k8s.io/v1"
PLUGIN_API_VERSIONS = (PLUGIN_V1, "credentialprovider.kubelet.k8s.io/v1beta1",
                       "credentialprovider.kubelet.k8s.io/v1alpha1")
CACHE_KEY_TYPES = ("Image", "Registry", "Global")
TOKEN_CACHE_TYPES = ("ServiceAccount", "Token")
GLOBAL_KEY = "<global>"  # angle brackets: never an image or registry name
# Where the kubelet puts the tokens the CSIDriver's tokenRequests asked for (KEP-1855), in
# volume_context, or in secrets when the CSIDriver opts in (KEP-5538).
TOKENS_KEY = "csi.storage.k8s.io/serviceAccount.tokens"
EXEC_TIMEOUT = 60.0  # the kubelet's catch-all for every exec plugin
STDERR_SHOWN = 1000  # characters of a failing plugin's stderr said in the log and errors

# Kubernetes' IsQualifiedName (annotation keys): [DNS subdomain prefix/]name.
_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]"
_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_QUALIFIED = re.compile(rf"(({_SUBDOMAIN})/)?{_NAME}")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                   "m": 60.0, "h": 3600.0}


# -- the configuration -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenAttributes:
    audience: str
    require_service_account: bool
    cache_type: str  # "ServiceAccount" or "Token"
    required_annotation_keys: tuple[str, ...] = ()
    optional_annotation_keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ProviderSpec:
    """One entry of `providers`."""

    name: str
    match_images: tuple[str, ...]
    default_cache_duration: float  # seconds
    api_version: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)
    tokens: TokenAttributes | None = None


class _Fields:
    """Reads one YAML/JSON object strictly, as the kubelet's strict decoder does: unknown
    fields and wrong types are refused, naming the file and the field's path."""

    def __init__(self, doc, path: str, where: str, allowed: tuple[str, ...]):
        self.where, self.path = where, path
        if not isinstance(doc, dict):
            self.fail("must be an object")
        self.doc = doc
        for key in doc:
            if key not in allowed:
                self.fail(f"unknown field {key!r} (known: {', '.join(allowed)})", key)

    def fail(self, why: str, key: str | None = None):
        field = f"{self.path}.{key}" if key and self.path else key or self.path or "(top)"
        raise InvalidArgument(f"{self.where}: {field}: {why}")

    def get(self, key: str, kind, required: bool = False, default=None):
        if key not in self.doc or self.doc[key] is None:
            if required:
                self.fail("is required", key)
            return default
        value = self.doc[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            self.fail(f"must be {_KIND_NAMES[kind]}, got {value!r}", key)
        return value

    def strings(self, key: str, required: bool = False) -> tuple[str, ...]:
        values = self.get(key, list, required, [])
        for i, v in enumerate(values):
            if not isinstance(v, str):
                self.fail(f"must be strings, got {v!r}", f"{key}[{i}]")
        if required and not values:
            self.fail("needs at least one item", key)
        return tuple(values)

    def duration(self, key: str, required: bool = False) -> float | None:
        if isinstance(self.doc.get(key), (int, float)) and not isinstance(self.doc[key], bool):
            # metav1.Duration is a string: the kubelet refuses a bare number too.
            self.fail(f"must be a duration string such as \"12h\" or \"0s\", got "
                      f"{self.doc[key]!r}", key)
        text = self.get(key, str, required)
        if text is None:
            return None
        try:
            return parse_duration(text)
        except ValueError as e:
            self.fail(str(e), key)


_KIND_NAMES = {str: "a string", list: "a list", dict: "an object", bool: "true or false"}


def parse_duration(text: str) -> float:
    """A Go duration (time.ParseDuration, what metav1.Duration holds): "12h", "1h30m",
    "90s", "1.5h", "0". Seconds."""
    text = text.strip()
    if text in ("0", "+0", "-0"):
        return 0.0
    m = re.fullmatch(r"([-+]?)((?:\d+\.?\d*|\.\d+)[a-zµμ]+)+", text)
    if not m:
        raise ValueError(f"{text!r} is not a duration such as \"12h\", \"1h30m\" or \"90s\"")
    total = 0.0
    for number, unit in re.findall(r"(\d+\.?\d*|\.\d+)([a-zµμ]+)", text):
        if unit not in _DURATION_UNITS:
            raise ValueError(f"{text!r}: unknown unit {unit!r} (ns, us, ms, s, m, h)")
        total += float(number) * _DURATION_UNITS[unit]
    return -total if m.group(1) == "-" else total


def parse_config(data: bytes | str, where: str) -> list[ProviderSpec]:
    """A CredentialProviderConfig document (YAML, of which JSON is a subset), validated as
    the kubelet validates it (validateCredentialProviderConfig)."""
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{where}: not YAML or JSON: {e}") from None
    top = _Fields(doc, "", where, ("apiVersion", "kind", "providers"))
    version = top.get("apiVersion", str, required=True)
    if version not in CONFIG_API_VERSIONS:
        top.fail(f"{version!r} is not one of {', '.join(CONFIG_API_VERSIONS)}", "apiVersion")
    if top.get("kind", str, required=True) != CONFIG_KIND:
        top.fail(f"must be {CONFIG_KIND}, got {doc['kind']!r}", "kind")
    providers = top.get("providers", list, required=True)
    if not providers:
        top.fail("needs at least one provider", "providers")
    return [_provider(p, f"providers[{i}]", where) for i, p in enumerate(providers)]


def _provider(doc, path: str, where: str) -> ProviderSpec:
    f = _Fields(doc, path, where, ("name", "matchImages", "defaultCacheDuration", "apiVersion",
                                   "args", "env", "tokenAttributes"))
    name = f.get("name", str, required=True)
    if not name or "/" in name or " " in name or name in (".", ".."):
        f.fail(f"{name!r} must name a file in the bin dir: not empty, '.' or '..', no '/' "
               "or spaces", "name")
    version = f.get("apiVersion", str, required=True)
    if version not in PLUGIN_API_VERSIONS:
        f.fail(f"{version!r} is not one of {', '.join(PLUGIN_API_VERSIONS)}", "apiVersion")
    match_images = f.strings("matchImages", required=True)
    for i, pattern in enumerate(match_images):
        try:
            _pattern(pattern)
        except ValueError as e:
            f.fail(f"{pattern!r}: {e}", f"matchImages[{i}]")
    cache = f.duration("defaultCacheDuration", required=True)
    if cache < 0:
        f.fail("must not be negative", "defaultCacheDuration")
    env = []
    for i, item in enumerate(f.get("env", list, default=[])):
        e = _Fields(item, f"{path}.env[{i}]", where, ("name", "value"))
        env.append((e.get("name", str, required=True), e.get("value", str, required=True)))
    tokens = None
    if f.get("tokenAttributes", dict) is not None:
        if version != PLUGIN_V1:
            f.fail(f"is only supported with apiVersion {PLUGIN_V1}", "tokenAttributes")
        tokens = _token_attributes(doc["tokenAttributes"], f"{path}.tokenAttributes", where)
    return ProviderSpec(name, match_images, cache, version, f.strings("args"), tuple(env),
                        tokens)


def _token_attributes(doc, path: str, where: str) -> TokenAttributes:
    f = _Fields(doc, path, where, ("serviceAccountTokenAudience", "requireServiceAccount",
                                   "requiredServiceAccountAnnotationKeys",
                                   "optionalServiceAccountAnnotationKeys", "cacheType"))
    audience = f.get("serviceAccountTokenAudience", str, required=True)
    if not audience:
        f.fail("must not be empty", "serviceAccountTokenAudience")
    require = f.get("requireServiceAccount", bool, required=True)
    cache_type = f.get("cacheType", str, required=True)
    if cache_type not in TOKEN_CACHE_TYPES:
        f.fail(f"{cache_type!r} is not one of {', '.join(TOKEN_CACHE_TYPES)}", "cacheType")
    keys = {}
    for kind in ("required", "optional"):
        name = f"{kind}ServiceAccountAnnotationKeys"
        keys[kind] = f.strings(name)
        for k in keys[kind]:
            if not _QUALIFIED.fullmatch(k.lower()) or len(k.partition("/")[0]) > 253:
                f.fail(f"{k!r} is not an annotation key", name)
        if len(set(keys[kind])) != len(keys[kind]):
            f.fail("has duplicates", name)
    if set(keys["required"]) & set(keys["optional"]):
        f.fail("annotation keys cannot be both required and optional")
    if keys["required"] and not require:
        f.fail("requireServiceAccount cannot be false when requiredServiceAccountAnnotationKeys "
               "is set", "requiredServiceAccountAnnotationKeys")
    return TokenAttributes(audience, require, cache_type, keys["required"], keys["optional"])


def load_config(path: str) -> list[ProviderSpec]:
    """The providers of a config file, or of a directory's *.json, *.yaml and *.yml files in
    name order (provider names unique across them), as the kubelet reads them."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.endswith((".json", ".yaml", ".yml"))
                       and os.path.isfile(os.path.join(path, n)))
        if not files:
            raise InvalidArgument(f"{path}: no *.json, *.yaml or *.yml files in the directory")
    else:
        files = [path]
    specs: list[ProviderSpec] = []
    seen: dict[str, str] = {}
    for name in files:
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InvalidArgument(f"{name}: {e.strerror}") from None
        for i, spec in enumerate(parse_config(data, name)):
            if spec.name in seen:
                raise InvalidArgument(f"{name}: providers[{i}].name: {spec.name!r} is "
                                      f"already named in {seen[spec.name]}")
            seen[spec.name] = name
            specs.append(spec)
    return specs


# -- which images a provider is for --------------------------------------------------------
def _go_glob(pattern: str) -> re.Pattern:
    """Go's path/filepath.Match as a regex: `*` and `?` never match '/', `[…]` classes
    negated with `^` (not `!`), backslash escapes. A malformed pattern is a ValueError (Go's
    ErrBadPattern)."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            if i == n:
                raise ValueError("a pattern cannot end in '\\'")
            out.append(re.escape(pattern[i]))
            i += 1
        elif c == "[":
            negate = i < n and pattern[i] == "^"
            i += negate
            ranges = []
            while True:
                if i == n:
                    raise ValueError("unterminated '['")
                if pattern[i] == "]" and ranges:
                    i += 1
                    break
                lo, i = _class_char(pattern, i)
                hi = lo
                if i < n and pattern[i] == "-":
                    hi, i = _class_char(pattern, i + 1)
                    if hi < lo:
                        raise ValueError(f"bad range {lo}-{hi}")
                ranges.append(f"{re.escape(lo)}-{re.escape(hi)}")
            out.append(f"[{'^' if negate else ''}{''.join(ranges)}]")
        else:
            out.append(re.escape(c))
    return re.compile("".join(out), re.DOTALL)


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    if i >= len(pattern) or pattern[i] in "-]":
        raise ValueError("bad character class")
    if pattern[i] == "\\":
        if i + 1 >= len(pattern):
            raise ValueError("a pattern cannot end in '\\'")
        return pattern[i + 1], i + 2
    return pattern[i], i + 1


def _split_url(text: str) -> tuple[list[str], str, str]:
    """A schemeless URL (the kubelet's ParseSchemelessURL) → (host labels, port, path). An
    http(s):// scheme is dropped: a pattern may be written with one."""
    text = re.sub(r"^https?://", "", text, flags=re.IGNORECASE)
    host, slash, path = text.partition("/")
    path = slash + path
    port = ""
    if host.startswith("["):  # net.SplitHostPort: [v6]:port
        addr, _, rest = host[1:].partition("]")
        if rest.startswith(":"):
            host, port = addr, rest[1:]
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    return host.split("."), port, path


def _pattern(pattern: str) -> tuple[list[re.Pattern], str, str]:
    """A matchImages entry as (a regex per host label, port, path); ValueError if a glob is
    malformed."""
    labels, port, path = _split_url(pattern)
    if not pattern.strip() or not all(labels):
        raise ValueError("names no host")
    return [_go_glob(label) for label in labels], port, path


def match_image(pattern: str, image: str) -> bool:
    """The kubelet's URLsMatchStr(pattern, image): as many host labels, each matching its
    glob; equal ports; the pattern's path a prefix of the image's (a string prefix, as
    the kubelet compares it: `r.io/team` covers `r.io/teammate/x`)."""
    globs, port, path = _pattern(pattern)
    image_labels, image_port, image_path = _split_url(image)
    return (port == image_port and len(globs) == len(image_labels)
            and image_path.startswith(path)
            and all(g.fullmatch(label) for g, label in zip(globs, image_labels, strict=True)))


# -- who a pull is for ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Identity:
    """The pod a pull is for, as NodePublishVolume tells it (podInfoOnMount), and the raw
    TOKENS_KEY value from the CSIDriver's tokenRequests ("" when none came)."""

    namespace: str = ""
    pod: str = ""
    pod_uid: str = ""
    service_account: str = ""
    tokens: str = dataclasses.field(default="", repr=False)


def audience_token(tokens: str, audience: str) -> str:
    """The token for `audience` from a TOKENS_KEY value; "" when it holds none for it. A
    value that is not the kubelet's JSON is InvalidArgument (its text is never quoted: it
    holds tokens)."""
    if not tokens:
        return ""
    try:
        doc = json.loads(tokens)
    except ValueError:
        raise InvalidArgument(f"{TOKENS_KEY} is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{TOKENS_KEY} is not a JSON object of audiences")
    entry = doc.get(audience)
    if entry is None:
        return ""
    token = entry.get("token") if isinstance(entry, dict) else None
    if not isinstance(token, str):
        raise InvalidArgument(f"{TOKENS_KEY}[{audience!r}] has no \"token\" string")
    return token


def token_claims(token: str) -> dict:
    """The claims of a JWT, unverified: the kubelet handed it over, minted by the API server
    for this pod; it is read only to key caches by the identity it names. {} when it is
    not a JWT."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _service_account(token: str, identity: Identity) -> tuple[str, str, str]:
    """(namespace, name, uid) of the service account a token is for: from its claims
    (`kubernetes.io` → namespace, serviceaccount.name/uid; else `sub`
    system:serviceaccount:NS:NAME), else the pod's attributes with no UID."""
    claims = token_claims(token)
    k8s = claims.get("kubernetes.io")
    if isinstance(k8s, dict) and isinstance(k8s.get("serviceaccount"), dict):
        sa = k8s["serviceaccount"]
        return (str(k8s.get("namespace", "")), str(sa.get("name", "")), str(sa.get("uid", "")))
    sub = claims.get("sub")
    if isinstance(sub, str) and sub.startswith("system:serviceaccount:"):
        ns, _, name = sub[len("system:serviceaccount:"):].partition(":")
        return ns, name, ""
    return identity.namespace, identity.service_account, ""


def _hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest() if token else ""


def service_account_key(tokens: TokenAttributes, token: str,
                        identity: Identity) -> tuple[str, ...]:
    """The kubelet's generateServiceAccountCacheKey: namespace, name, UID, annotations (none
    here), and with cacheType Token the token's hash. Without a UID (a token whose claims
    do not say it) the hash is always in: a service account deleted and made again under
    the same name is another identity, and only the token tells them apart."""
    namespace, name, uid = _service_account(token, identity)
    key = (namespace, name, uid, "annotations:0")
    if tokens.cache_type == "Token" or not uid:
        key += ("token", _hash(token))
    return key


def registry_of(image: str) -> str:
    """The kubelet's parseRegistry: the image's first path segment (host and port)."""
    return image.split("/", 1)[0]


def cache_key(key_type: str, image: str, sa_key: tuple[str, ...]) -> tuple:
    """Where an answer of `cacheKeyType` is kept (generateCacheKey(base, serviceAccount))."""
    base = {"Image": image, "Registry": registry_of(image), "Global": GLOBAL_KEY}[key_type]
    return (base, sa_key)


# -- running a provider ---------------------------------------------------------------------
class ProviderFailed(Exception):
    """A provider gave no answer: its message is safe to log (no token, no password)."""


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
    except ValueError:
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
    """Run a plugin in a process group of its own, so that a timeout kills all of it: a
    child it left holding our pipes would otherwise keep the pull waiting."""
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


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
        note, and a line in the log."""
        out = Provided()
        identity = identity or Identity()
        for p in self.providers:
            if not p.matches(image):
                continue
            out.gated |= p.spec.tokens is not None
            try:
                token, sa_key = self._token(p.spec, identity)
                out.keyrings.append(p.provide(image, token, sa_key, timeout))
            except (ProviderFailed, _Skipped, InvalidArgument) as e:
                why = f"credential provider {p.spec.name} " + (
                    f"was not run: {e}" if isinstance(e, _Skipped)
                    else f"failed for {image}: {e}")
                log.warning("%s; pulling without its credentials", why,
                            extra={"image": image, "provider": p.spec.name})
                out.notes.append(why)
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
        token = audience_token(identity.tokens, attrs.audience)
        if not token:
            if attrs.require_service_account:
                raise _Skipped(
                    f"it requires the pod's service-account token for audience "
                    f"{attrs.audience!r} (tokenAttributes.requireServiceAccount) and the "
                    "request carried none; the CSIDriver must list that audience in "
                    "tokenRequests, and tokens come only with NodePublishVolume")
            return "", ()
        return token, service_account_key(attrs, token, identity)


