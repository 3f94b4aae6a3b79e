"""``bench/gpu_pipeline.py``'s parts: a part run again under its own key (``split2#2``), so that an A/B
comparison can be run as A, B, B#2, A#2 and the order's own effect read off; a worker variant's ``VAR=value``
words become its workers' environment; a part named twice, or a bad suffix, is refused before anything
starts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_pipeline.py"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--parts", "split2,split2"], "part(s) ['split2'] given twice (a split or 70b part runs again under a "
         "key of its own, e.g. split2#2)"),
        (["--parts", "1gpu,1gpu"], "part(s) ['1gpu'] given twice\n"),
        (["--parts", "split2#x"], "unknown part(s) ['split2#x']"),
        (["--parts", "split2@nope#2"], "no --worker-variant named 'nope'"),
        (["--parts", "split2", "--worker-variant", "x=oops --cpus 0"], "'oops' is neither VAR=value"),
        (["--variants", "graph,graph_compile,graph"], "decode variant(s) ['graph'] given twice"),
        (["--variants", "graph_compile,fast"], "unknown decode variant(s) ['fast']; valid: eager, graph,"),
    ],
)  # fmt: skip
def test_bad_part_lists_are_refused_before_anything_runs(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    out = tmp_path / "never.json"
    r = _run([*argv, "--out", str(out / "x.json")], timeout=120)
    assert r.returncode != 0 and message in r.stderr + r.stdout, r.stderr[-2000:]
    assert not out.exists()  # refused before the output folder was made


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_part_runs_again_under_its_own_key_with_a_variants_environment(tmp_path: Path) -> None:
    """split2, then split2@stamps#2 (the same part again, its workers with HYPERLANE_HOST_STAMPS set by the
    variant): two LocalClusters of two real worker processes on loopback, each generating; both results in the
    JSON and the table under their own names, and only the second cluster's workers wrote host stamps."""
    out = tmp_path / "parts.json"
    stamps = tmp_path / "hs"
    stamps.mkdir()
    args = [
        "--parts",
        "split2,split2@stamps#2",
        "--decode-tokens",
        "2",
        "--prefill",
        "8",
        "--reps",
        "1",
        "--ms=",
    ]
    variant = f"stamps=HYPERLANE_HOST_STAMPS={stamps}/hs_{{pid}}.jsonl --compute-spin-us 0"
    r = _run([*args, "--worker-variant", variant, "--out", str(out)], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("split2", "split2@stamps#2"):
        assert "error" not in res[key], res[key].get("error")
        assert res[key]["stages"] == 2 and res[key]["decode"]["tok_s"] > 0
        assert f"| {key} decode |" in r.stdout
        assert res[key]["decode_choices"] == [{}, {}]  # Health's field, read per worker: no CUDA decoder here
    assert res["split2"]["worker_env"] == {} and "--compute-spin-us" not in res["split2"]["worker_flags"]
    assert res["split2@stamps#2"]["worker_env"] == {"HYPERLANE_HOST_STAMPS": f"{stamps}/hs_{{pid}}.jsonl"}
    assert res["split2@stamps#2"]["worker_flags"][-2:] == ["--compute-spin-us", "0"]
    files = sorted(stamps.glob("hs_*.jsonl"))
    assert len(files) == 2, files  # one per worker of the second cluster (a process id each)
    kinds = {json.loads(line)["kind"] for f in files for line in f.read_text().splitlines()}
    assert "dispatch" in kinds or "prompt" in kinds, kinds


def test_choice_summary_names_the_kernels_a_stage_chose() -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_gpu_pipeline_parts", ROOT / "bench" / "gpu_pipeline_parts.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    choice_summary = mod.choice_summary
    timed = {"cublas": 30.0, "64x64w4s3": 25.0}
    choices = {
        "12288x4096": {"triton": True, "us": timed},
        "4096x4096": {"triton": False, "us": {"cublas": 10.0}},
        "22016x4096": {"triton": True, "us": timed},
        "triton_layer": {
            "wqkv": "GemvConfig(block_n=16, block_k=256, num_warps=4, num_stages=4, split_k=1)",
            "w_down": "GemvConfig(block_n=8, block_k=512, num_warps=4, num_stages=3, split_k=2)",
            "wo": "64x64w4s3",
        },
        "triton_layer_pdl": "pdl+prefetch",
    }
    assert choice_summary(choices) == (
        "triton GEMV 2/3 shapes, all-Triton layer (wqkv 16x256w4s4, w_down 8x512w4s3k2, wo 64x64w4s3), "
        "pdl+prefetch"
    )
    assert (
        choice_summary({"4096x4096": {"triton": False, "us": {}}, "pdl": "off"}) == "triton GEMV 0/1 shapes"
    )
    pinned = {
        "4096x4096": {"triton": True, "us": {}, "pinned": "8x512w4s3"},
        "4096x11008": {"triton": True, "us": {}},
    }
    assert choice_summary(pinned) == "triton GEMV 2/2 shapes (1 pinned)"
    pinned["pins_unmatched"] = ["11008x4096"]
    assert choice_summary(pinned) == "triton GEMV 2/2 shapes (1 pinned, 1 pins not in this stage)"
    assert (
        choice_summary({"4096x4096": {"triton": True, "us": {}}, "pdl": "pdl"})
        == "triton GEMV 1/1 shapes, pdl"
    )
    assert choice_summary({}) == "none reported"
    choices["triton_layer_tune"] = {
        "alone": {"wqkv": "16x256w4s4", "wo": "8x512w4s3"},
        "chosen": {"wqkv": "8x512w4s3", "wo": "8x512w4s3"},
        "trials": [{"role": "wqkv", "config": "8x512w4s3", "kept": True}, {"role": "wo", "config": "a"}],
    }
    assert choice_summary(choices).endswith(
        "wo 64x64w4s3), tuned in the step (2 trials, 1 roles changed), pdl+prefetch"
    )


def test_hop_breakdown_of_a_token_loop_through_a_socket_and_in_memory() -> None:
    """``hop_breakdown`` on synthetic one-stage traces (µs): through the worker's own socket the ring frame's
    send comes first, and the segments add up to the token; handed over in memory (no ring send) the next
    step's frame is made before the tokens are sent, so complete and send run beside the next dispatch and
    only compute, handover and dispatch are on the token's path."""
    from hyperlane_lab.types import EventKind, TraceEvent

    spec = importlib.util.spec_from_file_location(
        "bench_gpu_pipeline_parts", ROOT / "bench" / "gpu_pipeline_parts.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def ev(kind: str, a: float, b: float, step: int) -> TraceEvent:
        return TraceEvent(0, EventKind(kind), a * 1e-6, b * 1e-6, "s", step)

    def trace(local: bool) -> list[TraceEvent]:
        out, t = [], 0.0
        for k in range(1, 6):  # step k: frame in at t, GPU t+50 .. t+3050
            out += [ev("receive", t - 5, t, k), ev("compute", t + 50, t + 3050, k)]
            if local:  # next frame made 3100, launched; tokens sent 3200-3220
                out += [ev("send", t + 3200, t + 3220, k)]
                t += 3100
            else:  # ring frame sent 3100-3120, tokens 3130-3150, next frame in 3300
                out += [ev("send", t + 3100, t + 3120, k), ev("send", t + 3130, t + 3150, k)]
                t += 3300
        return out

    sock = mod.hop_breakdown(trace(False), 1, 3300e-6)
    assert {k: round(v * 1e6) for k, v in sock.items()} == {
        "s0_dispatch": 50, "s0_compute": 3000, "s0_complete": 80, "s0_send": 20, "s0_ring_send": 20,
        "client": 150,
    }  # fmt: skip
    mem = mod.hop_breakdown(trace(True), 1, 3100e-6)
    assert {k: round(v * 1e6) for k, v in mem.items()} == {
        "s0_dispatch": 50, "s0_compute": 3000, "s0_complete": 150, "s0_send": 20, "s0_handover": 50, "client": 0,
    }  # fmt: skip


def test_device_sequence_splits_busy_time_among_overlapping_kernels() -> None:
    """``gpu_pipeline.device_sequence``: each event's added time is how far it moves the end of the busy time
    (a PDL kernel that starts early and waits adds only its tail), gaps are idle time, and added plus gaps
    make up the whole span; checked against a brute-force walk over a 0.125 µs grid."""
    import random
    from types import SimpleNamespace as NS

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu_pipeline", SCRIPT)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rng = random.Random(7)
    events, t = [], 0.0
    for _step in range(3):
        for name in ("gemv", "attn", "gemv", "argmax"):
            start = t  # PDL: a kernel may start before the last one ends, never before it started
            if events:
                start = max(events[-1].time_range.start + 0.25, t - rng.choice([0.0, 2.5, 6.0]))
            t = max(t, start) + rng.choice([0.5, 1.0, 3.0, 8.0])
            events.append(NS(name=name, device_type=None, time_range=NS(start=start, end=t)))
            t += rng.choice([0.0, 0.0, 1.5])  # sometimes idle
    seq = mod.device_sequence(list(reversed(events)), steps=3)  # any input order
    assert seq["events_per_step"] == 4 and [e["name"] for e in seq["middle_step"]] == [
        "gemv",
        "attn",
        "gemv",
        "argmax",
    ]
    assert seq["middle_step"][0]["start_us"] == events[4].time_range.start - events[0].time_range.start
    grid = [i * 0.125 for i in range(int(t / 0.125) + 1)]  # every time is a multiple of 0.25
    busy = sum(0.125 for g in grid[:-1] if any(e.time_range.start <= g < e.time_range.end for e in events))
    added = sum(seq["added_us_per_step"].values()) * 3
    assert abs(added - busy) < 1e-6
    assert abs(added + seq["gap_us_per_step"] * 3 - seq["span_us_per_step"] * 3) < 1e-6
    for e in seq["middle_step"]:
        assert 0 <= e["added_us"] <= e["dur_us"]
