"""The trash: private state leaves its place at once and is deleted in the background; a
mount inside is still never deleted into; what a stop or a crash left is deleted at the
next start; an unpublish over the real socket leaves nothing under volumes/ or trash/."""

import contextlib
import logging
import os
import subprocess
import threading

import pytest

from csi.trash import Trash
from tests.conftest import needs_root, unmount_all_under


def _tree(path) -> None:
    for d in ("upper/a/b", "work/work"):
        (path / d).mkdir(parents=True)
    (path / "upper" / "a" / "b" / "f").write_text("pod data")
    (path / "upper" / "top").write_text("x")


def emptied_by_a_start(directory) -> None:
    """A new Trash on `directory` deletes everything there."""
    t = Trash(str(directory)).start()
    try:
        assert t.drain(timeout=60)
        assert os.listdir(directory) == []
    finally:
        t.stop()


LEFT = "deadbeefdeadbeef-01234567"  # an entry an earlier server left in the trash


@contextlib.contextmanager
def served(tmp_path):
    """The server's parts on `tmp_path/store` (its trash started): (parts, the paths each
    discard was asked for). Closed, and whatever was mounted under tmp_path unmounted,
    however the test ends."""
    from csi import compose
    from csi.config import Config

    parts = compose.node(Config(root=str(tmp_path / "store"), node_id="t"))
    discarded: list[str] = []
    real = parts.trash.discard
    parts.trash.discard = lambda p: discarded.append(p) or real(p)
    try:
        yield parts, discarded
    finally:
        parts.close()
        unmount_all_under(str(tmp_path))


@pytest.fixture
def trash(tmp_path):
    t = Trash(str(tmp_path / "trash"))
    yield t
    t.stop()


def test_before_start_a_discard_deletes_at_once(tmp_path, trash):
    _tree(tmp_path / "k")
    trash.discard(str(tmp_path / "k"))
    assert not (tmp_path / "k").exists()
    assert not (tmp_path / "trash").exists(), "nothing goes to the trash before start()"


def test_a_discard_moves_the_tree_out_at_once_and_deletes_it_later(tmp_path, trash):
    trash.start()
    _tree(tmp_path / "k")
    trash.discard(str(tmp_path / "k"))
    assert not (tmp_path / "k").exists()
    assert trash.drain(timeout=30)
    assert os.listdir(tmp_path / "trash") == []
    assert trash.pending() == 0


def test_a_missing_path_is_nothing_to_do(tmp_path, trash):
    trash.start()
    trash.discard(str(tmp_path / "never"))
    assert trash.drain(timeout=30)
    assert os.listdir(tmp_path / "trash") == []


def test_the_same_name_discarded_twice_keeps_both_until_deleted(tmp_path, trash):
    """Keys are never reused, but two trees of one name must not collide in the trash."""
    trash.start()
    for _ in range(2):
        _tree(tmp_path / "k")
        trash.discard(str(tmp_path / "k"))
        assert not (tmp_path / "k").exists()
    assert trash.drain(timeout=30)
    assert os.listdir(tmp_path / "trash") == []


def test_stop_ends_the_thread_at_once_and_the_next_start_finishes(tmp_path, caplog):
    """A stop does not wait for the deletions: the thread is gone when stop() returns
    (another server may take the store next), and the next start deletes the rest."""
    big = tmp_path / "k"
    for i in range(2000):
        (big / str(i)).mkdir(parents=True)
        (big / str(i) / "f").write_text("x")
    t = Trash(str(tmp_path / "trash")).start()
    t.discard(str(big))
    t.stop()
    assert not any(th.name == "trash" and th.is_alive() for th in threading.enumerate())
    assert os.listdir(tmp_path / "trash") != [], "stop did not wait for 2,000 directories"
    with caplog.at_level(logging.ERROR):
        emptied_by_a_start(tmp_path / "trash")
    assert "cannot delete" not in caplog.text


def test_on_empty_is_called_once_the_queue_runs_dry(tmp_path, trash):
    emptied = []
    trash.on_empty = lambda: emptied.append(os.listdir(tmp_path / "trash"))
    trash.start()
    _tree(tmp_path / "k")
    trash.discard(str(tmp_path / "k"))
    assert trash.drain(timeout=30)
    from tests.integration.test_life_events import wait_for
    wait_for(lambda: emptied, what="on_empty")
    assert emptied[0] == [], "called once the entry was gone"


def test_start_deletes_what_an_earlier_run_left(tmp_path):
    left = tmp_path / "trash" / "k-0123abcd"
    _tree(left)
    (tmp_path / "trash" / "a-file").write_text("left too")
    emptied_by_a_start(tmp_path / "trash")


def test_after_stop_a_discard_deletes_at_once(tmp_path, trash):
    trash.start()
    trash.stop()
    _tree(tmp_path / "k")
    trash.discard(str(tmp_path / "k"))
    assert not (tmp_path / "k").exists()
    assert os.listdir(tmp_path / "trash") == []


