"""`strata`'s usage errors: every bad flag, value or STRATA_* variable is refused by the
command's own parser (exit 2, `strata CMD: error: …` naming the flag, under that command's
usage), never a traceback; every `--help` exits 0. The tools' own failures (no store, a bad
image reference) go to stderr with a non-zero exit, stdout left for answers.

Most cases run `cli.main` in this process (a crash would surface as an exception other than
SystemExit); a few run `python -m csi` as the operator would, and read its stderr."""

import os
import subprocess
import sys

import pytest

from csi import cli


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in [n for n in os.environ if n.startswith("STRATA_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STRATA_CONFIG", "")  # never this machine's /etc/strata/config.yaml


@pytest.fixture(autouse=True)
def never_serve(monkeypatch):
    """A value wrongly accepted must fail the test, not start a server that never returns."""
    def accepted(config):
        raise AssertionError(f"strata serve started with {config}")

    monkeypatch.setattr("csi.server.serve", accepted)


def serve(tmp_path, *extra):
    return ["serve", "--node-id", "n", "--root", str(tmp_path / "store"),
            "--endpoint", f"unix://{tmp_path}/csi.sock", *extra]


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out = capsys.readouterr()
    assert e.value.code == 2, out.err
    assert "Traceback" not in out.out + out.err
    assert out.out == ""
    return out.err


SERVE_FLAGS = [
    ("--gc-min-age", "soon"), ("--gc-min-age", "nan"), ("--gc-min-age", "inf"),
    ("--gc-min-age", "-1"), ("--grace-seconds", "inf"), ("--grace-seconds", "-1"),
    ("--grace-seconds", "ten"), ("--gc-high-percent", "nan"), ("--gc-high-percent", "101"),
    ("--gc-low-percent", "-5"), ("--gc-max-bytes", "1.5"), ("--gc-max-bytes", "1e3"),
    ("--gc-max-bytes", "-1"), ("--gc-policy", "never"), ("--log-level", "loud"),
    ("--log-level", "chatty"), ("--gc-min-age", "abc"), ("--metrics-top-layers", "abc"),
    ("--registry-timeout", "-1"), ("--insecure-registry", "http://foo"),
    ("--metrics-address", "127.0.0.1:0"),
    ("--log-format", "yaml"), ("--size-limit-mechanism", "xfs"),
    ("--registry-retries", "many"), ("--registry-retries", "-1"),
    ("--registry-timeout", "0"), ("--registry-timeout", "nan"),
    ("--registry-read-timeout", "inf"), ("--tag-ttl", "-5"), ("--pull-wait", "inf"),
    ("--pull-wait", "2m"), ("--default-size-limit", "lots"), ("--default-size-limit", "0"),
    ("--default-size-limit", "1Zi"), ("--default-size-limit", "100Ti"),
    ("--default-size-limit", "9" * 5000), ("--registry-mirror", "docker.io"),
    ("--registry-mirror", "=https://mirror"), ("--registry-mirror", "docker.io=ftp://m"),
    ("--registry-mirror", "docker.io=https://m/v2/path"),
    ("--registry-mirror", "docker.io=https://m:99999"),
    ("--insecure-registry", "http://r:5000"), ("--insecure-registry", "r:5000/x"),
    ("--metrics-address", "9090"), ("--metrics-address", "host:0"),
    ("--metrics-address", "host:65536"), ("--metrics-address", "bad host:9090"),
    ("--metrics-address", "256.1.1.1:9090"), ("--endpoint", "tcp://127.0.0.1:1"),
    ("--endpoint", "/csi/csi.sock"), ("--controller-endpoint", "relative.sock"),
    ("--registry-ca", "/nonexistent/ca.pem"), ("--registry-config", "/"),
    ("--oci-layout-root", "images"), ("--root", "relative"), ("--root", "/a:b"),
    ("--node-id", ""), ("--node-id", "n" * 300),
]


@pytest.mark.parametrize("name, value", SERVE_FLAGS)
def test_a_bad_serve_value_is_a_usage_error_naming_the_flag(name, value, tmp_path, capsys):
    err = usage_error(serve(tmp_path, name, value), capsys)
    assert "strata serve: error: " in err
    assert name in err.rsplit("error: ", 1)[1], err


@pytest.mark.parametrize("env, value, name", [
    ("STRATA_GC_MIN_AGE", "soon", "--gc-min-age"),
    ("STRATA_GC_MIN_AGE", "nan", "--gc-min-age"),
    ("STRATA_GC_MAX_BYTES", "lots", "--gc-max-bytes"),
    ("STRATA_REGISTRY_RETRIES", "1.5", "--registry-retries"),
    ("STRATA_GRACE_SECONDS", "inf", "--grace-seconds"),
    ("STRATA_LOG_LEVEL", "verbose", "--log-level"),
    ("STRATA_LOG_FORMAT", "yaml", "--log-format"),
    ("STRATA_GC_POLICY", "never", "--gc-policy"),
    ("STRATA_NO_WAIT", "perhaps", "STRATA_NO_WAIT"),
    ("STRATA_METRICS_ADDRESS", "9090", "--metrics-address"),
    ("STRATA_REGISTRY_MIRROR", "docker.io", "--registry-mirror"),
    ("STRATA_INSECURE_REGISTRY", "ok:5000,http://bad", "--insecure-registry"),
    ("STRATA_DEFAULT_SIZE_LIMIT", "lots", "--default-size-limit"),
    ("STRATA_ENDPOINT", "tcp://x", "--endpoint"),
    ("STRATA_ROOT", "relative", "--root"),
])
def test_a_bad_environment_value_is_a_usage_error_naming_it(env, value, name, monkeypatch,
                                                            tmp_path, capsys):
    monkeypatch.setenv(env, value)
    argv = ["serve", "--node-id", "n"]
    if env != "STRATA_ROOT":
        argv += ["--root", str(tmp_path / "store")]
    if env != "STRATA_ENDPOINT":
        argv += ["--endpoint", f"unix://{tmp_path}/csi.sock"]
    err = usage_error(argv, capsys)
    assert "strata serve: error: " in err and name in err, err
    if f"{env} (for" in err:  # converted from the variable: both are named
        assert name in err


@pytest.mark.parametrize("env, value", [("STRATA_GC_MIN_AGE", "soon"),
                                        ("STRATA_LOG_FORMAT", "yaml")])
def test_a_converted_variable_names_itself(env, value, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(env, value)
    err = usage_error(serve(tmp_path), capsys)
    assert f"{env} (for --" in err


@pytest.mark.parametrize("argv, command, fragment", [
    (["serve", "--bogus"], "serve", "unrecognized arguments: --bogus"),
    (["serve", "--gc-min-age"], "serve", "--gc-min-age: expected one argument"),
    (["gc", "--gc-high-percent", "x"], "gc", "--gc-high-percent"),
    (["gc", "--gc-max-bytes", "-1"], "gc", "--gc-max-bytes"),
    (["ls", "--root", "relative"], "ls", "--root"),
    (["ls", "--node-id", "n"], "ls", "unrecognized arguments: --node-id"),
    (["df", "--log-format", "yaml"], "df", "--log-format"),
    (["diff", "/t", "--gc-policy", "lru"], "diff", "unrecognized arguments: --gc-policy"),
    (["diff"], "diff", "required"),
    (["pull"], "pull", "required: image"),
    (["pull", "img", "--pull-policy", "Sometimes"], "pull", "--pull-policy"),
    (["pull", "img", "--registry-retries", "-1"], "pull", "--registry-retries"),
    (["pull", "img", "--registry-mirror", "x"], "pull", "--registry-mirror"),
    (["pull", "img", "--registry-timeout", "0"], "pull", "--registry-timeout"),
    (["demo", "--bogus"], "demo", "unrecognized arguments: --bogus"),
])
def test_tool_usage_errors(argv, command, fragment, capsys):
    err = usage_error(argv, capsys)
    assert f"strata {command}: error: " in err and fragment in err, err


@pytest.mark.parametrize("argv", [[], ["nothing"], ["--bogus"]])
def test_no_or_an_unknown_command(argv, capsys):
    assert "strata: error: " in usage_error(argv, capsys)


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"] if command is None else [command, "--help"])
    out = capsys.readouterr()
    assert e.value.code == 0 and out.out.startswith("usage: strata") and out.err == ""


# -- the real entry point, as an operator runs it ------------------------------------------
def strata(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "csi", *argv], capture_output=True,
                          text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items()
                                  if not k.startswith("STRATA_")},
                               "STRATA_CONFIG": "", **(env or {})})


