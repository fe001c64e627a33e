"""csi-sanity against `strata serve --backend btrfs`, its store on the session's btrfs:
the same suite, the same expectations as tests/sanity/test_csi_sanity.py for overlay."""

import os
import signal
import subprocess
import uuid

import pytest

from tests.conftest import ROOT_REASON, StrataProcess, unmount_all_under
from tests.sanity.test_csi_sanity import BINARY, EXPECTED_SPECS, tally
from tests.storefs import delete_subvolumes, store_fs


@pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)
def test_csi_sanity_on_btrfs(tmp_path, images, store_filesystems):
    if not os.path.exists(BINARY):
        if os.environ.get("CI"):
            pytest.fail(f"csi-sanity not found at {BINARY}")
        pytest.skip(f"csi-sanity not found at {BINARY} (set CSI_SANITY)")
    root = os.path.join(store_fs(store_filesystems, "btrfs").root, f"sanity-{uuid.uuid4().hex}")
    plugin = StrataProcess(str(tmp_path), root=root, extra_args=("--backend", "btrfs"))
    params = tmp_path / "params.yaml"
    params.write_text(f"image: {images.app}\n")
    junit = tmp_path / "sanity.xml"
    try:
        plugin.start()
        run = subprocess.run(
            [BINARY, f"--csi.endpoint=unix://{plugin.node_sock}",
             f"--csi.controllerendpoint=unix://{plugin.ctrl_sock}",
             f"--csi.mountdir={tmp_path}/mount", f"--csi.stagingdir={tmp_path}/staging",
             f"--csi.testvolumeparameters={params}", f"-ginkgo.junit-report={junit}",
             "-ginkgo.no-color"],
            capture_output=True, text=True, timeout=600)
    finally:
        try:
            stopped = plugin.stop(signal.SIGTERM)
        finally:
            left = unmount_all_under(str(tmp_path))
    log = plugin.read_log()
    volumes = os.listdir(os.path.join(root, "volumes"))
    delete_subvolumes(root)
    output = f"{run.stdout[-6000:]}{run.stderr[-2000:]}\n--- plugin log ---\n{log[-4000:]}"
    assert junit.exists(), f"csi-sanity wrote no report (exit {run.returncode}):\n{output}"
    counts = tally(str(junit))
    ran = counts["total"] - counts["skipped"]
    assert run.returncode == 0 and counts["failed"] == 0, f"csi-sanity failed {counts}:\n{output}"
    assert counts["passed"] == ran >= EXPECTED_SPECS, counts
    assert stopped == 0, f"strata serve exited {stopped} on SIGTERM:\n{log[-4000:]}"
    assert "Traceback" not in log, log[-4000:]
    assert not left, f"csi-sanity run left mounts: {left}"
    assert volumes == []
