"""What "% of copy bandwidth" a codec kernel would score if it had the copy's own fixed cost and bandwidth.

``bench/codec_kernels.py`` rates a kernel by its bytes read + written per second against a device-to-device copy of
the same input in the same run. A copy's time is close to a fixed cost (launch, ramp-up, tail) plus its bytes over
a bandwidth; fitted to the copy rows of one run (sizes from ``--min-mb``), ``t = t0 + bytes / bw``. An encoder
reads the input and writes a smaller payload, so if it paid the same ``t0`` and moved its bytes at the same ``bw``
it would score ``(bytes / t) / (copy bytes / copy t)``, below 100% wherever ``t0`` is not negligible. That
figure, next to the measured one, says how much of a miss is the kernel and how much the metric. It is a model,
not a bound: a kernel whose fixed cost is smaller than the copy's (the decoders, which write most of their bytes)
scores above it.

Usage: python bench/copy_model.py bench/out/codec_kernels_h100_s11c.json [more.json ...] [--min-mb 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

MB = 1 << 20


def copy_model(rows: list[dict[str, Any]], min_bytes: int = 16 * MB) -> tuple[float, float]:
    """Least-squares ``(t0 µs, µs per byte moved)`` of the copy rows (``op == "copy"``) of at least ``min_bytes``
    of input; a copy moves twice its input. ValueError without two such sizes."""
    pts = [
        (2.0 * r["size_bytes"], float(r["us"]))
        for r in rows
        if r["op"] == "copy" and r["size_bytes"] >= min_bytes
    ]
    if len({x for x, _ in pts}) < 2:
        raise ValueError(f"need copy rows of at least two sizes >= {min_bytes} bytes, got {len(pts)}")
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - slope * mx, slope


def expected_pct(size_bytes: int, payload_bytes: int, model: tuple[float, float]) -> float:
    """% of the copy's bandwidth (bytes read + written per second) that a kernel moving ``size_bytes`` +
    ``payload_bytes`` reaches with the copy's fixed cost and bandwidth (``copy_model``)."""
    t0, per_byte = model
    moved, copy_moved = size_bytes + payload_bytes, 2 * size_bytes
    return 100.0 * (moved / (t0 + per_byte * moved)) / (copy_moved / (t0 + per_byte * copy_moved))


def expected_rows(rows: list[dict[str, Any]], min_bytes: int = 16 * MB) -> list[dict[str, Any]]:
    """Each kernel row (``impl == "kernel"``) of at least ``min_bytes``, with its expected % (``expected_pct``) and
    the measured % as a share of it."""
    model = copy_model(rows, min_bytes)
    out = []
    for r in rows:
        if r["impl"] == "kernel" and r["size_bytes"] >= min_bytes and r.get("payload_bytes"):
            exp = expected_pct(r["size_bytes"], r["payload_bytes"], model)
            out.append(dict(op=r["op"], codec=r["codec"], mb=r["size_bytes"] // MB, pct_copy=r["pct_copy"],
                            expected_pct=exp, of_expected=100.0 * r["pct_copy"] / exp))  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="codec_kernels.py JSON files")
    ap.add_argument("--min-mb", type=int, default=16, help="smallest size fitted and shown")
    args = ap.parse_args()
    for f in args.files:
        data = json.loads(f.read_text())
        t0, per_byte = copy_model(data["sizes"], args.min_mb * MB)
        print(
            f"\n# {f.name}: {data['meta'].get('device', '?')}; copy = {t0:.2f} µs + bytes at {1e-3 / per_byte:.0f} GB/s\n"
        )
        print("| op | codec | MB | % of copy | at the copy's cost | measured / that |")
        print("|---|---|---:|---:|---:|---:|")
        for r in expected_rows(data["sizes"], args.min_mb * MB):
            print(f"| {r['op']} | {r['codec']} | {r['mb']} | {r['pct_copy']:.1f}% | {r['expected_pct']:.1f}% | "
                  f"{r['of_expected']:.1f}% |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
