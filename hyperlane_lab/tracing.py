"""Pipeline traces as tables: TraceEvent lists <-> DataFrames, per-stage bubble summaries, clock sync.

    df = events_to_frame(model.trace_events())   # one row per event (+ ``duration``)
    summarize(df)                                # per stage: busy %, bubble %, tokens/s, bytes sent

Every stage's events must be on one clock (the client's) before they can share a timeline. A worker's
clock is related to the client's by an offset estimated from round trips (``clock_offset``, NTP-style);
``shift(events, -offset)`` moves a worker's events onto the client clock.

pandas is imported inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from hyperlane_lab.types import EventKind, TraceEvent

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BUSY_KINDS",
    "COLUMNS",
    "SUMMARY_COLUMNS",
    "clock_offset",
    "clock_offset_bound",
    "events_to_frame",
    "frame_to_events",
    "max_concurrent_sessions",
    "shift",
    "simulate_from_trace",
    "summarize",
    "union_length",
]

# the TraceEvent fields, in declaration order, then the derived duration
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TraceEvent))
COLUMNS: tuple[str, ...] = (*FIELDS, "duration")
# kinds during which a stage's device counts as busy (the rest - network, queueing - is bubble)
BUSY_KINDS: tuple[str, ...] = (EventKind.COMPUTE.value,)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "source",
    "stage",
    "events",
    "busy_s",
    "makespan_s",
    "busy_pct",
    "bubble_pct",
    "tokens",
    "tokens_per_s",
    "bytes_sent",
)


def events_to_frame(events: Iterable[TraceEvent]) -> pd.DataFrame:
    """One row per event; columns = TraceEvent fields (``kind`` as its string value) + ``duration``.

    Rows keep the input order; an empty input gives an empty frame with the same columns.
    """
    import pandas as pd

    rows = []
    for ev in events:
        row = {name: getattr(ev, name) for name in FIELDS}
        row["kind"] = EventKind(ev.kind).value
        row["duration"] = ev.end - ev.start
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    if not rows:  # give an empty frame useful dtypes so filters and sums work
        df = df.astype(
            {
                "stage": "int64",
                "start": "float64",
                "end": "float64",
                "step": "int64",
                "nbytes": "int64",
                "tokens": "int64",
                "duration": "float64",
                "kind": "object",
                "session": "object",
                "source": "object",
            }
        )
    return df


def frame_to_events(df: pd.DataFrame) -> list[TraceEvent]:
    """Inverse of ``events_to_frame`` (extra columns are ignored; missing optional ones take defaults)."""
    missing = [c for c in ("stage", "kind", "start", "end") if c not in df.columns]
    if missing:
        raise ValueError(
            f"trace frame lacks column(s) {missing}; build it with hyperlane_lab.tracing.events_to_frame"
        )
    present = [c for c in FIELDS if c in df.columns]
    casts = {
        "stage": int,
        "step": int,
        "nbytes": int,
        "tokens": int,
        "start": float,
        "end": float,
        "session": str,
        "source": str,
    }
    events = []
    for rec in df[present].to_dict("records"):
        kw: dict[str, Any] = {k: casts[k](v) if k in casts else v for k, v in rec.items()}
        kw["kind"] = EventKind(kw["kind"])
        events.append(TraceEvent(**kw))
    return events


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by ``[start, end)`` intervals, overlaps counted once."""
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_end is None or s > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total


def _as_frame(trace: Any) -> pd.DataFrame:
    import pandas as pd

    if isinstance(trace, pd.DataFrame):
        return trace
    return events_to_frame(trace)


