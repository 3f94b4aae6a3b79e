"""Opt-in host stamps (``hyperlane_lab.host_stamps``): off by default, one JSON line per step when on, marks
of one thread's step only, and a bad path turns them off instead of failing the worker."""

from __future__ import annotations

import json
import threading

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
