"""Opt-in host stamps (``hyperlane_lab.host_stamps``): off by default, one JSON line per step when on, marks
of one thread's step only, and a bad path turns them off instead of failing the worker."""

from __future__ import annotations

import functools
import json
import sys
import threading
import time

import pytest
import torch

from hyperlane_lab import host_stamps as hs_mod
from hyperlane_lab.host_stamps import HostStamps


def _records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_disabled_stamps_do_nothing(tmp_path):
    hs = HostStamps(None)
    hs.begin("prompt", "s", 0)
    hs.mark("x")
    hs.end()
    hs.flush()
    assert not hs.enabled and hs.records == 0 and list(tmp_path.iterdir()) == []


def test_steps_become_json_lines_in_order(tmp_path):
    hs = HostStamps(str(tmp_path / "st_{pid}.jsonl"))
    assert "{pid}" not in hs.path
    hs.mark("ignored")  # no step begun on this thread
    hs.end()
    for step in range(3):
        hs.begin("decode", "sess", step, tokens=1)
        hs.mark("a")
        hs.mark("b")
        hs.end()
    hs.flush()
    lines = _records(hs.path)
    assert [r["step"] for r in lines] == [0, 1, 2] and hs.records == 3
    for r in lines:
        assert [m[0] for m in r["marks"]] == ["begin", "a", "b", "end"]
        times = [m[1] for m in r["marks"]]
        assert times == sorted(times)
        assert (r["kind"], r["session"], r["tokens"]) == ("decode", "sess", 1)