def summarize(trace: Any, busy_kinds: Sequence[str] = BUSY_KINDS) -> pd.DataFrame:
    """Per (source, stage) figures of a trace (DataFrame or TraceEvent list).

    makespan_s: first start to last end over ALL stages of that source (the pipeline's wall time);
    busy_pct: 100 * |union of busy_kinds intervals| / makespan; bubble_pct = 100 - busy_pct;
    tokens / tokens_per_s: tokens of compute events and their rate over the makespan;
    bytes_sent: nbytes of send events; events: rows of that stage.
    """
    import pandas as pd

    df = _as_frame(trace)
    busy = {EventKind(k).value for k in busy_kinds}
    rows = []
    if "source" not in df.columns:
        df = df.assign(source="measured")
    for source, sdf in df.groupby("source", sort=True):
        makespan = float(sdf["end"].max() - sdf["start"].min())
        for stage, g in sdf.groupby("stage", sort=True):
            kinds = g["kind"].map(lambda k: EventKind(k).value)
            busy_rows = g[kinds.isin(busy)]
            busy_s = union_length(zip(busy_rows["start"], busy_rows["end"]))
            busy_pct = 100.0 * busy_s / makespan if makespan > 0 else 0.0
            tokens = int(g.loc[kinds == EventKind.COMPUTE.value, "tokens"].sum())
            rows.append(
                {
                    "source": source,
                    "stage": int(stage),
                    "events": len(g),
                    "busy_s": busy_s,
                    "makespan_s": makespan,
                    "busy_pct": busy_pct,
                    "bubble_pct": 100.0 - busy_pct,
                    "tokens": tokens,
                    "tokens_per_s": tokens / makespan if makespan > 0 else 0.0,
                    "bytes_sent": int(g.loc[kinds == EventKind.SEND.value, "nbytes"].sum()),
                }
            )
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


# ---------------------------------------------------------------- clocks


def _offset_and_delay(sample: Sequence[float]) -> tuple[float, float]:
    """One round trip -> (offset = remote clock - local clock, network delay)."""
    if len(sample) == 3:  # (t_send_local, t_remote, t_recv_local): remote stamped once
        t0, t1, t3 = (float(x) for x in sample)
        t2 = t1
    elif len(sample) == 4:  # NTP's four stamps: remote receive and remote send separately
        t0, t1, t2, t3 = (float(x) for x in sample)
    else:
        raise ValueError(
            f"a clock sample is (t_send_local, t_remote, t_recv_local) or "
            f"(t_send_local, t_remote_recv, t_remote_send, t_recv_local); got {len(sample)} values"
        )
    if t3 < t0 or t2 < t1 or not all(math.isfinite(t) for t in (t0, t1, t2, t3)):
        raise ValueError(f"clock sample {tuple(sample)} is not a round trip (received before sent)")
    # symmetric-path assumption: the remote stamp sits halfway through the network part of the trip
    offset = ((t1 - t0) + (t2 - t3)) / 2.0
    delay = (t3 - t0) - (t2 - t1)
    return offset, delay


def clock_offset_bound(samples: Sequence[Sequence[float]]) -> tuple[float, float]:
    """``(offset, error_bound)`` from the minimum-delay sample; the true offset lies within ±error_bound.

    offset = remote clock - local clock, so ``t_local = t_remote - offset``. The bound is half that
    sample's network delay (exact whenever the two path legs take any split of that delay).
    """
    if not samples:
        raise ValueError("clock_offset needs at least one round-trip sample")
    best = min((_offset_and_delay(s) for s in samples), key=lambda od: od[1])
    return best[0], best[1] / 2.0


def clock_offset(samples: Sequence[Sequence[float]]) -> float:
    """Estimate a remote clock's offset (remote - local, seconds) from round trips, NTP-style.

    Each sample is ``(t_send_local, t_remote, t_recv_local)`` (or NTP's 4 stamps); the sample with
    the smallest round-trip time is trusted most, since queueing only ever adds delay.
    """
    return clock_offset_bound(samples)[0]


def shift(events: Iterable[TraceEvent], offset: float) -> list[TraceEvent]:
    """Events with ``offset`` added to start and end (``shift(remote_events, -clock_offset(s))``
    moves a worker's events onto the local clock)."""
    return [dataclasses.replace(ev, start=ev.start + offset, end=ev.end + offset) for ev in events]


# ---------------------------------------------------------------- measured -> simulated


