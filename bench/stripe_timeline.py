"""Where a striped frame's time goes: one tensor frame through ``SocketSender`` (striped over k connections)
to a data server on loopback, with the moments each side reaches, in µs from the send's start (medians).

    PYTHONPATH=$PWD python3 bench/stripe_timeline.py --sizes-mb 2,4 --stripes 2,3

Marks: ``send_end`` (the sender's call returns), ``expect`` (the main connection parsed the header and
took the body buffer), ``take_in`` / ``take_out`` (a reader has its part's header / the frame it belongs
to), ``main_part_done`` (the main connection's own part is in), ``put_in`` (a reader's part is in),
``finish`` (the frame is handed on). Wraps the transport's methods: for diagnosis, not for speed figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import socket_bulk

from hyperlane_lab.runtime import sender, stripe_conn, stripes

MARKS: dict[str, list[float]] = {}


def _wrap(cls: Any, name: str, before: str | None, after: str | None = None) -> None:
    f = getattr(cls, name)

    def g(*a: Any, **kw: Any) -> Any:
        if before:
            MARKS.setdefault(before, []).append(time.perf_counter())
        r = f(*a, **kw)
        if after:
            MARKS.setdefault(after, []).append(time.perf_counter())
        return r

    setattr(cls, name, g)


def timeline(nbytes: int, k: int) -> dict[str, float]:
    MARKS.clear()
    total = socket_bulk.transport_s(nbytes, k)
    t0 = MARKS["send_start"]
    out = {"total": total * 1e6}
    for key, v in MARKS.items():
        per = len(v) // len(t0)
        if per == 0 or len(v) != per * len(t0):
            continue
        d = [v[i * per + j] - t0[i] for i in range(2, len(t0)) for j in range(per)]  # after 2 warm-ups
        out[key] = statistics.median(d) * 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="2,4")
    ap.add_argument("--stripes", default="2,3")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    _wrap(sender.SocketSender, "_send_striped", "send_start", "send_end")
    _wrap(stripes.StripeGroup, "expect", "expect")
    _wrap(stripes.StripeGroup, "take", "take_in", "take_out")
    _wrap(stripes.StripeGroup, "put", "put_in")
    _wrap(stripe_conn.StripedConnection, "_body_done", "main_part_done")
    _wrap(stripe_conn.StripedConnection, "_finish_striped", "finish")
    rows = []
    for mb in (float(x) for x in args.sizes_mb.split(",")):
        for k in (int(x) for x in args.stripes.split(",")):
            r = timeline(int(mb * (1 << 20)), k)
            rows.append({"mb": mb, "stripes": k, **r})
            marks = ", ".join(f"{key} {v:.0f}" for key, v in sorted(r.items(), key=lambda kv: kv[1]))
            print(f"{mb:g} MB over {k}: {marks}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
