"""``hyperlane sweep FILE [--out DIR]``: run a YAML experiment sweep and print its results table.

    hyperlane sweep experiments/partitioners_catalog.yaml
    hyperlane sweep experiments/concurrency_bubbles.yaml --out results/bubbles --columns concurrency,tokens_per_s

Re-running skips the points already finished in the results folder.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a YAML experiment sweep (resumable)",
        description="Run every point of a sweep YAML (base config x grid); results go to a parquet/CSV file.",
    )
    p.add_argument("file", help="sweep YAML, e.g. experiments/partitioners_catalog.yaml")
    p.add_argument(
        "--out", default=None, help="results folder (default: the file's `results:` or results/<name>)"
    )
    p.add_argument("--columns", default=None, help="comma-separated columns to print (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing point")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from hyperlane_lab.sweep import load_config, run_config
    from hyperlane_lab.sweep.store import ResultStore

    cfg = load_config(args.file)
    df = run_config(
        cfg,
        args.out,
        progress=not getattr(args, "no_progress", False),
        fail_fast=getattr(args, "fail_fast", False),
    )
    shown = df
    if getattr(args, "columns", None):
        cols = [c.strip() for c in args.columns.split(",") if c.strip()]
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"no column(s) {missing} in the results; available: {', '.join(df.columns)}")
        shown = df[cols]
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(shown.to_string(index=False))
    folder = args.out if args.out is not None else (cfg.results or f"results/{cfg.name}")
    print(f"\n{len(df)} rows -> {ResultStore(folder).path}")
    failed = int((df["status"] != "ok").sum()) if "status" in df.columns else 0
    if failed:
        print(f"{failed} row(s) failed; see the 'error' column (they run again on the next invocation)")
    return 1 if failed else 0
