"""Settings: each one declared once, here, with its default, help text and the commands that
take it; `strata`'s flags, `STRATA_*` environment variables and the keys of the config file
(`read_file`) are generated from these declarations (cli.py), and a Config is validated
once, in `validate()`.
"""

import dataclasses
import difflib
import functools
import math
import os
import re
import socket
import ssl

import yaml

from csi import validate
from csi.errors import InvalidArgument
from csi.image.auth import Keyring
from csi.image.credprovider import CredentialProviders, MissingPlugin
from csi.image.registry import ClientOptions, mirror_endpoint
from csi.image.transport import Options
from csi.logs import FORMATS as LOG_FORMATS
from csi.store.gc import POLICIES as GC_POLICIES
from csi.store.gc import Policy

ENV_PREFIX = "STRATA_"
TOOLS = ("pull", "gc", "ls", "df", "diff")  # the operator tools that open a store
PULLING = ("serve", "pull")
EVERY = ("serve", *TOOLS)
SIZE_LIMIT_MECHANISMS = ("auto", "loop", "quota")
BACKENDS = ("overlay", "btrfs")


class CPUs(int):
    """The number of CPUs this process may run on (its affinity mask, which a container's
    cpuset narrows; not every CPU of the host), as a default that says what it is: the
    help text and docs/configuration.md name it rather than this machine's figure."""

    def __new__(cls):
        return super().__new__(cls, len(os.sched_getaffinity(0)) or 1)

    def __repr__(self) -> str:
        return "CPUs"

    __str__ = __repr__


