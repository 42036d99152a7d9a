"""Regenerate the committed gRPC stubs from caravan.proto.

    python -m caravan.proto.generate

protoc is given the virtual include path caravan/proto so the stubs import each other as
`caravan.proto.caravan_pb2`, matching the package mapping in pyproject.toml. A test
regenerates them into a temporary folder and diffs, so an edit to the .proto cannot land
without its stubs.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
STUBS = ("caravan_pb2.py", "caravan_pb2.pyi", "caravan_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs for proto/caravan.proto into out_dir; returns their paths."""
    from grpc_tools import protoc  # build-time only: grpcio-tools is not a runtime dependency

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-Icaravan/proto={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--pyi_out={tmp}",
            "caravan/proto/caravan.proto",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on proto/caravan.proto")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in STUBS:
            target = out_dir / name
            shutil.copyfile(Path(tmp) / "caravan" / "proto" / name, target)
            written.append(target)
        return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
