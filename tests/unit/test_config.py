"""csi/config.py: endpoints, HOST:PORT, Config.validate(), and the flags and environment
variables generated from the settings' declarations."""

import dataclasses
import shutil
import ssl

import pytest

from csi import cli, compose
from csi.config import Config, env_name, flag, parse_host_port, settings, socket_path
from csi.errors import FailedPrecondition, InvalidArgument


@pytest.mark.parametrize("endpoint, path", [
    ("unix:///csi/csi.sock", "/csi/csi.sock"),
    ("unix:/csi/csi.sock", "/csi/csi.sock"),
    ("unix:///var/lib/kubelet/plugins/strata.csi.dev/csi.sock",
     "/var/lib/kubelet/plugins/strata.csi.dev/csi.sock"),
])
def test_socket_path(endpoint, path):
    assert socket_path(endpoint) == path


@pytest.mark.parametrize("endpoint", [
    "", "/csi/csi.sock", "unix:relative.sock", "tcp://127.0.0.1:10000", "UNIX:///csi.sock",
    "unix:", "dns:///x",
])
def test_socket_path_refused(endpoint):
    with pytest.raises(InvalidArgument, match="unix:///ABSOLUTE/PATH"):
        socket_path(endpoint)


@pytest.mark.parametrize("endpoint", ["unix://", "unix:///", "unix://tmp/csi.sock"])
def test_socket_path_refuses_authority_forms(endpoint):
    with pytest.raises(InvalidArgument):
        socket_path(endpoint)


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:9090", ("127.0.0.1", 9090)),
    (":9090", ("0.0.0.0", 9090)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("localhost:65535", ("localhost", 65535)),
    ("[::1]:8080", ("::1", 8080)),
    ("[::]:8080", ("::", 8080)),
])
def test_parse_host_port(address, expected):
    assert parse_host_port(address) == expected


@pytest.mark.parametrize("address", ["9090", "host:", "host:0", "host:65536", "host:-1",
                                     "host:http", "host:80a", ""])
def test_parse_host_port_refused(address):
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        parse_host_port(address)


def good(**over) -> Config:
    return dataclasses.replace(Config(node_id="node-1", root="/var/lib/strata"), **over)


def test_defaults_validate_with_node_id():
    cfg = good()
    assert cfg.validate() is cfg
    assert cfg.socket_path == "/csi/csi.sock"
    assert cfg.controller_socket_path == ""


def test_controller_socket_path():
    cfg = good(controller_endpoint="unix:///csi/controller.sock")
    assert cfg.validate().controller_socket_path == "/csi/controller.sock"