def test_threads_keep_their_own_steps(tmp_path):
    hs = HostStamps(str(tmp_path / "st.jsonl"))
    ready = threading.Barrier(2)

    def run(name: str) -> None:
        hs.begin("prompt", name, 0)
        ready.wait()
        hs.mark(name)
        ready.wait()
        hs.end()

    threads = [threading.Thread(target=run, args=(n,)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hs.flush()
    recs = {r["session"]: [m[0] for m in r["marks"]] for r in _records(hs.path)}
    assert recs == {"t1": ["begin", "t1", "end"], "t2": ["begin", "t2", "end"]}


def test_an_unwritable_path_turns_stamps_off(tmp_path, caplog):
    hs = HostStamps(str(tmp_path / "no_such_dir" / "st.jsonl"))
    hs.begin("prompt", "s", 0)
    hs.end()
    hs.flush()
    assert not hs.enabled and "cannot write" in caplog.text


def test_a_cpu_stage_forward_marks_its_checks(tmp_path, monkeypatch):
    from hyperlane_lab.models import ModelSpec, TorchStage
    from hyperlane_lab.types import LayerSpan

    hs = hs_mod._reset_for_tests(str(tmp_path / "st.jsonl"))
    try:
        spec = ModelSpec("llama", 2, 32, 4, 2, 8, 64, 50)
        st = TorchStage.random(spec, LayerSpan(0, 2), seed=1)
        st.open_session("s", 1, 8)
        hs.begin("prompt", "s", 0)
        st.forward("s", torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
        hs.end()
        hs.flush()
        (rec,) = _records(hs.path)
        assert [m[0] for m in rec["marks"]] == ["begin", "fwd:checked", "end"]
    finally:
        hs_mod._reset_for_tests(None)


@functools.cache
def _summary_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "host_stamps.py"
    spec = importlib.util.spec_from_file_location("bench_host_stamps", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RUSAGE_THREAD is Linux-only")
def test_marks_tell_waiting_from_running(tmp_path):
    """A sleep between two marks is wall time without CPU time and with a voluntary switch; a busy loop is
    CPU time (3 ms of it, however loaded the machine); the summary reports both per interval."""
    hs = HostStamps(str(tmp_path / "st.jsonl"))
    for step in range(3):
        hs.begin("prompt", "s", step, tokens=256, received=time.perf_counter())
        hs.mark("slept")
        time.sleep(0.005)
        hs.mark("spun")
        cpu_end, wall_limit = time.thread_time() + 0.003, time.perf_counter() + 5.0
        while time.thread_time() < cpu_end and time.perf_counter() < wall_limit:
            pass
        hs.end()
    hs.flush()
    recs = _records(hs.path)
    for r in recs:
        assert r["thread"] == threading.current_thread().name
        received, *marks = r["marks"]
        assert len(received) == 2 and all(len(m) == 5 for m in marks)
        (_, t0, c0, v0, _), (_, t1, c1, v1, _), (_, t2, c2, _, _) = marks[1:4]
        assert t1 - t0 >= 0.005 and c1 - c0 < 0.5 * (t1 - t0) and v1 - v0 >= 1  # the sleep: waiting
        # the loop: running (thread CPU time and perf_counter are different clocks: a few µs of slack)
        assert c2 - c1 >= 0.003 and t2 - t1 >= c2 - c1 - 50e-6
    summary = _summary_module().summarize(recs, min_tokens=128)["prompt"]
    slept, spun = summary["slept -> spun"], summary["spun -> end"]
    assert slept["median_us"] >= 5000 and slept["cpu_median_us"] < 0.5 * slept["median_us"]
    assert slept["vcs_mean"] >= 1
    assert spun["cpu_median_us"] >= 3000 and spun["median_us"] >= spun["cpu_median_us"] - 50
    assert "cpu_median_us" not in summary["received -> begin"]  # the other thread's time has no CPU part
    assert summary["begin -> end (whole)"]["n"] == 3
    assert _summary_module().summarize(recs, min_tokens=512) == {}


def test_old_two_field_marks_still_summarize():
    rec = {"kind": "decode", "tokens": 1, "marks": [["begin", 1.0], ["a", 1.000010], ["end", 1.000030]]}
    summary = _summary_module().summarize([rec])["decode"]
    assert round(summary["a -> end"]["median_us"]) == 20 and "cpu_median_us" not in summary["a -> end"]
    assert round(summary["begin -> end (whole)"]["median_us"]) == 30


def test_probe_times_a_loop_and_a_torch_call_before_each_step(tmp_path, monkeypatch):
    monkeypatch.setenv(hs_mod.ENV, str(tmp_path / "st.jsonl"))
    monkeypatch.setenv(hs_mod.PROBE_ENV, "1")
    monkeypatch.setattr(hs_mod, "_INSTANCE", None)
    hs = hs_mod.host_stamps()
    try:
        assert hs.probing
        for step in range(2):
            hs.begin("prompt", "s", step, tokens=256, received=time.perf_counter())
            hs.end()
        hs.flush()
        recs = _records(hs.path)
        assert all(len(r["probe"]) == 4 and min(r["probe"]) > 0 for r in recs)
        # the probe runs between its own mark and "begin": the hand-off (received -> probe) stays clean
        assert all([m[0] for m in r["marks"]] == ["received", "probe", "begin", "end"] for r in recs)
        summary = _summary_module().summarize(recs)["prompt"]
        assert summary["probe"]["n"] == 2 and summary["probe"]["torch call median_us"] > 0
        assert summary["probe -> begin"]["median_us"] >= 0.9 * sum(sorted(r["probe"])[0] for r in recs) / 2
    finally:
        monkeypatch.setattr(hs_mod, "_INSTANCE", None)
    assert not HostStamps(None, probing=True).probing  # nothing to write: no probing either
    for off in ("0", "false", "Off", "no", ""):
        monkeypatch.setenv(hs_mod.PROBE_ENV, off)
        monkeypatch.setattr(hs_mod, "_INSTANCE", None)
        try:
            assert not hs_mod.host_stamps().probing, off
        finally:
            monkeypatch.setattr(hs_mod, "_INSTANCE", None)


def test_platforms_without_switch_counts_leave_them_out(tmp_path, monkeypatch):
    """Where getrusage(RUSAGE_THREAD) is missing the marks carry null switch counts and the summary reports CPU
    time only (no "0 switches" that would read as "never waited")."""
    monkeypatch.setattr(hs_mod, "_switch_reader", lambda: hs_mod._no_switches)
    hs = HostStamps(str(tmp_path / "st.jsonl"))
    hs.begin("prompt", "s", 0, tokens=256)
    hs.mark("a")
    hs.end()
    hs.flush()
    (rec,) = _records(hs.path)
    assert all(m[3] is None and m[4] is None for m in rec["marks"])
    row = _summary_module().summarize([rec])["prompt"]["begin -> a"]
    assert "cpu_median_us" in row and "vcs_mean" not in row and "ivcs_mean" not in row


@pytest.mark.multiprocess
def test_workers_stamp_the_loop_threads_part_of_each_hand_off(tmp_path, monkeypatch, hf_greedy):
    """Real worker processes with ``HYPERLANE_HOST_STAMPS`` set: every tensor frame a worker hands to its compute
    thread leaves a "dispatch" record on the receiving thread (received, begin, decoded, routed, submitted, end,
    in time order), written when the worker stops; the tokens are still transformers' greedy ones."""
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster

    monkeypatch.setenv(hs_mod.ENV, str(tmp_path / "hs_{pid}.jsonl"))  # the worker processes inherit it
    prompt, n = "Once upon a time", 6
    with (
        LocalCluster(2, cache_dir=tmp_path / "cache") as cluster,
        AutoDistributedModel.from_pretrained(None, workers=cluster.addresses, progress=False) as m,
    ):
        assert m.generate(prompt, max_tokens=n).token_ids == hf_greedy(prompt, n)
    files = sorted(tmp_path.glob("hs_*.jsonl"))
    assert len(files) == 2  # one per worker process, written at its stop
    for f in files:
        recs = [r for r in _records(str(f)) if r["kind"] == "dispatch"]
        assert len([r for r in recs if r["tokens"] > 1]) == 1  # the prompt
        assert len(recs) >= n - 1  # and one frame per new token after the first
        for r in recs:
            assert [m[0] for m in r["marks"]] == [
                "received",
                "begin",
                "decoded",
                "routed",
                "submitted",
                "end",
            ]
            times = [m[1] for m in r["marks"]]
            assert times == sorted(times)