def setting(default, help: str, commands: tuple[str, ...], flag: str = "",
            choices: tuple[str, ...] = ()):
    """A Config field that is also a command-line flag (`flag`, else the field's name with
    dashes) and an environment variable (STRATA_ and the flag in capitals)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "commands": commands, "flag": flag, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
    endpoint: str = setting("unix:///csi/csi.sock", "CSI node endpoint, unix:///PATH",
                            ("serve",))
    root: str = setting("/var/lib/strata", "store root: state.db, layers/, volumes/, tmp/",
                        EVERY)
    node_id: str = setting("", "this node's ID (Kubernetes: the node name); required",
                           ("serve",))
    controller_endpoint: str = setting("", "also serve the controller on this unix:///PATH",
                                       ("serve",))
    metrics_address: str = setting("", "serve Prometheus metrics on HOST:PORT", ("serve",))
    # docs/metrics.md: a scrape reads what the last pass found, never walks an upper dir.
    metrics_refresh_seconds: float = setting(
        15.0, "seconds between background passes over the publications' writable layers "
        "for the per-publication metrics", ("serve",))
    metrics_top_layers: int = setting(10, "strata_layer_references/_bytes name this many of "
                                      "the largest layers; the rest are layer=\"other\"",
                                      ("serve",))
    log_level: str = setting("INFO", "log level", ("serve",),
                             choices=("DEBUG", "INFO", "WARNING", "WARN", "ERROR",
                                      "CRITICAL"))
    # docs/logging.md: the keys of both formats.
    log_format: str = setting("text", "log lines as text (key=value fields) or json (one "
                              "object per line)", EVERY, choices=LOG_FORMATS)
    grace_seconds: float = setting(10.0, "how long running RPCs may take to finish on "
                                   "SIGTERM", ("serve",))
    # A DaemonSet rolled with maxSurge starts the new pod while the old one still serves.
    no_wait: bool = setting(False, "when another strata server holds the store (--root) "
                            "or serves on our sockets, exit with status 1 instead of "
                            "waiting for it to stop",
                            ("serve",))
    gc_policy: str = setting("lru", "immediate: drop unreferenced layers at once; lru: keep "
                             "them as a cache until the high-water mark", ("serve", "gc"),
                             choices=GC_POLICIES)
    gc_high_percent: float = setting(85.0, "lru: start collecting above this % of capacity",
                                     ("serve", "gc"))
    gc_low_percent: float = setting(80.0, "lru: collect down to this %", ("serve", "gc"))
    gc_max_bytes: int = setting(0, "capacity for the marks; 0 = the filesystem under --root",
                                ("serve", "gc"))
    # A warm cache, like the kubelet's image GC minimum age.
    gc_min_age: float = setting(300.0, "seconds a layer stays after its last use",
                                ("serve", "gc"))
    registry_config: str = setting("", "docker config.json with node-wide registry "
                                   "credentials", PULLING)
    registry_ca: tuple[str, ...] = setting((), "a PEM file of CAs to trust for registries, "
                                           "beside the system's", PULLING)
    insecure_registries: tuple[str, ...] = setting(
        (), "HOST:PORT to reach over plain HTTP (e.g. kind's local registry)", PULLING,
        flag="--insecure-registry")
    registry_mirrors: tuple[str, ...] = setting(
        (), "REGISTRY=URL: try this mirror first, falling back to the registry, e.g. "
        "docker.io=http://127.0.0.1:30020 (as containerd's hosts.toml: the API root is the "
        "URL's path + /v2, requests carry ?ns=REGISTRY); repeatable, tried in order",
        PULLING, flag="--registry-mirror")
    # docs/credential-providers.md: the kubelet's own flags and files, so that ECR, GCR and
    # ACR nodes pull image volumes without pull secrets.
    image_credential_provider_config: str = setting(
        "", "the kubelet's CredentialProviderConfig (a YAML or JSON file, or a directory of "
        "them): credential-provider plugins to run for registry credentials", PULLING)
    image_credential_provider_bin_dir: str = setting(
        "", "the directory of the plugins --image-credential-provider-config names", PULLING)
    registry_timeout: float = setting(10.0, "seconds to connect to a registry", PULLING)
    registry_read_timeout: float = setting(60.0, "seconds a registry may be silent "
                                           "mid-request", PULLING)
    registry_retries: int = setting(4, "retries on 429, 5xx and dropped connections "
                                    "(exponential backoff with jitter)", PULLING)
    tag_ttl: float = setting(300.0, "seconds a tag's resolution is trusted (IfNotPresent)",
                             PULLING)
    # As the kubelet's --max-parallel-image-pulls bounds a node's pulls: unpacking is CPU
    # work (inflate, tar parsing, file creation), so more than the CPUs only adds waiting.
    max_parallel_unpacks: int = setting(
        CPUs(), "layers this process unpacks at once, across pulls (each layer's "
        "blob streams into its unpack as it downloads; downloads may run ahead, buffered on "
        "disk); at least 1", PULLING)
    # Below the kubelet's ~2 min NodePublish deadline.
    pull_wait: float = setting(100.0, "seconds NodePublish waits for a pull before answering "
                               "ABORTED (the pull goes on; the kubelet's retry joins it)",
                               ("serve",))
    default_size_limit: str = setting(
        "", "bound the writable layer of volumes that name no sizeLimit, e.g. 1Gi (a "
        "Kubernetes quantity); empty: unbounded", ("serve",))
    # docs/size-limits.md: project quotas where the store's filesystem enforces them.
    size_limit_mechanism: str = setting(
        "auto", "how a sizeLimit is enforced: quota (project quotas of the filesystem under "
        "--root; start-up fails where it does not enforce them), loop (a filesystem image "
        "per volume, on a loop device), auto (quota where enforced, else loop)", ("serve",),
        choices=SIZE_LIMIT_MECHANISMS)
    # docs: the btrfs backend needs the store on btrfs (csi/backend/btrfs.py).
    backend: str = setting(
        "overlay", "storage backend: overlay (an overlay of the shared layers per volume) or "
        "btrfs (a subvolume snapshot per volume; --root must be on btrfs)", ("serve",),
        choices=BACKENDS)
    oci_layout_roots: tuple[str, ...] = setting(
        (), "allow oci:/PATH images only below this directory (default: anywhere)",
        ("serve",), flag="--oci-layout-root")

    @property
    def registry(self) -> Options:
        mirrors = []
        for m in self.registry_mirrors:
            registry, sep, url = m.partition("=")
            why = _mirror_url(registry, url) if sep and registry and url else ""
            if not sep or not registry or not url or why:
                raise InvalidArgument(f"--registry-mirror must be REGISTRY=URL, the URL "
                                      f"[http(s)://]HOST[:PORT][/PATH]"
                                      f"{f' ({why})' if why else ''}, got {m!r}")
            mirrors.append((registry, url))
        return ClientOptions(
            ca_files=self.registry_ca, insecure=frozenset(self.insecure_registries),
            mirrors=tuple(mirrors), connect_timeout=self.registry_timeout,
            read_timeout=self.registry_read_timeout, retries=self.registry_retries,
            credential_providers=self.credential_providers)

    @functools.cached_property
    def credential_providers(self) -> CredentialProviders | None:
        """The kubelet credential-provider plugins, their config read and checked once (a
        bad one refused naming the file and the field); None without the two flags."""
        path, bin_dir = (self.image_credential_provider_config,
                         self.image_credential_provider_bin_dir)
        if not path and not bin_dir:
            return None
        if not (path and bin_dir):
            raise InvalidArgument("--image-credential-provider-config and "
                                  "--image-credential-provider-bin-dir go together: give both "
                                  "or neither")
        for name in ("image_credential_provider_config", "image_credential_provider_bin_dir"):
            if not os.path.isabs(getattr(self, name)):
                raise InvalidArgument(f"{flag(_field(name))} must be an absolute path, got "
                                      f"{getattr(self, name)!r}")
        if not os.path.exists(path):
            raise InvalidArgument(f"--image-credential-provider-config: {path} does not exist")
        try:
            return CredentialProviders.load(path, bin_dir)
        except MissingPlugin as e:
            raise InvalidArgument(f"--image-credential-provider-bin-dir: {e}") from None
        except InvalidArgument as e:
            raise InvalidArgument(f"--image-credential-provider-config: {e}") from None

    @property
    def gc(self) -> Policy:
        return Policy(self.gc_policy, self.gc_high_percent, self.gc_low_percent,
                      self.gc_max_bytes, self.gc_min_age)

    @property
    def default_size_limit_bytes(self) -> int:
        # one parser for the flag and the volume attribute
        return validate.size_limit(self.default_size_limit, "--default-size-limit")

    @property
    def socket_path(self) -> str:
        return socket_path(self.endpoint)

    @property
    def controller_socket_path(self) -> str:
        return socket_path(self.controller_endpoint) if self.controller_endpoint else ""

    def validate(self, command: str = "serve") -> "Config":
        """Every check, once; `command` is what the settings are for (`serve` needs a node
        ID and endpoints, the tools only a store)."""
        for f in dataclasses.fields(self):  # also what the environment gave
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise InvalidArgument(f"{flag(f)} must be one of {', '.join(choices)}, got "
                                      f"{getattr(self, f.name)!r}")
        if not os.path.isabs(self.root):
            raise InvalidArgument(f"--root must be an absolute path, got {self.root!r}")
        # Layer paths are joined into overlay's lowerdir=a:b:c,upperdir=… option string,
        # where ':' and ',' are separators; a root containing them cannot be expressed.
        if re.search(r"[:,\s]", self.root):
            raise InvalidArgument(f"--root must not contain ':', ',' or whitespace: {self.root!r}")
        if command == "serve":
            for name in ("endpoint", "controller_endpoint"):
                if name == "endpoint" or self.controller_endpoint:
                    _named(_field(name), socket_path, getattr(self, name))
            if not self.node_id:
                raise InvalidArgument("--node-id (or STRATA_NODE_ID) is required")
            if len(self.node_id.encode()) > 256:
                raise InvalidArgument("--node-id must be at most 256 bytes (CSI limit)")
            if self.metrics_address:
                _named(_field("metrics_address"), resolve_host_port, self.metrics_address)
        self._check_numbers()
        try:
            self.gc.validate()
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        self.registry  # noqa: B018 - parses the mirrors, reads the credential providers
        for host in self.insecure_registries:
            if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^/\s:@\[\]]+)(:[0-9]+)?", host):
                raise InvalidArgument(f"--insecure-registry must be HOST or HOST:PORT (no "
                                      f"scheme or path), got {host!r}")
        for root in self.oci_layout_roots:
            if not os.path.isabs(root):
                raise InvalidArgument(f"--oci-layout-root must be an absolute path, got "
                                      f"{root!r}")
        self.default_size_limit_bytes  # noqa: B018
        for name in ("registry_ca", "registry_config"):
            value = getattr(self, name)
            for path in (value,) if isinstance(value, str) else value:
                if path and not os.path.isfile(path):
                    why = "is not a file" if os.path.exists(path) else "does not exist"
                    raise InvalidArgument(f"{flag(_field(name))}: {path} {why}")
        # Read now, so that a file that is not what it should be is refused by its flag at
        # start-up, not found out at the first pull as a registry failure (and retried).
        for path in self.registry_ca:
            try:
                ssl.create_default_context().load_verify_locations(cafile=path)
            except (ssl.SSLError, OSError) as e:
                raise InvalidArgument(f"--registry-ca: {path} holds no PEM certificate "
                                      f"({getattr(e, 'reason', None) or e})") from None
        if self.registry_config:
            _named(_field("registry_config"), Keyring.from_file, self.registry_config)
        return self

    def _check_numbers(self) -> None:
        """Every number a finite value in its range, the flag named: `nan` or `inf` parse as
        floats but mean no duration (and `inf` overflows the timers it reaches)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type not in (int, float) or isinstance(value, bool):
                continue
            if not math.isfinite(value):
                raise InvalidArgument(f"{flag(f)} must be a finite number, got {value!r}")
            if value < 0:
                raise InvalidArgument(f"{flag(f)} must not be negative, got {value!r}")
        if self.max_parallel_unpacks < 1:
            raise InvalidArgument(f"--max-parallel-unpacks must be at least 1, got "
                                  f"{self.max_parallel_unpacks}")
        for name in ("registry_timeout", "registry_read_timeout"):
            if getattr(self, name) == 0:  # a socket timeout of 0 is non-blocking, not "none"
                raise InvalidArgument(f"{flag(_field(name))} must be more than 0 seconds")


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(Config) if f.name == name)


