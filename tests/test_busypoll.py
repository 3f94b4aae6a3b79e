"""Busy polling (runtime/busypoll.py): the selector's spin / block rules on a socket pair, an asyncio
loop on it, and real workers started with ``--busy-poll-us`` giving transformers' tokens."""

from __future__ import annotations

import asyncio
import selectors
import socket
import sys
import threading
import time

import pytest
import torch

from hyperlane_lab.runtime.busypoll import BusyPollSelector
from hyperlane_lab.runtime.worker_config import WorkerConfig


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _sel(pair, **kw) -> BusyPollSelector:
    sel = BusyPollSelector(**kw)
    sel.register(pair[0], selectors.EVENT_READ, "a")
    return sel


def test_cold_selector_blocks_and_times_out(pair):
    sel = _sel(pair, window_s=10.0)
    t0 = time.monotonic()
    assert sel.select(0.05) == []
    assert 0.04 <= time.monotonic() - t0 < 2.0
    assert sel.spun == 0  # never hot: no event yet, so no spinning
    pair[1].send(b"x")
    (key, ev), *_ = sel.select(1.0)
    assert key.data == "a" and ev & selectors.EVENT_READ
    assert (sel.spun, sel.blocked) == (0, 1)
    sel.close()


def test_hot_selector_spins_for_the_next_event(pair):
    sel = _sel(pair, window_s=5.0)
    pair[1].send(b"x")
    assert sel.select(1.0)  # the event makes it hot
    pair[0].recv(16)
    timer = threading.Timer(0.02, pair[1].send, args=(b"y",))
    timer.start()
    ready = sel.select(None)  # hot: answered by polling, not by blocking
    timer.join()
    assert [k.data for k, _ in ready] == ["a"]
    assert (sel.spun, sel.blocked) == (1, 1)
    sel.close()


def test_hot_selector_honours_the_timeout_and_the_window(pair):
    asked = []

    def spin() -> bool:
        asked.append(time.monotonic())
        return True

    sel = _sel(pair, window_s=0.3, should_spin=spin)
    pair[1].send(b"x")
    assert sel.select(1.0)
    pair[0].recv(16)
    t0 = time.monotonic()
    assert sel.select(0.02) == []  # spins, but no longer than the caller's timeout
    assert asked and time.monotonic() - t0 < 0.25 and asked[-1] - t0 < 0.1
    asked.clear()
    time.sleep(0.35)  # the window has passed: cold again, so it blocks without asking to spin
    assert sel.select(0.03) == [] and asked == [] and sel.spun == 0
    sel.close()


def test_no_spinning_while_the_worker_is_busy(pair):
    calls = []

    def busy() -> bool:
        calls.append(1)
        return False

    sel = _sel(pair, window_s=5.0, should_spin=busy)
    pair[1].send(b"x")
    assert sel.select(1.0)
    pair[0].recv(16)
    threading.Timer(0.02, pair[1].send, args=(b"y",)).start()
    assert sel.select(2.0)
    assert sel.spun == 0 and sel.blocked == 2 and calls  # asked, refused, blocked instead
    sel.close()


def test_window_zero_never_spins_and_bad_windows_are_refused(pair):
    sel = _sel(pair, window_s=0.0)
    pair[1].send(b"x")
    assert sel.select(1.0) and sel.select(1.0)
    assert sel.spun == 0
    sel.close()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="busy-poll window"):
            BusyPollSelector(bad)


