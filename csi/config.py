"""Settings from flags and environment, validated once into a frozen Config."""

import dataclasses
import os
import re

from csi.errors import InvalidArgument
from csi.image.registry import Options
from csi.store.gc import Policy

ENV_PREFIX = "STRATA_"


@dataclasses.dataclass(frozen=True)
class Config:
    endpoint: str = "unix:///csi/csi.sock"
    root: str = "/var/lib/strata"
    node_id: str = ""
    controller_endpoint: str = ""
    metrics_address: str = ""
    log_level: str = "INFO"
    grace_seconds: float = 10.0
    gc_policy: str = "lru"
    gc_high_percent: float = 85.0
    gc_low_percent: float = 80.0
    gc_max_bytes: int = 0
    gc_min_age: float = 300.0  # a warm cache, like the kubelet's image GC minimum age
    registry_config: str = ""  # a docker config.json with node-wide credentials
    registry_ca: tuple[str, ...] = ()
    insecure_registries: tuple[str, ...] = ()
    registry_mirrors: tuple[str, ...] = ()  # "REGISTRY=URL"
    registry_timeout: float = 10.0  # connect
    registry_read_timeout: float = 60.0
    registry_retries: int = 4
    tag_ttl: float = 300.0
    pull_wait: float = 100.0  # below the kubelet's ~2 min NodePublish deadline
    oci_layout_roots: tuple[str, ...] = ()  # where oci: images may live; empty: anywhere

    @property
    def registry(self) -> Options:
        mirrors = []
        for m in self.registry_mirrors:
            registry, sep, url = m.partition("=")
            if not sep or not registry or not url:
                raise InvalidArgument(f"--registry-mirror must be REGISTRY=URL, got {m!r}")
            mirrors.append((registry, url))
        return Options(ca_files=self.registry_ca, insecure=frozenset(self.insecure_registries),
                       mirrors=tuple(mirrors), connect_timeout=self.registry_timeout,
                       read_timeout=self.registry_read_timeout, retries=self.registry_retries)

    @property
    def gc(self) -> Policy:
        return Policy(self.gc_policy, self.gc_high_percent, self.gc_low_percent,
                      self.gc_max_bytes, self.gc_min_age)

    @property
    def socket_path(self) -> str:
        return socket_path(self.endpoint)

    @property
    def controller_socket_path(self) -> str:
        return socket_path(self.controller_endpoint) if self.controller_endpoint else ""

    def validate(self) -> "Config":
        socket_path(self.endpoint)
        if self.controller_endpoint:
            socket_path(self.controller_endpoint)
        if not os.path.isabs(self.root):
            raise InvalidArgument(f"--root must be an absolute path, got {self.root!r}")
        # Layer paths are joined into overlay's lowerdir=a:b:c,upperdir=… option string,
        # where ':' and ',' are separators; a root containing them cannot be expressed.
        if re.search(r"[:,\s]", self.root):
            raise InvalidArgument(f"--root must not contain ':', ',' or whitespace: {self.root!r}")
        if not self.node_id:
            raise InvalidArgument("--node-id (or STRATA_NODE_ID) is required")
        if len(self.node_id.encode()) > 256:
            raise InvalidArgument("--node-id must be at most 256 bytes (CSI limit)")
        if self.metrics_address:
            parse_host_port(self.metrics_address)
        try:
            self.gc.validate()
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        self.registry  # noqa: B018 - parses the mirrors
        for path in self.registry_ca + ((self.registry_config,) if self.registry_config else ()):
            if not os.path.isfile(path):
                raise InvalidArgument(f"{path} does not exist")
        if self.tag_ttl < 0 or self.pull_wait < 0 or self.registry_retries < 0:
            raise InvalidArgument("--tag-ttl, --pull-wait and --registry-retries must not be "
                                  "negative")
        return self


def socket_path(endpoint: str) -> str:
    """`unix:///abs/path.sock` (or `unix:/abs`) → `/abs/path.sock`; anything else is refused."""
    m = re.fullmatch(r"unix:(?://)?(/[^/].*)", endpoint)  # not unix://host/…
    if not m:
        raise InvalidArgument(f"endpoint must be unix:///ABSOLUTE/PATH, got {endpoint!r}")
    return m.group(1)


def parse_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def env_default(name: str, default: str = "") -> str:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)