@pytest.mark.parametrize("argv, env, fragment", [
    (["serve", "--node-id", "n", "--gc-min-age", "nan"], {}, "--gc-min-age"),
    (["serve", "--node-id", "n", "--grace-seconds", "inf"], {}, "--grace-seconds"),
    (["serve", "--node-id", "n", "--metrics-address", "bad host:80"], {},
     "--metrics-address"),
    (["serve", "--node-id", "n", "--bogus"], {}, "--bogus"),
    (["gc"], {"STRATA_GC_MAX_BYTES": "lots"}, "STRATA_GC_MAX_BYTES"),
])
def test_the_command_line(argv, env, fragment, tmp_path):
    argv = [*argv, "--root", str(tmp_path / "store")]
    if argv[0] == "serve":
        argv += ["--endpoint", f"unix://{tmp_path}/csi.sock"]
    r = strata(*argv, env=env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert f"strata {argv[0]}: error: " in r.stderr and fragment in r.stderr


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_the_command_line_help(command):
    """`--help` of every command as the operator runs it (`%` in a help text once made
    argparse crash here)."""
    r = strata("--help") if command is None else strata(command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: strata {command or ''}".rstrip()), r.stdout
    assert r.stderr == ""


def test_version():
    r = strata("--version")
    assert r.returncode == 0 and r.stdout.startswith("strata ") and r.stderr == ""


# -- the list, each as the operator hit it -------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["--log-level", "chatty"], "argument --log-level: invalid choice: 'CHATTY'"),
    (["--gc-min-age", "abc"], "argument --gc-min-age: invalid float value: 'abc'"),
    (["--gc-max-bytes", "1.5"], "argument --gc-max-bytes: invalid int value: '1.5'"),
    (["--metrics-address", "127.0.0.1:0"],
     "--metrics-address: address must be HOST:PORT with a fixed port (1-65535; port 0"),
    (["--registry-timeout", "-1"], "--registry-timeout must not be negative"),
    (["--insecure-registry", "http://foo"], "--insecure-registry must be HOST or HOST:PORT"),
])
def test_a_usage_error_names_the_flag_under_the_commands_usage(argv, fragment, tmp_path):
    r = strata(*serve(tmp_path, *argv))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith("usage: strata serve "), "the command's usage, not strata's"
    assert f"strata serve: error: {fragment}" in r.stderr, r.stderr