@needs_root
def test_a_mount_inside_is_never_deleted_into(tmp_path, trash, caplog):
    trash.start()
    _tree(tmp_path / "k")
    inside = tmp_path / "k" / "upper" / "a"
    subprocess.run(["mount", "-t", "tmpfs", "strata-test", str(inside)], check=True)
    try:
        (inside / "precious").write_text("mounted data")
        with caplog.at_level(logging.ERROR):
            trash.discard(str(tmp_path / "k"))
            assert trash.drain(timeout=30)
        [entry] = os.listdir(tmp_path / "trash")
        moved = tmp_path / "trash" / entry / "upper" / "a"
        assert (moved / "precious").read_text() == "mounted data"
        assert "mount point" in caplog.text
    finally:
        unmount_all_under(str(tmp_path))
    emptied_by_a_start(tmp_path / "trash")  # with the mount gone, the rest goes


@needs_root
def test_an_entry_that_cannot_be_deleted_shows_in_the_metrics(tmp_path):
    """strata_trash_entries counts what trash/ holds: an entry with a mount inside stays
    (and the log says why), so the gauge stays above 0 until an operator unmounts it."""
    from prometheus_client.parser import text_string_to_metric_families

    from csi.metrics import exposition

    def gauge(parts) -> float:
        text = exposition(parts.metrics.registry).decode()
        [value] = [s.value for f in text_string_to_metric_families(text)
                   for s in f.samples if s.name == "strata_trash_entries"]
        return value

    stuck = tmp_path / "store" / "trash" / LEFT
    _tree(stuck)
    subprocess.run(["mount", "-t", "tmpfs", "strata-test", str(stuck / "upper" / "a")],
                   check=True)
    with served(tmp_path) as (parts, _):
        assert parts.trash.drain(timeout=30)
        assert gauge(parts) == 1
    with served(tmp_path) as (parts, _):  # the first one's exit unmounted the tmpfs
        assert parts.trash.drain(timeout=30)
        assert gauge(parts) == 0, "unmounted: the next start deleted it"


@needs_root
def test_a_mount_point_itself_is_refused_at_once(tmp_path, trash):
    """rename(2) of a mount point is EBUSY: deleted in place instead, which refuses."""
    trash.start()
    target = tmp_path / "k"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "strata-test", str(target)], check=True)
    try:
        (target / "precious").write_text("mounted data")
        with pytest.raises(OSError):
            trash.discard(str(target))
        assert (target / "precious").read_text() == "mounted data"
    finally:
        unmount_all_under(str(tmp_path))


# -- the server's ------------------------------------------------------------------------------
@needs_root
def test_unpublish_leaves_no_key_and_start_up_empties_the_trash(tmp_path, images):
    """Through the server's parts: an unpublish takes the key out of volumes/ before it
    returns, the trash deletes it; a tree a crash left in the trash goes at the next start."""
    from csi.volumes import PublishSpec

    _tree(tmp_path / "store" / "trash" / LEFT)
    with served(tmp_path) as (parts, discarded):
        assert parts.trash.drain(timeout=30)
        assert os.listdir(parts.paths.trash) == [], "start-up deletes what was left"
        target = str(tmp_path / "pod")
        parts.volumes.publish(PublishSpec("v", target, images.app, False, 1))
        with open(os.path.join(target, "written"), "w") as f:
            f.write("by the pod\n")
        [key] = os.listdir(parts.paths.volumes)
        parts.volumes.unpublish("v", target)
        assert discarded == [parts.paths.volume(key)], "through the trash"
        assert os.listdir(parts.paths.volumes) == [], "the key leaves volumes/ at once"
        assert parts.trash.drain(timeout=30)
        assert os.listdir(parts.paths.trash) == []


@needs_root
def test_unpublish_over_the_socket_leaves_nothing(tmp_path, images):
    from tests.conftest import StrataProcess
    from tests.integration.test_life_events import wait_for

    p = StrataProcess(str(tmp_path)).start()
    try:
        for i in range(3):
            p.csi.publish(f"v{i}", tmp_path / f"pod{i}", images.app)
            (tmp_path / f"pod{i}" / "written").write_text("by the pod\n")
        for i in range(3):
            p.csi.unpublish(f"v{i}", tmp_path / f"pod{i}")
            assert not (tmp_path / f"pod{i}").exists()
        assert os.listdir(os.path.join(p.root, "volumes")) == []
        trash = os.path.join(p.root, "trash")
        wait_for(lambda: os.listdir(trash) == [], what="the trash to be emptied")
    finally:
        p.stop()
        unmount_all_under(str(tmp_path))


@needs_root
def test_a_limited_key_is_deleted_before_unpublish_returns(tmp_path, images):
    """A limited key's files count toward what bounds it (a project ID is free for the next
    publish once volumes/KEY is gone): they never wait in the trash."""
    from csi.volumes import PublishSpec

    with served(tmp_path) as (parts, discarded):
        limited, unlimited = str(tmp_path / "limited"), str(tmp_path / "unlimited")
        parts.volumes.publish(PublishSpec("l", limited, images.app, False, 1,
                                          size_limit=16 << 20))
        parts.volumes.publish(PublishSpec("u", unlimited, images.app, False, 1))
        [key_l, key_u] = sorted(os.listdir(parts.paths.volumes),
                                key=lambda k: os.path.isdir(parts.paths.volume_part(k, "upper")))
        parts.volumes.unpublish("l", limited)
        assert discarded == [] and os.listdir(parts.paths.volumes) == [key_u]
        parts.volumes.unpublish("u", unlimited)
        assert discarded == [parts.paths.volume(key_u)]
        assert os.listdir(parts.paths.volumes) == []
        assert parts.trash.drain(timeout=30)
