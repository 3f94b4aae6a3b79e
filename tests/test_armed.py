"""Armed decode steps on the CPU: the pinned-word protocol (``decode_armed.Arming``) and the GPU stepper's
rules for when a step is armed, fired or released, with stand-ins for the GPU parts. The gate kernel is
tested in ``tests/test_kernels.py`` (interpreter and GPU); workers with armed steps in
``tests/test_gpu_wire.py``."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hyperlane_lab.generation.sampling import Sampler, SamplingParams
from hyperlane_lab.models.decode_armed import ArmedStep, ArmFailed, Arming
from hyperlane_lab.runtime.frame import FLAG_LAST
from hyperlane_lab.runtime.gpu_pending import _Pending, _StepIO
from hyperlane_lab.runtime.gpu_steps import GpuStepper
from hyperlane_lab.runtime.worker import _Session


class _Wire:
    def __init__(self, n: int) -> None:
        self.in_np = np.zeros(n, dtype=np.uint8)
        self.spec: Any = type("Spec", (), {})()

    def put(self, payload: Any) -> None:
        np.copyto(self.in_np, np.frombuffer(payload, dtype=np.uint8))


class _Graph:
    """The fields of cuda_decode._Graph the armed path uses."""

    def __init__(self, batch: int = 2, nbytes: int = 8) -> None:
        self.io_host = torch.zeros((2, batch), dtype=torch.int64)
        self.io_np = self.io_host.numpy()
        self.wire: Any = _Wire(nbytes)
        self.wire.out_host = torch.zeros(batch, dtype=torch.float16)
        self.wire.spec.out_codec = 0
        self.out = torch.zeros(batch, dtype=torch.float16)
        self.staged = object()


def _armed(arming: Arming, g: _Graph, sid: str = "s") -> ArmedStep:
    arming.target += 1
    return ArmedStep(sid, g, arming.target, __import__("time").monotonic(), None, None)  # type: ignore[arg-type]


def test_fire_writes_the_inputs_then_the_flag_and_release_pads():
    arming, g = Arming(), _Graph()
    a = _armed(arming, g)
    assert arming.fire(a, np.array([5, -1]), b"\x01" * 8, first=False)
    assert g.io_np[1].tolist() == [5, -1] and g.wire.in_np.tolist() == [1] * 8
    assert int(arming.flag[0]) == a.target and arming.fired == 1
    b = _armed(arming, g)
    assert arming.fire(b, np.array([6, 7]), np.array([11, 12]), first=True)
    assert g.io_np.tolist() == [[11, 12], [6, 7]]
    c = _armed(arming, g)
    arming.release(c)  # the graph then runs on padding: its K/V writes go to the trash slot
    assert g.io_np[1].tolist() == [-1, -1] and int(arming.flag[0]) == c.target and arming.released == 1
    assert arming.gave_up == 0
    arming.status[0] = -c.target  # the gate's word when it ended by its limit
    assert arming.gave_up_on(c)
    d = _armed(arming, g)
    arming.status[0] = -d.target
    arming.release(d)  # released after its gate gave up: counted (Health's armed_gave_up)
    assert arming.released == 2 and arming.gave_up == 1
    arming.status[0] = d.target
    assert not arming.gave_up_on(d)


def test_a_step_armed_ahead_has_its_inputs_written_only_after_the_step_before_it_ran():
    """Armed behind a step of the same graph (a one-stage ring), fire and release share that step's pinned
    inputs: each waits for the event recorded before the gate, then writes. One armed directly waits for
    nothing."""
    arming, g = Arming(), _Graph(batch=1)
    g.io_np[1] = 3  # the step ahead's position, maybe not read yet
    for how in ("fire", "release"):
        a = _armed(arming, g)
        a.ahead = ev = _Ahead(g)
        if how == "fire":
            assert arming.fire(a, np.array([4]), np.array([9]), first=True)
            assert ev.seen == [[3]] and g.io_np[:, 0].tolist() == [9, 4]
        else:
            arming.release(a)
            assert ev.seen == [[4]] and g.io_np[1].tolist() == [-1]
        assert int(arming.flag[0]) == a.target
    _armed(arming, g).behind()  # no step ahead: returns at once


def test_step_events_come_in_three_sets_taken_in_turn(monkeypatch):
    """A one-stage ring may have a step completing (its GPU times read after its ship), the next in flight and
    the one after armed: each records into its own set."""
    from hyperlane_lab.runtime.gpu_pending import _step_io

    monkeypatch.setattr(torch.cuda, "Event", lambda **kw: _Ev())
    cache = type("Cache", (), {"step_io": None})()
    io = _step_io(cache)
    assert cache.step_io is io and _step_io(cache) is io
    got = [io.take() for _ in range(6)]
    assert len({id(e) for s in got[:3] for e in s}) == 9 and got[3:] == got[:3]


def test_arm_ahead_records_an_event_before_the_gate(monkeypatch):
    """``Arming.arm(after=n)`` records the event that fire and release wait for on the stream before the
    gate (so it passes once the step ahead has run); without ``ahead`` none. A replay that fails opens the
    gate on padding, after waiting for the step ahead."""
    import hyperlane_lab.codecs._kernels as kernels

    order: list[str] = []

    class _Event(_Ev):
        def record(self, stream: Any = None) -> None:
            order.append("ahead")

        def synchronize(self) -> None:
            order.append("waited")

    class _Gate:
        @staticmethod
        def armed_wait(*a: Any, **kw: Any) -> None:
            order.append("gate")

    class _Replay:
        fail = False

        def replay(self) -> None:
            order.append("replay")
            if self.fail:
                raise RuntimeError("replay failed")

    monkeypatch.setattr(kernels, "kernel_module", lambda name: _Gate)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    arming, g = Arming(), _Graph(batch=1)
    g.graph, g.staged = _Replay(), _Ev()
    a = arming.arm("s", g, _Ev(), _Ev(), None, after=1)  # type: ignore[arg-type]
    assert order == ["ahead", "gate", "replay"] and a.ahead is not None and a.target == 1
    order.clear()
    b = arming.arm("s", g, _Ev(), _Ev(), None)  # type: ignore[arg-type]
    assert order == ["gate", "replay"] and b.ahead is None
    order.clear()
    g.graph.fail, g.io_np[1] = True, 5
    with pytest.raises(ArmFailed) as failed:  # ahead: the gate stays closed (the stepper releases it later)
        arming.arm("s", g, _Ev(), _Ev(), None, after=1)  # type: ignore[arg-type]
    assert order == ["ahead", "gate", "replay"] and g.io_np[1].tolist() == [5]
    assert failed.value.step.target == arming.target == 3 and int(arming.flag[0]) == 0
    with pytest.raises(RuntimeError, match="replay failed"):  # not ahead: opened on padding at once
        arming.arm("s", g, _Ev(), _Ev(), None)  # type: ignore[arg-type]
    assert g.io_np[1].tolist() == [-1] and int(arming.flag[0]) == arming.target == 4


def test_a_step_armed_too_long_ago_is_not_fired():
    """The host fires only within half the gate's limit of arming, so the gate never gives up on a fired step."""
    now = [100.0]
    arming, g = Arming(limit_s=2.0, clock=lambda: now[0]), _Graph()
    arming.target += 1
    a = ArmedStep("s", g, arming.target, now[0], None, None)  # type: ignore[arg-type]
    now[0] += 0.99
    assert arming.fire(a, np.array([1, 2]), b"\x03" * 8, first=False)  # within the window
    arming.target += 1
    b = ArmedStep("s", g, arming.target, now[0], None, None)  # type: ignore[arg-type]
    now[0] += 1.01
    assert not arming.fire(b, np.array([5, 6]), b"\x02" * 8, first=False)
    assert g.io_np[1].tolist() == [1, 2] and int(arming.flag[0]) == a.target  # nothing written for b
    with pytest.raises(ValueError, match="limit"):
        Arming(limit_s=0)


