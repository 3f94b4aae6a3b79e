"""Summarize the host stamps GPU workers wrote with ``HYPERLANE_HOST_STAMPS`` (``hyperlane_lab/host_stamps.py``).

Per step kind (prompt / decode / wire) and per interval between consecutive marks (e.g. ``upload ->
fwd:checked``): the median, 90th percentile and count, in µs, plus the whole step (begin -> end). Run a
benchmark with the variable set, then this on the files it left:

    HYPERLANE_HOST_STAMPS=/tmp/hs_{pid}.jsonl PYTHONPATH=$PWD python3 bench/gpu_pipeline.py --parts split4 ...
    python3 bench/host_stamps.py /tmp/hs_*.jsonl [--min-tokens 128]

Writes ``$OUT/host_stamps.json`` when ``$OUT`` is set, else ``bench/out/host_stamps.json``, and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def summarize(records: list[dict[str, Any]], min_tokens: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """{kind: {"a -> b": {"median_us", "p90_us", "n"}}} over the records with at least ``min_tokens`` tokens."""
    spans: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("tokens", 0) < min_tokens:
            continue
        marks = r["marks"]
        for (a, ta), (b, tb) in itertools.pairwise(marks):
            spans[r["kind"]][f"{a} -> {b}"].append((tb - ta) * 1e6)
        begin = next((t for name, t in marks if name == "begin"), marks[0][1])  # not "received"
        spans[r["kind"]]["begin -> end (whole)"].append((marks[-1][1] - begin) * 1e6)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind, by in spans.items():
        out[kind] = {}
        for name, vals in by.items():
            vals.sort()
            out[kind][name] = {
                "median_us": statistics.median(vals),
                "p90_us": vals[min(len(vals) - 1, int(0.9 * len(vals)))],
                "n": len(vals),
            }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--min-tokens", type=int, default=0, help="only steps of at least this many tokens")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    records = []
    for f in args.files:
        with open(f, encoding="utf-8") as fh:
            records += [json.loads(line) for line in fh if line.strip()]
    summary = summarize(records, args.min_tokens)
    out = Path(args.out or Path(os.environ.get("OUT", Path(__file__).parent / "out")) / "host_stamps.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"files": args.files, "records": len(records), "summary": summary}, indent=1))
    for kind, by in summary.items():
        print(
            f"\n{kind} ({max(v['n'] for v in by.values())} steps)\n\n| interval | median µs | p90 µs | n |\n|---|---:|---:|---:|"
        )
        for name, v in by.items():
            print(f"| {name} | {v['median_us']:.0f} | {v['p90_us']:.0f} | {v['n']} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
