"""Generate csi/proto/ from protos/csi.proto with grpcio-tools (`make proto`).

The generated gRPC module imports its messages as a top-level module (`import csi_pb2`);
we rewrite that one line into a package-relative import so `csi.proto` works installed.
tests/unit/test_proto_fresh.py runs this into a temp dir and fails when csi/proto/ is stale.
"""

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # grpc_tools ships the well-known types (descriptor, wrappers, timestamp).
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / "protos" / "csi.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    grpc_py = out / "csi_pb2_grpc.py"
    text = grpc_py.read_text()
    text = text.replace("import csi_pb2 as csi__pb2", "from . import csi_pb2 as csi__pb2")
    grpc_py.write_text(text)
    init = out / "__init__.py"
    init.write_text('"""Generated from protos/csi.proto by `make proto`. Do not edit."""\n')


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "csi" / "proto")
