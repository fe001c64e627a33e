"""csi/mount/features.py without a kernel: the constructor tests use, the module-parameter
reading, and how probe's answers follow from what the kernel says (a fake `attempt`)."""

import errno
import os

import pytest

from csi.mount import features
from csi.mount.features import Features


def test_defaults_claim_nothing_but_the_page_size():
    f = Features()
    assert f.page_size == os.sysconf("SC_PAGESIZE")
    assert not (f.lowerdir_plus or f.redirect_dir or f.metacopy or f.index or f.volatile
                or f.userxattr)
    assert f.redirect_dir_default is f.metacopy_default is f.index_default is None


def test_forcing_features_for_a_test():
    f = Features(lowerdir_plus=False, page_size=4096, volatile=True)
    assert (f.lowerdir_plus, f.page_size, f.volatile) == (False, 4096, True)
    with pytest.raises(AttributeError):
        f.lowerdir_plus = True  # type: ignore[misc]


@pytest.mark.parametrize("text, value", [("Y\n", True), ("N\n", False), ("N", False),
                                         ("on\n", None), ("", None)])
def test_parse_param(text, value):
    assert features.parse_param(text) is value


def test_read_param_missing_file_means_unknown(tmp_path):
    (tmp_path / "index").write_text("Y\n")
    assert features.read_param(str(tmp_path), "index") is True
    assert features.read_param(str(tmp_path), "metacopy") is None


class FakeKernel:
    """Refuses (EINVAL) any attempt containing one of `refuse`; records what it was asked."""

    def __init__(self, refuse=(), fail=None, nosys=False):
        self.refuse, self.fail, self.nosys = refuse, fail, nosys
        self.calls: list[tuple[list[str], str, bool]] = []

    def __call__(self, options, target, fsconfig_only):
        self.calls.append((list(options), target, fsconfig_only))
        for o in options:
            assert o.startswith(("lowerdir", "upperdir", "workdir")) or "/" not in o
            if o.startswith(("lowerdir=", "upperdir=", "workdir=", "lowerdir+=")):
                for p in o.split("=", 1)[1].split(":"):
                    assert not os.path.isabs(p), "relative to the target's directory"
                    p = os.path.join(os.path.dirname(target), p)
                    assert os.path.isdir(p), f"{p} was not made before the attempt"
        assert os.path.isdir(target) and not os.listdir(target)
        if self.fail and any(self.fail in o for o in options):
            raise OSError(errno.EPERM, "not permitted")
        if self.nosys and fsconfig_only:
            raise OSError(errno.ENOSYS, "no fsopen")
        if any(r in o for r in self.refuse for o in options):
            raise OSError(errno.EINVAL, "Invalid argument")


def sysfs(tmp_path, **params):
    d = tmp_path / "params"
    d.mkdir()
    for k, v in params.items():
        (d / k).write_text(v + "\n")
    return str(d)


@pytest.fixture
def scratch(tmp_path):
    d = tmp_path / "scratch"
    d.mkdir()
    yield str(d)
    assert os.listdir(d) == [], "probe left something in scratch_dir"


def test_everything_accepted(tmp_path, scratch):
    kernel = FakeKernel()
    f = features._probe(scratch, kernel, sysfs(tmp_path, redirect_dir="Y", index="N"))
    assert f == Features(lowerdir_plus=True, redirect_dir=True, redirect_dir_default=True,
                         metacopy=True, metacopy_default=None, index=True, index_default=False,
                         volatile=True, userxattr=True)
    targets = [t for _, t, _ in kernel.calls]
    assert len(set(targets)) == len(targets), "every attempt gets fresh directories"
    plus = [c for c in kernel.calls if any(o.startswith("lowerdir+=") for o in c[0])]
    assert len(plus) == 1 and plus[0][2] is True  # asked of fsconfig only
    assert not any(o.startswith("upperdir=") for o in plus[0][0])


def test_refused_options_come_out_false(tmp_path, scratch):
    kernel = FakeKernel(refuse=("lowerdir+", "metacopy", "volatile", "userxattr"))
    f = features._probe(scratch, kernel, sysfs(tmp_path))
    assert (f.lowerdir_plus, f.metacopy, f.volatile, f.userxattr) == (False,) * 4
    assert f.redirect_dir and f.index


def test_no_fsopen_means_no_lowerdir_plus(tmp_path, scratch):
    f = features._probe(scratch, FakeKernel(nosys=True), sysfs(tmp_path))
    assert not f.lowerdir_plus and f.volatile


def test_a_filesystem_that_cannot_hold_an_upper(tmp_path, scratch):
    f = features._probe(scratch, FakeKernel(refuse=("upperdir",)), sysfs(tmp_path, index="Y"))
    assert f == Features(lowerdir_plus=True, index_default=True)


def test_no_overlay_at_all_raises(tmp_path, scratch):
    with pytest.raises(OSError, match="plain two-layer"):
        features._probe(scratch, FakeKernel(refuse=("lowerdir",)), sysfs(tmp_path))


def test_other_errors_are_not_answers_and_leave_nothing(tmp_path, scratch):
    # EPERM (no CAP_SYS_ADMIN) says nothing about the option: raised, not reported False.
    with pytest.raises(PermissionError):
        features._probe(scratch, FakeKernel(fail="index=on"), sysfs(tmp_path))
