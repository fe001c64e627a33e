"""Fixtures of the integration tests that more than one module shares."""

import os

import pytest

from tests.conftest import unmount_all_under
from tests.integration.quotafs import make_all


@pytest.fixture(scope="session")
def quota_filesystems(tmp_path_factory):
    """The loop-mounted filesystems of quotafs.py, made once per session; all unmounted at
    the end, whatever happened. Tests make directories of their own names in them."""
    if os.geteuid() != 0:
        pytest.skip("needs root: loop-mounted filesystems")
    base = tmp_path_factory.mktemp("quota-fs")
    try:
        yield make_all(base)
    finally:
        unmount_all_under(str(base))
