"""Bulk hand-off over loopback TCP: the project's transport vs a bare socket (issue 9, prompt frames).

A prompt step hands a [S, H] hidden state (4 MB for 512 tokens of a 4096-wide fp16 model) from one
worker to the next. This times, for each size, one frame from a sending thread to the time the
receiver has all of it: (a) ``SocketSender`` -> the asyncio ``FrameConnection`` a worker uses,
on one connection and striped over several (``--transport-stripes``: ``hyperlane worker --stripes``,
runtime/stripes.py), (b) a bare socket: ``sendall`` in one thread, a ``recv_into`` loop in another,
on one connection and over several (``--streams``). Medians of 10 after 2 warm-ups; JSON to
$OUT/socket_bulk.json (or --out).

    PYTHONPATH=$PWD python3 bench/socket_bulk.py --sizes-mb 1,2,4,16 --transport-stripes 2,3,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from hyperlane_lab.runtime.dataplane import READ_TIMEOUT_S, BufferPool, start_server
from hyperlane_lab.runtime.frame import MAX_PAYLOAD, FrameHeader, FrameKind
from hyperlane_lab.runtime.sender import SocketSender
from hyperlane_lab.runtime.stripes import MIN_PART, StripeRegistry

REPS = 12


def transport_s(n: int, stripes: int = 1) -> float:
    """One tensor frame of ``n`` body bytes through the project's transport (split over ``stripes``
    connections when > 1, as a worker started with ``--stripes`` sends a prompt's hidden state)."""
    arrived: list[float] = []
    ev = threading.Event()

    def on_frame(conn: Any, frame: Any) -> None:
        arrived.append(time.perf_counter())
        frame.body.release()
        ev.set()

    async def main() -> list[float]:
        registry = StripeRegistry(READ_TIMEOUT_S, MAX_PAYLOAD)
        srv = await start_server("127.0.0.1", 0, on_frame, BufferPool(), stripes=registry)
        port = srv.sockets[0].getsockname()[1]
        times: list[float] = []

        def client() -> None:
            snd = SocketSender(f"127.0.0.1:{port}", stripes=stripes, stripe_from=MIN_PART)
            positions, payload = memoryview(bytearray(8)), memoryview(bytearray(n - 8))
            for i in range(REPS):
                ev.clear()
                t0 = time.perf_counter()
                h = FrameHeader(FrameKind.TENSOR, "", i, 1, 1, torch.uint8, 0, 0, (n - 8,), n - 8)
                snd.send(h, positions, payload)
                if not ev.wait(30):
                    raise TimeoutError("frame did not arrive")
                times.append(arrived[-1] - t0)
            snd.close()

        th = threading.Thread(target=client)
        th.start()
        while th.is_alive():
            await asyncio.sleep(0.005)
        srv.close()
        registry.close()
        return times

    return statistics.median(asyncio.run(main())[2:])


def bare_s(n: int, streams: int = 1) -> float:
    """One buffer over ``streams`` connections at once (stripe i on connection i, a sending and a receiving
    thread per connection), from the first send to the last byte received: a bare socket's hand-off, and
    what striping a frame over several connections would give (NCCL's socket transport does that)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(streams)
    cuts = [n * i // streams for i in range(streams + 1)]
    got_all = threading.Barrier(streams + 1)  # each receiver, then the timer
    go = [threading.Event() for _ in range(REPS)]
    stamps: list[list[float]] = [[] for _ in range(streams)]

    def rx(i: int, c: socket.socket) -> None:
        mv = memoryview(bytearray(n))[cuts[i] : cuts[i + 1]]
        for _ in range(REPS):
            got = 0
            while got < len(mv):
                got += c.recv_into(mv[got:], len(mv) - got)
            stamps[i].append(time.perf_counter())
            got_all.wait(30)
        c.close()

    def tx(i: int, s: socket.socket) -> None:
        payload = memoryview(bytearray(n))[cuts[i] : cuts[i + 1]]
        for r in range(REPS):
            if not go[r].wait(30):
                raise TimeoutError("no start signal")
            s.sendall(payload)

    senders = []
    for i in range(streams):
        s = socket.create_connection(srv.getsockname())
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c, _ = srv.accept()
        threading.Thread(target=rx, args=(i, c), daemon=True).start()
        senders.append((threading.Thread(target=tx, args=(i, s), daemon=True), s))
    for th, _ in senders:
        th.start()
    times = []
    for r in range(REPS):
        t0 = time.perf_counter()
        go[r].set()
        got_all.wait(30)
        times.append(max(st[r] for st in stamps) - t0)
    for th, s in senders:
        th.join(30)
        s.close()
    srv.close()
    return statistics.median(times[2:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="1,4,16")
    ap.add_argument("--streams", default="2,4", help="bare sockets striped over this many connections too")
    ap.add_argument("--transport-stripes", default="2,3,4", help="the transport striped over this many too")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for mb in [float(x) for x in args.sizes_mb.split(",")]:
        n = int(mb * (1 << 20))
        t, b = transport_s(n), bare_s(n)
        striped = {int(k): bare_s(n, int(k)) for k in args.streams.split(",") if k}
        t_striped = {int(k): transport_s(n, int(k)) for k in args.transport_stripes.split(",") if k}
        rows.append(
            {
                "bytes": n,
                "transport_s": t,
                "bare_s": b,
                "transport_gb_s": n / t / 1e9,
                "bare_gb_s": n / b / 1e9,
                "bare_striped_s": striped,
                "transport_striped_s": t_striped,
            }
        )
        more = "".join(f", {k} streams {v * 1e3:.2f} ms ({n / v / 1e9:.2f} GB/s)" for k, v in striped.items())
        more += "".join(f", transport x{k} {v * 1e3:.2f} ms" for k, v in t_striped.items())
        print(f"{mb:g} MB: transport {t * 1e3:.2f} ms ({n / t / 1e9:.2f} GB/s), bare socket {b * 1e3:.2f} ms "
              f"({n / b / 1e9:.2f} GB/s){more}, ratio {b / t:.2f}", flush=True)  # fmt: skip
    out = Path(args.out or Path(os.environ.get("OUT", "bench/out")) / "socket_bulk.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
