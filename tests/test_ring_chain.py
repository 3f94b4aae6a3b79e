"""Chained steps (``runtime/gpu_chain.py``) on the CPU: a one-stage greedy token loop driven end to end through the
real stepper (``run_wire``, the completion loop, ``_ship``, the outbox's ``ring_next`` / ``ring_here``,
``run_ring``) on a stand-in GPU that runs each enqueued piece at once, in order (a valid order of one stream).
Its "graph" computes a token from each row's id and position by a fixed rule; the link between steps is the
kernel's reference (``kernels/ring_chain.py``; the kernel itself is tested against it in ``test_kernels.py``).

The oracle is the token loop written out plainly (the outbox's rule: next position + 1, EOS or padding rows
padded, the budget). On a GPU, one worker's tokens against the in-process engine's: ``tests/test_gpu.py``."""

from __future__ import annotations

import threading
import time
from collections import deque
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from hyperlane_lab.generation.sampling import Sampler, SamplingParams
from hyperlane_lab.runtime.dataplane import Frame, PooledBuffer
from hyperlane_lab.runtime.frame import FrameHeader, FrameKind
from hyperlane_lab.runtime.gpu_pending import _StepIO
from hyperlane_lab.runtime.gpu_steps import GpuStepper
from hyperlane_lab.runtime.outbox import WorkerOutbox
from hyperlane_lab.runtime.worker import _Session
from tests.test_armed import _Ev as _CountingEv

V = 97


def rule(tok: int, pos: int) -> int:
    """The stand-in model's greedy token (padding rows: 0)."""
    return (7 * tok + 3 * pos + 1) % V if pos >= 0 else 0


def oracle(ids: list[int], pos: list[int], budget: int, eos: frozenset[int], max_len: int) -> list[list[int]]:
    """Each step's sampled ids, as a plain loop: the prompt step's row ids and positions, then the outbox's rule."""
    steps: list[list[int]] = []
    for step in range(budget):
        out = [rule(t, p) for t, p in zip(ids, pos, strict=True)]
        steps.append(out)
        nxt = [p + 1 if p >= 0 and o not in eos else -1 for o, p in zip(out, pos, strict=True)]
        if step + 1 >= budget or all(n < 0 for n in nxt) or max(nxt) >= max_len:
            break
        ids, pos = out, nxt
    return steps


class _Ev(_CountingEv):
    """``test_armed``'s stand-in event, waited for and timed as the completion thread does."""

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: Any) -> float:
        return 1.0


class _Graph:
    """A wire-mode graph on a GPU that runs at once: copies its pinned inputs in, computes, copies the result
    out (``wire.out_host``), like the real one's pieces (``decode_wire.py``)."""

    def __init__(self, batch: int) -> None:
        self.io = torch.zeros((2, batch), dtype=torch.int64)
        self.io_host = torch.zeros((2, batch), dtype=torch.int64)
        self.io_np = self.io_host.numpy()
        self.greedy = torch.zeros(batch + 1, dtype=torch.int64)
        self.out = self.greedy
        out_host = torch.zeros(batch + 1, dtype=torch.int64)
        self.wire = SimpleNamespace(
            spec=SimpleNamespace(out_codec=0), out_host=out_host, out_ids=out_host.numpy()
        )
        self.graph = self
        self.staged = _Ev()
        self.runs: list[tuple[list[int], list[int]]] = []

    def replay(self) -> None:
        self.io.copy_(self.io_host)
        ids, pos = self.io[0].tolist(), self.io[1].tolist()
        self.runs.append((ids, pos))
        self.greedy[:-1] = torch.tensor([rule(t, p) for t, p in zip(ids, pos, strict=True)])
        self.greedy[-1] = 0
        self.wire.out_host.copy_(self.greedy)


class _Decoder:
    def step_wire(self, cache: Any, spec: Any, pos: Any, x: Any) -> Any:
        g = cache.graph
        g.io_np[1], g.io_np[0] = pos, x
        g.replay()
        return g


