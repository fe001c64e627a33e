"""`--max-parallel-unpacks` (STRATA_MAX_PARALLEL_UNPACKS, `max-parallel-unpacks` in the config
file): at least 1, refused by the command's parser naming the flag (exit 2), shown by
`--help` for serve and pull, defaulting to the CPUs."""

import os

import pytest

from csi import cli
from csi.config import Config, CPUs
from tests.unit.test_cli_usage import serve, usage_error


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in [n for n in os.environ if n.startswith("STRATA_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STRATA_CONFIG", "")  # never this machine's /etc/strata/config.yaml


@pytest.fixture
def served(monkeypatch):
    """What `strata serve` would have served with, instead of serving."""
    got = []
    monkeypatch.setattr("csi.server.serve", lambda config: got.append(config) or 0)
    return got


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", ""])
def test_a_bad_value_is_a_usage_error_naming_the_flag(tmp_path, capsys, served, value):
    err = usage_error(serve(tmp_path, "--max-parallel-unpacks", value), capsys)
    assert "--max-parallel-unpacks" in err and "strata serve: error" in err
    assert served == []


def test_a_bad_environment_value_names_the_variable(tmp_path, capsys, served, monkeypatch):
    monkeypatch.setenv("STRATA_MAX_PARALLEL_UNPACKS", "0")
    err = usage_error(serve(tmp_path), capsys)
    assert "--max-parallel-unpacks must be at least 1" in err
    assert "STRATA_MAX_PARALLEL_UNPACKS" in err


def test_a_bad_config_file_value_names_the_file_and_key(tmp_path, capsys, served):
    path = tmp_path / "config.yaml"
    path.write_text("max-parallel-unpacks: 0\n")
    err = usage_error(serve(tmp_path, "--config", str(path)), capsys)
    assert str(path) in err and "max-parallel-unpacks" in err


def test_flag_environment_and_default(tmp_path, served, monkeypatch):
    assert cli.main(serve(tmp_path, "--max-parallel-unpacks", "3")) == 0
    monkeypatch.setenv("STRATA_MAX_PARALLEL_UNPACKS", "5")
    assert cli.main(serve(tmp_path)) == 0
    monkeypatch.delenv("STRATA_MAX_PARALLEL_UNPACKS")
    assert cli.main(serve(tmp_path)) == 0
    assert [c.max_parallel_unpacks for c in served] == [3, 5, os.cpu_count() or 1]


def test_the_default_is_the_cpus_and_says_so():
    default = Config().max_parallel_unpacks
    assert isinstance(default, CPUs) and default == (os.cpu_count() or 1)
    assert str(default) == "CPUs", "the help and docs name it, not this machine's figure"


@pytest.mark.parametrize("command", ["serve", "pull"])
def test_help_shows_it(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-parallel-unpacks" in out and "STRATA_MAX_PARALLEL_UNPACKS" in out
    assert "default CPUs" in out