def _named(field: dataclasses.Field, check, value):
    """`check(value)`, its refusal naming the flag."""
    try:
        return check(value)
    except InvalidArgument as e:
        raise InvalidArgument(f"{flag(field)}: {e}") from None


def settings(command: str) -> list[dataclasses.Field]:
    """The settings a command takes, in declaration order."""
    return [f for f in dataclasses.fields(Config) if command in f.metadata["commands"]]


def switch(field: dataclasses.Field) -> bool:
    """An on/off setting: a flag without a value; in the environment 1/true/yes/on or
    0/false/no/off."""
    return field.type is bool


def parse_switch(text: str, name: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False, "": False}.get(
        text.strip().lower())
    if value is None:
        raise InvalidArgument(f"{name} must be true or false (1/0, yes/no, on/off), got "
                              f"{text!r}")
    return value


def repeatable(field: dataclasses.Field) -> bool:
    """A list setting: a repeatable flag, a comma-separated environment variable."""
    return field.type == tuple[str, ...]


def flag(field: dataclasses.Field) -> str:
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def env_name(field: dataclasses.Field) -> str:
    return ENV_PREFIX + flag(field).lstrip("-").replace("-", "_").upper()


def socket_path(endpoint: str) -> str:
    """`unix:///abs/path.sock` (or `unix:/abs`) → `/abs/path.sock`; anything else is refused."""
    m = re.fullmatch(r"unix:(?://)?(/[^/].*)", endpoint)  # not unix://host/…
    if not m:
        raise InvalidArgument(f"endpoint must be unix:///ABSOLUTE/PATH, got {endpoint!r}")
    return m.group(1)


