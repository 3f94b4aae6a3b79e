"""The committed gRPC stubs must be exactly what grpcio-tools generates from proto/hyperlane.proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperlane_lab.runtime import protogen


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = protogen.generate(tmp_path)
    committed = Path(protogen.DEFAULT_OUT)
    for f in fresh:
        assert (committed / f.name).read_text() == f.read_text(), (
            f"{f.name} drifted from proto/hyperlane.proto: run `python -m hyperlane_lab.runtime.protogen`"
        )


def test_drift_is_detected(tmp_path: Path) -> None:
    """The check above can fail: a changed .proto gives different stubs."""
    pytest.importorskip("grpc_tools")
    proto = tmp_path / "hyperlane.proto"
    proto.write_text(
        protogen.PROTO.read_text().replace(
            "uint32 sessions = 20;", "uint32 sessions = 20;\n  bool extra = 21;"
        )
    )
    fresh = protogen.generate(tmp_path / "out", proto)
    committed = Path(protogen.DEFAULT_OUT) / "hyperlane_pb2.py"
    assert fresh[0].read_text() != committed.read_text()