@pytest.mark.parametrize("over, fragment", [
    ({"endpoint": "tcp://0:1"}, "endpoint must be"),
    ({"controller_endpoint": "relative.sock"}, "endpoint must be"),
    ({"root": "var/lib/strata"}, "--root must be an absolute path"),
    ({"root": ""}, "--root must be an absolute path"),
    ({"root": "/var/lib/str:ata"}, "must not contain"),
    ({"root": "/var/lib/str,ata"}, "must not contain"),
    ({"root": "/var/lib/str ata"}, "must not contain"),
    ({"root": "/var/lib/str\tata"}, "must not contain"),
    ({"node_id": ""}, "--node-id"),
    ({"node_id": "n" * 257}, "at most 256"),
    ({"metrics_address": "9090"}, "HOST:PORT"),
    ({"gc_policy": "never"}, "--gc-policy must be one of"),
    ({"log_level": "VERBOSE"}, "--log-level must be one of"),
    ({"gc_high_percent": 70.0, "gc_low_percent": 80.0}, "--gc-low-percent"),
    ({"gc_high_percent": 101.0}, "--gc-high-percent"),
    ({"gc_low_percent": -1.0}, "--gc-low-percent"),
    ({"gc_max_bytes": -1}, "must not be negative"),
    ({"gc_min_age": -0.5}, "must not be negative"),
    # Each refusal names its flag.
    ({"endpoint": "tcp://0:1"}, "^--endpoint: "),
    ({"controller_endpoint": "x"}, "^--controller-endpoint: "),
    ({"metrics_address": "9090"}, "^--metrics-address: "),
    ({"metrics_address": "no such host:9090"}, "^--metrics-address: cannot bind"),
    ({"gc_min_age": float("nan")}, "--gc-min-age must be a finite number"),
    ({"grace_seconds": float("inf")}, "--grace-seconds must be a finite number"),
    ({"gc_high_percent": float("nan")}, "--gc-high-percent must be a finite number"),
    ({"tag_ttl": -1.0}, "--tag-ttl must not be negative"),
    ({"registry_retries": -1}, "--registry-retries must not be negative"),
    ({"registry_timeout": 0.0}, "--registry-timeout must be more than 0"),
    ({"registry_read_timeout": 0.0}, "--registry-read-timeout must be more than 0"),
    ({"registry_mirrors": ("docker.io",)}, "--registry-mirror must be REGISTRY=URL"),
    ({"registry_mirrors": ("=https://m",)}, "--registry-mirror"),
    ({"registry_mirrors": ("docker.io=ftp://m",)}, "--registry-mirror"),
    ({"registry_mirrors": ("docker.io=https://m/v2/x",)}, "--registry-mirror"),
    ({"registry_mirrors": ("docker.io=https://m:99999",)}, "--registry-mirror"),
    ({"insecure_registries": ("http://r:5000",)}, "--insecure-registry must be HOST"),
    ({"insecure_registries": ("r:5000/x",)}, "--insecure-registry"),
    ({"oci_layout_roots": ("images",)}, "--oci-layout-root must be an absolute path"),
    ({"registry_ca": ("/nonexistent/ca.pem",)}, "--registry-ca: /nonexistent/ca.pem does"),
    ({"registry_config": "/"}, "--registry-config: / is not a file"),
    ({"log_format": "yaml"}, "--log-format must be one of text, json"),
])
def test_validate_errors(over, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        good(**over).validate()


@pytest.mark.parametrize("over", [
    {"registry_mirrors": ("docker.io=https://mirror.example", "quay.io=m:5000",
                          "r=http://[::1]:5000/")},
    {"insecure_registries": ("registry:5000", "localhost", "[::1]:5000")},
    {"metrics_address": "127.0.0.1:9090"}, {"metrics_address": ":9090"},
    {"metrics_address": "[::]:9090"}, {"registry_retries": 0}, {"tag_ttl": 0.0},
    {"log_format": "json"},
])
def test_validate_accepts(over):
    good(**over).validate()


def test_node_id_at_limit_ok():
    good(node_id="n" * 256).validate()


def test_node_id_limit_is_in_bytes():
    with pytest.raises(InvalidArgument, match="at most 256"):
        good(node_id="é" * 200).validate()  # 200 characters, 400 bytes


def test_gc_policy_from_config():
    cfg = good(gc_policy="immediate", gc_high_percent=90, gc_low_percent=50, gc_max_bytes=10,
               gc_min_age=1.5)
    p = cfg.gc
    assert (p.mode, p.high_percent, p.low_percent, p.max_bytes, p.min_age) == \
        ("immediate", 90, 50, 10, 1.5)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        good().root = "/x"  # type: ignore[misc]


def test_tools_need_no_node_id():
    for command in ("pull", "gc", "ls", "df", "diff"):
        assert Config(root="/var/lib/strata").validate(command).node_id == ""
    with pytest.raises(InvalidArgument, match="--node-id"):
        Config(root="/var/lib/strata").validate("serve")


def test_every_setting_is_a_flag_of_the_commands_that_take_it():
    every = {f.name for f in dataclasses.fields(Config)}
    taken = set()
    for command in cli.COMMANDS:
        parser = cli._parser()
        text = parser._subparsers._group_actions[0].choices[command].format_help()
        for f in settings(command):
            assert flag(f) in text and env_name(f) in text, (command, f.name)
            taken.add(f.name)
    assert taken == every, "a setting no command takes"


@pytest.mark.parametrize("name, env", [
    ("node_id", "STRATA_NODE_ID"), ("insecure_registries", "STRATA_INSECURE_REGISTRY"),
    ("oci_layout_roots", "STRATA_OCI_LAYOUT_ROOT"), ("gc_min_age", "STRATA_GC_MIN_AGE"),
])
def test_environment_names(name, env):
    (f,) = [f for f in dataclasses.fields(Config) if f.name == name]
    assert env_name(f) == env


def parse(argv: list[str]) -> Config:
    parser = cli._parser()
    return cli._config(parser.parse_args(argv), parser)


def test_flags_environment_and_defaults(monkeypatch, tmp_path):
    ca = tmp_path / "ca.pem"
    shutil.copy(ssl.get_default_verify_paths().openssl_cafile, ca)
    monkeypatch.setenv("STRATA_NODE_ID", "from-env")
    monkeypatch.setenv("STRATA_GC_MIN_AGE", "12.5")
    monkeypatch.setenv("STRATA_INSECURE_REGISTRY", "a:5000,b:5000")
    monkeypatch.setenv("STRATA_LOG_LEVEL", "debug")
    cfg = parse(["serve", "--gc-high-percent", "90", "--registry-ca", str(ca),
                 "--registry-ca", str(ca)])
    assert cfg.node_id == "from-env" and cfg.gc_min_age == 12.5 and cfg.log_level == "DEBUG"
    assert cfg.insecure_registries == ("a:5000", "b:5000")
    assert cfg.gc_high_percent == 90.0 and cfg.registry_ca == (str(ca), str(ca))
    assert cfg.tag_ttl == Config().tag_ttl
    assert parse(["serve", "--node-id", "flag", "--insecure-registry", "c:1"]) \
        .insecure_registries == ("c:1",), "a flag replaces the environment's list"


@pytest.mark.parametrize("argv, env, fragment", [
    (["serve"], {}, "--node-id"),
    (["serve", "--node-id", "n", "--gc-min-age", "soon"], {}, "invalid float value"),
    (["gc"], {"STRATA_GC_MAX_BYTES": "lots"}, "invalid int value"),
    (["gc", "--gc-policy", "never"], {}, "invalid choice"),
    (["serve", "--node-id", "n", "--log-level", "loud"], {}, "invalid choice"),
    (["ls", "--root", "relative"], {}, "--root must be an absolute path"),
    (["ls", "--node-id", "n"], {}, "unrecognized arguments"),
    (["pull", "img", "--pull-policy", "Sometimes"], {}, "invalid choice"),
])
def test_bad_flags_and_values_are_usage_errors(argv, env, fragment, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err


def test_one_spelling_of_the_root():
    """The root is part of the mount source start-up recognises its overlays by."""
    from csi.paths import StorePaths

    assert StorePaths("/var/lib/strata/").root == StorePaths("/var/lib/strata").root
    assert StorePaths("/var/lib//strata/.").volumes == "/var/lib/strata/volumes"


def test_a_bad_log_level_from_the_environment_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("STRATA_LOG_LEVEL", "verbose")
    with pytest.raises(SystemExit) as e:
        parse(["serve", "--node-id", "n"])
    assert e.value.code == 2 and "STRATA_LOG_LEVEL (for --log-level) must be one of" in \
        capsys.readouterr().err
    monkeypatch.setenv("STRATA_LOG_LEVEL", "warn")
    assert parse(["serve", "--node-id", "n"]).log_level == "WARN"


def test_no_wait_is_a_switch_from_flag_or_environment(monkeypatch):
    assert parse(["serve", "--node-id", "n"]).no_wait is False
    assert parse(["serve", "--node-id", "n", "--no-wait"]).no_wait is True
    for raw, value in (("true", True), ("1", True), ("Yes", True), ("off", False),
                       ("0", False), ("", False)):
        monkeypatch.setenv("STRATA_NO_WAIT", raw)
        assert parse(["serve", "--node-id", "n"]).no_wait is value, raw
    monkeypatch.setenv("STRATA_NO_WAIT", "false")
    assert parse(["serve", "--node-id", "n", "--no-wait"]).no_wait is True, "the flag wins"


def test_a_bad_switch_from_the_environment_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("STRATA_NO_WAIT", "perhaps")
    with pytest.raises(SystemExit) as e:
        parse(["serve", "--node-id", "n"])
    assert e.value.code == 2 and "STRATA_NO_WAIT must be true or false" in \
        capsys.readouterr().err


# --- --size-limit-mechanism and the choice it makes (compose.mechanism).

def test_size_limit_mechanism_defaults_to_auto_and_takes_three_values(monkeypatch):
    assert Config().size_limit_mechanism == "auto"
    assert parse(["serve", "--node-id", "n"]).size_limit_mechanism == "auto"
    for value in ("auto", "loop", "quota"):
        assert parse(["serve", "--node-id", "n", "--size-limit-mechanism", value]) \
            .size_limit_mechanism == value
        good(size_limit_mechanism=value).validate()
    monkeypatch.setenv("STRATA_SIZE_LIMIT_MECHANISM", "loop")
    assert parse(["serve", "--node-id", "n"]).size_limit_mechanism == "loop"
    assert parse(["serve", "--node-id", "n", "--size-limit-mechanism", "quota"]) \
        .size_limit_mechanism == "quota", "a flag wins over the environment"


def test_a_bad_size_limit_mechanism_is_refused(monkeypatch, capsys):
    with pytest.raises(InvalidArgument, match="--size-limit-mechanism must be one of auto, "
                                              "loop, quota, got 'xfs'"):
        good(size_limit_mechanism="xfs").validate()
    with pytest.raises(SystemExit):
        parse(["serve", "--node-id", "n", "--size-limit-mechanism", "prjquota"])
    assert "invalid choice" in capsys.readouterr().err
    monkeypatch.setenv("STRATA_SIZE_LIMIT_MECHANISM", "both")
    with pytest.raises(SystemExit):
        parse(["serve", "--node-id", "n"])
    assert "STRATA_SIZE_LIMIT_MECHANISM (for --size-limit-mechanism) must be one of" in \
        capsys.readouterr().err


def test_size_limit_mechanism_is_a_serve_setting_only():
    assert "size_limit_mechanism" in {f.name for f in settings("serve")}
    assert all("size_limit_mechanism" not in {f.name for f in settings(c)}
               for c in ("pull", "gc", "ls", "df", "diff"))


@pytest.mark.parametrize("setting, no_quotas, chosen", [
    ("auto", "", "quota"),
    ("auto", "xfs at /s is mounted without project quotas", "loop"),
    ("loop", "", "loop"),
    ("loop", "no quotas", "loop"),
    ("quota", "", "quota"),
])
def test_the_mechanism_chosen(setting, no_quotas, chosen):
    assert compose.mechanism(setting, no_quotas) == chosen


def test_quota_where_the_filesystem_has_none_stops_the_start_with_the_reason():
    with pytest.raises(FailedPrecondition) as e:
        compose.mechanism("quota", "xfs at /var/lib/strata is mounted without project quotas "
                                   "(mount it with -o prjquota)")
    said = str(e.value)
    assert said.startswith("--size-limit-mechanism quota, but the store's filesystem does "
                           "not enforce project quotas: xfs at /var/lib/strata is mounted "
                           "without project quotas (mount it with -o prjquota)")
    assert "--size-limit-mechanism auto or loop" in said
