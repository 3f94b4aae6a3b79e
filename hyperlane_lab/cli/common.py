"""Helpers shared by CLI subcommands: generation options and output formatting."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["add_generation_args", "format_table", "print_json", "result_json"]


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="Once upon a time", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)"
    cols = list(columns or rows[0].keys())

    def cell(col: str, value: Any) -> str:
        if col in ("span", "layers") and isinstance(value, (list, tuple)) and len(value) == 2:
            return f"[{value[0]}, {value[1]})"  # layer spans are half-open
        return str(value)

    cells = [[cell(c, r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def result_json(result: Any, stages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "text": result.text,
        "token_ids": list(result.token_ids),
        "stages": stages,
        "timings": result.timings.as_dict(),
    }


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=None))
