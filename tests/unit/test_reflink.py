"""The reflink probe's answer as the start-up log and the metric say it (pure), and the
probe itself on the test machine's tmp filesystem, whatever that is: it answers and leaves
nothing behind (the answers on ext4, XFS and btrfs: tests/integration/test_reflink.py)."""

import os

from csi.inspect import Summary
from csi.metrics import reflink_family
from csi.mount.reflink import Reflink, filesystem, probe


def test_the_start_up_line_says_what_copy_up_does():
    assert Reflink("xfs", True).describe("/var/lib/strata") == \
        "store /var/lib/strata on xfs: copy-up clones extents (reflink)"
    assert Reflink("ext4", False).describe("/s") == "store /s on ext4: copy-up copies whole files"
    assert Reflink().describe("/s") == \
        "store /s on an unknown filesystem: copy-up copies whole files"


def test_the_gauge_is_one_series_labelled_with_the_filesystem():
    [sample] = reflink_family(Reflink("btrfs", True)).samples
    assert (sample.name, sample.labels, sample.value) == (
        "strata_store_reflink", {"filesystem": "btrfs"}, 1)
    [sample] = reflink_family(Reflink("ext4", False)).samples
    assert sample.value == 0


def test_the_probe_answers_and_leaves_nothing(tmp_path):
    got = probe(str(tmp_path))
    assert got.filesystem == filesystem(str(tmp_path)) != ""
    assert os.listdir(tmp_path) == []


def test_summaries_add_their_logical_bytes():
    a = Summary(copied_up=1, copied_up_bytes=4096, copied_up_logical_bytes=100)
    assert (a + a).copied_up_logical_bytes == 200


def test_a_probe_that_cannot_make_its_files_says_no_and_does_not_stop_the_start(
        tmp_path, caplog):
    got = probe(str(tmp_path / "gone"))  # ENOENT, as ENOSPC or EROFS would be
    assert got.clones is False
    assert "clones extents failed" in caplog.text
