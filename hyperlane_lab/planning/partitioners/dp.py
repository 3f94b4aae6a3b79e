"""Exact dynamic programming over contiguous spans for a FIXED device order ('dp'), and the
threshold search that turns any min-sum/min-max solver into an exact throughput solver.

Latency (min R). State ``f[k][e]`` = least partial ring time of a pipeline whose last stage is
device k ending at layer e (client hop and all stages/hops before included):

    f[k][e] = min over j < e, predecessor p of  f[p][j] + hop(p→k) + stage_k[j, e]
    answer  = min over last k of  f[k][L] + hop(k→client)

where p is device k−1 (or the client for k = 0) — or, with ``allow_skip``, any earlier device or
the client: a skipped device gets no layers and leaves the ring entirely (its hops vanish; the
neighbours talk directly). Without ``allow_skip`` every device gets ≥ 1 layer. Spans that do not
fit memory have stage time inf. Cost: O(D·L²) (+O(D²·L) with skips), vectorized over (j, e).

Throughput (min λ = max(R/m, M), M = slowest server). Let g(T) = least R over plans whose servers
all take ≤ T (the same DP with slower spans/hops removed); g is non-increasing. With the sorted
candidate values v_1 < … < v_N of all stage/hop service times, the optimum is
``min_i max(g(v_i)/m, v_i)``; since g(v)/m − v strictly decreases, let i* be the first i with
g(v_i)/m <= v_i: the optimum is ``min(v_{i*}, g(v_{i*−1})/m)``. We find M* = min M by the same DP
in (max, min) form, start at v = M*, and binary-search i* above it: O(log N) DP runs in all, and
just two when R/m <= M* (m at least the number of stages, typically). The search window shrinks
with what each run teaches: a plan with ring time R and slowest server M satisfies every
v >= max(M, R/m) (upper end), and a satisfied v_i rules out every v < g(v_i)/m (lower end).
Among equal λ the plan with the smaller R wins.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hyperlane_lab.planning.partitioners.base import Assignment, capacity_error, register
from hyperlane_lab.planning.table import F64, CostTable, evaluate

__all__ = ["Runner", "dp", "optimize", "threshold_costs"]

# (mode, threshold) -> (objective value, assignment) or None if no plan; mode is "sum" or "max"
Runner = Callable[[str, float], "tuple[float, Assignment] | None"]


def threshold_costs(table: CostTable, mode: str, threshold: float) -> tuple[F64, F64]:
    """(stage costs (D, L+1, L+1), hop costs (D+1, D+1)) for a DP run; servers slower than the
    threshold are removed (inf). Sum mode adds full hop times, max mode takes serializations."""
    stage = table.service()
    hops = (table.link_time if mode == "sum" else table.link_ser).copy()
    if np.isfinite(threshold):
        stage = np.where(stage <= threshold, stage, np.inf)
        hops = np.where(table.link_ser <= threshold, hops, np.inf)
    return stage, hops


def _chain(table: CostTable, mode: str, threshold: float) -> tuple[float, Assignment] | None:
    D, L, c = table.n_devices, table.n_layers, table.client
    skip = table.options.allow_skip
    stage, hop = threshold_costs(table, mode, threshold)
    op = np.add if mode == "sum" else np.maximum
    cols = np.arange(L + 1)
    f = np.full((D, L + 1), np.inf)
    back_j = np.zeros((D, L + 1), dtype=np.int64)  # start layer of the stage ending at e on k
    back_k = np.full((D, L + 1), -1, dtype=np.int64)  # predecessor device (-1 = client)
    for k in range(D):
        arrive = np.full(L + 1, np.inf)  # best time to hand layer j's input to device k
        arrive_k = np.full(L + 1, -1, dtype=np.int64)
        if k == 0 or skip:
            arrive[0] = hop[c, k]
        for p in range(k) if skip else range(k - 1, k) if k else ():
            v = op(f[p], hop[p, k])
            better = v < arrive  # strict: ties keep the client / the earlier device
            arrive = np.where(better, v, arrive)
            arrive_k = np.where(better, p, arrive_k)
        cand = op(arrive[:, None], stage[k])  # (j, e)
        best_j = np.argmin(cand, axis=0)  # first j on ties
        f[k] = cand[best_j, cols]
        back_j[k] = best_j
        back_k[k] = arrive_k[best_j]
    best, last = np.inf, -1
    for k in range(D) if skip else (D - 1,):
        v = float(op(f[k, L], hop[k, c]))
        if v < best:
            best, last = v, k
    if not np.isfinite(best):
        return None
    order, bounds = [], [L]
    k, e = last, L
    while k >= 0:
        j = int(back_j[k, e])
        order.append(k)
        bounds.append(j)
        k, e = int(back_k[k, e]), j
    return best, (tuple(reversed(order)), tuple(reversed(bounds)))


def optimize(table: CostTable, run: Runner, name: str) -> Assignment:
    """Exact optimum of the table's objective, given a DP ``run`` (see module docstring)."""
    if table.options.objective == "latency":
        res = run("sum", np.inf)
        if res is None:
            raise capacity_error(table, name)
        return res[1]
    m = table.options.concurrency
    minmax = run("max", np.inf)
    if minmax is None:
        raise capacity_error(table, name)
    m_star = minmax[0]
    base = run("sum", m_star)  # feasible: the min-max plan has every server <= M*
    if base is None or base[0] / m <= m_star:
        return (base or minmax)[1]
    svc, ser = table.service(), table.link_ser
    values = np.concatenate([svc[np.isfinite(svc)], ser[np.isfinite(ser)]])
    cands = np.unique(values[values > m_star])  # sorted
    seen: dict[int, tuple[float, Assignment]] = {-1: base}

    def g(i: int) -> tuple[float, Assignment]:
        if i not in seen:
            r = run("sum", float(cands[i]))
            assert r is not None, "a larger threshold keeps every plan of a smaller one"
            seen[i] = r
        return seen[i]

    def first_at_least(x: float) -> int:
        return int(np.searchsorted(cands, x, side="left"))

    # i* lies in [lo, hi]; hi = len(cands) means "no candidate satisfies". A plan P with ring time
    # R and slowest server M satisfies every v >= max(M, R/m), which bounds hi; a satisfied v_i
    # also bounds lo, as every v < v_i has g(v) >= g(v_i) and needs v >= g(v_i)/m.
    lo, hi = 0, first_at_least(base[0] / m)
    while lo < hi:
        mid = (lo + hi) // 2
        ring, plan = g(mid)
        hi = min(hi, first_at_least(max(evaluate(table, *plan).bottleneck_s, ring / m)))
        if ring / m <= cands[mid]:
            hi = min(hi, mid)
            lo = max(lo, first_at_least(ring / m))
        else:
            lo = mid + 1
    picks = [g(lo)[1]] if lo < len(cands) else []
    picks.append(g(lo - 1)[1])
    return min(picks, key=lambda a: (evaluate(table, *a).cycle_s, evaluate(table, *a).round_trip_s))


@register("dp")
def dp(table: CostTable) -> Assignment:
    """Exact optimum over contiguous spans for the given device order (see module docstring).

    Every device gets at least one layer unless ``options.allow_skip``.
    """
    D, L = table.n_devices, table.n_layers
    if D > L and not table.options.allow_skip:
        raise capacity_error(
            table, "dp", f"{D} devices but only {L} layers; set allow_skip or use 'dp_select'"
        )
    return optimize(table, lambda mode, t: _chain(table, mode, t), "dp")