class _Engine:
    is_first = is_last = True
    spec = SimpleNamespace(vocab_size=V)

    def __init__(self, cache: Any) -> None:
        self.cache, self.decoder = cache, _Decoder()

    def session(self, sid: str) -> Any:
        return self.cache

    def graph_decoder(self) -> _Decoder:
        return self.decoder

    def decode_graph_ready(self, sid: str, spec: Any) -> bool:
        return True


class _Worker(WorkerOutbox):
    """The outbox's real token loop (``ring_next``, ``ring_here``); frames to the client are recorded."""

    def __init__(self, sess: _Session, engine: _Engine) -> None:
        self.sessions, self.engine = {"s": sess}, engine
        self.trace = SimpleNamespace(add=lambda *a, **k: None)
        self.stage_index, self._loop = 0, None
        self._submitted = self._finished = 0
        self.gpu_users, self.busy_polling = 0, False
        self.tokens: list[tuple[int, list[int]]] = []
        self.errors: list[tuple[int, str]] = []
        self.to_loop: list[Any] = []

    def _send(self, reply_to: str, header: Any, parts: list[Any], sid: str, step: int) -> str:
        assert header.kind == FrameKind.TOKENS and reply_to == "client:1"
        self.tokens.append((header.step, np.frombuffer(bytes(parts[1]), dtype=np.int64).tolist()))
        return ""

    def _call_soon(self, fn: Any, *args: Any) -> None:
        if fn == self._forward_error:
            self.errors.append((args[1], args[2]))
        else:  # the event loop's path for a ring frame the completion thread did not take
            self.to_loop.append(args)

    def step_failed(self, sess: Any, sid: str, step: int, message: str) -> None:
        self.errors.append((step, message))


class _Queue:
    """The completion thread's queue, drained in the test's thread (None once empty ends the loop)."""

    def __init__(self) -> None:
        self.items: deque[Any] = deque()

    def put(self, p: Any) -> None:
        self.items.append(p)

    def get(self) -> Any:
        return self.items.popleft() if self.items else None


def _loop(batch: int, budget: int, eos: frozenset[int], max_len: int = 64, chain: bool = True) -> Any:
    """A stepper, its worker, graph and cache. Chaining on, armed steps are on too (as for ``LocalCluster``
    workers with a GPU each), with the stand-in gate of ``test_armed.py``: a greedy loop must arm nothing."""
    from tests.test_armed import _FakeArming

    g = _Graph(batch)
    cache = SimpleNamespace(graph=g, writes=0, limit=max_len, step_io=_StepIO(tuple(
        (_Ev(), _Ev(), _Ev()) for _ in range(3)), {}))  # type: ignore[arg-type]  # fmt: skip
    sess = _Session(
        batch, max_len, Sampler(SamplingParams()), "client:1", ring=("here", budget, eos), ring_here=True
    )
    w = _Worker(sess, _Engine(cache))
    st = object.__new__(GpuStepper)
    st.w, st.device, st.compute_stream, st.pool = w, torch.device("cpu"), None, None  # type: ignore[assignment]
    st.arming = _FakeArming() if chain else None  # (the stand-in gate never replays: off without chaining)
    st._arm_lock, st._armed, st._arming_now, st._closing = threading.RLock(), None, False, False
    st._put = st._done = st._read = 0
    st._orphan, st.ring_steps, st.ring_ahead, st.arm_ahead, st.chain = None, 0, None, True, chain
    st._q = _Queue()  # type: ignore[assignment]
    st._thread = threading.current_thread()
    st._on_device = lambda: None  # type: ignore[method-assign]
    st.wire_spec = lambda h: g.wire.spec  # type: ignore[method-assign,assignment]
    w._gpu = st  # type: ignore[assignment]
    return st, w, g, cache


