"""``hyperlane demo``: the bundled TinyStories model split over 3 stages; prints story, plan, timings."""

from __future__ import annotations

import argparse

from hyperlane_lab.cli.common import format_table

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="tell a story with the bundled model over 3 local stages")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--in-process", action="store_true", help="run the stages in this process")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.in_process:
        from hyperlane_lab.runtime.cli_support import demo_distributed

        return demo_distributed(args)
    from hyperlane_lab.generation.pipeline import InProcessPipeline

    pipe = InProcessPipeline.from_pretrained(None, n_stages=args.stages)
    print(f"hyperlane demo: bundled stories260K, {args.stages} in-process stages\n")
    result = pipe.generate(args.prompt, max_tokens=args.max_tokens)
    print(args.prompt + result.text + "\n")
    print(
        format_table(
            pipe.stage_table(), ["stage", "span", "engine", "device", "weight_bytes", "calls", "compute_s"]
        )
    )
    print()
    print(format_table([result.timings.as_dict()]))
    return 0
