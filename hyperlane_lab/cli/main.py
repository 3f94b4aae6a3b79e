"""``hyperlane`` entry point. Each subcommand lives in ``hyperlane_lab/cli/<name>.py`` with
``add_parser(subparsers)`` and ``run(args) -> int``; modules import heavy libraries inside ``run``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

SUBCOMMANDS = ("demo", "run", "worker", "discover", "plan", "export", "sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperlane", description="Pipeline-parallel LLM inference across the GPUs of a LAN."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"hyperlane_lab.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"hyperlane_lab.cli.{name}":
                continue  # subcommand not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError, ConnectionError) as e:
        if args.verbose >= 2:
            raise
        print(f"hyperlane {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
