"""The worker's compute thread (runtime/hot_thread.py): calls run in order on one thread, results and errors
reach their futures, and the thread spins for the next call only within its window (then blocks)."""

from __future__ import annotations

import argparse
import threading
import time

import pytest
import torch

from hyperlane_lab.runtime.hot_thread import HotThread, SpinWake, spin_wake_available
from hyperlane_lab.runtime.worker_config import WorkerConfig

needs_spin = pytest.mark.skipif(not spin_wake_available(), reason="glibc spin locks only (Linux)")


def windows(spin: float) -> list:
    """Parameters: no spin, and a ``spin`` s window where glibc's spin locks exist."""
    return [0.0, pytest.param(spin, marks=needs_spin)]


def _wait_until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


@pytest.mark.parametrize("window", windows(0.2))
def test_calls_run_in_order_on_one_thread_with_their_results_and_errors(window):
    h = HotThread("t-order", window)
    try:
        seen: list[tuple[int, int | None]] = []

        def call(i: int) -> int:
            seen.append((i, threading.get_ident()))
            if i % 7 == 3:
                raise KeyError(f"call {i}")
            return i * i

        futs = [h.submit(call, i) for i in range(40)]
        for i, f in enumerate(futs):
            if i % 7 == 3:
                with pytest.raises(KeyError, match=f"call {i}"):
                    f.result(10)
            else:
                assert f.result(10) == i * i
        assert [i for i, _ in seen] == list(range(40))  # in submission order
        assert len({tid for _, tid in seen}) == 1 and seen[0][1] != threading.get_ident()
    finally:
        h.shutdown(wait=True)
    assert not h._thread.is_alive()


@needs_spin
def test_the_thread_spins_for_the_next_call_only_within_its_window():
    """A call submitted soon after the last one ends is taken after a spin; once the window has run out
    the watchdog ends the spin and the next call is taken after a blocking wait."""
    h = HotThread("t-window", 1.5)
    try:
        h.submit(lambda: None).result(10)  # the first call: taken from a blocking wait
        assert (h.spun, h.blocked) == (0, 1)
        for _ in range(5):
            time.sleep(0.01)
            h.submit(lambda: None).result(10)
        assert (h.spun, h.blocked) == (5, 1)
        assert _wait_until(lambda: h.spinning, 1.0)  # idle, within the window: spinning
        assert _wait_until(lambda: not h.spinning, 10.0)  # the window ran out: no longer spinning
        time.sleep(0.05)
        assert not h.spinning
        h.submit(lambda: None).result(10)
        assert (h.spun, h.blocked) == (5, 2)
    finally:
        h.shutdown(wait=True)


def test_without_a_window_the_thread_never_spins():
    h = HotThread("t-off", 0.0)
    try:
        for _ in range(5):
            h.submit(time.sleep, 0.001).result(10)
        assert h.spun == 0 and h.blocked == 5 and h._watchdog is None and h.window_s == 0
    finally:
        h.shutdown(wait=True)


@pytest.mark.parametrize("window", windows(5.0))
def test_shutdown_cancels_waiting_calls_and_refuses_new_ones(window):
    h = HotThread("t-stop", window)
    gate = threading.Event()
    first = h.submit(gate.wait, 10)
    assert _wait_until(first.running)
    later = [h.submit(lambda: 1) for _ in range(3)]
    h.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert first.result(10) is True  # the running call finishes
    assert all(f.cancelled() for f in later)
    h._thread.join(10)
    assert not h._thread.is_alive()  # a spinning thread (5 s window) is woken to stop
    with pytest.raises(RuntimeError, match="stopped compute thread"):
        h.submit(lambda: 1)
    h.shutdown()  # a second shutdown is harmless


@pytest.mark.parametrize("window", windows(5.0))
def test_shutdown_by_default_runs_the_waiting_calls_first(window):
    """ThreadPoolExecutor's defaults: ``shutdown()`` lets queued calls run, then joins the thread."""
    h = HotThread("t-drain", window)
    gate = threading.Event()
    h.submit(gate.wait, 10)
    later = [h.submit(lambda i=i: i) for i in range(3)]
    threading.Timer(0.05, gate.set).start()
    h.shutdown()
    assert not h._thread.is_alive()
    assert [f.result(0) for f in later] == [0, 1, 2]


def test_calls_submitted_while_another_thread_shuts_down_are_run_or_refused():
    """No future is left pending: a submit racing shutdown either lands before the stop marker (and runs)
    or raises."""

    def submitter(h: HotThread, futs: list, refused: list) -> None:
        for i in range(200):
            try:
                futs.append(h.submit(lambda i=i: i))
            except RuntimeError:
                refused.append(i)
                return

    for _ in range(20):
        h = HotThread("t-race", 0.0)
        futs: list = []
        refused: list = []
        th = threading.Thread(target=submitter, args=(h, futs, refused))
        th.start()
        time.sleep(0.001)
        h.shutdown(wait=True, cancel_futures=False)
        th.join(10)
        assert all(f.done() for f in futs)
        assert [f.result() for f in futs] == list(range(len(futs)))
        assert len(futs) == 200 or refused == [len(futs)]


@needs_spin
def test_spin_wake_keeps_one_wake_up_for_a_later_wait():
    s = SpinWake()
    s.wake()
    s.wake()  # a second wake-up is not counted: one stored, as a binary semaphore
    done = threading.Event()

    def waiter() -> None:
        s.wait()  # returns at once: the stored wake-up
        done.set()
        s.wait()  # spins until the next wake()
        done.clear()

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    try:
        assert _wait_until(done.is_set)
        time.sleep(0.05)
        assert th.is_alive() and done.is_set()  # spinning in the second wait
    finally:
        s.wake()  # never leave a thread spinning for the rest of the session
        th.join(5)
    assert not th.is_alive() and not done.is_set()


