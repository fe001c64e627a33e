"""`strata demo` (the README's first command) runs end to end and passes: its pods' diff,
their per-pod series from a real scrape, and its own clean-up check."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT_REASON

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)


def test_demo_passes_and_shows_the_per_pod_series():
    out = subprocess.run([sys.executable, "-m", "csi", "demo"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "     A /srv/www/visits.log" in lines
    assert "     D /usr/lib/python3/json/decoder.py" in lines
    rows = {line.split()[0]: line.split()[1:] for line in lines
            if line.startswith("   demo/pod-")}
    assert rows["demo/pod-a"][:4] == ["1", "1", "0", "1"]  # created, copied up, metacopy, deleted
    assert set(rows["demo/pod-b"]) == {"0"}
    assert "per-pod series left after unpublish: 0;" in out.stdout
    assert lines[-1] == "Demo passed."
