"""csi/proto/ is exactly what `make proto` generates from protos/csi.proto.

The generated modules are committed, so an edit to protos/csi.proto (or a grpcio-tools bump)
without `make proto` would go unnoticed until a field went missing at run time. This runs
scripts/genproto.py's generate() into a temp dir and compares file by file, byte for byte.
"""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
COMMITTED = REPO / "csi" / "proto"
FIX = "csi/proto/ is stale: run `make proto` and commit the result"


def load_genproto():
    spec = importlib.util.spec_from_file_location("genproto", REPO / "scripts" / "genproto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def files(top: pathlib.Path) -> dict[str, bytes]:
    """Relative path → content; bytecode caches are not part of the generated set."""
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_committed_proto_modules_match_a_fresh_generation(tmp_path):
    load_genproto().generate(tmp_path)
    fresh, committed = files(tmp_path), files(COMMITTED)
    assert fresh, "generate() produced nothing"
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    assert not missing, f"{FIX} (not committed: {missing})"
    assert not extra, f"{FIX} (committed but no longer generated: {extra})"
    differ = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not differ, f"{FIX} (differs from a fresh generation: {differ})"