# ---------------------------------------------------------------------------- the stepper's rules


class _FakeArming(Arming):
    def __init__(self) -> None:
        super().__init__()
        self.armed_graphs: list[Any] = []
        self.fail = False
        self.slow: Any = None  # (started, go) events: arm waits for go after signalling started
        self.aheads: list[bool] = []

    def warm(self, batch: int) -> None:
        pass

    def arm(self, sid, graph, start, end, stream, after=0):  # type: ignore[no-untyped-def,override]
        if self.fail:
            raise RuntimeError("no gate here")
        if self.slow is not None:
            started, go = self.slow
            started.set()
            assert go.wait(10)
        self.armed_graphs.append(graph)
        self.aheads.append(bool(after))
        self.target += 1
        a = ArmedStep(sid, graph, self.target, __import__("time").monotonic(), start, end, after=after)
        a.ahead = _Ahead(graph) if after else None
        return a


class _Ahead:
    """Stands in for the event recorded before a gate armed ahead: ``synchronize`` notes the graph's positions
    as they were when the host waited (before it wrote any)."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.seen: list[list[int]] = []

    def synchronize(self) -> None:
        self.seen.append(self.graph.io_np[1].tolist())


class _Ev:
    """A stand-in CUDA event: counts its records."""

    def __init__(self) -> None:
        self.records = 0

    def record(self, stream: Any = None) -> None:
        self.records += 1


class _Cache:
    def __init__(self, g: _Graph) -> None:
        self.graph = g
        self.writes = 0
        self.limit = 64
        self.step_io = _StepIO(((_Ev(), _Ev(), _Ev()), (_Ev(), _Ev(), _Ev())), {})  # type: ignore[arg-type]


class _Decoder:
    """Stands in for GraphDecoder.step_wire: records the launch, returns the cache's graph."""

    def __init__(self) -> None:
        self.launched: list[tuple[Any, ...]] = []

    def step_wire(self, cache: _Cache, spec: Any, pos: Any, x: Any) -> Any:
        self.launched.append((cache, spec, pos.tolist(), np.asarray(x).tolist()))
        cache.graph.io_np[1] = pos  # the inputs the real one writes (first stage)
        cache.graph.io_np[0] = x
        return cache.graph