def _run(st: Any, ids: list[int], pos: list[int], monkeypatch: Any) -> None:
    """The prompt's last step (step 0) as the loop thread launches a decode frame, then the completion loop."""
    import hyperlane_lab.codecs._kernels as kernels
    from hyperlane_lab.kernels import ring_chain

    monkeypatch.setattr(
        kernels, "kernel_module", lambda name: SimpleNamespace(ring_chain=ring_chain.ring_chain_reference)
    )
    batch = len(ids)
    body = np.array(pos, dtype=np.int64).tobytes() + np.array(ids, dtype=np.int64).tobytes()
    h = FrameHeader(FrameKind.TENSOR, "s", 0, batch, 1, torch.int64, 0, 0, (batch, 1), 8 * batch)
    now = time.perf_counter()
    st.run_wire(Frame(h, PooledBuffer(None, bytearray(body), len(body)), now, now), st.wire_spec(h), now)
    st._complete_loop()


CASES = {  # batch rows' (ids, positions), budget, EOS ids
    "one_row": ([5], [3], 12, frozenset()),
    "rows": ([5, 8, 1], [3, 9, 6], 10, frozenset()),
    "a_padding_row": ([5, 8], [3, -1], 9, frozenset()),
    "budget_two": ([5], [3], 2, frozenset()),
    "budget_one": ([5], [3], 1, frozenset()),
}


