"""csi/health.py: the verdict on an observation of a publication or a stage, a pure
function, and the one rule for "at its size limit"."""

import errno

import pytest

from csi.health import MTIME_SLACK, LayerSample, Observation, upper_full, verdict

MiB = 1 << 20


def layer(lid="aaaa", **over) -> LayerSample:
    fields = dict(layer_id=lid, path=f"/store/layers/{lid}/fs", recorded=100.0, mtime=99.0)
    fields.update(over)
    return LayerSample(**fields)


def obs(**over) -> Observation:
    fields = dict(target="/pods/p/vol", image="registry/app:1", mounted=True,
                  layers=(layer("aaaa"), layer("bbbb")), writable="/store/volumes/k1")
    fields.update(over)
    return Observation(**fields)


def test_a_healthy_publication_and_a_healthy_stage():
    v = verdict(obs())
    assert not v.abnormal and v.message == "mounted"
    v = verdict(obs(mounted=None, writable=""))
    assert not v.abnormal and v.message == "staged"


def test_a_lost_mount():
    v = verdict(obs(mounted=False))
    assert v.abnormal
    assert v.message.startswith("/pods/p/vol is not mounted any more")
    assert "restart the pod" in v.message


def test_missing_layers_are_named_in_one_problem():
    v = verdict(obs(layers=(layer("aaaa", error=errno.ENOENT), layer("bbbb"),
                            layer("cccc", error=errno.ENOENT))))
    assert v.abnormal
    assert "2 of 3 layers of image registry/app:1 are missing" in v.message
    assert "aaaa (/store/layers/aaaa/fs)" in v.message and "cccc" in v.message
    assert "bbbb" not in v.message
    assert v.message.count(";") >= 1 and "restart strata" in v.message


def test_one_missing_layer_reads_singular():
    v = verdict(obs(layers=(layer("aaaa", error=errno.ENOENT), layer("bbbb"))))
    assert "1 of 2 layers of image registry/app:1 is missing" in v.message


@pytest.mark.parametrize("sample, words", [
    (layer(is_dir=False), "is not a directory"),
    (layer(error=errno.EIO), "cannot be read"),
    (layer(error=errno.EACCES), "Permission denied"),
    (layer(mtime=100.0 + MTIME_SLACK + 30), "was changed after it was unpacked"),
])
def test_a_damaged_layer(sample, words):
    v = verdict(obs(layers=(sample,)))
    assert v.abnormal and words in v.message and "aaaa" in v.message


@pytest.mark.parametrize("sample", [
    layer(mtime=100.0 + MTIME_SLACK),  # no later than its record
    layer(recorded=0.0, mtime=1e9),  # no record time to compare with
])
def test_what_is_not_damage(sample):
    assert not verdict(obs(layers=(sample,))).abnormal


def test_an_incomplete_image():
    v = verdict(obs(image_complete=False, layers=()))
    assert v.abnormal and "image registry/app:1 is no longer complete" in v.message


def test_a_lost_writable_layer():
    v = verdict(obs(writable_missing=True))
    assert v.abnormal and "the writable layer /store/volumes/k1 is gone" in v.message
    assert not verdict(obs(writable="", writable_missing=True)).abnormal, \
        "a read-only view has no writable layer to lose"


def test_every_problem_is_reported_most_urgent_first():
    v = verdict(obs(mounted=False, layers=(layer(error=errno.ENOENT),),
                    writable_missing=True, size_limit=MiB, used_bytes=MiB))
    parts = v.message.split("; ")
    starts = [i for i, p in enumerate(parts) if p.startswith((
        "/pods/p/vol is not mounted", "1 of 1 layers", "the writable layer /store",
        "the writable layer is at its size limit"))]
    assert len(starts) == 4 and starts == sorted(starts)


# -- the size limit ------------------------------------------------------------------------
def test_no_limit_is_never_full():
    assert upper_full(0, 10 * MiB, 0, 0) == ""


def test_full_from_bytes_used_when_the_backend_says_nothing_more():
    assert upper_full(MiB, MiB - 1, None, None) == ""
    msg = upper_full(MiB, MiB, None, None)
    assert "at its size limit (1.0 MiB used of 1.0 MiB, no bytes left)" in msg
    assert "ENOSPC" in msg and "sizeLimit" in msg


def test_full_from_what_the_bound_leaves():
    # A loop filesystem's metadata means "used" never reaches the limit; what is left decides.
    assert "no bytes left" in upper_full(MiB, MiB - 64 * 1024, 0, 100)
    assert "no inodes left" in upper_full(MiB, 4096, 10 * 4096, 0)
    assert upper_full(MiB, MiB, 4096, 3) == "", "room left, whatever the usage says"


def test_a_full_upper_makes_the_verdict_abnormal():
    v = verdict(obs(size_limit=MiB, used_bytes=2 * MiB))
    assert v.abnormal and "size limit" in v.message
    assert not verdict(obs(size_limit=MiB, used_bytes=MiB // 2)).abnormal
