"""How much of a hop's dispatch would an *armed* decode graph save? (issue 9, a measurement first)

A worker now dispatches a decode step when its frame arrives: numpy writes into the graph's pinned
inputs, an event record and ``graph.replay()`` from Python. The alternative measured here enqueues
the step *before* the frame arrives: the graph's first kernel spins on a flag in pinned host memory
(mapped into the GPU's address space), so on arrival the host only writes the payload and the flag.

Per mode, the latency from "the frame is here" (t0) to the host seeing the step's result (its end
event passed), median over many steps with idle gaps between them, for a small body (8 KB in, one
kernel, 8 KB out: the hop's own cost) and for a body of ~300 small kernels (a decode stage's node
count: the graph launch's own cost grows with it):

- ``launch``: t0 -> pinned writes -> start.record -> replay -> end.record -> end.synchronize
- ``armed``: (graph already enqueued) t0 -> pinned payload write -> flag write -> end.synchronize

Each step's payload differs from the previous one and every result is checked against the same ops
run on the GPU, so a step that read its input before the flag would show. Note: in ``armed`` mode
the GPU is busy (spinning) when the frame comes, in ``launch`` mode it idled through the gap, so
part of the difference is the GPU's own wake-up from idle; arming buys that too.

    PYTHONPATH=$PWD python3 bench/armed_launch.py [--steps 400] [--out bench/out/armed_launch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

MAX_SPINS = 2_000_000  # ~1-2 s of PCIe reads: a step whose flag never comes cannot hang the stream


@triton.jit
def _wait_flag(flag_ptr, target_ptr, spins_ptr, MAX: tl.constexpr):
    """Spin until the host-written flag reaches the graph's own step counter (or MAX reads)."""
    target = tl.load(target_ptr)
    v = tl.load(flag_ptr, volatile=True)
    n = 0
    while (v < target) & (n < MAX):
        v = tl.load(flag_ptr, volatile=True)
        n += 1
    tl.store(spins_ptr, n)


def _body(x_host: torch.Tensor, x_dev: torch.Tensor, y_host: torch.Tensor, small_kernels: int) -> None:
    x_dev.copy_(x_host, non_blocking=True)
    y = x_dev * 2.0
    for _ in range(small_kernels):
        y.add_(1.0)
    y_host.copy_(y, non_blocking=True)


def _capture(fn: Any) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up (Triton compile, allocator)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def measure(small_kernels: int, steps: int, gap_s: float) -> dict[str, Any]:
    n = 4096  # one fp16 hidden state of a 7B model: 8 KB
    x_host = torch.zeros(n, dtype=torch.float16, pin_memory=True)
    y_host = torch.zeros(n, dtype=torch.float16, pin_memory=True)
    x_dev = torch.zeros(n, dtype=torch.float16, device="cuda")
    flag = torch.zeros(1, dtype=torch.int64, pin_memory=True)  # host-written, read by the GPU
    target = torch.zeros(1, dtype=torch.int64, device="cuda")
    spins = torch.zeros(1, dtype=torch.int32, device="cuda")
    x_np, flag_np = x_host.numpy(), flag.numpy()
    payloads = [torch.randn(n, generator=torch.Generator().manual_seed(s)).half() for s in (0, 1)]
    expect = []  # each payload through the body's ops, on the GPU: the exact result bits
    for p in payloads:
        r = p.cuda() * 2.0
        for _ in range(small_kernels):
            r.add_(1.0)
        expect.append(r.cpu())
    payloads_np = [p.numpy() for p in payloads]
    wrong = 0

    def armed_body() -> None:
        target.add_(1)  # this replay waits for flag >= its own step number
        _wait_flag[(1,)](flag, target, spins, MAX=MAX_SPINS)
        _body(x_host, x_dev, y_host, small_kernels)

    g_launch = _capture(lambda: _body(x_host, x_dev, y_host, small_kernels))
    flag_np[0] = 1 << 62  # lets the capture's warm-up and the capture itself pass
    g_armed = _capture(armed_body)
    target.zero_()
    flag_np[0] = 0
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(), torch.cuda.Event()  # start: the worker records one per step too
    out: dict[str, Any] = {"small_kernels": small_kernels, "steps": steps, "gap_s": gap_s}

    lat, host = [], []
    for i in range(steps + 20):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        x_np[:] = payloads_np[i % 2]
        start.record()
        g_launch.replay()
        end.record()
        t1 = time.perf_counter()
        end.synchronize()
        t2 = time.perf_counter()
        wrong += not torch.equal(y_host, expect[i % 2])
        if i >= 20:
            lat.append(t2 - t0)
            host.append(t1 - t0)
    out["launch_us"] = 1e6 * statistics.median(lat)
    out["launch_p90_us"] = 1e6 * sorted(lat)[int(0.9 * len(lat))]
    out["launch_host_us"] = 1e6 * statistics.median(host)

    lat, host, timeouts = [], [], 0
    g_armed.replay()  # step 1 waits
    end.record()
    for i in range(steps + 20):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        x_np[:] = payloads_np[i % 2]
        flag_np[0] = i + 1  # x86 stores are ordered: the payload is visible before the flag
        t1 = time.perf_counter()
        end.synchronize()
        t2 = time.perf_counter()
        wrong += not torch.equal(y_host, expect[i % 2])
        if int(spins.item()) >= MAX_SPINS:  # read before arming: .item() waits for the stream
            timeouts += 1
        g_armed.replay()  # arm the next step (off the critical path)
        end.record()
        if i >= 20:
            lat.append(t2 - t0)
            host.append(t1 - t0)
    flag_np[0] = 1 << 62  # release the last armed step
    torch.cuda.synchronize()
    out["armed_us"] = 1e6 * statistics.median(lat)
    out["armed_p90_us"] = 1e6 * sorted(lat)[int(0.9 * len(lat))]
    out["armed_host_us"] = 1e6 * statistics.median(host)
    out["armed_timeouts"] = timeouts
    out["saving_us"] = out["launch_us"] - out["armed_us"]
    out["wrong_results"] = wrong  # over both modes
    out["result_ok"] = wrong == 0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--gap-ms", type=float, default=1.0, help="idle time before each step")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.steps < 1 or args.gap_ms < 0:
        ap.error("--steps must be >= 1 and --gap-ms >= 0")
    if not torch.cuda.is_available():
        raise SystemExit("armed_launch.py needs a CUDA GPU (run it through the device tool)")
    rows = [measure(k, args.steps, args.gap_ms / 1e3) for k in (0, 300)]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    path = args.out or Path(os.environ.get("OUT", Path(__file__).parent / "out")) / "armed_launch.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"# armed vs launched graph steps on {meta['device']} (median of {args.steps}, µs)\n")
    print(
        "| body | launch: t0 -> result | of which host calls | armed: t0 -> result | saving | timeouts | result ok |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['small_kernels']} small kernels | {r['launch_us']:.1f} (p90 {r['launch_p90_us']:.1f}) | "
              f"{r['launch_host_us']:.1f} | {r['armed_us']:.1f} (p90 {r['armed_p90_us']:.1f}) | "
              f"{r['saving_us']:.1f} | {r['armed_timeouts']} | {r['result_ok']} |")  # fmt: skip
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
