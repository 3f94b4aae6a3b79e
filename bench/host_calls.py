"""What each host call on a GPU worker's step path costs, alone and next to a busy Python thread (issue 9).

The s10b host stamps put ~84 µs of "checks" and ~40 µs of replay in a decode hop's dispatch and ~280 µs
in a prompt chunk's ``CudaStager.upload``: more than such calls cost on an idle desktop. This times each
one in a loop on the device host (median of ``--reps`` calls, µs of host wall time, GPU idle unless
noted) so that the stamps can be read as "the call" or "waiting for something else":

- CUDA runtime calls from Python: ``torch.cuda.device`` enter/exit, ``current_stream``, a timing
  event's ``record``, ``elapsed_time`` and ``synchronize`` on finished events;
- ``CudaStager.upload`` of an 8 KB and a 2 MB body held in a pinned pool buffer (a ``frombuffer``
  view, as a frame's payload is), with its wait, and without it ("enqueue only": the call, and the free of
  the returned tensor) with the GPU idle and while a ~1 ms kernel runs on the compute stream; the same copy
  into a device buffer allocated once, with its wait; an 8 KB numpy write into pinned memory;
- ``graph.replay()`` of a one-kernel graph and of a 300-kernel graph;
- ``SocketSender.send`` of an 8 KB and a 2 MB frame to a loopback peer drained by a thread;
- the upload and the 8 KB send again while another Python thread runs pure-Python work that never blocks
  (the worst case of the GIL hand-off a worker's threads pay while another one runs Python).

The loopback peer is a Python thread (it competes for the GIL too). Calls that need a reset between them
(a synchronize, a kernel) take ``reps / 4`` or ``reps / 8`` samples.

Writes ``$OUT/host_calls.json`` (else ``bench/out/host_calls.json``) and prints a table.
Usage: PYTHONPATH=$PWD python3 bench/host_calls.py [--reps 400]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _time(fn: Callable[[], object], reps: int, before: Callable[[], object] | None = None) -> float:
    out = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e6


def _drained_sender(n_max: int) -> tuple[Any, Callable[[], None]]:
    from hyperlane_lab.runtime.sender import SocketSender

    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    stop = threading.Event()

    def drain() -> None:
        conn, _ = ls.accept()
        buf = bytearray(n_max + 4096)
        with conn:
            while not stop.is_set() and conn.recv_into(buf):
                pass

    th = threading.Thread(target=drain, daemon=True)
    th.start()
    host, port = ls.getsockname()
    sender = SocketSender(f"{host}:{port}")

    def close() -> None:
        stop.set()
        sender.close()
        ls.close()

    return sender, close


class _Busy:
    """A Python thread doing pure-Python work (it holds the GIL except at switch intervals)."""

    def __enter__(self) -> _Busy:
        self._stop = False
        self._th = threading.Thread(target=self._spin, daemon=True)
        self._th.start()
        time.sleep(0.01)
        return self

    def _spin(self) -> None:
        x = 0
        while not self._stop:
            x = (x + 1) % 1000

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._th.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=400)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("host_calls.py times CUDA calls: run it on a GPU host (the device tool)")
    from hyperlane_lab.runtime.frame import FrameHeader, FrameKind
    from hyperlane_lab.runtime.wire import CudaStager

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    reps = args.reps
    res: dict[str, float] = {}
    s = torch.cuda.current_stream(dev)
    a, b = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    a.record(s)
    b.record(s)
    torch.cuda.synchronize()

    def in_device() -> None:
        with torch.cuda.device(dev):
            pass

    res["torch.cuda.device enter+exit"] = _time(in_device, reps)
    res["torch.cuda.current_stream"] = _time(lambda: torch.cuda.current_stream(dev), reps)
    res["Event.record (timing)"] = _time(lambda: a.record(s), reps)
    torch.cuda.synchronize()
    res["Event.elapsed_time"] = _time(lambda: a.elapsed_time(b), reps)
    res["Event.synchronize (done)"] = _time(b.synchronize, reps)

    stager = CudaStager(dev)
    pinned = torch.empty(4 << 20, dtype=torch.uint8, pin_memory=True).numpy()  # a pool body
    for label, n in (("8 KB", 8192), ("2 MB", 2 << 20)):
        view = memoryview(pinned)[64 : 64 + n]  # payload after a header, as in a frame
        x = torch.frombuffer(view, dtype=torch.float16)
        dst = torch.empty_like(x, device=dev)

        def upload(x: torch.Tensor = x) -> None:
            _, ev = stager.upload(x)
            ev.synchronize()

        def prealloc(x: torch.Tensor = x, dst: torch.Tensor = dst) -> None:
            with torch.cuda.stream(stager.h2d_stream):
                dst.copy_(x, non_blocking=True)
            stager.h2d_stream.synchronize()

        res[f"upload {label} (+ wait)"] = _time(upload, reps // 4)
        res[f"upload {label} enqueue only"] = _time(
            lambda x=x: stager.upload(x), reps // 4, torch.cuda.synchronize
        )
        res[f"upload {label} enqueue, GPU busy"] = _time(
            lambda x=x: stager.upload(x),
            reps // 8,
            lambda: (torch.cuda.synchronize(), torch.cuda._sleep(2_000_000)),
        )
        res[f"copy into a preallocated buffer {label} (+ wait)"] = _time(prealloc, reps // 4)
        with _Busy():
            res[f"upload {label} enqueue, a busy Python thread"] = _time(
                lambda x=x: stager.upload(x), reps // 8, torch.cuda.synchronize
            )
    torch.cuda.synchronize()
    host = torch.empty(4096, dtype=torch.float16, pin_memory=True).numpy()
    src = torch.randn(4096).half().numpy()
    res["numpy write 8 KB into pinned"] = _time(lambda: host.__setitem__(slice(None), src), reps)

    for n_kernels in (1, 300):
        x = torch.zeros(4096, device=dev)
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(dev)
        with torch.cuda.stream(side):
            for _ in range(2):
                x.add_(1)
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            for _ in range(n_kernels):
                x.add_(1)
        g.replay()
        torch.cuda.synchronize()
        res[f"graph.replay() {n_kernels} kernel(s)"] = _time(g.replay, reps // 4, torch.cuda.synchronize)

    sender, close = _drained_sender(2 << 20)
    try:
        for label, n in (("8 KB", 8192), ("2 MB", 2 << 20)):
            body = memoryview(pinned)[:n]
            h = FrameHeader(FrameKind.TENSOR, "a" * 32, 1, 1, 1, torch.float16, 0, 0, (1, 1, n // 2), n)
            res[f"SocketSender.send {label}"] = _time(lambda h=h, body=body: sender.send(h, body), reps // 4)
        h8 = FrameHeader(FrameKind.TENSOR, "a" * 32, 1, 1, 1, torch.float16, 0, 0, (1, 1, 4096), 8192)
        with _Busy():
            res["SocketSender.send 8 KB, a busy Python thread"] = _time(
                lambda: sender.send(h8, memoryview(pinned)[:8192]), reps // 8
            )
    finally:
        close()

    meta = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, python=sys.version.split()[0],
                switch_interval_s=sys.getswitchinterval(), reps=reps)  # fmt: skip
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "host_calls.json"
    path.write_text(json.dumps({"meta": meta, "us": res}, indent=1))
    print(f"# host calls on {meta['device']} (median µs of host wall time)\n\n| call | µs |\n|---|---:|")
    for k, v in res.items():
        print(f"| {k} | {v:.1f} |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
