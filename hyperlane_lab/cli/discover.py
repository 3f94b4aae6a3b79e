"""``hyperlane discover``: list the hyperlane workers that announce themselves on the LAN (mDNS).

    hyperlane discover                      # listen 3 s on all interfaces, print a table
    hyperlane discover --timeout 5 --json   # JSON list of WorkerInfo fields (+ "address")
    hyperlane discover --interface 192.168.1.20 --count 2   # stop once 2 are found

Exit status: 0 when at least one worker (or ``--count`` workers) was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from hyperlane_lab.types import WorkerInfo

__all__ = ["add_parser", "format_table", "run", "workers_to_json"]

_GIB = 2**30


def add_parser(subparsers: Any) -> None:
    """Register ``discover`` on the main parser's subparsers."""
    from hyperlane_lab.discovery.txt import SERVICE_TYPE

    p = subparsers.add_parser(
        "discover",
        help="list hyperlane workers on the LAN (mDNS)",
        description="Browse mDNS for hyperlane workers and print what they announce.",
    )
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to listen (default: 3)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument(
        "--interface",
        action="append",
        metavar="IP",
        help="browse only on the interface holding this IP (repeatable; default: all interfaces)",
    )
    p.add_argument(
        "--count",
        type=int,
        default=0,
        metavar="N",
        help="return as soon as N workers are found; exit 1 if fewer appear within --timeout",
    )
    p.add_argument("--service-type", default=SERVICE_TYPE, help=argparse.SUPPRESS)  # for tests
    p.set_defaults(func=run)


def _gib(nbytes: int) -> str:
    return f"{nbytes / _GIB:.1f}"


def format_table(workers: Sequence[WorkerInfo]) -> str:
    """A fixed-width text table, one row per worker (sorted by id)."""
    header = ("ID", "ADDRESS", "DEVICE", "GPU", "FREE/TOTAL GiB", "TFLOP/s", "GB/s", "SHARD", "AUTH")
    rows = [header]
    for w in sorted(workers, key=lambda w: w.worker_id):
        rows.append(
            (
                w.worker_id,
                w.address,
                w.device,
                w.gpu_name or "-",
                f"{_gib(w.free_memory)}/{_gib(w.total_memory)}" if w.total_memory else "-",
                f"{w.flops / 1e12:.1f}" if w.flops else "-",
                f"{w.mem_bw / 1e9:.0f}" if w.mem_bw else "-",
                "loaded" if w.shard_loaded else "-",
                "yes" if w.auth_required else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows)


def workers_to_json(workers: Sequence[WorkerInfo]) -> str:
    """JSON list of the WorkerInfo fields plus ``address`` ("host:grpc_port"), sorted by id."""
    items = [
        {**dataclasses.asdict(w), "address": w.address} for w in sorted(workers, key=lambda w: w.worker_id)
    ]
    return json.dumps(items, indent=2)


def run(args: argparse.Namespace) -> int:
    from hyperlane_lab.discovery.manager import MDNS_HINTS, DiscoveryManager
    from hyperlane_lab.discovery.txt import SERVICE_TYPE

    timeout = float(getattr(args, "timeout", 3.0))
    count = int(getattr(args, "count", 0) or 0)
    interfaces = getattr(args, "interface", None) or "all"
    service_type = getattr(args, "service_type", SERVICE_TYPE)
    if timeout < 0 or count < 0:
        print("error: --timeout and --count must be >= 0", file=sys.stderr)
        return 2
    try:
        manager = DiscoveryManager(interfaces=interfaces, service_type=service_type)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with manager:
        if count:
            try:
                workers = manager.wait_for(count, timeout)
            except TimeoutError as exc:
                print(f"warning: {exc}", file=sys.stderr)
                workers = manager.workers()
        else:
            time.sleep(timeout)  # mDNS has no "end of answers": listen for the whole window
            workers = manager.workers()
        ignored = manager.ignored_services
    if getattr(args, "json", False):
        print(workers_to_json(workers))
    elif workers:
        print(format_table(workers))
    for name, why in sorted(ignored.items()):
        print(f"note: ignored {name}: {why}", file=sys.stderr)
    if not workers:
        if not getattr(args, "json", False):
            print(f"no hyperlane workers found within {timeout:g} s. {MDNS_HINTS}", file=sys.stderr)
        return 1
    return 0 if len(workers) >= count else 1