class _Engine:
    is_first, is_last = True, False
    spec = type("Spec", (), {"vocab_size": 97})()

    def __init__(self, caches: dict[str, _Cache]) -> None:
        self.caches = caches
        self.decoder = _Decoder()

    def session(self, sid: str) -> _Cache:
        return self.caches[sid]

    def graph_decoder(self) -> _Decoder:
        return self.decoder


class _W:
    def __init__(self, sessions: dict[str, _Session], engine: _Engine) -> None:
        self.sessions, self.engine = sessions, engine
        self._submitted = self._finished = 0
        self.gpu_users = 0
        self.stage_index = 0
        self.failed: list[str] = []

    def step_failed(self, sess: Any, sid: str, step: int, message: str) -> None:
        self.failed.append(message)


def _stepper(
    n_sessions: int = 1, ring: tuple[str, int, frozenset[int]] | None = None
) -> tuple[GpuStepper, Any]:
    sess = {f"s{i}": _Session(1, 64, Sampler(SamplingParams()), "c:1", ring=ring) for i in range(n_sessions)}
    caches = {sid: _Cache(_Graph(batch=1)) for sid in sess}
    st = object.__new__(GpuStepper)
    st.w = _W(sess, _Engine(caches))  # type: ignore[assignment]
    st.arming = _FakeArming()
    st._arm_lock = threading.RLock()
    st._armed = None
    st._arming_now = False
    st._closing = False
    st._put, st._done = 1, 0  # the step being completed is the only one in flight
    st.ring_ahead, st.arm_ahead, st._read, st._orphan = None, True, 0, None
    st._thread = threading.Thread(target=lambda: None)  # the completion thread: not the test's
    st.compute_stream = None  # type: ignore[assignment]
    st.device = torch.device("cpu")
    st._on_device = lambda: None  # type: ignore[method-assign]
    return st, caches


def _done_step(caches: dict[str, _Cache], sid: str = "s0", step: int = 3) -> _Pending:
    g = caches[sid].graph
    return _Pending(sid, step, 1, 1, 0.0, 1, b"", None, None, None, None, None, "hidden", wire=g.wire)  # type: ignore[arg-type]


def test_a_lone_sessions_next_step_is_armed_and_fired_by_its_own_frame():
    st, caches = _stepper()
    st._arm_after(_done_step(caches))
    a = st._armed
    assert a is not None and a.graph is caches["s0"].graph and st.arming.armed_graphs == [a.graph]
    g = caches["s0"].graph
    assert st._take_armed("s0", caches["s0"], g.wire.spec) is a and st._armed is None
    assert st._fire(a, np.array([4]), np.array([9]), first=True) and g.io_np[:, 0].tolist() == [9, 4]


