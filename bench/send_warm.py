"""Does a hop get faster if its path is used shortly before the frame goes? A loopback probe, no GPU.

A pipeline stage sends one frame per token after ~2 ms of waiting for its GPU step, to a receiver that has been
spinning (busy polling) for as long. On the H200 hosts the worker's ``sendmsg`` of such a frame took 54-67 µs
(gpu_notes, eighteenth and twenty-ninth sessions), against ~13 µs one-way in a back-to-back ping-pong, and the
last stage's second send right after it took half its first. This measures, for an 8 KB frame sent every
``--gap`` seconds from one process to another whose receiver polls a non-blocking socket with ``select(0)``
in Python (as ``runtime/busypoll.py`` does):

  send_us   the sender's ``sendmsg`` call (what the worker's "send" segment times)
  one_way   the sender's clock before the call -> the receiver's clock with the whole frame (same host)

in three interleaved modes: ``plain`` (the sender idles, then sends), ``warm`` (a 16-byte no-op frame on the
same connection ``--lead`` seconds before the frame, which the receiver reads and drops) and ``warm_local``
(``--lead`` before, the sender runs the frame's Python path without the system call). The sender idles by
spinning (``--idle spin``: a worker's completion thread waits in ``cudaEventSynchronize``, which spins) or
sleeping. Writes JSON (``$OUT/send_warm.json`` or ``bench/out/send_warm.json``) and prints a table.

Usage: python bench/send_warm.py [--gap 0.0019] [--lead 0.0001] [--reps 600] [--idle spin|sleep]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import selectors
import socket
import statistics
import struct
import time
from pathlib import Path
from typing import Any

N = 8192 + 72  # a 4096-wide fp16 hidden state + header and position
HEAD = struct.Struct("=BIxxxd")  # kind (0 frame, 1 no-op), body length, the sender's clock
MODES = ("plain", "warm", "warm_local")


def _recv_exact(sock: socket.socket, view: memoryview, n: int, sel: selectors.BaseSelector) -> None:
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:n])
        except BlockingIOError:
            sel.select(0)
            continue
        if k == 0:
            raise ConnectionError("sender closed")
        got += k


def _receiver(port_q: Any, result_q: Any, reps: int) -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    port_q.put(ls.getsockname()[1])
    sock, _ = ls.accept()
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    buf = bytearray(N + HEAD.size)
    view = memoryview(buf)
    arrivals: list[tuple[float, float]] = []
    while len(arrivals) < reps:
        while not sel.select(0):  # busy polling, the GIL dropped and taken back per poll as the worker's loop
            pass
        _recv_exact(sock, view, HEAD.size, sel)
        kind, n, t0 = HEAD.unpack_from(buf)
        _recv_exact(sock, view[HEAD.size :], n, sel)
        if kind == 0:
            arrivals.append((t0, time.perf_counter()))
    result_q.put(arrivals)
    sock.close()


def _idle_until(deadline: float, spin: bool) -> None:
    if not spin:
        left = deadline - time.perf_counter()
        if left > 0:
            time.sleep(left)
    while time.perf_counter() < deadline:
        pass


def _frame(kind: int, body: bytes | bytearray) -> list[memoryview]:
    return [memoryview(HEAD.pack(kind, len(body), time.perf_counter())), memoryview(body).cast("B")]


def run(gap: float, lead: float, reps: int, spin: bool) -> dict[str, Any]:
    port_q: Any = mp.Queue()
    result_q: Any = mp.Queue()
    proc = mp.Process(target=_receiver, args=(port_q, result_q, reps * len(MODES)), daemon=True)
    proc.start()
    try:
        sock = socket.create_connection(("127.0.0.1", port_q.get(timeout=30)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body, noop = bytes(N), bytes(8)
        sends: dict[str, list[float]] = {m: [] for m in MODES}
        order: list[str] = []
        for i in range(reps * len(MODES)):
            mode = MODES[i % len(MODES)]
            order.append(mode)
            start = time.perf_counter()
            if mode == "warm":
                _idle_until(start + gap - lead, spin)
                sock.sendmsg(_frame(1, noop))
            elif mode == "warm_local":
                _idle_until(start + gap - lead, spin)
                _frame(0, body)  # the frame's Python path, no system call
            _idle_until(start + gap, spin)
            parts = _frame(0, body)
            t0 = time.perf_counter()
            sock.sendmsg(parts)
            sends[mode].append(time.perf_counter() - t0)
        arrivals = result_q.get(timeout=60)
        sock.close()
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    one_way: dict[str, list[float]] = {m: [] for m in MODES}
    for mode, (t0, t1) in zip(order, arrivals, strict=True):
        one_way[mode].append(t1 - t0)
    skip = min(20, reps // 10)
    out: dict[str, Any] = {}
    for m in MODES:
        s, w = sends[m][skip:], one_way[m][skip:]
        out[m] = {
            "send_us_median": statistics.median(s) * 1e6,
            "send_us_p90": statistics.quantiles(s, n=10)[-1] * 1e6,
            "one_way_us_median": statistics.median(w) * 1e6,
            "one_way_us_p90": statistics.quantiles(w, n=10)[-1] * 1e6,
            "n": len(s),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gap", type=float, default=0.0019, help="seconds between frames (a stage's GPU step)")
    ap.add_argument(
        "--lead", type=float, default=0.0001, help="the warm-up this many seconds before the frame"
    )
    ap.add_argument("--reps", type=int, default=600, help="frames per mode")
    ap.add_argument("--idle", choices=("spin", "sleep"), default="spin")
    args = ap.parse_args()
    if not (0 < args.lead < args.gap):
        raise SystemExit(f"--lead must be between 0 and --gap ({args.gap}), got {args.lead}")
    res = {
        "gap_s": args.gap,
        "lead_s": args.lead,
        "idle": args.idle,
        "cpus": os.cpu_count(),
        "modes": run(args.gap, args.lead, args.reps, args.idle == "spin"),
    }
    out_dir = Path(os.environ.get("OUT", Path(__file__).parent / "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "send_warm.json").write_text(json.dumps(res, indent=1))
    print(f"gap {args.gap * 1e6:.0f} us, warm-up {args.lead * 1e6:.0f} us before, idle by {args.idle}")
    print("| mode | send (us, median / p90) | one way (us, median / p90) |")
    print("|---|---|---|")
    for m, r in res["modes"].items():
        print(
            f"| {m} | {r['send_us_median']:.1f} / {r['send_us_p90']:.1f} | "
            f"{r['one_way_us_median']:.1f} / {r['one_way_us_p90']:.1f} |"
        )


if __name__ == "__main__":
    main()
