"""csi/mount/syscalls.py without mounting: the thread that gives a relative mount its own
working directory, and the refusals that happen before any syscall."""

import errno
import os
import threading

import pytest

from csi.mount import spec, syscalls
from csi.mount.features import Features
from csi.mount.syscalls import Mounter, in_dir


def test_flag_names_agree_with_spec():
    # spec.fits leaves spec.FLAGS out of the data; the executor must pass them as flags.
    assert syscalls._FLAGS.keys() == spec.FLAGS
    assert set(syscalls._ATTRS) <= spec.FLAGS


def test_in_dir_resolves_relative_paths_there_and_moves_no_one(tmp_path):
    (tmp_path / "here.txt").write_text("found")
    before = os.getcwd()
    seen = {}

    def fn():
        seen["cwd"] = os.getcwd()
        with open("here.txt") as f:
            seen["text"] = f.read()
        seen["thread"] = threading.current_thread()

    in_dir(str(tmp_path), fn)
    assert seen["cwd"] == str(tmp_path) and seen["text"] == "found"
    assert seen["thread"] is not threading.current_thread()
    assert os.getcwd() == before


def test_in_dir_without_cwd_runs_on_the_calling_thread():
    seen = []
    in_dir("", lambda: seen.append(threading.current_thread()))
    assert seen == [threading.current_thread()]


def test_in_dir_raises_what_fn_raised(tmp_path):
    def fn():
        raise FileNotFoundError(errno.ENOENT, "gone", "x")

    with pytest.raises(FileNotFoundError, match="gone"):
        in_dir(str(tmp_path), fn)
    with pytest.raises(FileNotFoundError):
        in_dir(str(tmp_path / "missing"), lambda: None)  # chdir itself fails
    assert os.getcwd() != str(tmp_path)


def too_big(target="/pods/t", type_="overlay"):
    lowers = [f"/var/lib/strata/layers/{i:016x}/fs" for i in range(200)]
    if type_ == "overlay":
        return spec.overlay(lowers, "/v/u", "/v/w", target)
    return spec.Mount(type_, "/dev/x", target, ("a=" + ":".join(lowers),))


def test_oversized_options_without_lowerdir_plus_are_e2big_naming_the_target():
    m = Mounter(features=Features(lowerdir_plus=False, page_size=4096))
    with pytest.raises(OSError) as e:
        m.mount(too_big("/pods/deep"))
    assert e.value.errno == errno.E2BIG
    assert "/pods/deep" in str(e.value) and "exceed one page" in str(e.value)


def test_oversized_options_of_anything_but_an_overlay_are_e2big():
    m = Mounter(features=Features(lowerdir_plus=True, page_size=4096))
    with pytest.raises(OSError) as e:
        m.mount(too_big("/mnt/x", type_="ext4"))
    assert e.value.errno == errno.E2BIG and "/mnt/x" in str(e.value)


def test_page_size_comes_from_the_injected_features():
    # A smaller page makes a small plan oversized: how a test forces the fallback cheaply.
    m = Mounter(features=Features(lowerdir_plus=False, page_size=64))
    with pytest.raises(OSError) as e:
        m.mount(spec.overlay(["/l/" + "a" * 40, "/l/b"], "/u", "/w", "/t"))
    assert e.value.errno == errno.E2BIG
