"""The config file (--config, STRATA_CONFIG, else /etc/strata/config.yaml if it exists): a
YAML mapping keyed by the flags without dashes, read by every command, below flags and the
environment; an unknown key or a bad value is a usage error naming the file and the key.

Every test names its file through STRATA_CONFIG or --config (or moves the default path
into tmp_path): this machine's /etc/strata is never read."""

import dataclasses
import os
import subprocess
import sys

import pytest

from csi import cli, config
from csi.config import Config, file_key, flag, read_file, settings

TOOLS = ("pull", "gc", "ls", "df", "diff")


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in [n for n in os.environ if n.startswith("STRATA_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STRATA_CONFIG", "")


@pytest.fixture(autouse=True)
def never_run(monkeypatch):
    """The settings are what is tested: a command that got them returns them."""
    monkeypatch.setattr("csi.server.serve", lambda c: c)
    for tool in TOOLS:
        monkeypatch.setattr(f"csi.store_cli.{tool}", lambda c, *a: c)
    monkeypatch.setattr("csi.store_cli.run", lambda command, c, *a: command(c, *a))


ARGS = {"serve": ["--node-id", "n"], "pull": ["nginx:1.27"], "diff": ["/pod"]}


def settings_of(command: str, *argv: str) -> Config:
    return cli.main([command, *ARGS.get(command, []), *argv])


def write(tmp_path, text: str, name="config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def refused(capsys, command: str, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        settings_of(command, *argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"strata {command}: error: " in err and "Traceback" not in err
    return err.rsplit("error: ", 1)[1]


# -- precedence: flag > environment > file > default --------------------------------------
def test_precedence(tmp_path, monkeypatch):
    path = write(tmp_path, "registry-timeout: 3\ninsecure-registry: [file:5000]\n"
                           "gc-policy: immediate\n")
    monkeypatch.setenv("STRATA_CONFIG", path)
    c = settings_of("serve")
    assert (c.registry_timeout, c.insecure_registries, c.gc_policy) == \
        (3.0, ("file:5000",), "immediate")
    assert c.registry_read_timeout == Config().registry_read_timeout, "the default"
    monkeypatch.setenv("STRATA_REGISTRY_TIMEOUT", "4")
    monkeypatch.setenv("STRATA_INSECURE_REGISTRY", "env:5000,env2:5000")
    c = settings_of("serve")
    assert (c.registry_timeout, c.insecure_registries) == (4.0, ("env:5000", "env2:5000"))
    c = settings_of("serve", "--registry-timeout", "5", "--insecure-registry", "flag:5000")
    assert (c.registry_timeout, c.insecure_registries, c.gc_policy) == \
        (5.0, ("flag:5000",), "immediate")


def test_a_set_but_empty_variable_wins_over_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CONFIG", write(tmp_path, "insecure-registry: [file:5000]\n"))
    monkeypatch.setenv("STRATA_INSECURE_REGISTRY", "")
    assert settings_of("pull").insecure_registries == ()


def test_a_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CONFIG", write(tmp_path, "no-wait: true\n"))
    assert settings_of("serve").no_wait is True
    monkeypatch.setenv("STRATA_NO_WAIT", "false")
    assert settings_of("serve").no_wait is False, "the environment wins"
    assert settings_of("serve", "--no-wait").no_wait is True


def test_config_flag_wins_over_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CONFIG", write(tmp_path, "gc-min-age: 1\n", "env.yaml"))
    assert settings_of("gc", "--config", write(tmp_path, "gc-min-age: 2\n")).gc_min_age == 2
    assert settings_of("gc").gc_min_age == 1
    assert settings_of("gc", "--config", "").gc_min_age == Config().gc_min_age, "'': none"


# -- every command reads it; every setting has a key --------------------------------------
@pytest.mark.parametrize("command", ["serve", *TOOLS])
def test_every_command_reads_it(command, tmp_path):
    path = write(tmp_path, "root: /srv/strata\nlog-format: json\n")
    c = settings_of(command, "--config", path)
    assert (c.root, c.log_format) == ("/srv/strata", "json")


def test_keys_of_other_commands_are_accepted_and_unused(tmp_path):
    """One file for the server and the tools: `strata pull` skips what only serve takes."""
    path = write(tmp_path, "node-id: node-1\ngc-policy: immediate\nroot: /srv/strata\n")
    c = settings_of("pull", "--config", path)
    assert (c.node_id, c.gc_policy, c.root) == ("", Config().gc_policy, "/srv/strata")
    assert settings_of("gc", "--config", path).gc_policy == "immediate"


def yaml_of(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def test_every_setting_has_its_key(tmp_path):
    """Derived from the declarations: a value for each key reads back as that setting."""
    sample = {str: "x", int: 7, float: 2.5, bool: True, tuple[str, ...]: ("a:1", "b:2")}
    for f in dataclasses.fields(Config):
        value = f.metadata["choices"][-1] if f.metadata["choices"] else sample[f.type]
        assert file_key(f) == flag(f).lstrip("-")
        path = write(tmp_path, f"{file_key(f)}: {yaml_of(value)}\n")
        assert read_file(path) == {f.name: value}, f.name


def test_the_keys_named_as_the_flags():
    names = {file_key(f) for f in dataclasses.fields(Config)}
    assert {"insecure-registry", "registry-mirror", "oci-layout-root", "registry-timeout",
            "root", "node-id", "no-wait"} <= names


# -- the file itself ------------------------------------------------------------------------
def test_an_empty_file_and_empty_values_change_nothing(tmp_path):
    assert read_file(write(tmp_path, "")) == {}
    assert read_file(write(tmp_path, "# only a comment\n")) == {}
    assert read_file(write(tmp_path, "root:\ninsecure-registry:\n")) == {}


def test_values_as_yaml_writes_them(tmp_path):
    got = read_file(write(tmp_path, """
insecure-registry: a:5000,b:5000    # one string: comma-separated, as in the environment
registry-mirror:
  - docker.io=https://mirror.example
registry-timeout: 5                 # an int where a float is meant
registry-read-timeout: "7.5"        # text converted as a flag's is
gc-max-bytes: 1000000
log-level: debug                    # choices in any case, as the flag takes them
no-wait: yes                        # YAML's booleans
node-id: "0123"
"""))
    assert got == {"insecure_registries": ("a:5000", "b:5000"),
                   "registry_mirrors": ("docker.io=https://mirror.example",),
                   "registry_timeout": 5.0, "registry_read_timeout": 7.5,
                   "gc_max_bytes": 1000000, "log_level": "DEBUG", "no_wait": True,
                   "node_id": "0123"}
    assert isinstance(got["registry_timeout"], float)


def test_the_default_file_is_read_only_if_it_exists(tmp_path, monkeypatch):
    monkeypatch.delenv("STRATA_CONFIG")
    default = tmp_path / "etc" / "config.yaml"
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(default))
    assert settings_of("ls").root == Config().root, "no file: defaults"
    default.parent.mkdir()
    default.write_text("root: /from/default\n")
    assert settings_of("ls").root == "/from/default"


def test_a_bad_default_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STRATA_CONFIG")
    default = tmp_path / "config.yaml"
    default.write_text("bogus: 1\n")
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(default))
    assert refused(capsys, "ls").startswith(f"config file {default}: unknown key 'bogus'")


@pytest.mark.parametrize("text, message", [
    ("insecure-registries: [a:5000]\n",
     "unknown key 'insecure-registries' (did you mean 'insecure-registry'?)"),
    ("registry_timeout: 5\n", "unknown key 'registry_timeout' (did you mean "
                              "'registry-timeout'?)"),
    ("--root: /x\n", "unknown key '--root'"),
    ("config: /x\n", "unknown key 'config'"),
    ("1: x\n", "unknown key 1"),
    ("registry-timeout: abc\n", "registry-timeout: invalid float value: 'abc'"),
    ("registry-timeout: true\n", "registry-timeout: expected a number, got bool True"),
    ("registry-timeout: [1]\n", "registry-timeout: expected a number, got list [1]"),
    ("gc-max-bytes: 1.5\n", "gc-max-bytes: expected an integer, got float 1.5"),
    ("gc-max-bytes: 1e3\n", "gc-max-bytes: invalid int value: '1e3'"),
    ("node-id: 0123\n", "node-id: expected text, got int 83"),
    ("root: {a: 1}\n", "root: expected text, got dict"),
    ("insecure-registry: [a:5000, 5000]\n", "insecure-registry: expected text, got int 5000"),
    ("log-level: chatty\n", "log-level: must be one of DEBUG, INFO"),
    ("no-wait: perhaps\n", "no-wait: the value must be true or false"),
    ("root: /a\nroot: /b\n", "not valid YAML: key 'root' is given twice (line 2, column 1)"),
    ("root: [\n", "not valid YAML: "),
    ("- root\n", "must be a mapping of settings"),
    ("just text\n", "must be a mapping of settings (e.g. `registry-timeout: 5`), got a str"),
])
def test_a_bad_file_names_itself_and_the_key(text, message, tmp_path, capsys):
    path = write(tmp_path, text)
    assert refused(capsys, "serve", "--config", path).startswith(
        f"config file {path}: {message}")


@pytest.mark.parametrize("text, message", [
    ("registry-timeout: -1\n", "--registry-timeout must not be negative, got -1.0 (from "
                               "config file {path}, key registry-timeout)"),
    ("root: relative\n", "--root must be an absolute path, got 'relative' (from config "
                         "file {path}, key root)"),
    ("insecure-registry: [http://r:5000]\n", "(no scheme or path), got 'http://r:5000' "
                                              "(from config file {path}, key "
                                              "insecure-registry)"),
    ("gc-high-percent: 50\ngc-low-percent: 60\n", "(from config file {path}, keys "
                                                  "gc-high-percent, gc-low-percent)"),
])
def test_a_value_out_of_range_names_where_it_came_from(text, message, tmp_path, capsys):
    path = write(tmp_path, text)
    assert message.format(path=path) in refused(capsys, "serve", "--config", path)


def test_a_value_from_the_environment_names_its_variable(monkeypatch, capsys):
    monkeypatch.setenv("STRATA_REGISTRY_TIMEOUT", "-1")
    assert refused(capsys, "pull").endswith("(from STRATA_REGISTRY_TIMEOUT)\n")
    monkeypatch.setenv("STRATA_GC_HIGH_PERCENT", "50")
    monkeypatch.setenv("STRATA_GC_LOW_PERCENT", "60")
    assert "(from STRATA_GC_HIGH_PERCENT, STRATA_GC_LOW_PERCENT)" in refused(capsys, "gc")


def test_a_flags_own_value_names_nothing_more(capsys):
    err = refused(capsys, "pull", "--registry-timeout", "-1")
    assert err == "--registry-timeout must not be negative, got -1.0\n"


def test_a_named_file_must_exist(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nope.yaml"
    assert refused(capsys, "ls", "--config", str(missing)) == \
        f"config file {missing}: no such file\n"
    monkeypatch.setenv("STRATA_CONFIG", str(missing))
    assert refused(capsys, "ls") == f"config file {missing}: no such file (from STRATA_CONFIG)\n"
    assert refused(capsys, "ls", "--config", str(tmp_path)).startswith(
        f"config file {tmp_path}: cannot read it: ")


def test_the_demo_reads_no_file(monkeypatch):
    """The demo runs its own server and tools on a temporary root: a node's file must not
    reach them (they inherit STRATA_CONFIG='')."""
    monkeypatch.setenv("STRATA_CONFIG", "/nonexistent/config.yaml")
    monkeypatch.setattr("csi.demo.run", lambda keep: os.environ["STRATA_CONFIG"])
    assert cli.main(["demo"]) == ""
    with pytest.raises(SystemExit):
        cli.main(["demo", "--config", "/x"])


def test_help_names_the_file():
    for command in ("serve", *TOOLS):
        text = cli._parser()._subparsers._group_actions[0].choices[command].format_help()
        assert "--config PATH" in text and "STRATA_CONFIG" in text
        assert config.DEFAULT_CONFIG_FILE in text


def test_settings_are_generic():
    """No setting has code of its own in the file reader: every field of Config is a key,
    and the commands take what settings() says."""
    assert {f.name for c in ("serve", *TOOLS) for f in settings(c)} == \
        {f.name for f in dataclasses.fields(Config)}


# -- the real entry point -------------------------------------------------------------------
def test_the_command_line(tmp_path):
    path = write(tmp_path, "registry-timeout: soon\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    r = subprocess.run([sys.executable, "-m", "csi", "pull", "nginx:1.27"],
                       env={**env, "STRATA_CONFIG": path}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.startswith("usage: strata pull")
    assert (f"strata pull: error: config file {path}: registry-timeout: invalid float "
            "value: 'soon'") in r.stderr
