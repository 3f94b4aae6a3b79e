"""Loopback hand-off of a prompt-sized frame with the reader's and writer's CPUs shared or kept apart.

A writer process ``sendall``s N bytes to a reader process blocked in ``epoll`` (as a worker's event
loop is); the reader stamps the first byte's arrival and the last byte's. Unpinned, Linux may wake
the reader on the writer's CPU ("wake-affine"), so it reads only after the writer's copy is done;
pinned to different CPUs (what ``hyperlane worker --cpus`` does), both copies can run at once.
Median of the runs after warm-up, per mode; JSON to ``--out`` (default bench/out/socket_affinity.json).

    python bench/socket_affinity.py --sizes 2097152,4194304
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import select
import socket
import statistics
import time
from pathlib import Path
from typing import Any


def _reader(port: int, n: int, reps: int, cpu: int | None, q: Any) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(1)
    q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setblocking(False)
    ep = select.epoll()
    ep.register(conn.fileno(), select.EPOLLIN)
    view = memoryview(bytearray(n))
    for _ in range(reps):
        got, first = 0, 0.0
        while got < n:
            if not ep.poll(5.0):
                raise TimeoutError("no data for 5 s")
            first = first or time.perf_counter()
            while got < n:
                try:
                    k = conn.recv_into(view[got:])
                except BlockingIOError:
                    break
                if k == 0:
                    raise ConnectionError("writer closed early")
                got += k
        q.put((first, time.perf_counter()))
        conn.setblocking(True)
        conn.sendall(b"k")  # ack: the writer starts the next round
        conn.setblocking(False)


def measure(n: int, pinned: bool, reps: int = 40, warmup: int = 5) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    if pinned and len(cpus) < 2:
        raise ValueError("pinning needs at least 2 CPUs")
    q: Any = mp.Queue()
    p = mp.Process(target=_reader, args=(0, n, reps, cpus[-1] if pinned else None, q), daemon=True)
    p.start()
    port = q.get(timeout=30)
    before = os.sched_getaffinity(0)
    try:
        if pinned:
            os.sched_setaffinity(0, {cpus[0]})
        c = socket.create_connection(("127.0.0.1", port))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = memoryview(os.urandom(n))
        rows = []
        for _ in range(reps):
            time.sleep(0.01)  # let the reader go back to sleep in epoll
            t0 = time.perf_counter()
            c.sendall(data)
            t1 = time.perf_counter()
            first, done = q.get(timeout=30)
            c.recv(1)
            rows.append((t1 - t0, first - t0, done - t0))
        c.close()
    finally:
        os.sched_setaffinity(0, before)
        p.join(5)
        if p.is_alive():
            p.terminate()
    rows = rows[warmup:]
    med = [statistics.median(r[i] for r in rows) * 1e6 for i in range(3)]
    return dict(bytes=n, pinned=pinned, send_us=med[0], first_byte_us=med[1], done_us=med[2], runs=len(rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2097152,4194304")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "out" / "socket_affinity.json"
    )
    args = ap.parse_args()
    results = [
        measure(int(n), pinned, args.reps)
        for n in args.sizes.split(",")
        for pinned in (False, True, False, True)
    ]
    print("| bytes | reader/writer CPUs | send µs | first byte µs | all read µs |")
    print("|---:|---|---:|---:|---:|")
    for r in results:
        mode = "apart (pinned)" if r["pinned"] else "any (unpinned)"
        print(
            f"| {r['bytes']} | {mode} | {r['send_us']:.0f} | {r['first_byte_us']:.0f} | {r['done_us']:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(cpus=len(os.sched_getaffinity(0)), results=results), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