def max_concurrent_sessions(trace: Any) -> int:
    """Most sessions active at once (a session spans its first start to its last end)."""
    df = _as_frame(trace)
    if df.empty:
        return 0
    spans = df.groupby("session").agg(start=("start", "min"), end=("end", "max"))
    edges = sorted(
        [(s, 1) for s in spans["start"]] + [(e, -1) for e in spans["end"]], key=lambda x: (x[0], x[1])
    )
    best = cur = 0
    for _, d in edges:  # ends sort before starts at equal times: back-to-back sessions do not overlap
        cur += d
        best = max(best, cur)
    return best


def _median(values: Sequence[float]) -> float:
    import statistics

    return float(statistics.median(values)) if values else 0.0


def simulate_from_trace(trace: Any, concurrency: int | None = None, decode_steps: int | None = None) -> Any:
    """The planner's pipeline simulator, fed with service times measured in ``trace``.

    Per (session, step), stage i's service is its total COMPUTE time and the hop into stage i+1 is the
    gap from stage i's last COMPUTE end to stage i+1's first COMPUTE start (send, network, receive,
    decode and quantize all fall in it); the client hop is the gap from the last stage at step k to
    stage 0 at step k+1. Medians of those become the simulator's stage times and pure hop delays, so
    busy/bubble percentages of the two traces compare like for like.

    Concurrency defaults to the most sessions the trace had in flight, decode steps to its last step.
    Feed it an uncontended (one request) trace and ask for ``concurrency=m`` to see what an ideal
    pipeline would do with m requests, then compare with a measured m-request trace. Returns the
    simulator's ``SimResult`` (events tagged ``simulated``).
    """
    from hyperlane_lab.planning.simulator import PipelineTimes, simulate

    df = _as_frame(trace)
    kinds = df["kind"].map(lambda k: EventKind(k).value) if len(df) else df["kind"]
    comp = df[kinds == EventKind.COMPUTE.value]
    comp = comp.assign(busy=comp["end"] - comp["start"])
    if comp.empty:
        raise ValueError(
            "the trace has no compute events; generate something first, then simulate from its trace"
        )
    n_stages = int(comp["stage"].max()) + 1
    # per (session, step, stage): first start, last end, total compute, tokens
    g = comp.groupby(["session", "step", "stage"]).agg(
        first=("start", "min"), last=("end", "max"), busy=("busy", "sum"), tokens=("tokens", "sum")
    )
    prefill: list[float] = []
    decode: list[float] = []
    hops: list[list[float]] = [[] for _ in range(n_stages + 1)]
    for i in range(n_stages):
        gi = g.xs(i, level="stage")
        prefill.append(_median(gi.loc[gi.index.get_level_values("step") == 0, "busy"].tolist()))
        decode.append(_median(gi.loc[gi.index.get_level_values("step") > 0, "busy"].tolist()))
    decode = [d if d > 0 else p for d, p in zip(decode, prefill)]
    table = g.reset_index()
    first = {(r.session, r.step, r.stage): r.first for r in table.itertuples()}
    for r in table.itertuples():
        nxt = first.get((r.session, r.step, r.stage + 1))
        if r.stage + 1 < n_stages and nxt is not None:
            hops[r.stage + 1].append(max(0.0, nxt - r.last))
        if r.stage == n_stages - 1 and (r.session, r.step + 1, 0) in first:  # around the ring via the client
            hops[0].append(max(0.0, first[(r.session, r.step + 1, 0)] - r.last))
    zeros = (0.0,) * (n_stages + 1)
    first_tokens = table.loc[(table["step"] == 0) & (table["stage"] == 0), "tokens"].tolist()
    times = PipelineTimes(
        tuple(prefill),
        tuple(decode),
        tuple(_median(h) for h in hops),
        zeros,
        zeros,
        prefill_tokens=max(1, int(_median(first_tokens))) if first_tokens else 1,
    )
    m = concurrency if concurrency is not None else max(1, max_concurrent_sessions(df))
    steps = decode_steps if decode_steps is not None else int(df["step"].max())
    return simulate(times, m, steps)