@pytest.mark.parametrize(
    "why",
    ["two_sessions", "compute_busy", "another_step", "ring_done", "ring_eos", "last_step", "other_graph", "armed",
     "closed", "failed", "profiling"],
)  # fmt: skip
def test_no_step_is_armed_unless_the_session_is_alone_and_nothing_else_is_in_flight(why):
    st, caches = _stepper(2 if why == "two_sessions" else 1, ring=("f:1", 4, frozenset()))
    p = _done_step(caches, step=3 if why == "ring_done" else 2)  # the ring's budget is 4 steps
    if why == "compute_busy":
        st.w._submitted = 1  # a compute-thread task (open/close session, a staged step) is pending
    elif why == "another_step":
        st._put = 2
    elif why == "other_graph":
        caches["s0"].graph = _Graph()  # recaptured since (another spec): not the graph that ran p
    elif why == "armed":
        st._armed = ArmedStep("x", _Graph(), 1, 0.0, None, None)  # type: ignore[arg-type]
    elif why == "closed":
        del st.w.sessions["s0"]
    elif why == "ring_eos":
        p.final = True  # the ship's ring frame found every row done (EOS): no next step
    elif why == "last_step":  # a stage before the last: the ring frame said this is its budget's last step
        st.w.sessions["s0"].ring = None
        p.flags = FLAG_LAST
    elif why == "failed":
        st.w.sessions["s0"].error = "stage 0: a bad frame"
    elif why == "profiling":
        st.w.gpu_users = 1  # Profile runs on another thread and synchronizes the device
    before = st._armed
    st._arm_after(p)
    assert st._armed is before and st.arming.armed_graphs == []


@pytest.mark.parametrize("what", ["other_session", "other_spec", "disarm"])
def test_anything_else_releases_the_armed_step(what):
    """Another session's frame, a frame whose wire spec changed, or ``disarm`` (a prompt, a compute task, a
    reload) releases the armed step: padding positions, then the flag."""
    st, caches = _stepper(2)
    g = caches["s0"].graph
    g.io_np[1] = 7
    st._armed = a = ArmedStep("s0", g, 5, 0.0, None, None)  # type: ignore[arg-type]
    if what == "disarm":
        st.disarm()
    else:
        sid, spec = ("s1", caches["s1"].graph.wire.spec) if what == "other_session" else ("s0", object())
        assert st._take_armed(sid, caches[sid], spec) is None
    assert st._armed is None and g.io_np[1].tolist() == [-1] and int(st.arming.flag[0]) == a.target
    assert st.arming.released == 1


