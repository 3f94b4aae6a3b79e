"""gRPC servicer: validates each request, then calls the Worker. Bad requests get
INVALID_ARGUMENT with a message saying what was wrong; the worker keeps serving."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

import hyperlane_lab
from hyperlane_lab.errors import ModelLoadError
from hyperlane_lab.models.loading import DTYPES
from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb
from hyperlane_lab.runtime.proto_gen import hyperlane_pb2_grpc as pb_grpc
from hyperlane_lab.runtime.worker import Worker, device_memory, resolve_device
from hyperlane_lab.types import LayerSpan, SamplingParams

__all__ = ["PROTOCOL_VERSION", "WorkerService", "shard_info"]

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 1
_SID = re.compile(r"^[0-9a-f]{32}$")
R = TypeVar("R")


def _guard(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Map exceptions to gRPC status codes with the message intact."""

    @functools.wraps(fn)
    async def wrapper(self: WorkerService, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await fn(self, request, context)
        except (ValueError, KeyError, ModelLoadError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(msg))
        except MemoryError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ConnectionError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except TimeoutError as e:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except torch.OutOfMemoryError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of device memory: {e}")
        except OSError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"worker file system: {e}")
        raise AssertionError("unreachable")  # context.abort raises

    return wrapper


def _check_sid(sid: str) -> str:
    if not _SID.fullmatch(sid):
        raise ValueError(f"session_id {sid!r} must be 32 lowercase hex characters (uuid4().hex)")
    return sid


