"""Link probes over the data plane: PING frames of several sizes, echoed as PONG.

latency = half the round trip of the smallest payload; bandwidth = from the slope of round-trip
time over payload size (each byte crosses the link twice), least squares over the sizes.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import torch

from hyperlane_lab.runtime.dataplane import FrameConnection
from hyperlane_lab.runtime.frame import FrameHeader, FrameKind

__all__ = ["fit_link", "probe_connection"]

_ids = itertools.count(1)


def fit_link(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """(size, round_trip_s) samples -> (one-way latency s, bandwidth B/s)."""
    best: dict[int, float] = {}
    for size, rtt in samples:
        best[size] = min(rtt, best.get(size, float("inf")))
    sizes = sorted(best)
    latency = best[sizes[0]] / 2
    if len(sizes) < 2:
        return latency, float("inf")
    n = len(sizes)
    mx = sum(sizes) / n
    my = sum(best[s] for s in sizes) / n
    cov = sum((s - mx) * (best[s] - my) for s in sizes)
    var = sum((s - mx) ** 2 for s in sizes)
    slope = cov / var if var else 0.0  # seconds per byte, round trip (2 crossings)
    bandwidth = 2 / slope if slope > 0 else float("inf")
    return latency, bandwidth


async def probe_connection(
    conn: FrameConnection,
    pongs: dict[int, asyncio.Future[float]],
    sizes: list[int],
    repeats: int,
    timeout: float = 10.0,
) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    samples: list[tuple[int, float]] = []
    for size in sizes:
        payload = bytes(size)
        for _ in range(max(1, repeats)):
            ident = next(_ids) & 0xFFFFFFFF
            fut: asyncio.Future[float] = loop.create_future()
            pongs[ident] = fut
            t0 = time.perf_counter()
            try:
                conn.send(FrameHeader(FrameKind.PING, "", ident, 0, 0, torch.uint8, 0, 0, (), size), payload)
                t1 = await asyncio.wait_for(fut, timeout)
            finally:
                pongs.pop(ident, None)
            samples.append((size, t1 - t0))
    return fit_link(samples)
