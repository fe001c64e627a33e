"""csi/mount/syscalls.py without mounting."""

from csi.mount import spec, syscalls


def test_flag_names_agree_with_spec():
    # spec.fits leaves spec.FLAGS out of the data; the executor must pass them as flags.
    assert syscalls._FLAGS.keys() == spec.FLAGS
    assert set(syscalls._ATTRS) <= spec.FLAGS
