"""The read-only tools on stores they cannot or may not read: exit 1 with a reason, never
a traceback, and the store left as it was."""

import os
import sqlite3

from csi import cli
from csi.store import state as st


def test_no_store(tmp_path, capsys):
    for command in (["ls"], ["df"], ["gc"], ["diff", "/x"]):
        assert cli.main([*command, "--root", str(tmp_path / "none")]) == 1
        assert "no store at" in capsys.readouterr().err


def test_an_older_schema_is_not_upgraded_by_a_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(st, "SCHEMA_VERSION", 3)
    st.State(str(tmp_path / "state.db")).close()
    monkeypatch.undo()
    for command in (["ls"], ["df"], ["diff", "/x"]):
        assert cli.main([*command, "--root", str(tmp_path)]) == 1
        assert "schema version 3" in capsys.readouterr().err
    con = sqlite3.connect(tmp_path / "state.db")
    assert con.execute("PRAGMA user_version").fetchone() == (3,)
    con.close()


def test_an_empty_store_lists_nothing(tmp_path, capsys):
    st.State(str(tmp_path / "state.db")).close()
    assert cli.main(["ls", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["IMAGE", "DIGEST"]
    assert cli.main(["df", "--root", str(tmp_path)]) == 0
    assert "0 publications" in capsys.readouterr().out
    assert cli.main(["diff", str(tmp_path / "pod"), "--root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "nothing is published" in err
    assert cli.main(["diff", "some-volume", "--json", "--root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "no publication of a volume 'some-volume'" in err


def test_write_tools_do_not_upgrade_a_store_another_process_uses(tmp_path, capsys,
                                                                 monkeypatch):
    """An older `strata serve` on the store would break on the new schema."""
    from csi.locks import StoreUsers

    monkeypatch.setattr(st, "SCHEMA_VERSION", 3)
    st.State(str(tmp_path / "state.db")).close()
    monkeypatch.undo()
    server = StoreUsers(str(tmp_path / "store.lock")).share()  # as a running server does
    try:
        assert cli.main(["gc", "--root", str(tmp_path)]) == 1
        assert "schema version 3" in capsys.readouterr().err
        assert cli.main(["pull", "oci:/nowhere:x", "--root", str(tmp_path)]) == 1
        assert "schema version 3" in capsys.readouterr().err
    finally:
        server.close()
    con = sqlite3.connect(tmp_path / "state.db")
    assert con.execute("PRAGMA user_version").fetchone() == (3,)
    con.close()
    assert cli.main(["gc", "--root", str(tmp_path)]) == 0, "alone, it upgrades"
    con = sqlite3.connect(tmp_path / "state.db")
    assert con.execute("PRAGMA user_version").fetchone() == (st.SCHEMA_VERSION,)
    con.close()


def test_a_pull_never_creates_a_store(tmp_path, capsys):
    """Only `strata serve` creates a store: a mistyped --root is refused, nothing made."""
    from csi.locks import StoreUsers

    (tmp_path / "store").mkdir()
    other = StoreUsers(str(tmp_path / "store" / "store.lock")).share()
    try:
        assert cli.main(["pull", "oci:/nowhere:x", "--root", str(tmp_path / "store")]) == 1
        assert "no store at" in capsys.readouterr().err
    finally:
        other.close()
    assert os.listdir(tmp_path / "store") == ["store.lock"]
