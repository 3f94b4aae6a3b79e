"""Summarize the host stamps GPU workers wrote with ``HYPERLANE_HOST_STAMPS`` (``hyperlane_lab/host_stamps.py``).

Per step kind (prompt / decode / wire / complete / dispatch, the loop thread's hand-off) and per interval
between consecutive marks (e.g. ``upload -> fwd:checked``): the median, 90th percentile and count, in µs, plus the whole step (begin -> end); where the marks
carry the thread's CPU time and context switches (files written since the eighteenth session), also the median
CPU time of the interval and its mean voluntary / involuntary switches: wall time far above CPU time with
voluntary switches is waiting (the GIL, a lock), CPU time near the wall time is slow code. Run a benchmark with
the variable set, then this on the files it left:

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


def _intervals(marks: list[list[Any]]) -> list[tuple[str, float, list[float | None] | None]]:
    """(name, wall µs, [CPU µs, voluntary, involuntary switches] or None) per consecutive pair of marks, and the
    whole step from "begin" (not "received") to the last mark."""
    out: list[tuple[str, float, list[float | None] | None]] = []
    for a, b in itertools.pairwise(marks):
        out.append((f"{a[0]} -> {b[0]}", (b[1] - a[1]) * 1e6, _cpu_part(a, b)))
    begin = next((m for m in marks if m[0] == "begin"), marks[0])
    out.append(("begin -> end (whole)", (marks[-1][1] - begin[1]) * 1e6, _cpu_part(begin, marks[-1])))
    return out


def _cpu_part(a: list[Any], b: list[Any]) -> list[float | None] | None:
    """[CPU µs, voluntary, involuntary switches] between two marks (a switch count None where the platform did
    not give one), or None when either mark has no CPU fields."""
    if len(a) < 5 or len(b) < 5:
        return None
    switches = [y - x if x is not None and y is not None else None for x, y in ((a[3], b[3]), (a[4], b[4]))]
    return [(b[2] - a[2]) * 1e6, *switches]


def summarize(records: list[dict[str, Any]], min_tokens: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """{kind: {"a -> b": {"median_us", "p90_us", "n"[, "cpu_median_us", "vcs_mean", "ivcs_mean"]}}} over the
    records with at least ``min_tokens`` tokens (the CPU fields where the marks carry them)."""
    spans: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    extras: dict[str, dict[str, list[list[float | None]]]] = defaultdict(lambda: defaultdict(list))
    probes: dict[str, list[list[float]]] = defaultdict(list)
    for r in records:
        if r.get("tokens", 0) < min_tokens:
            continue
        for name, wall, extra in _intervals(r["marks"]):
            spans[r["kind"]][name].append(wall)
            if extra is not None:
                extras[r["kind"]][name].append(extra)
        if r.get("probe"):
            probes[r["kind"]].append(r["probe"])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind, rows in probes.items():  # HYPERLANE_HOST_STAMPS_PROBE: cold / warm loop and torch call
        names = ("loop", "loop again", "torch call", "torch call again")
        out.setdefault(kind, {})["probe"] = {
            f"{n} median_us": statistics.median(row[i] for row in rows) for i, n in enumerate(names)
        } | {"n": len(rows)}
    for kind, by in spans.items():
        out.setdefault(kind, {})
        for name, vals in by.items():
            vals.sort()
            row = {
                "median_us": statistics.median(vals),
                "p90_us": vals[min(len(vals) - 1, int(0.9 * len(vals)))],
                "n": len(vals),
            }
            ex = extras[kind].get(name)
            if ex:
                row["cpu_median_us"] = statistics.median(e[0] for e in ex)  # CPU time: always there
                for key, i in (("vcs_mean", 1), ("ivcs_mean", 2)):
                    counts = [e[i] for e in ex if e[i] is not None]
                    if counts:
                        row[key] = statistics.fmean(counts)
            out[kind][name] = row
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
        print(f"\n{kind} ({max(v['n'] for v in by.values())} steps)\n")
        print("| interval | median µs | p90 µs | n | CPU median µs | vol. switches | invol. switches |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, v in by.items():
            if name == "probe":
                continue
            cells = [f"{v['cpu_median_us']:.0f}" if "cpu_median_us" in v else ""]
            cells += [f"{v[k]:.2f}" if k in v else "" for k in ("vcs_mean", "ivcs_mean")]
            cpu = " | ".join(cells)
            print(f"| {name} | {v['median_us']:.0f} | {v['p90_us']:.0f} | {v['n']} | {cpu} |")
        if "probe" in by:
            p = by["probe"]
            print(
                f"\nprobe before each step's begin ({p['n']:.0f} steps), median µs: "
                + ", ".join(f"{k.removesuffix(' median_us')} {v:.1f}" for k, v in p.items() if k != "n")
            )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
