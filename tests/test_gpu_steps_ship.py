"""The GPU completion thread's ship step (``GpuStepper._ship``) for a greedy last stage, run on the CPU with
a stand-in worker: the token loop's next frame and the client's TOKENS frame carry exactly the ids and
positions a step produced, and a non-finite flag refuses the step."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

from hyperlane_lab.generation.sampling import NON_FINITE, Sampler, SamplingParams
from hyperlane_lab.runtime.frame import FrameKind
from hyperlane_lab.runtime.gpu_pending import _Pending
from hyperlane_lab.runtime.gpu_steps import GpuStepper
from hyperlane_lab.runtime.outbox import WorkerOutbox
from hyperlane_lab.runtime.worker import _Session


class _Trace:
    def add(self, *a: Any, **k: Any) -> None:
        pass


class _Worker(WorkerOutbox):
    """The outbox's real token loop, with ``_send`` recording frames instead of writing to sockets."""

    def __init__(self, sess: _Session) -> None:
        self.sessions = {"ab" * 16: sess}
        self.trace, self.stage_index, self.engine, self._loop = _Trace(), 1, None, None
        self.sent: list[tuple[str, Any, list[bytes]]] = []

    def _send(self, reply_to: str, header: Any, parts: list[Any], sid: str, step: int) -> str:
        self.sent.append((reply_to, header, [bytes(p) for p in parts]))
        return ""


def _ship(ids: list[int], flag: int, positions: list[int], eos: frozenset[int] = frozenset()) -> _Worker:
    batch = len(ids)
    sess = _Session(batch, 64, Sampler(SamplingParams()), "client:1", ring=("first:2", 50, eos))
    w = _Worker(sess)
    stepper = object.__new__(GpuStepper)  # no CUDA needed for a greedy step's ship
    stepper.w = w
    stepper._done, stepper._read, stepper._orphan = 4, 0, None  # four steps done before this one
    host = torch.tensor([*ids, flag], dtype=torch.int64)  # the decode graph's pinned [ids..., finite flag]
    pos = np.array(positions, dtype=np.int64).reshape(batch, -1)
    p = _Pending("ab" * 16, 3, batch, 1, 0.0, batch, pos.tobytes(), host, None, None, host, None, "greedy")
    assert stepper._ship(p) is not None  # the sample time
    assert stepper._read == 5  # its result was read: a step armed behind it may be released (gpu_arming.py)
    return w


@pytest.mark.parametrize("ids, positions", [([17], [9]), ([4, 8, 2], [5, -1, 11])])
def test_greedy_ship_sends_the_next_step_then_the_tokens(ids, positions):
    w = _ship(ids, 0, positions, eos=frozenset({2}))
    (ring_to, ring, ring_parts), (tok_to, tokens, tok_parts) = w.sent
    assert ring_to == "first:2" and ring.kind == FrameKind.TENSOR and ring.step == 4
    want_pos = [p + 1 if p >= 0 and t != 2 else -1 for p, t in zip(positions, ids)]
    assert np.frombuffer(ring_parts[0], dtype=np.int64).tolist() == want_pos
    assert np.frombuffer(ring_parts[1], dtype=np.int64).tolist() == ids
    assert tok_to == "client:1" and tokens.kind == FrameKind.TOKENS and tokens.shape == (len(ids),)
    assert tokens.payload_len == 8 * len(ids) and tok_parts[0] == b""
    assert np.frombuffer(tok_parts[1], dtype=np.int64).tolist() == ids


def test_greedy_ship_reads_a_wire_graphs_ids_through_its_numpy_view():
    """A wire graph's last stage keeps an int64 numpy view of its pinned result (``WireIO.out_ids``); the
    ship reads the ids and the finite flag there, with no torch call."""
    sess = _Session(1, 64, Sampler(SamplingParams()), "client:1", ring=("first:2", 50, frozenset()))
    w = _Worker(sess)
    stepper = object.__new__(GpuStepper)
    stepper.w, stepper._done, stepper._read, stepper._orphan = w, 0, 0, None

    class _Wire:
        out_ids = np.array([23, 0], dtype=np.int64)

    pos = np.array([[7]], dtype=np.int64)
    p = _Pending(
        "ab" * 16, 3, 1, 1, 0.0, 1, pos.tobytes(), None, None, None, None, None, "greedy", wire=_Wire()
    )  # type: ignore[arg-type]
    assert stepper._ship(p) is not None
    (_, ring, ring_parts), (_, tokens, tok_parts) = w.sent
    assert np.frombuffer(ring_parts[1], dtype=np.int64).tolist() == [23] and ring.step == 4
    assert tokens.kind == FrameKind.TOKENS
    assert np.frombuffer(tok_parts[1], dtype=np.int64).tolist() == [23]
    _Wire.out_ids[1] = 1  # the graph's NaN/Inf flag
    with pytest.raises(ValueError, match=re.escape(NON_FINITE)):
        stepper._ship(p)


def test_greedy_ship_refuses_a_non_finite_step():
    with pytest.raises(ValueError, match=re.escape(NON_FINITE)):
        _ship([5], 1, [3])


class _Event:
    """A stand-in timing event: ``record`` stamps a GPU time (ms); ``elapsed_time`` as CUDA's."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self, t: float) -> None:
        self.t = t

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: _Event) -> float:
        return other.t - self.t


class _Recorder(_Trace):
    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []

    def add(self, kind: str, start: float, end: float, *a: Any, **k: Any) -> None:
        self.events.append((kind, start, end))


def test_gpu_times_are_read_after_the_ship_from_the_steps_own_events():
    """The completion thread ships a step before reading its GPU times; the session's next step, launched
    during the ship (a one-stage ring starts it from there), takes another event set, so the times read
    are the step's own (step s takes s ms here), not the next step's."""
    from hyperlane_lab.runtime.gpu_pending import _StepIO

    sess = _Session(1, 64, Sampler(SamplingParams()), "client:1")
    w = _Worker(sess)
    w.trace = _Recorder()
    io = _StepIO(tuple((_Event(), _Event(), _Event()) for _ in range(3)), {})  # type: ignore[arg-type]
    stepper = object.__new__(GpuStepper)
    stepper.w, stepper.pool = w, None

    def launch(step: int) -> _Pending:
        start, end, _ = io.take()
        start.record(100.0 * step)
        end.record(100.0 * step + step)  # step s: s ms on the GPU
        return _Pending("ab" * 16, step, 1, 1, 0.0, 1, b"", None, start, end, None, None, "hidden")  # type: ignore[arg-type]

    launched = [launch(1)]

    def ship_and_launch_the_next(p: _Pending) -> None:
        launched.append(launch(p.step + 1))

    stepper._ship = ship_and_launch_the_next  # type: ignore[method-assign]
    for step in range(1, 5):
        stepper._complete(launched[step - 1])
    took = [b - a for kind, a, b in w.trace.events if kind == "compute"]
    assert took == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3])
