"""tests/e2e (opt-in, never run here: no container engine) is checked for what can rot
without a cluster: kind.sh parses (and is shellcheck-clean where shellcheck is
installed), applies the kind overlay and every example but the one needing credentials of
your own, and test-driver.yaml declares strata as the external-storage e2e suite expects.
"""

import os
import re
import shutil
import subprocess

import pytest
import yaml

import csi
from csi.image import reference
from tests.deploy.manifests import REPO, example_files

E2E = os.path.join(REPO, "tests", "e2e")
KIND_SH = os.path.join(E2E, "kind.sh")
NEEDS_OWN_REGISTRY = {"private-registry.yaml"}


def test_kind_sh_parses_and_is_executable():
    assert os.access(KIND_SH, os.X_OK)
    subprocess.run(["bash", "-n", KIND_SH], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_kind_sh_is_shellcheck_clean():
    run = subprocess.run(["shellcheck", KIND_SH], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout


def test_kind_sh_applies_the_overlay_and_the_examples():
    with open(KIND_SH) as f:
        text = f.read()
    assert "deploy/overlays/kind" in text
    [listed] = re.findall(r"^examples=\(([^)]*)\)", text, re.M)
    applied = {f"{n}.yaml" for n in listed.split()}
    assert applied == set(example_files()) - NEEDS_OWN_REGISTRY
    assert "strata df" in text, "the ten pods' one image is shown in the plugin pod"


def test_the_driver_definition_declares_inline_volumes_only():
    with open(os.path.join(E2E, "test-driver.yaml")) as f:
        driver = yaml.safe_load(f)
    assert set(driver) == {"DriverInfo", "InlineVolumes"}, "no StorageClass: no PVC tests"
    assert driver["DriverInfo"]["Name"] == csi.DRIVER_NAME
    caps = driver["DriverInfo"]["Capabilities"]
    assert caps["persistence"] is False and caps["multipods"] is False
    assert driver["InlineVolumes"]
    for v in driver["InlineVolumes"]:
        assert set(v) == {"Attributes", "Shared", "ReadOnly"}
        assert v["Shared"] is False and v["ReadOnly"] is False
        reference.parse(v["Attributes"]["image"])