@pytest.mark.parametrize("chain", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_chained_loop_sends_the_oracles_tokens(case, chain, monkeypatch):
    """Every step's TOKENS frame, in order, equal the plain loop's; the GPU ran exactly those steps (none past the
    budget); with chaining, every step after the first two was enqueued behind the one before it."""
    ids, pos, budget, eos = CASES[case]
    st, w, g, _ = _loop(len(ids), budget, eos, chain=chain)
    _run(st, ids, pos, monkeypatch)
    want = oracle(ids, pos, budget, eos, 64)
    assert w.tokens == list(enumerate(want)) and w.errors == [] and w.to_loop == []
    assert len(g.runs) == len(want) and st._put == st._done == len(want)
    assert st.chained_steps == (max(0, len(want) - 2) if chain else 0)
    assert st.ring_steps == len(want) - 1 - st.chained_steps and st._chained is None
    assert st.arming is None or (st.arming.armed_graphs == [] and st._armed is None)


@pytest.mark.parametrize("rows", [1, 3])
def test_a_loop_that_ends_on_eos_wastes_one_padding_step_and_sends_nothing_of_it(rows, monkeypatch):
    """Every row sampled EOS at step k: step k+1, chained already, runs on padding positions (its K/V writes
    hit the trash slot), is never confirmed and sends nothing; nothing is chained after it."""
    ids, pos = [5, 8, 1][:rows], [3, 9, 6][:rows]
    free = oracle(ids, pos, 30, frozenset(), 64)
    eos = frozenset(free[6])  # the ids of step 6: each row ends there at the latest
    want = oracle(ids, pos, 30, eos, 64)
    assert 3 <= len(want) <= 7
    st, w, g, _ = _loop(rows, 30, eos)
    _run(st, ids, pos, monkeypatch)
    assert w.tokens == list(enumerate(want)) and w.errors == []
    assert len(g.runs) == len(want) + 1 and g.runs[-1][1] == [-1] * rows  # the wasted step: padding
    assert g.runs[: len(want)] == [(i, p) for i, p in _inputs(ids, pos, want, eos)]
    assert st._put == st._done and st._chained is None
    assert (
        st.arming.armed_graphs == [] and st._armed is None
    )  # no gate behind the wasted step: no frame comes


def _inputs(ids: list[int], pos: list[int], steps: list[list[int]], eos: frozenset[int]) -> list[Any]:
    """Each step's (ids, positions) as the plain loop feeds them."""
    out = [(ids, pos)]
    for s in steps[:-1]:
        pos = [p + 1 if p >= 0 and o not in eos else -1 for o, p in zip(s, pos, strict=True)]
        out.append((s, pos))
    return out


def test_a_row_reaching_the_sessions_length_fails_the_step_and_the_chained_one_runs_as_padding(monkeypatch):
    """The next position would be the session's max length: the host reports the step as failed (an error frame,
    never silence), and the chained step the device made of it ran on padding (no K/V write past the cache)."""
    st, w, g, _ = _loop(1, 40, frozenset(), max_len=10)
    _run(st, [5], [3], monkeypatch)
    want = oracle([5], [3], 40, frozenset(), 10)
    assert w.tokens == list(enumerate(want)) and len(want) == 7  # positions 3..9
    ((step, message),) = w.errors
    assert step == 7 and "beyond the session's max length" in message
    assert [p for _, (p,) in g.runs] == [3, 4, 5, 6, 7, 8, 9, -1]


def test_a_non_finite_step_fails_and_the_step_chained_behind_it_ships_nothing(monkeypatch):
    """The graph flagged NaN/Inf at step 4: the completion thread relays the failure for step 4; step 5, chained
    already, ran on padding (the link pads every row of a flagged step) and sends nothing."""
    st, w, g, _ = _loop(1, 20, frozenset())
    real = g.replay

    def replay() -> None:
        real()
        if len(g.runs) == 5:
            g.greedy[-1] = 1
            g.wire.out_host.copy_(g.greedy)

    g.replay = replay  # type: ignore[method-assign]
    _run(st, [5], [3], monkeypatch)
    assert [s for s, _ in w.tokens] == [0, 1, 2, 3]
    ((step, message),) = w.errors
    assert step == 4 and "NaN" in message
    assert len(g.runs) == 6 and g.runs[-1][1] == [-1] and st._put == st._done == 6


def test_no_chain_with_an_armed_step_a_pending_task_or_another_step_behind():
    """The rules of ``_may_chain``, each broken once on a step about to have one chained behind it."""
    from hyperlane_lab.runtime.frame import FLAG_LAST

    st, w, g, _ = _loop(1, 20, frozenset())
    sess = w.sessions["s"]
    p = SimpleNamespace(sid="s", step=3, batch=1, mode="greedy", wire=g.wire, flags=0)
    st._last = p
    eng = w.engine
    assert st._may_chain(p, sess, eng)
    many_eos = ("here", 20, frozenset(range(65)))
    for broken, undo in (
        (lambda: setattr(st, "_chained", object()), lambda: setattr(st, "_chained", None)),
        (lambda: setattr(st, "_closing", True), lambda: setattr(st, "_closing", False)),
        (lambda: setattr(p, "flags", FLAG_LAST), lambda: setattr(p, "flags", 0)),
        (lambda: setattr(p, "wire", None), lambda: setattr(p, "wire", g.wire)),
        (lambda: setattr(eng, "is_last", False), lambda: setattr(eng, "is_last", True)),
        (lambda: setattr(eng, "is_first", False), lambda: setattr(eng, "is_first", True)),
        (lambda: setattr(sess, "ring", many_eos), lambda: setattr(sess, "ring", ("here", 20, frozenset()))),
        (lambda: setattr(p, "batch", 1025), lambda: setattr(p, "batch", 1)),
        (lambda: w.sessions.__setitem__("s", object()), lambda: w.sessions.__setitem__("s", sess)),
        (lambda: setattr(st, "_armed", object()), lambda: setattr(st, "_armed", None)),
        (lambda: setattr(w, "_submitted", 1), lambda: setattr(w, "_submitted", 0)),
        (lambda: setattr(st, "_last", object()), lambda: setattr(st, "_last", p)),
        (
            lambda: setattr(p, "step", 19),
            lambda: setattr(p, "step", 3),
        ),  # the next step would be past the budget
        (lambda: setattr(p, "mode", "sample"), lambda: setattr(p, "mode", "greedy")),
        (lambda: setattr(sess, "error", "x"), lambda: setattr(sess, "error", "")),
        (lambda: setattr(sess, "ring_here", False), lambda: setattr(sess, "ring_here", True)),
        (lambda: setattr(st, "chain", False), lambda: setattr(st, "chain", True)),
        (lambda: setattr(w, "gpu_users", 1), lambda: setattr(w, "gpu_users", 0)),
    ):
        broken()
        assert not st._may_chain(p, sess, eng)
        undo()
    assert st._may_chain(p, sess, eng)


class _Order(_Ev):
    def __init__(self, log: list[Any], name: str) -> None:
        super().__init__()
        self.log, self.name = log, name

    def record(self, stream: Any = None) -> None:
        self.log.append(self.name)


def test_a_chained_step_is_link_then_replay_and_its_predecessor_waits_for_the_link(monkeypatch):
    """In stream order: the chained step's start, the link, the event its predecessor's completion waits on (so the
    slot holds that result before the host reads it), the replay, the ``staged`` event (a later host write to the
    pinned inputs waits for it) and the step's end. The predecessor reads the slot the link wrote."""
    import hyperlane_lab.codecs._kernels as kernels
    from hyperlane_lab.kernels import ring_chain
    from hyperlane_lab.runtime.gpu_pending import _Pending

    st, _, g, cache = _loop(1, 20, frozenset())
    log: list[Any] = []
    cache.step_io = _StepIO(tuple((_Order(log, f"start{i}"), _Order(log, f"end{i}"), _Order(log, f"linked{i}"))
                                  for i in range(3)), {})  # type: ignore[arg-type]  # fmt: skip
    g.staged = _Order(log, "staged")

    def link(*a: Any) -> None:
        log.append("link")
        ring_chain.ring_chain_reference(*a)

    monkeypatch.setattr(kernels, "kernel_module", lambda name: SimpleNamespace(ring_chain=link))
    g.io_np[:, 0] = [9, 4]  # step 6 ran at position 4 with id 9
    g.replay()
    log.clear()
    c = _Pending("s", 6, 1, 1, 0.0, 1, b"", g.out, None, None, None, None, "greedy", wire=g.wire)  # type: ignore[arg-type]
    st._last = c
    st._maybe_chain(c)
    # the first link is its compile, a launch on buffers of its own before the lock (once per size)
    assert log == ["link", "start1", "link", "linked1", "staged", "end1"]
    assert c.done is cache.step_io.events[1][2] and c.slot.tolist() == [rule(9, 4), 0]
    assert g.runs[-1] == ([rule(9, 4)], [5])  # the chained step: c's id, the next position
    p = st._q.get()
    assert (p.sid, p.step, p.chained, p.confirmed) == ("s", 7, True, False) and st._chained is p


def test_a_session_closed_before_the_chain_leaves_chaining_on(monkeypatch):
    """The session closes between the checks and the cache lookup: nothing is chained, and chaining stays on
    (only a failure of the kernel turns it off)."""
    st, w, g, _ = _loop(1, 20, frozenset())
    c = SimpleNamespace(sid="s", step=3, batch=1, mode="greedy", wire=g.wire, flags=0)
    st._last = st._chain_due = c

    def gone(sid: str) -> Any:
        raise KeyError(sid)

    w.engine.session = gone  # type: ignore[method-assign]
    st._chain_after()
    assert st.chain and st._chained is None and st._put == 0

    def broken(name: str) -> Any:
        raise ModuleNotFoundError("no Triton here")

    import hyperlane_lab.codecs._kernels as kernels

    monkeypatch.setattr(kernels, "kernel_module", broken)
    w.engine.session = lambda sid: _  # type: ignore[method-assign]
    st._chain_due = c
    st._chain_after()
    assert not st.chain and st._put == 0


@pytest.mark.parametrize("how", ["failed", "closed"])
def test_a_ring_frame_for_a_chained_step_of_a_failed_session_is_dropped(how):
    """The step is on the GPU already: the frame is taken (the event loop must not launch it a second time) and
    dropped, and the step stays unconfirmed (it ships nothing)."""
    from hyperlane_lab.runtime.gpu_pending import _Pending

    st, w, g, _ = _loop(1, 20, frozenset())
    c = _Pending(
        "s", 7, 1, 1, 0.0, 0, b"", g.out, None, None, None, None, "greedy", wire=g.wire, chained=True
    )  # type: ignore[arg-type]
    st._chained = c
    if how == "failed":
        w.sessions["s"].error = "stage 0: a failure"
    else:
        del w.sessions["s"]
    body = np.array([8, 5], dtype=np.int64).tobytes()
    h = FrameHeader(FrameKind.TENSOR, "s", 7, 1, 1, torch.int64, 0, 0, (1, 1), 8)
    frame = Frame(h, PooledBuffer(None, bytearray(body), len(body)), 0.0, 0.0)
    assert st.run_ring(frame)
    assert c.wasted and st._chained is None and st._chain_due is None and st._put == 0


def test_a_warmed_link_is_not_launched_again_at_the_first_chain(monkeypatch):
    """``warm_chain`` (the compute thread, at the session's open) compiles the link on buffers of its own and
    uploads the EOS ids; the completion thread's first chain then launches only the real link."""
    import hyperlane_lab.codecs._kernels as kernels
    from hyperlane_lab.kernels import ring_chain

    st, _, g, _ = _loop(1, 20, frozenset({2, 3}))
    links: list[int] = []

    def link(*a: Any) -> None:
        links.append(a[0].numel())
        ring_chain.ring_chain_reference(*a)

    monkeypatch.setattr(kernels, "kernel_module", lambda name: SimpleNamespace(ring_chain=link))
    assert not st.chain_ready(1, frozenset({2, 3}))
    st.warm_chain(1, frozenset({2, 3}))
    assert st.chain_ready(1, frozenset({2, 3})) and links == [2]
    assert not st.chain_ready(2, frozenset({2, 3})) and not st.chain_ready(1, frozenset({2, 3, 4, 5, 6}))
    c = SimpleNamespace(sid="s", step=3, batch=1, mode="greedy", wire=g.wire, flags=0)
    st._last = c
    st._maybe_chain(c)
    assert links == [2, 2] and st.chained_steps == 1  # no second warm-up launch

    def broken(name: str) -> Any:
        raise ModuleNotFoundError("no Triton here")

    monkeypatch.setattr(kernels, "kernel_module", broken)
    st.warm_chain(4, frozenset())
    assert not st.chain and st.chain_ready(4, frozenset())  # off: nothing to warm


def test_opening_a_one_stage_greedy_session_warms_the_link_on_the_compute_thread(tmp_path):
    """``Worker.open_session``: a session whose token loop runs in memory (one stage holds every layer) and decodes
    greedily has the link warmed on the compute thread (where no capture runs beside it), once per size; a sampled
    session, or one of a stage that is not the first, does not."""
    import asyncio

    from hyperlane_lab.runtime.worker import Worker, WorkerConfig
    from hyperlane_lab.types import SamplingParams

    w = Worker(WorkerConfig(device="cpu", cache_dir=str(tmp_path)))
    warmed: list[tuple[Any, ...]] = []

    class _Gpu:
        def disarm(self) -> None:
            pass

        def chain_ready(self, batch: int, eos: frozenset[int]) -> bool:
            return (batch, eos) in [a[1:] for a in warmed]

        def warm_chain(self, batch: int, eos: frozenset[int]) -> None:
            warmed.append((threading.current_thread().name, batch, eos))

    async def no_connection(address: str) -> None:
        return None

    w._gpu = _Gpu()  # type: ignore[assignment]
    w.engine = SimpleNamespace(is_first=True, is_last=True, open_session=lambda *a: None)
    w._connection_to = no_connection  # type: ignore[method-assign]
    ring = ("x:1", 10, frozenset({2}))
    try:
        loop = asyncio.new_event_loop()
        for i, (params, first) in enumerate(
            [(SamplingParams(), True), (SamplingParams(), True), (SamplingParams(temperature=0.8), True),
             (SamplingParams(), False)]
        ):  # fmt: skip
            w.engine.is_first = first
            batch = (2, 2, 3, 4)[i]  # the second session: a size already warmed
            loop.run_until_complete(w.open_session(f"s{i}", batch, 64, params, "c:1", ring=ring))
        loop.close()
    finally:
        w._compute.shutdown(wait=True)
    assert [a[1:] for a in warmed] == [(2, frozenset({2}))]  # the first session only: then ready
    assert warmed[0][0] != threading.current_thread().name  # on the compute thread