def _mirror_url(registry: str, url: str) -> str:
    """Why registry.py would refuse this mirror URL; "" when it takes it."""
    try:
        mirror_endpoint(registry, url)
    except ValueError as e:
        return str(e)
    return ""


def resolve_host_port(address: str) -> tuple[str, int]:
    """parse_host_port, and the host resolved as the HTTP server will bind it: a name that
    does not resolve is refused at start-up, by the flag, not as a traceback later."""
    host, port = parse_host_port(address)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise InvalidArgument(f"cannot bind {address!r}: {e}") from None
    return host, port


def parse_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and int(port) == 0:
        # The kernel would pick a port, and no scrape configuration could name it.
        raise InvalidArgument(f"address must be HOST:PORT with a fixed port (1-65535; port "
                              f"0 would listen on a random one no scrape can find), got "
                              f"{address!r}")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


# -- the config file --------------------------------------------------------------------
# A YAML mapping whose keys are the flags without their dashes (`insecure-registry: [a,
# b]`, `registry-timeout: 5`): what a DaemonSet mounts once so that the server and every
# tool exec'd beside it (`kubectl exec … strata pull`) agree. Precedence (cli.py): flag >
# environment > file > default.
CONFIG_ENV = "STRATA_CONFIG"
DEFAULT_CONFIG_FILE = "/etc/strata/config.yaml"  # read only if it exists