@contextlib.contextmanager
def _messages(logger: str) -> Iterator[list[str]]:
    """The messages ``logger`` emits inside the block (without pytest's logging plugin, which device runs
    turn off)."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield seen
    finally:
        log.removeHandler(handler)


def test_an_arming_failure_turns_arming_off_for_the_worker():
    with _messages("hyperlane_lab.runtime.gpu_steps") as seen:
        st, caches = _stepper()
        st.arming.fail = True
        st._arm_after(_done_step(caches))
    assert st.arming is None and st._armed is None and any("cannot arm" in m for m in seen)


def test_a_worker_task_releases_the_armed_step_first(tmp_path):
    """``Worker._submit`` (open/close session, staged steps, captures on the compute thread) disarms."""
    from hyperlane_lab.runtime.worker import Worker, WorkerConfig

    w = Worker(WorkerConfig(device="cpu", cache_dir=str(tmp_path), armed_graphs=True))
    assert w.armed_graphs and w.armed_counts() == (0, 0, 0)
    calls: list[str] = []

    class _Gpu:
        arming = None

        def disarm(self) -> None:
            calls.append("disarm")

    w._gpu = _Gpu()  # type: ignore[assignment]
    assert w._submit(lambda: calls.append("task")).result(timeout=10) is None
    assert calls == ["disarm", "task"]
    w._compute.shutdown(wait=True)


def test_a_task_counted_while_an_arm_is_under_way_releases_it():
    """The race a review found: the completion thread passed its checks and is arming when the loop thread
    counts a compute task (a close) and disarms. ``disarm`` waits for the arm and releases it: nothing stays
    armed behind the task."""
    st, caches = _stepper()
    started, go = threading.Event(), threading.Event()
    st.arming.slow = (started, go)
    t = threading.Thread(target=st._arm_after, args=(_done_step(caches),))
    t.start()
    assert started.wait(10)  # inside arm(), the lock held, _armed not yet set
    st.w._submitted += 1  # Worker._submit: count the task, then disarm
    threading.Timer(0.05, go.set).start()
    st.disarm()  # blocks until the arm is done, then releases it
    t.join(10)
    assert st._armed is None and st.arming.released == 1 and len(st.arming.armed_graphs) == 1


def _hold(lock: Any) -> tuple[threading.Thread, threading.Event]:
    """A thread holding ``lock`` (as a launch on another thread does) until the returned event is set."""
    held, let_go = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            let_go.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(10)
    return t, let_go


def test_disarm_with_nothing_armed_does_not_wait_for_a_launch_holding_the_lock():
    """The compute thread holds the arming lock while it enqueues a prompt chunk (~1 ms); the loop thread's
    ``_submit`` (count, then disarm) must not wait for it when nothing is armed and no arm is under way. With
    an armed step it takes the lock and releases the step once the launch lets go."""
    st, caches = _stepper()
    t, let_go = _hold(st._arm_lock)  # run_step on the compute thread
    done = threading.Event()
    threading.Thread(target=lambda: (st.disarm(), done.set())).start()
    assert done.wait(5)  # returned while the launch still holds the lock
    assert st.arming.released == 0
    let_go.set()
    t.join(10)
    st._arm_after(_done_step(caches))  # now something is armed: disarm locks and releases it
    assert st._armed is not None
    t, let_go = _hold(st._arm_lock)
    done.clear()
    d = threading.Thread(target=lambda: (st.disarm(), done.set()))
    d.start()
    assert not done.wait(0.2)  # waits for the lock: the armed step must be released, not skipped
    let_go.set()
    assert done.wait(10)
    t.join(10), d.join(10)
    assert st._armed is None and st.arming.released == 1


def test_local_cluster_warns_when_armed_workers_share_a_gpu(monkeypatch, tmp_path):
    """Armed steps are for one worker per GPU: a LocalCluster that would put several armed workers on one
    GPU says so (nothing is started here)."""
    from hyperlane_lab.runtime.local_cluster import LocalCluster

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-mps"))
    with _messages("hyperlane_lab.runtime.local_cluster") as seen:
        cases = [
            (["cuda:0", "cuda:0", "cuda:1"], ["--armed-graphs"], {}, True),
            (["cuda:0", "cuda:1"], ["--armed-graphs"], {}, False),
            (["cuda:0", "cuda:0"], [], {"HYPERLANE_ARMED_GRAPHS": "1"}, True),
            (["cuda:0", "cuda:0"], [], {"HYPERLANE_ARMED_GRAPHS": "0"}, False),
            (["cpu", "cpu"], ["--armed-graphs"], {}, False),
        ]
        for devices, args, env, warns in cases:
            seen.clear()
            LocalCluster(len(devices), devices=devices, extra_args=args, env=env)
            assert any("several workers on cuda:0" in m for m in seen) == warns, (devices, args, env, seen)


@pytest.mark.parametrize(
    ("devices", "args", "env", "armed"),
    [
        (["cuda:0", "cuda:1", "cuda:2"], [], {}, True),  # one GPU each: on by default
        (["cuda", "cuda:1"], [], {}, True),
        (["cuda:0"], [], {}, True),
        (["cuda:0", "cuda:0", "cuda:1"], [], {}, False),  # a shared GPU: off unless asked
        (["cuda", "cuda:0"], [], {}, False),  # "cuda" is cuda:0
        (["cpu", "cpu"], [], {}, False),
        (["cuda:0", "cpu"], [], {}, False),
        (["cuda:0", "cuda:1"], ["--no-armed-graphs"], {}, False),  # refused
        (["cuda:0", "cuda:1"], [], {"HYPERLANE_ARMED_GRAPHS": "0"}, False),
        (["cuda:0", "cuda:0"], ["--armed-graphs"], {}, True),  # asked for
        (["cuda:0", "cuda:0"], [], {"HYPERLANE_ARMED_GRAPHS": "1"}, True),
        (["cuda:0", "cuda:1"], ["--no-armed-graphs", "--armed-graphs"], {}, True),  # the last one counts
        (
            ["cuda:0", "cuda:1"],
            ["--armed-graphs", "--no-armed-graphs"],
            {"HYPERLANE_ARMED_GRAPHS": "1"},
            False,
        ),
        (["cpu", "cpu"], ["--armed-graphs"], {}, False),  # asked for, but nothing would arm
    ],
)
def test_local_cluster_arms_workers_that_have_a_gpu_each(monkeypatch, tmp_path, devices, args, env, armed):
    """LocalCluster's default: armed steps where every worker has a GPU of its own (x86-64), off where any
    GPU is shared or a worker is on the CPU; an explicit flag or HYPERLANE_ARMED_GRAPHS decides otherwise.
    The workers get what was decided (nothing is started here)."""
    from hyperlane_lab.models import decode_armed
    from hyperlane_lab.runtime.local_cluster import LocalCluster

    monkeypatch.delenv("HYPERLANE_ARMED_GRAPHS", raising=False)
    monkeypatch.setenv(
        "CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-mps")
    )  # (no MPS daemon: see the next test)
    monkeypatch.setattr(decode_armed.platform, "machine", lambda: "x86_64")
    cl = LocalCluster(len(devices), devices=devices, extra_args=args, env=env)
    assert cl.armed is armed
    said = [a for a in cl.extra_args if a in ("--armed-graphs", "--no-armed-graphs")]
    if any(d.startswith("cuda") for d in devices):  # (CPU workers never arm, whatever they are told)
        assert (said[-1:] == ["--armed-graphs"]) == armed, said  # the worker's parser keeps the last


def test_local_cluster_arms_workers_sharing_a_gpu_through_mps(monkeypatch, tmp_path, request):
    """With an MPS control daemon reachable (its ``control`` socket in ``CUDA_MPS_PIPE_DIRECTORY``, from the
    environment or the cluster's ``env``), workers sharing a GPU run kernels side by side: armed by default, no
    warning. Without one (a folder without the socket, or a socket nothing listens on) they stay off."""
    from hyperlane_lab.models import decode_armed
    from hyperlane_lab.runtime.local_cluster import LocalCluster, mps_active

    monkeypatch.delenv("HYPERLANE_ARMED_GRAPHS", raising=False)
    monkeypatch.setattr(decode_armed.platform, "machine", lambda: "x86_64")
    short = Path(tempfile.mkdtemp(prefix="mps", dir="/tmp"))  # (a UNIX socket's path has at most 107 bytes)
    pipe, empty, stale = short / "pipe", tmp_path / "empty", tmp_path / "stale"
    for d in (pipe, empty, stale):
        d.mkdir()
    (stale / "control").touch()  # what a daemon that died may leave: nothing listens
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon.bind(str(pipe / "control"))
    daemon.listen(8)
    request.addfinalizer(lambda: (daemon.close(), shutil.rmtree(short, ignore_errors=True)))
    assert mps_active({"CUDA_MPS_PIPE_DIRECTORY": str(pipe)})
    assert not mps_active({"CUDA_MPS_PIPE_DIRECTORY": str(empty)})
    assert not mps_active({"CUDA_MPS_PIPE_DIRECTORY": str(stale)})
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(empty))
    assert LocalCluster(2, devices=["cuda:0", "cuda:0"]).armed is False
    with _messages("hyperlane_lab.runtime.local_cluster") as seen:
        cl = LocalCluster(2, devices=["cuda:0", "cuda:0"], env={"CUDA_MPS_PIPE_DIRECTORY": str(pipe)})
        assert cl.armed is True and cl.extra_args[-1] == "--armed-graphs" and seen == []
        monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipe))
        assert LocalCluster(3, devices=["cuda:0", "cuda:0", "cuda:1"]).armed is True and seen == []
        assert LocalCluster(2, devices=["cuda:0", "cuda:0"], extra_args=["--no-armed-graphs"]).armed is False
        assert LocalCluster(2, devices=["cuda:0", "cpu"]).armed is False  # a CPU worker: nothing arms


def test_local_cluster_does_not_arm_workers_on_hosts_without_ordered_stores(monkeypatch):
    """The flag-after-inputs protocol needs x86-64's store order: elsewhere the default stays off."""
    from hyperlane_lab.models import decode_armed
    from hyperlane_lab.runtime.local_cluster import LocalCluster

    monkeypatch.delenv("HYPERLANE_ARMED_GRAPHS", raising=False)
    monkeypatch.setattr(decode_armed.platform, "machine", lambda: "aarch64")
    cl = LocalCluster(2, devices=["cuda:0", "cuda:1"])
    assert cl.armed is False and "--armed-graphs" not in cl.extra_args
    assert LocalCluster(2, devices=["cuda:0", "cuda:1"], extra_args=["--armed-graphs"]).armed is False


def test_worker_command_line_takes_both_armed_flags():
    """``hyperlane worker --no-armed-graphs`` turns armed steps off even where HYPERLANE_ARMED_GRAPHS says on;
    without either flag the setting is left to the environment (None)."""
    import argparse

    from hyperlane_lab.cli import worker as cli_worker

    parser = argparse.ArgumentParser()
    cli_worker.add_parser(parser.add_subparsers())
    assert parser.parse_args(["worker", "--armed-graphs"]).armed_graphs is True
    assert parser.parse_args(["worker", "--no-armed-graphs"]).armed_graphs is False
    assert parser.parse_args(["worker"]).armed_graphs is None
    with pytest.raises(SystemExit):  # no abbreviations: LocalCluster reads these flags by their full names
        parser.parse_args(["worker", "--no-armed"])


class _ProbedStepper(GpuStepper):
    """A stepper whose ``_armed`` reads run a hook (for the orderings below)."""

    hook: Any = None

    @property  # type: ignore[override]
    def _armed(self) -> Any:
        v = self.__dict__.get("_armed_value")
        if self.hook is not None:
            self.hook()
        return v

    @_armed.setter
    def _armed(self, v: Any) -> None:
        self.__dict__["_armed_value"] = v


def test_disarm_reads_the_arm_in_progress_before_the_armed_step():
    """``disarm``'s lock-free check must read ``_arming_now`` before ``_armed``: here an arm whose checks passed
    before the caller counted its task finishes between disarm's reads. Reading ``_armed`` first would see
    None, then ``_arming_now`` cleared, and leave the step armed behind the task."""
    st, caches = _stepper()
    probe = object.__new__(_ProbedStepper)
    probe.__dict__.update({k: v for k, v in st.__dict__.items() if k != "_armed"})
    probe._armed = None
    started, go = threading.Event(), threading.Event()
    probe.arming.slow = (started, go)
    arm = threading.Thread(target=probe._arm_after, args=(_done_step(caches),))
    arm.start()
    assert started.wait(10)  # inside arm(): the lock held, _armed not yet set, _arming_now set
    me = threading.current_thread()
    fired: list[int] = []

    def between_reads() -> None:  # the first _armed read on this thread: let the arm finish first
        if threading.current_thread() is me and not fired:
            fired.append(1)
            go.set()
            arm.join(10)

    probe.hook = between_reads
    threading.Timer(0.05, go.set).start()  # the right order waits for the lock: let the arm end
    probe.w._submitted += 1  # Worker._submit: count the task, then disarm
    probe.disarm()
    arm.join(10)
    probe.hook = None
    assert probe._armed is None and probe.arming.released == 1


def test_an_arm_marks_itself_before_its_checks_read_the_task_count():
    """The completion thread sets ``_arming_now`` before ``_may_arm`` reads the counts: a caller that counts
    its task right after those checks passed finds the arm under way, waits for it and releases it."""
    st, caches = _stepper()
    checked, go = threading.Event(), threading.Event()
    real = st._may_arm
    calls: list[bool] = []

    def may_arm(*a: Any) -> bool:
        ok = real(*a)
        calls.append(ok)
        if len(calls) == 2:  # the re-check under the lock passed: the caller counts and disarms now
            checked.set()
            go.wait(10)
        return ok

    st._may_arm = may_arm  # type: ignore[method-assign]
    arm = threading.Thread(target=st._arm_after, args=(_done_step(caches),))
    arm.start()
    assert checked.wait(10)
    st.w._submitted += 1
    threading.Timer(0.05, go.set).start()
    st.disarm()  # finds _arming_now set: waits for the lock, then releases the step
    arm.join(10)
    assert calls == [True, True] and st._armed is None and st.arming.released == 1


def test_nothing_is_armed_once_the_stepper_is_closing():
    """``close`` marks the stepper before it disarms: a step completing meanwhile arms nothing after it."""
    st, caches = _stepper()
    st._closing = True
    st._arm_after(_done_step(caches))
    assert st._armed is None and st.arming.armed_graphs == []


class _Body:
    def __init__(self, data: bytes) -> None:
        self.view = memoryview(bytearray(data))
        self.released = False

    def release(self) -> None:
        self.released = True


class _Frame:
    """A decode frame for the first stage: positions then token ids (int64 each, batch 1)."""

    def __init__(self, sid: str, step: int, pos: int, tok: int) -> None:
        from hyperlane_lab.runtime.frame import FrameHeader, FrameKind

        self.header = FrameHeader(FrameKind.TENSOR, sid, step, 1, 1, torch.int64, 0, 0, (1, 1), 8)
        self.body = _Body(np.array([pos, tok], dtype=np.int64).tobytes())
        self.completed_at = 0.0
        self.positions_view = self.body.view[:8]
        self.payload_view = self.body.view[8:]


def _wire_stepper(n_sessions: int = 1) -> tuple[GpuStepper, Any]:
    import queue

    st, caches = _stepper(n_sessions)
    st._q = queue.SimpleQueue()
    st._put = st._done = 0
    return st, caches


def test_run_wire_fires_the_sessions_armed_step_without_a_launch():
    """The loop thread's path for an armed session: the frame's position and id go into the armed graph's
    pinned inputs, then the flag; nothing is launched; the step handed to the completion thread carries the
    armed step's events (read after its ship) and the armed step itself (its gate's status is checked)."""
    st, caches = _wire_stepper()
    g = caches["s0"].graph
    st.arming.target = 4
    st._armed = a = ArmedStep("s0", g, 4, __import__("time").monotonic(), _Ev(), _Ev())  # type: ignore[arg-type]
    frame = _Frame("s0", 9, pos=7, tok=11)
    st.run_wire(frame, g.wire.spec, 0.0)  # type: ignore[arg-type]
    p = st._q.get_nowait()
    assert p.armed is a and p.start is a.start and p.end is a.end and a.end.records == 0
    assert g.io_np[:, 0].tolist() == [11, 7] and int(st.arming.flag[0]) == 4 and st.arming.fired == 1
    assert st.w.engine.decoder.launched == [] and frame.body.released and caches["s0"].writes == 1
    assert (p.sid, p.step, p.pos_bytes, p.mode) == ("s0", 9, np.int64(7).tobytes(), "hidden")
    assert st._armed is None and st._put == 1 and st.w.failed == []


def test_run_wire_releases_another_sessions_armed_step_then_launches():
    st, caches = _wire_stepper(2)
    g0, g1 = caches["s0"].graph, caches["s1"].graph
    g0.io_np[1] = 5
    st._armed = ArmedStep("s0", g0, 3, __import__("time").monotonic(), _Ev(), _Ev())  # type: ignore[arg-type]
    st.arming.target = 3
    st.run_wire(_Frame("s1", 2, pos=3, tok=8), g1.wire.spec, 0.0)  # type: ignore[arg-type]
    assert g0.io_np[1].tolist() == [-1] and int(st.arming.flag[0]) == 3 and st.arming.released == 1
    ((cache, _, pos, ids),) = st.w.engine.decoder.launched
    assert cache is caches["s1"] and pos == [3] and ids == [8]
    p = st._q.get_nowait()
    assert p.armed is None and p.start.records == 1 and p.end.records == 1  # launched: its own events


def test_run_wire_refuses_a_bad_token_id_before_firing():
    """Batch 1 checks the id with plain Python; a bad one fails the step with the range in the message,
    and the armed step is left for the session's close to release (the session has failed)."""
    st, caches = _wire_stepper()
    g = caches["s0"].graph
    st._armed = a = ArmedStep("s0", g, 1, __import__("time").monotonic(), _Ev(), _Ev())  # type: ignore[arg-type]
    frame = _Frame("s0", 4, pos=2, tok=97)  # vocab_size 97: ids 0..96
    st.run_wire(frame, g.wire.spec, 0.0)  # type: ignore[arg-type]
    assert len(st.w.failed) == 1 and "token ids must be in [0, 97)" in st.w.failed[0], st.w.failed
    assert st._armed is a and st.arming.fired == 0 and int(st.arming.flag[0]) == 0 and frame.body.released
    assert st._q.empty()
