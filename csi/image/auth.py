"""Registry credentials in the kubelet's forms.

Pull secrets reach NodePublish/NodeStage as CSI `secrets`: the data of a
`kubernetes.io/dockerconfigjson` Secret, i.e. a `.dockerconfigjson` key holding
`{"auths": {"HOST": {"auth": base64(user:pass)} | {"username", "password"}}}` (or the legacy
`.dockercfg` without the "auths" wrapper). The node may also have a docker `config.json`
(`--registry-config`). Keys are matched like the kubelet's credential provider: scheme and
`/v1/` suffixes ignored, Docker Hub's aliases unified, `*.domain` globs, and the longest
matching path prefix wins.
"""

import base64
import dataclasses
import fnmatch
import re

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
        import hashlib

        return hashlib.sha256(f"{self.username}\0{self.password}\0{self.identity_token}"
                              .encode()).hexdigest()[:16]


def _normalise_key(key: str) -> tuple[str, str]:
    """A config key → (host glob, path prefix)."""
    key = re.sub(r"^[a-z]+://", "", key.strip().lower())
    host, _, path = key.partition("/")
    path = path.strip("/")
    if path in ("v1", "v2"):
        path = ""
    if host in DOCKER_HUB_ALIASES:
        host = "docker.io"
    return host, path


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
        out.append((*_normalise_key(key), creds))
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
        best, best_len = None, -1
        for i, (glob, prefix, creds) in enumerate(self._entries):
            if not fnmatch.fnmatchcase(host, glob):
                continue
            if prefix and not (repository == prefix or repository.startswith(prefix + "/")):
                continue
            # longest path prefix wins; among equals, the later source (a pod's secret)
            score = len(prefix) * 1000 + i
            if score > best_len:
                best, best_len = creds, score
        return best
