"""AutoDistributedModel: plan, load shards onto workers, wire the ring, and generate.

Control goes over gRPC to each worker; tensors go client -> stage 0 -> ... -> last stage, which
samples and sends the token ids straight back to the client's data port.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch

from hyperlane_lab.errors import WorkerError
from hyperlane_lab.generation.driver import TextGenerator
from hyperlane_lab.models import PRESETS, ModelSpec, load_tokenizer, resolve_model
from hyperlane_lab.runtime.client_dataplane import ClientDataPlane, local_address_towards
from hyperlane_lab.runtime.control import WorkerClient
from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb
from hyperlane_lab.types import EventKind, Plan, SamplingParams, TraceEvent, WorkerInfo

__all__ = ["AutoDistributedModel", "auto_prefill_chunk", "right_align"]

log = logging.getLogger(__name__)


def right_align(ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same prompt step with each row's tokens moved to the end of the row (padding, position
    -1, first; token order kept): positions say where each token goes, so the step means the same,
    and the last column holds every row's last token, so a step cut into column chunks ends, for
    every row, in its last chunk (where the last stage takes each row's logits)."""
    order = torch.argsort((positions >= 0).to(torch.int8), dim=1, stable=True)
    return ids.gather(1, order), positions.gather(1, order)


_KINDS = frozenset(k.value for k in EventKind)
AUTO_CHUNK_MIN, AUTO_CHUNK_MAX, AUTO_CHUNK_ALIGN = 256, 1024, 64  # chunk starts on prompt graphs' grid