@pytest.mark.parametrize("image, reason", [
    ("", "it is empty"), ("team/App", "repository name must be lowercase"),
    ("a b", "it contains whitespace"), ("nginx:", "empty tag after ':'"),
    ("oci:relative", "the OCI layout path must be absolute"),
])
def test_a_bad_image_reference_speaks_cli(image, reason, capsys):
    err = usage_error(["pull", image], capsys)
    assert f"strata pull: error: invalid image reference {image!r}: {reason}" in err, err
    assert "volume attribute" not in err


@pytest.mark.parametrize("argv", [["pull", "nginx:1.27"], ["gc"], ["ls"], ["df"],
                                  ["diff", "/pod"]])
def test_a_root_that_holds_no_store_is_refused_and_left_alone(argv, tmp_path, capsys):
    """A mistyped --root: an error on stderr, and no store made there (only `serve` makes
    one)."""
    for root in (tmp_path / "typo", tmp_path):  # missing, and an empty directory
        assert cli.main([*argv, "--root", str(root)]) == 1
        out = capsys.readouterr()
        assert out.out == ""
        assert f"strata {argv[0]}: no store at {root} (--root, STRATA_ROOT" in out.err
        assert f"start `strata serve --root {root}` first" in out.err
    assert not (tmp_path / "typo").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, content, fragment", [
    ("--registry-ca", "not a certificate\n", "holds no PEM certificate"),
    ("--registry-ca", "", "holds no PEM certificate"),
    ("--registry-config", "{bad", "is not valid JSON"),
])
def test_a_file_that_is_not_what_its_flag_wants_is_refused_at_once(name, content, fragment,
                                                                   tmp_path, capsys):
    """Read when the settings are, not found out at the first pull as a registry failure
    (and retried)."""
    path = tmp_path / "file"
    path.write_text(content)
    err = usage_error(["pull", "nginx:1.27", name, str(path)], capsys)
    assert f"strata pull: error: {name}: {path}" in err and fragment in err, err


@pytest.mark.skipif(os.geteuid() != 0, reason="root can create any store; as another user "
                    "the refusal would be a permission error, not the missing directory")
@pytest.mark.parametrize("where, fragment", [
    ("root", "cannot create the store at /proc/strata (--root)"),
    ("endpoint", "cannot listen on unix:///proc/strata.sock (--endpoint"),
])
def test_a_root_or_socket_that_cannot_be_made_is_a_clear_failure(where, fragment, tmp_path):
    """/proc holds neither: what serve cannot create is said with the flag, not a
    traceback from os.makedirs or gRPC's 'Failed to bind'."""
    root = "/proc/strata" if where == "root" else str(tmp_path / "store")
    endpoint = ("unix:///proc/strata.sock" if where == "endpoint"
                else f"unix://{tmp_path}/csi.sock")
    r = strata("serve", "--node-id", "n", "--root", root, "--endpoint", endpoint, "--no-wait")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and fragment in r.stderr, r.stderr
