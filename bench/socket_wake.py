"""How long a loopback message takes to reach a receiver that has been idle, by receiver style.

A pipeline stage waits ~2-3 ms for the previous stage (its GPU step) between frames, unlike a
ping-pong loop, so its core may drop into a deep idle state; waking it adds latency to every
hop. This measures one-way delivery (sender's clock -> receiver's clock, same host) of an 8 KB
message after ``--gap`` seconds of idleness, for receivers that:

  blocking   block in ``recv_into`` (a thread)
  asyncio    an asyncio BufferedProtocol (what the workers use), header then body
  spin       poll a non-blocking socket in a loop (``recv_into`` until data; burns a core)

Prints a table and writes JSON (``$OUT/socket_wake.json`` or ``bench/out/socket_wake.json``).
Usage: python bench/socket_wake.py [--gap 0.0025] [--reps 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import threading
import time
from pathlib import Path
from typing import Any

N = 8192 + 72  # a 4096-wide fp16 hidden state + header and position


def _pair() -> tuple[socket.socket, socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    a = socket.create_connection(ls.getsockname())
    b, _ = ls.accept()
    ls.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def _send_loop(a: socket.socket, gap: float, reps: int) -> None:
    payload = bytearray(N)
    for _ in range(reps):
        time.sleep(gap)
        struct.pack_into("d", payload, 0, time.perf_counter())
        a.sendall(payload)


def _blocking(b: socket.socket, reps: int, out: list[float], spin: bool) -> None:
    buf = bytearray(N)
    view = memoryview(buf)
    if spin:
        b.setblocking(False)
    for _ in range(reps):
        got = 0
        while got < N:
            try:
                got += b.recv_into(view[got:])
            except BlockingIOError:
                continue
        out.append(time.perf_counter() - struct.unpack_from("d", buf, 0)[0])


class _Proto(asyncio.BufferedProtocol):
    def __init__(self, out: list[float], done: asyncio.Future[None], reps: int) -> None:
        self.buf, self.got, self.out, self.done, self.reps = bytearray(N), 0, out, done, reps

    def get_buffer(self, sizehint: int) -> memoryview:
        # header first, then the rest, as dataplane.FrameConnection does
        end = 64 if self.got < 64 else N
        return memoryview(self.buf)[self.got : end]

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes
        if self.got >= N:
            self.got = 0
            self.out.append(time.perf_counter() - struct.unpack_from("d", self.buf, 0)[0])
            if len(self.out) >= self.reps and not self.done.done():
                self.done.set_result(None)


def _asyncio(b: socket.socket, reps: int, out: list[float]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        await loop.connect_accepted_socket(lambda: _Proto(out, done, reps), b)
        await done

    asyncio.run(main())


def measure(style: str, gap: float, reps: int) -> dict[str, Any]:
    """Receiver in this process, sender in a child process (as between two workers)."""
    import multiprocessing as mp

    a, b = _pair()
    out: list[float] = []
    if style == "asyncio":
        t = threading.Thread(target=_asyncio, args=(b, reps, out))
    else:
        t = threading.Thread(target=_blocking, args=(b, reps, out, style == "spin"))
    t.start()
    time.sleep(0.05)
    sender = mp.get_context("fork").Process(target=_send_loop, args=(a, gap, reps))
    sender.start()
    sender.join(timeout=60)
    t.join(timeout=30)
    a.close()
    b.close()
    xs = sorted(out[reps // 10 :])
    return {
        "style": style,
        "gap_s": gap,
        "n": len(xs),
        "median_us": statistics.median(xs) * 1e6,
        "p90_us": xs[int(0.9 * len(xs))] * 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gap", type=float, default=0.0025)
    ap.add_argument("--reps", type=int, default=400)
    args = ap.parse_args()
    rows = [measure(s, g, args.reps) for g in (0.0, args.gap) for s in ("blocking", "asyncio", "spin")]
    try:  # the same with a PM QoS CPU-latency limit of 0 µs held (what `worker --cpu-latency-us 0` does)
        from hyperlane_lab.runtime.worker import hold_cpu_latency

        qos = hold_cpu_latency(0)
    except (OSError, ImportError) as e:
        print(f"(no PM QoS rows: {e})")
    else:
        with qos:
            for s in ("blocking", "asyncio"):
                r = measure(s, args.gap, args.reps)
                r["style"] += " + cpu-latency 0"
                rows.append(r)
    print("| receiver | idle gap | one-way median | p90 |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['style']} | {r['gap_s'] * 1e3:.1f} ms | {r['median_us']:.0f} µs | {r['p90_us']:.0f} µs |"
        )
    out_dir = os.environ.get("OUT")
    path = (
        Path(out_dir) / "socket_wake.json" if out_dir else Path(__file__).parent / "out" / "socket_wake.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host_cpus": os.cpu_count(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
