"""Why a GPU worker's prompt-chunk host path is slower than its calls (issue 9): hot loop vs a thread woken per step.

The workers' host stamps (``HYPERLANE_HOST_STAMPS``, s17a/b) put a prompt chunk's host path at ~1.3 ms
(checks ~150 µs, ``CudaStager.upload`` ~300 µs, the stage's checks ~120 µs, the graph's input copy ~100 µs,
``replay`` ~100 µs), several times what ``bench/host_calls.py`` measures for the same calls in a hot loop,
and neither busy polling nor a PM QoS CPU latency changed it. This times one stand-in for that path (numpy
position checks, an upload of a 2 MB pinned frame body, a device copy into a static buffer, a 300-kernel graph
replay, a clone) on a thread fed by a queue, as a worker's compute thread is, in these modes:

- ``hot``: steps back to back;
- ``gap``: a step every ``--gap-ms`` (the thread sleeps in between, as between prompt chunks);
- ``gap+sync``: the same while another thread waits in ``Event.synchronize`` for a long GPU kernel on
  another stream (a worker's completion thread waiting for the previous chunk; CUDA spins by default);
- ``gap+blocking``: the same with that event made with ``blocking=True`` (the waiter sleeps in the driver);
- ``gap+spin``: ``gap``, with the thread waiting for its next step in ``pthread_spin_lock`` (through ctypes: native
  code, the GIL released) instead of on its queue. Its core stays busy.

The thread is the worker's own compute thread (``runtime/hot_thread.HotThread``: without a spin window in every
mode but ``gap+spin``, where the window outlasts the gap). The s17c/s17d figures in bench/RESULTS.md came from an
earlier copy of the script with its own queue-fed thread and the same spin lock.

Per mode: the median wake-up (put -> the thread's start) and the median of each piece, in µs.
Writes ``$OUT/host_cold.json`` (else ``bench/out/host_cold.json``) and prints a table.
Usage: PYTHONPATH=$PWD python3 bench/host_cold.py [--steps 200] [--gap-ms 4] [--modes hot,gap,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PIECES = ("checks", "upload", "input", "replay", "clone")


def _graph(
    dev: torch.device, n_kernels: int = 300
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
    x_in = torch.zeros(256, 4096, dtype=torch.float16, device=dev)
    out = torch.zeros_like(x_in)
    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        out.add_(x_in)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_kernels):
            out.add_(x_in)
    return g, x_in, out


def _step(env: dict[str, Any], marks: list[float]) -> None:
    from hyperlane_lab.runtime.wire import CudaStager

    stager: CudaStager = env["stager"]
    t = time.perf_counter
    positions = env["positions"]
    pos_np = positions.numpy().copy()
    torch.from_numpy(pos_np)
    pos_np.tobytes()
    int((pos_np >= 0).sum())
    int(pos_np.max())
    bool((np.diff(pos_np[0]) == 1).all())
    marks.append(t())
    x_dev, ready = stager.upload(env["body"])
    marks.append(t())
    with torch.cuda.device(env["dev"]):
        env["x_in"].copy_(x_dev)
    marks.append(t())
    env["graph"].replay()
    marks.append(t())
    env["out"].clone()
    ready.synchronize()
    marks.append(t())


def run_mode(env: dict[str, Any], mode: str, steps: int, gap_s: float) -> dict[str, float]:
    from hyperlane_lab.runtime.hot_thread import HotThread

    # the worker's compute thread itself: blocking on its queue, or (gap+spin) spinning for a window longer
    # than the gap, so every step after the first is taken from a spin
    compute = HotThread("host-cold", 10.0 if mode == "gap+spin" else 0.0)
    compute.submit(torch.cuda.set_device, env["dev"]).result(60)
    rows: list[list[float]] = []

    def step(put: float) -> None:
        marks = [put, time.perf_counter()]
        _step(env, marks)
        rows.append(marks)
        torch.cuda.current_stream(env["dev"]).synchronize()

    stop = threading.Event()
    waiter = None
    if mode.startswith("gap+") and mode != "gap+spin":
        blocking = mode == "gap+blocking"
        side = torch.cuda.Stream(env["dev"])

        def wait_loop() -> None:  # a GPU wait that always has something to wait for
            torch.cuda.set_device(env["dev"])
            while not stop.is_set():
                with torch.cuda.stream(side):
                    torch.cuda._sleep(5_000_000)  # a few ms of spinning kernel
                    ev = torch.cuda.Event(blocking=blocking)
                    ev.record(side)
                ev.synchronize()

        waiter = threading.Thread(target=wait_loop, daemon=True)
        waiter.start()
    for _ in range(steps):
        compute.submit(step, time.perf_counter()).result(60)
        if mode != "hot":
            time.sleep(gap_s)
    compute.shutdown()
    stop.set()
    if waiter is not None:
        waiter.join(timeout=60)
    rows = rows[steps // 10 :]  # drop the first tenth (warm-up)
    out = {"wake": statistics.median((r[1] - r[0]) * 1e6 for r in rows)}
    for i, name in enumerate(PIECES):
        out[name] = statistics.median((r[i + 2] - r[i + 1]) * 1e6 for r in rows)
    out["path"] = statistics.median((r[-1] - r[1]) * 1e6 for r in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--gap-ms", type=float, default=4.0)
    ap.add_argument("--modes", default="hot,gap,gap+sync,gap+spin")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/host_cold.json or bench/out/)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("host_cold.py times CUDA calls: run it on a GPU host (the device tool)")
    from hyperlane_lab.runtime.wire import CudaStager

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    pinned = torch.empty(4 << 20, dtype=torch.uint8, pin_memory=True).numpy()
    body = torch.frombuffer(memoryview(pinned)[64 : 64 + (2 << 20)], dtype=torch.float16).view(256, 4096)
    g, x_in, out = _graph(dev)
    env = dict(dev=dev, stager=CudaStager(dev), body=body, graph=g, x_in=x_in, out=out,
               positions=torch.arange(256)[None].clone())  # fmt: skip
    res = {m: run_mode(env, m, args.steps, args.gap_ms / 1e3) for m in args.modes.split(",")}
    meta = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, steps=args.steps,
                gap_ms=args.gap_ms, cpus=len(os.sched_getaffinity(0)))  # fmt: skip
    path = Path(args.out or Path(os.environ.get("OUT") or Path(__file__).parent / "out") / "host_cold.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "us": res}, indent=1))
    cols = ["wake", *PIECES, "path"]
    print(f"# a prompt-like host path on {meta['device']} (median µs)\n")
    print("| mode | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for m, r in res.items():
        print(f"| {m} | " + " | ".join(f"{r[c]:.0f}" for c in cols) + " |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