def shard_info(worker: Worker) -> pb.ShardInfo:
    eng = worker.engine
    if eng is None:
        return pb.ShardInfo()
    d = eng.describe()
    return pb.ShardInfo(
        start=eng.span.start,
        end=eng.span.end,
        n_layers=eng.spec.n_layers,
        engine=worker.engine_name,
        dtype=str(d.get("dtype", "")),
        weight_bytes=int(d.get("weight_bytes", 0) or 0),
        stage_index=worker.stage_index,
        hidden_size=eng.spec.hidden_size,
        vocab_size=eng.spec.vocab_size,
    )


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, worker: Worker, host_for_info: str) -> None:
        self.w = worker
        self.host = host_for_info

    # ------------------------------------------------------------------ info

    def info(self) -> pb.InfoReply:
        w = self.w
        total, free = w.memory()
        gpu = cc = ""
        if w.device.type == "cuda":
            gpu = torch.cuda.get_device_name(w.device)
            cc = "{}.{}".format(*torch.cuda.get_device_capability(w.device))
        from hyperlane_lab.engines import names as engine_names

        versions = f"hyperlane_lab={hyperlane_lab.__version__};torch={torch.__version__};python={platform.python_version()}"
        return pb.InfoReply(
            worker_id=w.worker_id,
            host=self.host,
            grpc_port=w.grpc_port,
            data_port=w.data_port,
            device=str(w.device),
            device_kind=w.device.type,
            gpu_name=gpu,
            total_memory=total,
            free_memory=free,
            compute_capability=cc,
            host_ram=device_memory(torch.device("cpu"))[0],
            flops=w.profile.get("flops", 0.0),
            mem_bw=w.profile.get("mem_bw", 0.0),
            shard_loaded=w.engine is not None,
            auth_required=False,
            protocol_version=PROTOCOL_VERSION,
            versions=versions,
            engines=engine_names(),
            shard=shard_info(w),
            sessions=len(w.sessions),
        )

    @_guard
    async def Info(self, request: pb.InfoRequest, context: Any) -> pb.InfoReply:
        return self.info()

    @_guard
    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthReply:
        sel = self.w.selector
        armed = self.w.armed_counts()
        warmups, warm_late, warm_wake_us = self.w.hop_warmups()
        return pb.HealthReply(
            ok=True,
            worker_time_s=time.perf_counter(),
            fast_path_steps=self.w.fast_steps,
            fast_path_prompts=self.w.fast_prompts,
            busy_poll_spun=sel.spun if sel is not None else 0,
            busy_poll_blocked=sel.blocked if sel is not None else 0,
            pinned_buffers=self.w.pool.pinned_allocations,
            staged_reuses=self.w.staged_reuses(),
            direct_uploads=self.w.direct_uploads(),
            ring_here_steps=self.w.ring_here_steps(),
            ring_chained_steps=self.w.ring_chained_steps(),
            hop_warmups=warmups,
            hop_warm_late=warm_late,
            hop_warm_wake_us=warm_wake_us,
            warm_frames_in=self.w.warm_frames_in,
            decode_choices=self.w.decode_choices() if request.with_decode_choices else "",
            armed_fired=armed[0],
            armed_released=armed[1],
            armed_gave_up=armed[2],
            striped_in=self.w.stripe_registry.frames,
            striped_out=self.w.out.conn.striped_out if self.w.out.conn is not None else 0,
        )

    # ------------------------------------------------------------------ blobs and shards

    @_guard
    async def HasBlobs(self, request: pb.HasBlobsRequest, context: Any) -> pb.HasBlobsReply:
        return pb.HasBlobsReply(missing=self.w.blobs.missing(list(request.sha256)))

    async def PutBlob(self, request_iterator: AsyncIterator[pb.BlobChunk], context: Any) -> pb.PutBlobReply:
        upload = None
        try:
            async for chunk in request_iterator:
                if upload is None:
                    if self.w.blobs.has(chunk.sha256):
                        return pb.PutBlobReply(sha256=chunk.sha256, size=chunk.size, already_present=True)
                    upload = self.w.blobs.begin(chunk.sha256, chunk.size)
                upload.write(chunk.data)
            if upload is None:
                raise ValueError("PutBlob stream was empty; send at least one chunk with sha256 and size")
            path = await asyncio.to_thread(upload.finish)
            log.info("received blob %s (%d bytes)", upload.digest[:12], upload.size)
            return pb.PutBlobReply(sha256=upload.digest, size=path.stat().st_size)
        except ValueError as e:
            if upload is not None:
                upload.abort()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
        except BaseException:  # client gone, disk full: never leave a half-written temp file
            if upload is not None:
                upload.abort()
            raise

    def _materialize(self, req: pb.LoadShardRequest) -> tuple[str, dict[str, Any]]:
        """Folder the engine loads from, and extra engine options."""
        if req.model_path:
            path = Path(req.model_path).expanduser()
            if not path.exists():
                raise ValueError(f"model_path {req.model_path} does not exist on worker {self.w.worker_id}")
            return str(path), {}
        if not req.config_sha256:
            raise ValueError("LoadShard needs model_path, or config_sha256 plus weights_sha256 / onnx_sha256")
        blobs = [req.config_sha256, req.weights_sha256, req.onnx_sha256]
        for b in filter(None, blobs):
            if not self.w.blobs.has(b):
                raise ValueError(
                    f"blob {b[:12]}... is not in the worker's cache; upload it with PutBlob first"
                )
        key = "-".join(b[:16] for b in blobs if b)
        # inside the worker's own cache: a folder next to it could be another cache's (two workers with
        # caches side by side in /tmp), whose weights link may point at a blob that cache has since lost
        folder = self.w.blobs.root / "shards" / key
        folder.mkdir(parents=True, exist_ok=True)
        # workers of one machine may share the cache: publish each file atomically
        tmp = folder / f".config.{os.getpid()}.{time.monotonic_ns()}"
        shutil.copyfile(self.w.blobs.path(req.config_sha256), tmp)
        os.replace(tmp, folder / "config.json")
        opts: dict[str, Any] = {}
        if req.weights_sha256:
            target, blob = folder / "model.safetensors", self.w.blobs.path(req.weights_sha256)
            # missing, dangling (a cache moved, a blob lost) or another file: link again, atomically. The link
            # is relative (../../<sha256>): right for a relative cache path and for a cache moved as a whole
            if not target.exists() or target.resolve() != blob.resolve():
                link = folder / f".weights.{os.getpid()}.{time.monotonic_ns()}"
                os.symlink(os.path.relpath(blob, folder), link)
                os.replace(link, target)
        if req.onnx_sha256:
            opts["onnx_path"] = str(self.w.blobs.path(req.onnx_sha256))
            opts["onnx_sha256"] = req.onnx_sha256
        return str(folder), opts

    @_guard
    async def LoadShard(self, request: pb.LoadShardRequest, context: Any) -> pb.LoadShardReply:
        from hyperlane_lab.engines import ENGINES, create_engine

        span = LayerSpan(int(request.start), int(request.end))
        dtype = request.dtype or "fp32"
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
        engine_name = request.engine or "torch"
        ENGINES.get(engine_name)
        device = resolve_device(request.device) if request.device else self.w.device
        source, opts = self._materialize(request)
        _, free = self.w.memory(device)
        need = self._estimate_bytes(request, source, span, dtype)
        if need and free and need > free:
            raise MemoryError(
                f"shard {span} needs about {need / 2**30:.2f} GiB, worker {self.w.worker_id} ({device}) has "
                f"{free / 2**30:.2f} GiB free; give this worker fewer layers or use fp16"
            )
        t0 = time.perf_counter()
        self.w.unload()
        engine: Any
        if request.random_weights:
            if engine_name != "torch":
                raise ValueError("random_weights works with the torch engine only")
            from hyperlane_lab.models import ModelSpec, TorchStage, parse_dtype

            spec = ModelSpec.from_pretrained(source)
            engine = await asyncio.to_thread(
                TorchStage.random, spec, span, int(request.seed), parse_dtype(dtype), device
            )
        else:
            engine = await asyncio.to_thread(
                create_engine, engine_name, source=source, span=span, dtype=dtype, device=device, **opts
            )
        self.w.set_engine(engine, engine_name, int(request.stage_index))
        load_s = time.perf_counter() - t0
        log.info(
            "loaded %s layers %s (%s, %s) on %s in %.2fs", engine_name, span, dtype, source, device, load_s
        )
        return pb.LoadShardReply(
            shard=shard_info(self.w), free_memory=self.w.memory(device)[1], load_s=load_s
        )

    def _estimate_bytes(self, req: pb.LoadShardRequest, source: str, span: LayerSpan, dtype: str) -> int:
        if not req.random_weights:
            for digest in (req.weights_sha256, req.onnx_sha256):
                if digest:
                    return self.w.blobs.path(digest).stat().st_size
        try:
            from hyperlane_lab.models.config import ModelSpec
            from hyperlane_lab.runtime.deploy import stage_weight_bytes

            return stage_weight_bytes(ModelSpec.from_pretrained(source), span, dtype)
        except Exception:
            return 0

    @_guard
    async def UnloadShard(self, request: pb.UnloadShardRequest, context: Any) -> pb.UnloadShardReply:
        return pb.UnloadShardReply(was_loaded=self.w.unload())

    # ------------------------------------------------------------------ sessions and wiring

    @_guard
    async def OpenSession(self, request: pb.OpenSessionRequest, context: Any) -> pb.OpenSessionReply:
        sid = _check_sid(request.session_id)
        if not 1 <= request.batch <= 4096:
            raise ValueError(f"batch must be in [1, 4096], got {request.batch}")
        if not 1 <= request.max_len <= 1 << 20:
            raise ValueError(f"max_len must be in [1, 1048576], got {request.max_len}")
        top_p = request.top_p if request.top_p > 0 else 1.0
        params = SamplingParams(
            float(request.temperature),
            int(request.top_k),
            float(top_p),
            int(request.seed) if request.has_seed else None,
        )
        ring = None
        if request.ring_to:
            from hyperlane_lab.runtime.dataplane import parse_address

            parse_address(request.ring_to)  # ValueError naming the expected form
            if not 1 <= request.max_new_tokens <= request.max_len:
                raise ValueError(
                    f"a server-side token loop (ring_to) needs 1 <= max_new_tokens <= max_len "
                    f"({request.max_len}), got {request.max_new_tokens}"
                )
            ring = (request.ring_to, int(request.max_new_tokens), frozenset(request.eos_token_ids))
        need = await self.w.open_session(
            sid,
            int(request.batch),
            int(request.max_len),
            params,
            request.reply_to,
            ring,
            request.ring_flag_last,
        )
        return pb.OpenSessionReply(
            kv_cache_bytes=need, ring=ring is not None, prompt_chunks=True, flag_last=True
        )

    @_guard
    async def CloseSession(self, request: pb.CloseSessionRequest, context: Any) -> pb.CloseSessionReply:
        return pb.CloseSessionReply(was_open=await self.w.close_session(_check_sid(request.session_id)))

    @_guard
    async def Connect(self, request: pb.ConnectRequest, context: Any) -> pb.ConnectReply:
        if request.next_address:
            from hyperlane_lab.runtime.dataplane import parse_address

            parse_address(request.next_address)
        s = await self.w.connect_next(request.next_address, request.codec or "raw", int(request.group_size))
        return pb.ConnectReply(connect_s=s)

    # ------------------------------------------------------------------ measurement

    @_guard
    async def Profile(self, request: pb.ProfileRequest, context: Any) -> pb.ProfileReply:
        from hyperlane_lab.runtime.profiling import profile_device

        cfg = json.loads(request.model_config_json) if request.model_config_json else None
        if cfg is not None and not isinstance(cfg, dict):
            raise ValueError("model_config_json must be a JSON object (a transformers config.json)")
        if request.context > 32768:
            raise ValueError(f"profile context {request.context} is too long; use <= 32768 tokens")
        for key in ("hidden_size", "intermediate_size", "vocab_size"):
            if cfg is not None and int(cfg.get(key, 0) or 0) > 1 << 20:
                raise ValueError(f"model_config_json {key}={cfg[key]} is implausibly large")
        self.w.gpu_users += 1  # profiling synchronizes the device: no step may wait armed meanwhile
        try:
            self.w.disarm()
            res = await asyncio.to_thread(
                profile_device, self.w.device, cfg, request.dtype or "fp16", request.context or 512
            )
        finally:
            self.w.gpu_users -= 1
        self.w.profile.update({"flops": res["flops"], "mem_bw": res["mem_bw"]})
        self.w.changed()
        return pb.ProfileReply(device=str(self.w.device), **{k: v for k, v in res.items() if k != "device"})

    @_guard
    async def ProbeLink(self, request: pb.ProbeLinkRequest, context: Any) -> pb.ProbeLinkReply:
        sizes = [int(s) for s in request.sizes] or [64, 65536, 1 << 20]
        if len(sizes) > 16 or any(s > 64 << 20 for s in sizes) or request.repeats > 100:
            raise ValueError("a link probe takes at most 16 sizes of <= 64 MiB and <= 100 repeats")
        lat, bw = await self.w.probe_link(request.target_address, sizes, int(request.repeats) or 3)
        return pb.ProbeLinkReply(latency_s=lat, bandwidth=bw)

    @_guard
    async def GetTrace(self, request: pb.GetTraceRequest, context: Any) -> pb.GetTraceReply:
        events, last = self.w.trace.since(int(request.since_seq))
        if request.clear:
            self.w.trace.clear()
        recs = [
            pb.TraceRecord(
                stage=e.stage,
                kind=e.kind,
                start=e.start,
                end=e.end,
                session=e.session,
                step=e.step,
                nbytes=e.nbytes,
                tokens=e.tokens,
            )
            for e in events
        ]
        return pb.GetTraceReply(events=recs, next_seq=last, worker_time_s=time.perf_counter())