def file_key(field: dataclasses.Field) -> str:
    return flag(field).lstrip("-")


def value_type(field: dataclasses.Field):
    """What turns a flag's, variable's or file's text into the setting's value: upper-case
    choices (log levels) are taken in any case."""
    choices = field.metadata["choices"]
    return str.upper if choices and all(c.isupper() for c in choices) else field.type


def read_file(path: str, required: bool = True) -> dict[str, object]:
    """The settings the config file at `path` gives, by field name, each converted and
    checked as its flag's value would be (ranges are Config.validate's). A key with no
    value is as if absent. A missing file is {} unless `required` (a path the operator
    named). InvalidArgument names the file and the key."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)  # a SafeLoader
    except FileNotFoundError:
        if required:
            raise InvalidArgument(f"config file {path}: no such file") from None
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"config file {path}: cannot read it: "
                              f"{getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        raise InvalidArgument(f"config file {path}: not valid YAML: {_yaml_problem(e)}") \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"config file {path}: must be a mapping of settings (e.g. "
                              f"`registry-timeout: 5`), got a {type(data).__name__}")
    fields = {file_key(f): f for f in dataclasses.fields(Config)}
    values = {}
    for key, value in data.items():
        f = fields.get(key) if isinstance(key, str) else None
        if f is None:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise InvalidArgument(f"config file {path}: unknown key {key!r}{hint}; the keys "
                                  "are the flags without dashes (`strata serve --help`)")
        if value is not None:
            try:
                values[f.name] = _from_yaml(f, value)
            except (InvalidArgument, ValueError) as e:
                raise InvalidArgument(f"config file {path}: {key}: {e}") from None
    return values


def _from_yaml(f: dataclasses.Field, value):
    """A setting's value from YAML's types; text is converted as the environment's is."""
    def text(item) -> str:
        if isinstance(item, str):
            return item
        # YAML reads `0123` as 83 and `1:30` as 90: a number where text is meant is
        # refused, not turned back into other text.
        raise ValueError(f"expected text, got {type(item).__name__} {item!r} (how YAML "
                         "reads it unquoted); quote it")

    if repeatable(f):  # a list, or one string (comma-separated, as in the environment)
        items = value if isinstance(value, list) else [x for x in text(value).split(",") if x]
        return tuple(text(x) for x in items)
    if switch(f):
        return value if isinstance(value, bool) else parse_switch(text(value), "the value")
    if f.type in (int, float) and isinstance(value, str):
        try:
            converted = f.type(value)
        except ValueError:
            raise ValueError(f"invalid {f.type.__name__} value: {value!r}") from None
    elif f.type in (int, float):
        allowed = int if f.type is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise ValueError(f"expected {'an integer' if f.type is int else 'a number'}, "
                             f"got {type(value).__name__} {value!r}")
        converted = f.type(value)
    else:
        converted = value_type(f)(text(value))
    choices = f.metadata["choices"]
    if choices and converted not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
    return converted


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: the problem and where (its str() takes several)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice (PyYAML keeps the last silently)."""


def _mapping(loader: _Loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark)
        if isinstance(key, str):
            seen.add(key)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