def auto_prefill_chunk(prompt_tokens: int, n_stages: int) -> int | None:
    """``prefill_chunk="auto"``: tokens per chunk for a prompt step of ``prompt_tokens`` over
    ``n_stages`` stages, or None (one frame). One stage has nothing to overlap; from 2 x 256
    tokens on, about four chunks of 256-1,024 tokens (multiples of 64): stage k+1 computes chunk i
    while stage k computes chunk i+1 and the link carries the hidden states between. Measured on
    2 x H200 with a 7B-shaped model (bench/RESULTS.md): 512 tokens as 2 x 256 kept 91.5% of one
    GPU's prefill rate (81% in one frame), 2,048 as 4 x 512 135% (89.5%); chunks of 128 lost
    (each chunk costs ~0.5-1 ms of hand-off and dispatch, and small products run slower), on 4
    stages too (4 x H200, 512 tokens: 4 x 128 kept 71.7%, 2 x 256 82.9%)."""
    if n_stages < 2 or prompt_tokens < 2 * AUTO_CHUNK_MIN:
        return None
    quarter = -(-prompt_tokens // 4)
    return min(AUTO_CHUNK_MAX, max(AUTO_CHUNK_MIN, -(-quarter // AUTO_CHUNK_ALIGN) * AUTO_CHUNK_ALIGN))


@dataclass
class _RemoteSession:
    model: AutoDistributedModel
    sid: str
    step_no: int = 0
    ring: bool = False  # the workers run the token loop: ``next_step`` after the prompt step
    chunks: bool = False  # every worker takes prompt chunks (``AutoDistributedModel.prefill_chunk``)

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        setting = self.model.prefill_chunk
        if setting == "auto":  # padded rows: chunks would not replay prompt graphs on GPU workers
            padded = bool((positions < 0).any())
            chunk = None if padded else auto_prefill_chunk(ids.shape[1], len(self.model.plan.stages))
        else:
            chunk = setting if isinstance(setting, int) else None
        more: list[tuple[torch.Tensor, torch.Tensor]] = []  # leading chunks: no reply to these
        if (
            chunk is not None and self.chunks and ids.shape[1] > chunk
        ):  # a long prompt: chunks flow down the pipeline
            ids, positions = right_align(ids, positions)  # every row's last token in the last chunk
            starts = range(0, ids.shape[1], chunk)
            more = [(ids[:, a : a + chunk], positions[:, a : a + chunk]) for a in starts[:-1]]
            ids, positions = ids[:, starts[-1] :], positions[:, starts[-1] :]
        out = self.model._data.step(self.sid, self.step_no, ids, positions, self.model.step_timeout, more)
        self.step_no += 1
        return out

    def next_step(self) -> torch.Tensor:
        """The next step's ids, produced by the workers' loop (no request from here)."""
        out = self.model._data.expect(self.sid, self.step_no, self.model.step_timeout)
        self.step_no += 1
        return out


class _RemoteRunner:
    def __init__(self, model: AutoDistributedModel) -> None:
        self.model = model

    @property
    def server_loop(self) -> bool:
        return self.model.server_loop

    @contextmanager
    def open_session(
        self, batch: int, max_len: int, params: SamplingParams, max_new_tokens: int = 0
    ) -> Iterator[_RemoteSession]:
        """``max_new_tokens`` > 0 with ``server_loop`` on: the last stage feeds each token back to
        the first (the client only reads tokens, it no longer relays them)."""
        m = self.model
        sid = uuid.uuid4().hex
        ring = m.server_loop and max_new_tokens > 0
        chunks = flag_last = True
        opened: list[WorkerClient] = []
        try:
            for i, w in enumerate(m.clients):
                last = i == len(m.clients) - 1
                req = pb.OpenSessionRequest(
                    session_id=sid,
                    batch=batch,
                    max_len=max_len,
                    temperature=params.temperature,
                    top_k=params.top_k,
                    top_p=params.top_p,
                    has_seed=params.seed is not None,
                    seed=params.seed or 0,
                    reply_to=m._data.reply_address if last else "",
                )
                if last and ring:
                    req.ring_to = m._data.first_stage
                    req.max_new_tokens = max_new_tokens
                    req.eos_token_ids.extend(m.spec.eos_token_ids)
                    req.ring_flag_last = flag_last  # the stages before it take the flag
                reply = w.call("OpenSession", req)
                opened.append(w)
                if last and ring and not reply.ring:  # a worker without the server-side loop
                    ring = False
                chunks = chunks and reply.prompt_chunks  # older workers: the prompt in one frame
                flag_last = flag_last and reply.flag_last  # older workers refuse frames flagged LAST
            if ring:
                m._data.open_ring(sid)
            yield _RemoteSession(m, sid, ring=ring, chunks=chunks)
        finally:
            m._data.end_session(sid)
            for w in opened:
                try:
                    w.call("CloseSession", pb.CloseSessionRequest(session_id=sid))
                except WorkerError as e:
                    log.warning("closing session %s: %s", sid[:8], e)


class AutoDistributedModel(TextGenerator):
    """A model whose layers live on remote workers. Use ``from_pretrained``; close when done."""

    def __init__(
        self,
        spec: ModelSpec,
        tokenizer: Any,
        clients: list[WorkerClient],
        plan: Plan,
        data: ClientDataPlane,
        step_timeout: float = 300.0,
    ) -> None:
        self.spec, self.tokenizer, self.clients, self.plan = spec, tokenizer, clients, plan
        self._data = data
        self.runner = _RemoteRunner(self)
        self.step_timeout = step_timeout
        # the workers run the token loop (the last stage feeds tokens to the first; see
        # Worker.ring_next); False: every token goes through this client (one more hop per token)
        self.server_loop = True
        self._prefill_chunk: int | str | None = "auto"
        self._closed = False
        self._trace_cursor = [0] * len(clients)
        self._trace_lock = threading.Lock()

    @property
    def prefill_chunk(self) -> int | str | None:
        """Prompt tokens per data-plane frame: an int, None (the whole prompt in one frame) or
        ``"auto"`` (the default: ``auto_prefill_chunk``, for prompts without padding). With
        chunks, stage k computes chunk i while stage k+1 computes chunk i-1; on CUDA workers,
        whose completion thread sends while the GPU computes, the link carries the hidden states
        in between too, and each chunk replays a CUDA graph (``models/prompt_graphs.py``). At
        least 2: a one-token chunk would take the decode step's CUDA graph, whose static output
        and reused host buffers assume one step of a session in flight."""
        return self._prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, value: int | str | None) -> None:
        ok = value is None or value == "auto" or (type(value) is int and value >= 2)
        if not ok:
            raise ValueError(
                f"prefill_chunk must be None, 'auto' or an int >= 2 (tokens per chunk), got {value!r}"
            )
        self._prefill_chunk = value

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        workers: Sequence[str] | None = None,
        discovery: Any = None,
        partitioner: str = "uniform",
        compression: str | Sequence[str] = "raw",
        group_size: int = 64,
        engine: str | Sequence[str] = "torch",
        dtype: str = "fp32",
        ship_weights: bool = True,
        progress: bool = True,
        objective: str = "latency",
        concurrency: int = 1,
        context: int = 2048,
        step_timeout: float = 300.0,
        n_workers: int | None = None,
        random_weights: bool = False,
        seed: int = 0,
    ) -> AutoDistributedModel:
        """Load ``model`` (path, .gguf, hub id; None = bundled) over ``workers`` (host:port list) or the
        workers a ``discovery`` (DiscoveryManager / StaticDiscovery) has found.

        ``random_weights=True`` builds random weights of the model's shape on the workers (speed
        work without checkpoints); ``model`` may then be a preset name such as ``"llama-2-7b"``,
        and generation takes token ids since there is no tokenizer."""
        from hyperlane_lab.runtime.deploy import deploy

        addresses = _worker_addresses(workers, discovery, n_workers)
        if random_weights and model in PRESETS:
            source, spec, tokenizer = str(model), PRESETS[str(model)], None
        else:
            source = resolve_model(model)
            spec = ModelSpec.from_pretrained(source)
            tokenizer = None if random_weights else load_tokenizer(source)
        clients = [WorkerClient(a) for a in addresses]
        data = None
        try:
            plan, clients = deploy(
                source,
                spec,
                clients,
                partitioner=partitioner,
                compression=compression,
                group_size=group_size,
                engine=engine,
                dtype=dtype,
                ship_weights=ship_weights,
                progress=progress,
                objective=objective,
                concurrency=concurrency,
                context=context,
                random_weights=random_weights,
                seed=seed,
            )
            first = clients[0]
            data = ClientDataPlane(first.data_address, local_address_towards(clients[-1].host))
            data.start()
            dist = cls(spec, tokenizer, clients, plan, data, step_timeout)
            if compression == "auto":
                dist._apply_auto_compression(dtype, group_size)
            return dist
        except BaseException:
            if data is not None:
                data.close()
            for c in clients:
                c.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._data.close()
        for c in self.clients:
            c.close()

    def __enter__(self) -> AutoDistributedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with suppress(Exception):
            self.close()

    # ------------------------------------------------------------------ inspection

    @property
    def workers(self) -> list[WorkerInfo]:
        return [c.worker_info() for c in self.clients]

    def stage_table(self) -> list[dict[str, Any]]:
        rows = []
        for i, (st, c) in enumerate(zip(self.plan.stages, self.clients)):
            info = c.info()
            rows.append(
                {
                    "stage": i,
                    "worker": c.address,
                    "span": [st.span.start, st.span.end],
                    "engine": info.shard.engine,
                    "device": info.device,
                    "dtype": info.shard.dtype,
                    "weight_bytes": info.shard.weight_bytes,
                    "codec": st.codec,
                }
            )
        return rows

    def decode_choices(self) -> list[dict[str, Any]]:
        """Per stage, the decode kernels its worker chose (Health's ``decode_choices``): per weight shape the
        Triton GEMV or cuBLAS with the timings (µs) that chose it, the all-Triton layer, the PDL mode. Each
        worker times its own products at its first decode capture, so stages on alike GPUs can choose apart;
        {} for a stage without a CUDA decoder (yet)."""
        out = []
        for c in self.clients:
            text = c.call("Health", pb.HealthRequest(with_decode_choices=True)).decode_choices
            try:
                out.append(json.loads(text or "{}"))
            except ValueError as e:
                raise ValueError(
                    f"worker {c.address} sent decode choices that are not JSON ({e}): {text[:200]!r}"
                ) from e
        return out

    def trace_events(self, clear: bool = False) -> list[TraceEvent]:
        """Events recorded by every stage since the last call, on this client's clock."""
        events: list[TraceEvent] = []
        with self._trace_lock:
            for i, c in enumerate(self.clients):
                offset, _ = c.clock_offset()
                reply = c.call("GetTrace", pb.GetTraceRequest(since_seq=self._trace_cursor[i], clear=clear))
                self._trace_cursor[i] = reply.next_seq
                for r in reply.events:
                    if r.kind not in _KINDS:  # a newer worker's kind: skipped, not an error
                        continue
                    events.append(
                        TraceEvent(
                            stage=i,
                            kind=EventKind(r.kind),
                            start=r.start - offset,
                            end=r.end - offset,
                            session=r.session,
                            step=r.step,
                            nbytes=r.nbytes,
                            tokens=r.tokens,
                        )
                    )
        events.sort(key=lambda e: (e.start, e.stage))
        return events

    def trace(self, clear: bool = False) -> Any:
        from hyperlane_lab.tracing import events_to_frame

        return events_to_frame(self.trace_events(clear=clear))

    def trace_summary(self, clear: bool = False) -> Any:
        from hyperlane_lab.tracing import summarize

        return summarize(self.trace(clear=clear))

    def _apply_auto_compression(self, dtype: str, group_size: int) -> None:
        """Measure each stage-to-stage link, then compress only where it pays (see codec_choice)."""
        from dataclasses import replace

        from hyperlane_lab.models.loading import parse_dtype
        from hyperlane_lab.runtime.codec_choice import choose_codec
        from hyperlane_lab.types import LinkProfile

        links = self.probe_links()[1:]  # stage i -> i+1
        stages = list(self.plan.stages)
        for i, row in enumerate(links):
            link = LinkProfile(row["latency_s"], min(row["bandwidth"], 1e13))
            kind = self.clients[i].info().device_kind
            name, predicted = choose_codec(
                link, self.spec.hidden_size, parse_dtype(dtype), group_size=group_size, device_kind=kind
            )
            log.info("auto compression, boundary %d: %s (predicted %s)", i, name, predicted)
            nxt = self.clients[i + 1].data_address
            self.clients[i].call(
                "Connect", pb.ConnectRequest(next_address=nxt, codec=name, group_size=group_size)
            )
            stages[i] = replace(stages[i], codec=name)
        self.plan = replace(self.plan, stages=tuple(stages))

    def probe_links(
        self, sizes: Sequence[int] = (64, 65536, 1 << 20), repeats: int = 3
    ) -> list[dict[str, Any]]:
        """Latency and bandwidth of each hop: client -> stage 0, stage i -> stage i+1."""
        rows = []
        lat, bw = self._data.probe_first_stage(list(sizes), repeats)
        rows.append({"from": "client", "to": self.clients[0].address, "latency_s": lat, "bandwidth": bw})
        for a, b in zip(self.clients, self.clients[1:]):
            r = a.call(
                "ProbeLink",
                pb.ProbeLinkRequest(target_address=b.data_address, sizes=list(sizes), repeats=repeats),
            )
            rows.append(
                {"from": a.address, "to": b.address, "latency_s": r.latency_s, "bandwidth": r.bandwidth}
            )
        return rows


def _worker_addresses(workers: Sequence[str] | None, discovery: Any, n_workers: int | None) -> list[str]:
    if workers:
        if isinstance(workers, str):
            workers = [w.strip() for w in workers.split(",") if w.strip()]
        return list(workers)
    if discovery is not None:
        found = (
            list(discovery.discovered_workers.values())
            if hasattr(discovery, "discovered_workers")
            else list(discovery.workers())
        )
        if n_workers and len(found) < n_workers and hasattr(discovery, "wait_for"):
            found = list(discovery.wait_for(n_workers, timeout=10.0))
        if not found:
            raise WorkerError(
                "discovery found no workers; start `hyperlane worker` on each GPU machine, "
                "or pass workers=['host:port', ...]"
            )
        found.sort(key=lambda w: w.worker_id)
        return [w.address for w in found[: n_workers or len(found)]]
    raise ValueError("pass workers=['host:port', ...] or discovery=DiscoveryManager()")


def _codec_list(compression: str | Sequence[str], n: int) -> list[str]:
    if isinstance(compression, str):
        return [compression] * n
    codecs = list(compression)
    if len(codecs) != n:
        raise ValueError(f"compression lists {len(codecs)} codecs but the plan has {n} stages")
    return codecs
