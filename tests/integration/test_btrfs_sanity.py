"""csi-sanity against `strata serve --backend btrfs`, its store on the session's btrfs:
the same suite, the same expectations as tests/sanity/test_csi_sanity.py for overlay."""

import os
import uuid

import pytest

from tests.conftest import ROOT_REASON, StrataProcess
from tests.sanity.test_csi_sanity import run_sanity
from tests.storefs import delete_subvolumes, store_fs


@pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)
def test_csi_sanity_on_btrfs(tmp_path, images, store_filesystems):
    root = os.path.join(store_fs(store_filesystems, "btrfs").root, f"sanity-{uuid.uuid4().hex}")
    plugin = StrataProcess(str(tmp_path), root=root, extra_args=("--backend", "btrfs"))
    try:
        run_sanity(plugin, tmp_path, f"image: {images.app}\n")
        assert os.listdir(os.path.join(root, "volumes")) == []
    finally:
        delete_subvolumes(root)
