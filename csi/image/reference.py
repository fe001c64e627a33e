"""Image references as pod authors write them in the `image` volume attribute.

Two forms are accepted:

* `oci:/ABS/PATH[:TAG]` — a local OCI image layout (skopeo's syntax), parsed into a
  `LayoutReference`;
* anything else is a registry reference, normalised exactly as the kubelet and containerd do
  (github.com/distribution/reference `ParseNormalizedNamed`), parsed into a
  `RegistryReference`: `nginx` is `docker.io/library/nginx:latest`, `localhost:5000/app:v1`
  names the registry `localhost:5000`, and `name:tag@sha256:…` keeps both tag and digest.

Grammar (distribution/reference):

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [domain "/"] path
    domain           := host [":" port]        host := domain-name | "[" IPv6 "]"
    domain-name      := domain-component ("." domain-component)*
    domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
    port             := [0-9]+
    path             := path-component ("/" path-component)*
    path-component   := [a-z0-9]+ (separator [a-z0-9]+)*    separator := [._] | "__" | "-"+
    tag              := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest           := "sha256:" [0-9a-f]{64}   (the only algorithm accepted here)

The first `/`-separated component is the domain when it contains "." or ":", is "localhost",
or contains an uppercase letter (Docker's rule: repository paths are lowercase, so such a
component can only be a host); otherwise the domain is "docker.io". A single-component name is
always on Docker Hub (`localhost` alone is `docker.io/library/localhost`, as in Docker).

Deliberate differences from distribution/reference, all refusals of strings it would accept:
a bare `sha256:…` (Docker's parser reads it as the image `library/sha256` with a hex tag;
the CRI treats it as an image ID), a first component that was taken as the domain but is not
a valid one (e.g. `foo_bar.com/x`, which distribution silently turns into a domain-less name
that cannot be pulled), and a canonical name (`registry/repository`) longer than 255
characters (distribution >= 0.6 limits only the repository path; the distribution spec and
older Docker limit the whole name).
"""

import dataclasses
import re

from csi.errors import InvalidArgument

_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

DOCKER_HUB = "docker.io"
DOCKER_HUB_LEGACY = "index.docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
OFFICIAL_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_MAX = 255

# `-+` rather than the grammar's `[-]*`: the same language, without the ambiguity that would
# make Python's backtracking matcher exponential on long alphanumeric runs.
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?")
_IPV6 = re.compile(r"\[[a-fA-F0-9:]+\]")
_PORT = re.compile(r"[0-9]+")
# What distribution's grammar calls a digest (any algorithm, >= 128 bits of hex).
_ANY_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_IMAGE_ID = re.compile(r"[a-f0-9]{64}")
_BARE_DIGEST = re.compile(r"sha(?:256|384|512):[^/@]*", re.IGNORECASE)
_TRANSPORT = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*:)/")


@dataclasses.dataclass(frozen=True)
class LayoutReference:
    """An image in a local OCI image layout: `path` is the layout directory, `tag` the
    `org.opencontainers.image.ref.name` annotation of its index entry (or a digest)."""

    path: str
    tag: str = ""

    def __str__(self) -> str:
        return f"oci:{self.path}:{self.tag}" if self.tag else f"oci:{self.path}"


