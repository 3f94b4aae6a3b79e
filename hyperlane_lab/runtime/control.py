"""Client side of the control plane: a small synchronous wrapper over one worker's gRPC stub."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import grpc

from hyperlane_lab.errors import WorkerError
from hyperlane_lab.runtime.dataplane import parse_address
from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb
from hyperlane_lab.runtime.proto_gen import hyperlane_pb2_grpc as pb_grpc
from hyperlane_lab.runtime.server import GRPC_OPTIONS
from hyperlane_lab.types import WorkerInfo

__all__ = ["CHUNK", "WorkerClient", "info_to_worker_info"]

log = logging.getLogger(__name__)
CHUNK = 4 << 20


def info_to_worker_info(reply: pb.InfoReply, host: str | None = None) -> WorkerInfo:
    return WorkerInfo(
        worker_id=reply.worker_id,
        host=host or reply.host,
        grpc_port=reply.grpc_port,
        data_port=reply.data_port,
        device_kind=reply.device_kind,
        gpu_name=reply.gpu_name,
        total_memory=reply.total_memory,
        free_memory=reply.free_memory,
        compute_capability=reply.compute_capability,
        host_ram=reply.host_ram,
        flops=reply.flops,
        mem_bw=reply.mem_bw,
        shard_loaded=reply.shard_loaded,
        auth_required=reply.auth_required,
        protocol_version=reply.protocol_version,
        device=reply.device,
    )


class WorkerClient:
    """One worker's control plane. Every failure becomes a WorkerError naming the address."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.host, self.port = parse_address(address)
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self.stub = pb_grpc.WorkerStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            detail = e.details() if hasattr(e, "details") else str(e)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise WorkerError(
                    f"worker {self.address} is unreachable ({detail}); is `hyperlane worker` running there "
                    "and the port open?"
                ) from None
            raise WorkerError(f"worker {self.address} refused {method}: {detail}") from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise WorkerError(
                f"worker {self.address} is unreachable: no answer within {timeout:.0f}s"
            ) from None

    def info(self) -> pb.InfoReply:
        return self.call("Info", pb.InfoRequest())

    def worker_info(self) -> WorkerInfo:
        return info_to_worker_info(self.info(), host=self.host)

    @property
    def data_address(self) -> str:
        return f"{self.host}:{self.info().data_port}"

    def clock_offset(self, rounds: int = 7) -> tuple[float, float]:
        """(worker clock - client clock, round trip) from the Health exchange with the smallest round trip."""
        best = (0.0, float("inf"))
        for _ in range(rounds):
            t0 = time.perf_counter()
            r = self.call("Health", pb.HealthRequest())
            t1 = time.perf_counter()
            if t1 - t0 < best[1]:
                best = (r.worker_time_s - (t0 + t1) / 2, t1 - t0)
        return best

    def upload_blob(self, data: bytes, progress: Any = None) -> str:
        """Send ``data`` unless the worker's cache already has it; returns its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        missing = self.call("HasBlobs", pb.HasBlobsRequest(sha256=[digest])).missing
        if not missing:
            log.info("worker %s already has blob %s", self.address, digest[:12])
            if progress is not None:
                progress.update(len(data))
            return digest

        def chunks() -> Iterator[pb.BlobChunk]:
            view = memoryview(data)
            for i in range(0, max(len(data), 1), CHUNK):
                piece = view[i : i + CHUNK]
                first = i == 0
                yield pb.BlobChunk(
                    sha256=digest if first else "", size=len(data) if first else 0, data=bytes(piece)
                )
                if progress is not None:
                    progress.update(len(piece))

        try:
            self.stub.PutBlob(chunks(), timeout=max(self.timeout, len(data) / 5e6))
        except grpc.RpcError as e:
            raise WorkerError(f"upload to worker {self.address} failed: {e.details()}") from None
        return digest
