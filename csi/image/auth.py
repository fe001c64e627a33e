"""Registry credentials in the kubelet's forms.

Pull secrets reach NodePublish/NodeStage as CSI `secrets`: the data of a
`kubernetes.io/dockerconfigjson` Secret, i.e. a `.dockerconfigjson` key holding
`{"auths": {"HOST": {"auth": base64(user:pass)} | {"username", "password"}}}` (or the legacy
`.dockercfg` without the "auths" wrapper). The node may also have a docker `config.json`
(`--registry-config`). Keys are matched like the kubelet's credential provider (keyring
`URLsMatch`): scheme and `/v1/`, `/v2/` prefixes ignored, Docker Hub's aliases unified, host
and port split apart (IPv6 literals unbracketed), each dot-separated part of the host matched
as a glob against the same part of the registry (so `*.example.com` covers `a.example.com`
but neither `example.com` nor `a.b.example.com`), ports equal; the longest matching path
prefix wins, then an exact host over a glob, then a pod's secret over the node's config.
An entry with no username, password or identity token is not credentials: it is what
`docker login` writes beside a `credsStore`, and is skipped.

A pull may present what several sources offer (`CredentialChain`), in the kubelet's order:
the pod's pull secrets, then what credential-provider plugins answered (credprovider.py),
then the node's config; like the kubelet, a pull tries each in turn until the registry
accepts one.
"""

import base64
import dataclasses
import fnmatch
import re

from csi.digest import sha256_hex
from csi.errors import InvalidArgument
from csi.image.manifest import json_object

DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
SECRET_KEYS = (".dockerconfigjson", ".dockercfg")


@dataclasses.dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)
    identity_token: str = dataclasses.field(default="", repr=False)

    def fingerprint(self) -> str:
        return sha256_hex(f"{self.username}\0{self.password}\0{self.identity_token}"
                          .encode())[:16]


def normalise_key(key: str) -> tuple[str, str]:
    """A config key → (host glob, path prefix)."""
    key = re.sub(r"^[a-z]+://", "", key.strip().lower())
    host, _, path = key.partition("/")
    path = re.sub(r"^v[12](/|$)", "", path.strip("/"))  # docker treats /v1/, /v2/ as the host
    if host in DOCKER_HUB_ALIASES:
        host = "docker.io"
    return host, path


def _split_host(host: str) -> tuple[list[str], str]:
    """HOST[:PORT] → (dot-separated parts of the host, port), as Go's net.SplitHostPort
    splits them: `[::1]:5000` → (["::1"], "5000"), `[::1]` → (["::1"], "")."""
    if host.startswith("["):
        addr, _, rest = host[1:].partition("]")
        return [addr], rest[1:] if rest.startswith(":") else ""
    if host.count(":") == 1:
        host, _, port = host.partition(":")
        return host.split("."), port
    return host.split("."), ""  # no port (or a bare IPv6 address: one part, no dots)


def host_matches(glob: str, host: str) -> bool:
    """Whether a config key's host (a glob per part, kubelet `URLsMatch`) covers `host`."""
    glob_parts, glob_port = _split_host(glob)
    parts, port = _split_host(host)
    if glob_port != port or len(glob_parts) != len(parts):
        return False
    # Per part, never on the raw key: brackets are gone, and `*` cannot cross a dot.
    return all(fnmatch.fnmatchcase(p, g) for g, p in zip(glob_parts, parts, strict=True))


def parse_config(data: str | bytes, what: str) -> list[tuple[str, str, Credentials]]:
    doc = json_object(data, what)
    auths = doc.get("auths", doc if "auths" not in doc else {})
    if not isinstance(auths, dict):
        raise InvalidArgument(f"{what}: 'auths' is not an object")
    out = []
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        user, password = entry.get("username", ""), entry.get("password", "")
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise InvalidArgument(f"{what}: the 'auth' of {key!r} is not base64 "
                                      "user:password") from None
        creds = Credentials(str(user), str(password), str(entry.get("identitytoken", "")))
        if not (creds.username or creds.password or creds.identity_token):
            # `{"auths": {"HOST": {}}, "credsStore": "desktop"}`: the secret is in a helper
            # the node cannot run. Sending `Basic Og==` (":") would only be refused.
            continue
        out.append((*normalise_key(key), creds))
    return out


class Keyring:
    """Credentials by registry; later sources (pod secrets) win over earlier ones (node)."""

    def __init__(self, entries: list[tuple[str, str, Credentials]] | None = None):
        self._entries = list(entries or [])

    @classmethod
    def from_secrets(cls, secrets: dict[str, str], base: "Keyring | None" = None) -> "Keyring":
        entries = list(base._entries) if base else []
        for key in SECRET_KEYS:
            if key in secrets:
                entries += parse_config(secrets[key], f"pull secret {key}")
        return cls(entries)

    @classmethod
    def from_file(cls, path: str) -> "Keyring":
        with open(path, "rb") as f:
            return cls(parse_config(f.read(), path))

    def lookup(self, registry: str, repository: str) -> Credentials | None:
        host = "docker.io" if registry.lower() in DOCKER_HUB_ALIASES else registry.lower()
        best, best_score = None, (-1, False, -1)
        for i, (glob, prefix, creds) in enumerate(self._entries):
            if not host_matches(glob, host):
                continue
            if prefix and not (repository == prefix or repository.startswith(prefix + "/")):
                continue
            # The longest path prefix wins; then an exact host over a glob; then the later
            # source (a pod's secret over the node's config).
            score = (len(prefix), not any(c in glob for c in "*?["), i)
            if score > best_score:
                best, best_score = creds, score
        return best


class CredentialChain:
    """The credentials one pull may present, source by source in the kubelet's order (its
    unionDockerKeyring: pull secrets first, then the node's providers): each keyring's best
    match for a registry, without repeats."""

    def __init__(self, keyrings: list[Keyring]):
        self._keyrings = keyrings

    def lookup(self, registry: str, repository: str) -> list[Credentials]:
        out: list[Credentials] = []
        for ring in self._keyrings:
            creds = ring.lookup(registry, repository)
            if creds is not None and creds not in out:
                out.append(creds)
        return out

    def fingerprint(self, registry: str, repository: str) -> str:
        """One hash of the credentials, in order ("" for none): pulls that would present
        the same credentials may share a download."""
        found = self.lookup(registry, repository)
        if not found:
            return ""
        return sha256_hex("\0".join(c.fingerprint() for c in found).encode())[:16]