@dataclasses.dataclass(frozen=True)
class RegistryReference:
    """A normalised registry reference: `registry` is the domain as Docker names it
    ("docker.io", "localhost:5000", "[::1]:5000"), `repository` the path within it
    ("library/nginx"). `parse()` always sets a tag or a digest (or both)."""

    registry: str
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        """The canonical name without tag or digest: "docker.io/library/nginx"."""
        return f"{self.registry}/{self.repository}"

    def _suffix(self) -> str:
        return (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.name + self._suffix()

    @property
    def reference(self) -> str:
        """The `<reference>` of the Distribution API's /v2/<name>/manifests/<reference>:
        the digest when there is one, else the tag."""
        return self.digest or self.tag

    @property
    def api_host(self) -> str:
        """The host (and port) to contact for the Distribution API."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry


def parse(image: str) -> LayoutReference | RegistryReference:
    if not image:
        raise InvalidArgument("volume attribute 'image' is empty")
    if len(image) > 4096:
        raise InvalidArgument(f"image reference {image[:80]!r} is malformed: it is too long")
    if any(c.isspace() for c in image):
        raise InvalidArgument(f"image reference {image[:80]!r} is malformed: it contains "
                              "whitespace")
    if image.startswith("oci:"):
        return _parse_layout(image)
    return _parse_registry(image)


def _parse_layout(image: str) -> LayoutReference:
    rest = image[len("oci:"):]
    path, tag = rest, ""
    # The tag is whatever follows the last ':' after the last '/', as in skopeo;
    # `oci:/x:sha256:…` names a manifest by digest.
    m = re.fullmatch(r"(.*?):(sha256:[0-9a-f]{64})", rest)
    if m:
        path, tag = m.groups()
    elif ":" in rest.rsplit("/", 1)[-1]:
        path, tag = rest.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(f"image {image!r}: invalid tag {tag!r}")
    if not path.startswith("/"):
        raise InvalidArgument(f"image {image!r}: the OCI layout path must be absolute")
    if "/../" in path + "/" or path.endswith("/.."):
        raise InvalidArgument(f"image {image!r}: the OCI layout path must not contain '..'")
    return LayoutReference(path=path.rstrip("/") or "/", tag=tag)


def _invalid(problem: str, image: str) -> InvalidArgument:
    return InvalidArgument(f"invalid reference format: {problem}: {image!r}")


def _parse_registry(image: str) -> RegistryReference:
    m = _TRANSPORT.match(image)
    if m:
        raise _invalid(f"unknown transport {m.group(1)!r} (a local OCI layout is written "
                       "oci:/ABSOLUTE/PATH:TAG, a registry image e.g. nginx:1.27)", image)
    if _IMAGE_ID.fullmatch(image):
        raise _invalid("a 64-hex-digit string is an image ID, not a repository name; "
                       "write REPOSITORY@sha256:<hex>", image)
    if _BARE_DIGEST.fullmatch(image):
        raise _invalid("a digest alone names no repository; write REPOSITORY@sha256:<hex>", image)
    if image.startswith("/"):
        raise _invalid("a reference must not start with '/' (a local OCI layout is written "
                       "oci:/ABSOLUTE/PATH:TAG)", image)
    if image[0] in ":@":
        raise _invalid(f"missing repository name before {image[0]!r}", image)

    registry, remainder = _split_domain(image)

    digest = ""
    if "@" in remainder:
        remainder, _, digest = remainder.partition("@")
        _check_digest(digest, image)
    path, colon, tag = remainder.partition(":")
    _check_path(path, image)
    if colon:
        if not tag:
            raise _invalid("empty tag after ':'", image)
        if not _TAG.fullmatch(tag):
            raise _invalid(f"invalid tag {tag!r}", image)
    elif not digest:
        tag = DEFAULT_TAG

    _check_domain(registry, image)
    name = f"{registry}/{path}"
    if len(name) > NAME_MAX:
        raise _invalid(f"repository name must not be more than {NAME_MAX} characters", image)
    return RegistryReference(registry=registry, repository=path, tag=tag, digest=digest)


def _split_domain(image: str) -> tuple[str, str]:
    """Docker's splitDockerDomain: (domain, remainder) where remainder is the path with any
    tag and digest still attached."""
    first, slash, rest = image.partition("/")
    if not slash:
        # A single component ("nginx", "nginx:1.27", even "localhost") is on Docker Hub; a
        # ':' here introduces a tag, never a port.
        return DOCKER_HUB, OFFICIAL_PREFIX + image
    if first == DOCKER_HUB_LEGACY:
        domain, remainder = DOCKER_HUB, rest
    elif first == "localhost" or "." in first or ":" in first or first.lower() != first:
        domain, remainder = first, rest
    else:
        domain, remainder = DOCKER_HUB, image
    if domain == DOCKER_HUB and "/" not in remainder:
        remainder = OFFICIAL_PREFIX + remainder
    return domain, remainder


def _check_digest(digest: str, image: str) -> None:
    if not digest:
        raise _invalid("'@' must be followed by a digest", image)
    if _DIGEST.fullmatch(digest):
        return
    algorithm, colon, _ = digest.partition(":")
    if colon and algorithm != "sha256" and _ANY_DIGEST.fullmatch(digest):
        raise _invalid(f"unsupported digest algorithm {algorithm!r}: only sha256 is supported",
                       image)
    raise _invalid(f"invalid digest {digest!r}: expected sha256: and 64 lowercase hex digits",
                   image)


def _check_path(path: str, image: str) -> None:
    if not path:
        raise _invalid("repository name must have at least one component", image)
    if path.lower() != path:
        raise _invalid("repository name must be lowercase", image)
    for component in path.split("/"):
        if not component:
            raise _invalid("repository name has an empty path component", image)
        if not _PATH_COMPONENT.fullmatch(component):
            raise _invalid(f"invalid repository path component {component!r}", image)


def _check_domain(domain: str, image: str) -> None:
    if domain.startswith("["):
        host, bracket, port = domain.partition("]")
        host += bracket
        if not _IPV6.fullmatch(host):
            raise _invalid(f"invalid IPv6 address {host!r} in registry host", image)
    else:
        host = domain.partition(":")[0]
        port = domain[len(host):]
        for component in host.split("."):
            if not _DOMAIN_COMPONENT.fullmatch(component):
                raise _invalid(f"invalid registry host {domain!r}", image)
    if port and not (port.startswith(":") and _PORT.fullmatch(port[1:])):
        raise _invalid(f"invalid port in registry host {domain!r}", image)


def is_digest(s: str) -> bool:
    return bool(_DIGEST.fullmatch(s))