def test_asyncio_loop_on_the_selector_echoes_over_loopback():
    """An asyncio client on the selector, a peer thread that answers each message 2 ms later: the
    replies are found by polling (after empty polls), as a stage's next frame would be."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def peer() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(64):
                time.sleep(0.002)
                conn.sendall(data)

    th = threading.Thread(target=peer, daemon=True)
    th.start()
    sel = BusyPollSelector(1.0)
    loop = asyncio.SelectorEventLoop(sel)

    async def main() -> list[bytes]:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        got = []
        for i in range(20):
            w.write(b"m%02d" % i)
            await w.drain()
            got.append(await asyncio.wait_for(r.readexactly(3), 10))
        w.close()
        await w.wait_closed()
        return got

    try:
        assert loop.run_until_complete(main()) == [b"m%02d" % i for i in range(20)]
    finally:
        loop.close()
        srv.close()
        th.join(10)
    assert sel.spun >= 10  # the replies (after the first) were picked up by polling


def test_worker_config_checks_the_busy_poll_settings():
    assert WorkerConfig(busy_poll_us=500).busy_poll_us == 500
    for bad in (-1, 2_000_000):
        with pytest.raises(ValueError, match="busy_poll_us must be 0"):
            WorkerConfig(busy_poll_us=bad)
    with pytest.raises(ValueError, match="switch_interval_us must be > 0"):
        WorkerConfig(switch_interval_us=0)


def test_busy_polling_is_on_by_default_only_for_cuda_workers_with_cpus_to_spare(monkeypatch):
    """Auto (no ``busy_poll_us``): a CPU worker never spins; a CUDA worker spins for 20 ms when it has at
    least 4 usable CPUs per GPU it shares them with (every visible GPU, or its own alone when it was
    given CPUs with ``cpus``); an explicit value (0 = off) always wins."""
    from hyperlane_lab.runtime import cpus
    from hyperlane_lab.runtime import worker_config as wc
    from hyperlane_lab.runtime.server import _loop_for

    assert WorkerConfig().busy_poll_us is None
    assert wc.busy_poll_window_us(WorkerConfig(device="cpu")) == 0
    loop, sel = _loop_for(WorkerConfig(device="cpu"))
    assert sel is None
    loop.close()
    monkeypatch.setattr(wc, "resolve_device", lambda d: torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    on = wc.AUTO_BUSY_POLL_US
    for n_cpus, want, want_pinned in ((8, on, on), (7, 0, on), (3, 0, 0), (64, on, on)):
        monkeypatch.setattr(cpus, "usable_cpus", lambda n=n_cpus: n)
        assert wc.busy_poll_window_us(WorkerConfig(device="cuda:0")) == want, n_cpus
        assert wc.busy_poll_window_us(WorkerConfig(device="cuda:0", cpus="0-1")) == want_pinned, n_cpus
        assert wc.busy_poll_window_us(WorkerConfig(device="cuda:0", busy_poll_us=0)) == 0
        assert wc.busy_poll_window_us(WorkerConfig(device="cuda:0", busy_poll_us=300)) == 300
    loop, sel = _loop_for(WorkerConfig(device="cuda:0"))
    assert isinstance(sel, BusyPollSelector) and sel.window_s == pytest.approx(on / 1e6)
    loop.close()


def test_usable_cpus_honours_a_container_quota(tmp_path):
    """The process's CPU affinity, capped by a cgroup v2 quota (``cpu.max``: quota and period in µs, or
    ``max``); an unreadable or malformed file leaves the affinity."""
    import os

    from hyperlane_lab.runtime.cpus import usable_cpus

    n = len(os.sched_getaffinity(0))
    f = tmp_path / "cpu.max"
    for text, want in (("max 100000", n), ("150000 100000", min(n, 1)), ("50000 100000", 1), ("x y", n)):
        f.write_text(text + "\n")
        assert usable_cpus(f) == want, text
    assert usable_cpus(tmp_path / "missing") == n
    f.write_text(f"{(n + 4) * 100000} 100000\n")
    assert usable_cpus(f) == n  # a quota above the affinity does not raise it


def test_loop_for_sets_the_switch_interval():
    from hyperlane_lab.runtime.server import _loop_for

    before = sys.getswitchinterval()
    try:
        loop, sel = _loop_for(WorkerConfig(busy_poll_us=2000))
        assert isinstance(sel, BusyPollSelector) and sel.window_s == pytest.approx(0.002)
        assert sys.getswitchinterval() == pytest.approx(before)  # left alone unless asked
        loop.close()
        loop, sel = _loop_for(WorkerConfig(switch_interval_us=250, busy_poll_us=0))
        assert sel is None and sys.getswitchinterval() == pytest.approx(250e-6)
        loop.close()
    finally:
        sys.setswitchinterval(before)


@pytest.mark.multiprocess
def test_busy_polling_workers_generate_transformers_tokens(tmp_path, hf_greedy):
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

    flags = ["--busy-poll-us", "20000", "--switch-interval-us", "200"]
    with (
        LocalCluster(2, cache_dir=tmp_path / "c", extra_args=flags) as cluster,
        AutoDistributedModel.from_pretrained(None, workers=cluster.addresses, progress=False) as model,
    ):
        for prompt in ("Once upon a time", "The cat sat on the mat"):
            assert model.generate(prompt, max_tokens=24).token_ids == hf_greedy(prompt, 24)
        outs = model.generate(["Lily went", "Tom saw a"], max_tokens=12)
        assert [o.token_ids for o in outs] == [hf_greedy("Lily went", 12), hf_greedy("Tom saw a", 12)]
        health = [c.call("Health", pb.HealthRequest()) for c in model.clients]
        choices = model.decode_choices()
    # decode kernel choices only when asked for (a clock probe stays cheap); CPU stages have none to report
    assert [h.decode_choices for h in health] == ["", ""] and choices == [{}, {}]
    # every worker picked frames up by polling (and the counters reach the control plane)
    assert all(h.busy_poll_spun > 0 for h in health), health