def test_the_compute_spin_is_on_where_the_loop_busy_polls_and_cpus_are_plenty_unless_given(monkeypatch):
    """Auto (None): a CUDA worker spins for AUTO_COMPUTE_SPIN_US when its event loop busy-polls
    (``busy_poll_us=0`` turns both off) and it has 6 usable CPUs per GPU (a third spinning thread); CPU
    workers never do; a given value always wins."""
    from hyperlane_lab.runtime import cpus
    from hyperlane_lab.runtime import worker_config as wc

    assert WorkerConfig().compute_spin_us is None
    for bad in (-1, 2_000_000):
        with pytest.raises(ValueError, match="compute_spin_us must be 0"):
            WorkerConfig(compute_spin_us=bad)
    assert WorkerConfig(compute_spin_us=700).compute_spin_us == 700
    assert wc.compute_spin_window_us(WorkerConfig(device="cpu")) == 0
    assert wc.compute_spin_window_us(WorkerConfig(device="cpu", busy_poll_us=500)) == 0  # no CPU worker spins
    assert wc.compute_spin_window_us(WorkerConfig(device="cpu", compute_spin_us=700)) == 700
    monkeypatch.setattr(wc, "resolve_device", lambda d: torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    on = wc.AUTO_COMPUTE_SPIN_US
    # (usable CPUs, 2 GPUs visible): busy polling from 4 per GPU, the compute spin from 6; pinned (cpus): 1 GPU
    for n_cpus, want, polls, want_pinned in ((8, 0, True, on), (12, on, True, on), (7, 0, False, on),
                                             (64, on, True, on), (5, 0, False, 0)):  # fmt: skip
        monkeypatch.setattr(cpus, "usable_cpus", lambda n=n_cpus: n)
        cfg = WorkerConfig(device="cuda:0")
        assert wc.compute_spin_window_us(cfg) == want, n_cpus
        assert (wc.busy_poll_window_us(cfg) > 0) == polls, n_cpus
        assert wc.compute_spin_window_us(WorkerConfig(device="cuda:0", cpus="0-1")) == want_pinned, n_cpus
        assert wc.compute_spin_window_us(WorkerConfig(device="cuda:0", busy_poll_us=0)) == 0
        assert wc.compute_spin_window_us(WorkerConfig(device="cuda:0", busy_poll_us=300)) == (
            on if n_cpus >= 12 else 0
        )
        assert wc.compute_spin_window_us(WorkerConfig(device="cuda:0", compute_spin_us=0)) == 0
        assert wc.compute_spin_window_us(WorkerConfig(device="cuda:0", compute_spin_us=5)) == 5


def test_a_worker_builds_its_compute_thread_with_the_resolved_window(tmp_path, monkeypatch, caplog):
    from hyperlane_lab.runtime import worker as worker_mod

    seen = []
    monkeypatch.setattr(worker_mod, "compute_spin_window_us", lambda cfg: seen.append(cfg) or 1234)
    cfg = WorkerConfig(device="cpu", cache_dir=str(tmp_path))
    with caplog.at_level("INFO", logger="hyperlane_lab.runtime.worker"):
        w = worker_mod.Worker(cfg)
    try:
        assert seen == [cfg] and w._compute.window_s == pytest.approx(1234e-6)
        assert "spins up to 1234 µs" in caplog.text
    finally:
        w._compute.shutdown(wait=True)


def test_worker_command_line_takes_the_compute_spin_window():
    from hyperlane_lab.cli import worker as cli_worker

    parser = argparse.ArgumentParser()
    cli_worker.add_parser(parser.add_subparsers())
    assert parser.parse_args(["worker", "--compute-spin-us", "5000"]).compute_spin_us == 5000
    assert parser.parse_args(["worker"]).compute_spin_us is None  # auto
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--compute-spin-us", "-3"])


@needs_spin
def test_a_worker_runs_its_engine_calls_on_a_spinning_thread_when_told(tmp_path):
    from hyperlane_lab.runtime.worker import Worker

    w = Worker(WorkerConfig(device="cpu", compute_spin_us=1_000_000, cache_dir=str(tmp_path)))
    try:
        assert w._compute.window_s == pytest.approx(1.0)
        assert w._submit(lambda: 41 + 1).result(10) == 42
        assert w._submit(lambda: 1).result(10) == 1
        assert w._compute.spun == 1
    finally:
        w._compute.shutdown(wait=True)
    w2 = Worker(WorkerConfig(device="cpu", cache_dir=str(tmp_path)))
    try:
        assert w2._compute.window_s == 0  # a CPU worker does not spin by default
    finally:
        w2._compute.shutdown(wait=True)


def test_a_call_in_progress_finishes_before_the_interpreter_exits(tmp_path):
    """As with ThreadPoolExecutor: a process that exits without shutdown() lets the running call end (a CUDA
    call cut off by the interpreter's teardown can crash it) and then exits, spinning thread or not."""
    import subprocess
    import sys

    done = tmp_path / "done"
    code = (
        "import time, pathlib\n"
        "from hyperlane_lab.runtime.hot_thread import HotThread\n"
        "h = HotThread('t-exit', 30.0)\n"
        "h.submit(lambda: None).result(10)\n"  # now spinning (30 s window)
        f"h.submit(lambda: (time.sleep(0.3), pathlib.Path({str(done)!r}).write_text('ok')))\n"
        "time.sleep(0.05)\n"
    )
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert done.read_text() == "ok"
    assert time.monotonic() - t0 < 30  # the spin did not hold the exit for its window
