"""What ``hyperlane run --workers`` and ``hyperlane demo`` do with real worker processes."""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from hyperlane_lab.cli.common import format_table, generation_kwargs

__all__ = ["demo_distributed", "run_distributed"]


@contextlib.contextmanager
def _workers(spec: str, cpus: str = "") -> Any:
    """``N`` starts N local workers (each with ``--cpus cpus``); ``host:port,...`` uses running ones."""
    if spec.isdigit():
        from hyperlane_lab.runtime.local_cluster import LocalCluster

        with LocalCluster(int(spec), cpus=cpus) as cluster:
            yield cluster.addresses
    elif cpus:
        raise ValueError(
            "--cpus pins the workers `hyperlane run --workers N` starts; running workers choose their "
            "own CPUs: start each with `hyperlane worker --cpus ...`"
        )
    else:
        yield [w.strip() for w in spec.split(",") if w.strip()]


def run_distributed(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]]]:
    from hyperlane_lab.runtime.client import AutoDistributedModel

    with (
        _workers(args.workers, getattr(args, "cpus", "")) as addresses,
        AutoDistributedModel.from_pretrained(
            args.model,
            workers=addresses,
            partitioner=args.partitioner,
            dtype=args.dtype,
            progress=not args.json,
            compression=getattr(args, "compression", "raw") or "raw",
        ) as model,
    ):
        model.prefill_chunk = getattr(args, "prefill_chunk", "auto")
        result = model.generate(args.prompt, **generation_kwargs(args))
        return result, model.stage_table()


def demo_distributed(args: argparse.Namespace) -> int:
    from hyperlane_lab.runtime.client import AutoDistributedModel
    from hyperlane_lab.runtime.local_cluster import LocalCluster

    print(f"hyperlane demo: bundled stories260K over {args.stages} local worker processes\n")
    t0 = time.perf_counter()
    with LocalCluster(args.stages) as cluster:
        t_up = time.perf_counter() - t0
        with AutoDistributedModel.from_pretrained(None, workers=cluster.addresses, progress=False) as model:
            t_load = time.perf_counter() - t0 - t_up
            pieces = []
            print(args.prompt, end="", flush=True)
            for piece in model.generate(args.prompt, max_tokens=args.max_tokens, stream=True):
                print(piece, end="", flush=True)
                pieces.append(piece)
            print("\n")
            print("plan:")
            print(
                format_table(
                    model.stage_table(),
                    ["stage", "worker", "span", "engine", "device", "weight_bytes", "codec"],
                )
            )
            summary = model.trace_summary()
            print("\nper-stage timings (measured on the workers):")
            print(summary.to_string(index=False) if hasattr(summary, "to_string") else summary)
            print(f"\nworkers up in {t_up:.1f}s, shards loaded in {t_load:.1f}s")
    return 0
