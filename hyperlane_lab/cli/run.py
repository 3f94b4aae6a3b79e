"""``hyperlane run MODEL --prompt ... --stages N``: generate text once and print it (or JSON)."""

from __future__ import annotations

import argparse

from hyperlane_lab.cli.common import (
    add_generation_args,
    format_table,
    generation_kwargs,
    print_json,
    result_json,
)

__all__ = ["add_parser", "cpus_arg", "prefill_chunk_arg", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="generate text with a model split into stages")
    p.add_argument(
        "model", nargs="?", default=None, help="HF folder, .gguf file or hub id (default: bundled)"
    )
    p.add_argument("--stages", type=int, default=None, help="number of in-process stages (default 1)")
    p.add_argument(
        "--workers", default=None, help="host:port,... of running workers, or N to start N locally"
    )
    p.add_argument("--partitioner", default="uniform", help="how to split layers over workers")
    p.add_argument(
        "--prefill-chunk",
        type=prefill_chunk_arg,
        default="auto",
        help="with --workers: prompt tokens per frame down the pipeline: auto (default), none (the whole "
        "prompt in one frame) or an int >= 2",
    )
    p.add_argument(
        "--cpus",
        type=cpus_arg,
        default="",
        help="with --workers N: keep each local worker on its share of the CPUs near its GPU (auto) or on "
        "a list (0-7); see `hyperlane worker --cpus`",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_generation_args(p)
    p.set_defaults(func=run)


def prefill_chunk_arg(text: str) -> int | str | None:
    """``--prefill-chunk``: "auto", "none" or an int >= 2 (``AutoDistributedModel.prefill_chunk``)."""
    low = text.strip().lower()
    if low in ("auto", "none"):
        return None if low == "none" else "auto"
    try:
        n = int(low)
    except ValueError:
        n = 0
    if n < 2:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a chunk size: use auto, none, or an int >= 2 (prompt tokens per frame)"
        )
    return n


def cpus_arg(text: str) -> str:
    """``--cpus``: "auto", a CPU list such as 0-7,16-23 (checked here, resolved by each worker), or ""."""
    if text.strip() in ("", "auto"):  # "" (the default): any CPU
        return text.strip()
    from hyperlane_lab.runtime.cpus import parse_cpu_list

    try:
        parse_cpu_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def run(args: argparse.Namespace) -> int:
    if args.workers:
        from hyperlane_lab.runtime.cli_support import run_distributed

        result, stages = run_distributed(args)
    else:
        from hyperlane_lab.generation.pipeline import InProcessPipeline

        pipe = InProcessPipeline.from_pretrained(args.model, n_stages=args.stages or 1, dtype=args.dtype)
        result = pipe.generate(args.prompt, **generation_kwargs(args))
        stages = pipe.stage_table()
    if args.json:
        print_json(result_json(result, stages))
    else:
        print(args.prompt + result.text)
        print()
        print(format_table(stages))
        print()
        print(format_table([result.timings.as_dict()]))
    return 0
