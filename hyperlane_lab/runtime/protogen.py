"""Generate the gRPC stubs from ``proto/hyperlane.proto`` with grpcio-tools.

``python -m hyperlane_lab.runtime.protogen [OUT_DIR]`` (default: the package's ``proto_gen``).
The committed stubs must equal what this produces; a test checks it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

__all__ = ["generate"]

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "hyperlane.proto"
DEFAULT_OUT = Path(__file__).resolve().parent / "proto_gen"


def generate(out_dir: Path = DEFAULT_OUT, proto: Path = PROTO) -> list[Path]:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{proto.parent}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
    grpc_file = out_dir / "hyperlane_pb2_grpc.py"
    # protoc writes an absolute-style import; make it package-relative so the stubs live in our package.
    text = grpc_file.read_text()
    text = re.sub(r"^import hyperlane_pb2 as", "from . import hyperlane_pb2 as", text, flags=re.M)
    grpc_file.write_text(text)
    return [out_dir / "hyperlane_pb2.py", grpc_file]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for p in generate(target):
        print(p)
