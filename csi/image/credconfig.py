"""The kubelet's `CredentialProviderConfig` (`kubelet.config.k8s.io/v1`, YAML or JSON, or a
directory of them) read and checked as the kubelet checks it, and its `matchImages`: which
images a credential provider is for (docs/credential-providers.md).

- `load_config` / `parse_config`: the providers, strictly (unknown fields and wrong types
  refused, naming the file and the field's path), with Go durations (`parse_duration`).
- `match_image`: the kubelet's URLsMatchStr: a glob per dot-separated host label, `*` never
  crossing a dot; the port equal when either names one; the pattern's path a string prefix
  of the image's. The image is the repository as the kubelet names it:
  "docker.io/library/nginx", no tag or digest.
"""

import dataclasses
import math
import os
import re

import yaml

from csi.errors import InvalidArgument

CONFIG_KIND = "CredentialProviderConfig"
CONFIG_API_VERSIONS = ("kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1beta1",
                       "kubelet.config.k8s.io/v1alpha1")
PLUGIN_V1 = "credentialprovider.kubelet.k8s.io/v1"
PLUGIN_API_VERSIONS = (PLUGIN_V1, "credentialprovider.kubelet.k8s.io/v1beta1",
                       "credentialprovider.kubelet.k8s.io/v1alpha1")
TOKEN_CACHE_TYPES = ("ServiceAccount", "Token")

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
    "90s", "1.5h", "0". Seconds.

    Read in one pass, piece by piece (a number, then its unit), never with a regex that
    backtracks: a provider's answer is untrusted, and `(number unit)+` with optional
    digits can be made to backtrack for hours on a few dozen bytes ("1111a" * 40 + "!")."""
    text = text.strip()
    shown = repr(text) if len(text) <= 80 else repr(text[:77] + "...")
    if text in ("0", "+0", "-0"):
        return 0.0
    sign, i, n, total = 1.0, 0, len(text), 0.0
    if text[:1] in ("-", "+"):
        sign, i = (-1.0 if text[0] == "-" else 1.0), 1
    if i == n:
        raise ValueError(f"{shown} is not a duration such as \"12h\", \"1h30m\" or \"90s\"")
    while i < n:
        start = i
        while i < n and "0" <= text[i] <= "9":
            i += 1
        whole = text[start:i]
        fraction = ""
        if i < n and text[i] == ".":
            i += 1
            dot = i
            while i < n and "0" <= text[i] <= "9":
                i += 1
            fraction = text[dot:i]
        if not whole and not fraction:
            raise ValueError(f"{shown} is not a duration such as \"12h\", \"1h30m\" or "
                             "\"90s\"")
        at = i
        while i < n and not ("0" <= text[i] <= "9" or text[i] == "."):
            i += 1
        unit = text[at:i]
        if not unit:
            raise ValueError(f"{shown}: a number without a unit (ns, us, ms, s, m, h)")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"{shown}: unknown unit {unit[:20]!r} (ns, us, ms, s, m, h)")
        total += float(f"{whole or 0}.{fraction or 0}") * _DURATION_UNITS[unit]
    if not math.isfinite(total):
        raise ValueError(f"{shown}: out of range")
    return sign * total


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
