"""'dp_select': exact choice of WHICH devices to use, in WHICH order, and their spans.

Subset DP. ``F[S, k, e]`` = least partial ring time of a pipeline that uses exactly the device set
S, ends with device k ∈ S, and covers layers [0, e):

    F[{k}, k, e]   = hop(client→k) + stage_k[0, e]
    F[S∪{k}, k, e] = min over j < e, p ∈ S of  F[S, p, j] + hop(p→k) + stage_k[j, e]
    answer         = min over S, k of  F[S, k, L] + hop(k→client)

Interchangeable devices (equal cost tables, and swapping them leaves every hop unchanged — e.g.
three identical cards on one switch) are merged into types: S becomes a multiset of counts per
type and k a type, which shrinks 2^D·D states to Π(n_t+1)·T (3×rtx3090 + 3×rtx4090 + 2×a6000 +
2×a5000 + l40s + l4: 576·6 instead of 4096·12). Without duplicates it is the plain bitmask DP.

Each target (S+k, k) has exactly one source S, so a level (all S of one size) is computed in bulk
with numpy: the best predecessor per start layer, then the best start per end layer over the band
``e − j <= w_k`` (w_k = the longest span that fits k's memory and the threshold). The forward
pass keeps values only; the assignment is recovered by redoing one step's arithmetic per stage
(min returns one of its inputs exactly, so the predecessor reproduces the value bit for bit).
Work O(states·T·L·(T + w)). Devices left out are not used (slow or small devices may be dropped).
The throughput objective uses the threshold search of 'dp' (``dp.optimize``). Ties go to the
lowest state, type, start layer and instance index, so results are deterministic.
"""

from __future__ import annotations

import numpy as np

from hyperlane_lab.planning.partitioners.base import Assignment, register
from hyperlane_lab.planning.partitioners.dp import optimize, threshold_costs
from hyperlane_lab.planning.table import F64, CostTable

__all__ = ["MAX_SELECT_STATES", "device_types", "dp_select"]

MAX_SELECT_STATES = 30_000_000  # floats in F = states × types × (L+1): 240 MB


def device_types(table: CostTable) -> list[list[int]]:
    """Groups of interchangeable devices (in index order): same stage/fit tables, and the swap of
    the two leaves the hop time and serialization matrices unchanged."""
    groups: list[list[int]] = []
    for k in range(table.n_devices):
        for group in groups:
            if _interchangeable(table, group[0], k):
                group.append(k)
                break
        else:
            groups.append([k])
    return groups


def _interchangeable(table: CostTable, a: int, b: int) -> bool:
    if not (
        np.array_equal(table.stage_s[a], table.stage_s[b]) and np.array_equal(table.fits[a], table.fits[b])
    ):
        return False
    perm = np.arange(table.n_devices + 1)
    perm[a], perm[b] = b, a
    swap = np.ix_(perm, perm)
    return bool(
        np.array_equal(table.link_time[swap], table.link_time)
        and np.array_equal(table.link_ser[swap], table.link_ser)
    )


def _select(
    table: CostTable, types: list[list[int]], mode: str, threshold: float
) -> tuple[float, Assignment] | None:
    D, L, c = table.n_devices, table.n_layers, table.client
    stage_d, hop_d = threshold_costs(table, mode, threshold)
    op = np.add if mode == "sum" else np.maximum
    T = len(types)
    reps = [g[0] for g in types]
    n = np.array([len(g) for g in types])
    radix = np.concatenate([[1], np.cumprod(n + 1)[:-1]]).astype(np.int64)
    n_states = int(np.prod(n + 1))
    stage = stage_d[reps]  # (T, L+1, L+1)
    hop = np.full((T + 1, T + 1), np.inf)  # by type; index T = client
    for a in range(T):
        hop[T, a], hop[a, T] = hop_d[c, reps[a]], hop_d[reps[a], c]
        for b in range(T):
            if a != b:
                hop[a, b] = hop_d[reps[a], reps[b]]
            elif n[a] >= 2:  # two instances of one type in a row
                hop[a, a] = hop_d[types[a][0], types[a][1]]

    F = np.full((n_states, T, L + 1), np.inf)
    for t in range(T):
        F[radix[t], t] = op(hop[T, t], stage[t, 0])
    widths = []
    for t in range(T):
        finite = np.argwhere(np.isfinite(stage[t]))
        widths.append(int((finite[:, 1] - finite[:, 0]).max()) if len(finite) else 0)
    diagonals = [[np.diagonal(stage[t], offset=d + 1) for d in range(widths[t])] for t in range(T)]
    device_hops = hop_d[:D, :D][~np.eye(D, dtype=bool)]
    uniform = D > 1 and bool(np.all(device_hops == device_hops[0]))  # then min over p needs no t

    states = np.arange(n_states, dtype=np.int64)
    counts = (states[:, None] // radix[None, :]) % (n + 1)[None, :]  # (states, T)
    sizes = counts.sum(axis=1)
    for size in range(1, min(D, L)):
        level = states[sizes == size]
        best_last = F[level].min(axis=1) if uniform else None  # (n, L+1): best over the last type
        for t in range(T):
            if widths[t] == 0:
                continue
            keep = counts[level, t] < n[t]
            src = level[keep]
            if best_last is not None:
                arrive = op(best_last[keep], device_hops[0])  # (n, L+1)
            else:
                block = F[src]  # (n, T, L+1)
                arrive = op(block[:, 0], hop[0, t])
                for p in range(1, T):
                    np.minimum(arrive, op(block[:, p], hop[p, t]), out=arrive)
            # val[:, e] = min over span lengths d+1 <= w of arrive[:, e-d-1] (+) stage[t, e-d-1, e]
            val = np.full((len(src), L + 1), np.inf)
            for d, diag in enumerate(diagonals[t]):
                np.minimum(val[:, d + 1 :], op(arrive[:, : L - d], diag[None, :]), out=val[:, d + 1 :])
            F[src + radix[t], t] = val

    final = op(F[:, :, L], hop[:T, T][None, :])  # (states, T)
    flat = int(np.argmin(final))  # first on ties: lowest state, then lowest type
    best = float(final.flat[flat])
    if not np.isfinite(best):
        return None
    type_order, bounds = _backtrack(F, stage, hop, op, flat, radix, L)
    taken = [0] * T
    order = []
    for t in type_order:  # instances of a type in index order
        order.append(types[t][taken[t]])
        taken[t] += 1
    return best, (tuple(order), bounds)


def _backtrack(
    F: F64, stage: F64, hop: F64, op: np.ufunc, flat: int, radix: np.ndarray, L: int
) -> tuple[list[int], tuple[int, ...]]:
    """Types in ring order and layer bounds of state ``flat`` (ties: smallest j, then type)."""
    T = stage.shape[0]
    state, t = divmod(flat, T)
    order: list[int] = []
    bounds, e = [L], L
    while True:
        order.append(t)
        rest = state - int(radix[t])
        if rest == 0:
            bounds.append(0)
            break
        cand = op(op(F[rest, :, :e], hop[:T, t][:, None]), stage[t, :e, e][None, :])  # (p, j)
        hits = np.argwhere(F[state, t, e] == cand.T)  # rows (j, p), sorted by j then p
        j, p = int(hits[0, 0]), int(hits[0, 1])
        bounds.append(j)
        state, t, e = rest, p, j
    return list(reversed(order)), tuple(reversed(bounds))


@register("dp_select")
def dp_select(table: CostTable) -> Assignment:
    """Exact optimum over device subsets, their order and their spans (subset DP, see module)."""
    types = device_types(table)
    n_states = int(np.prod([len(g) + 1 for g in types]))
    size = n_states * len(types) * (table.n_layers + 1)
    if size > MAX_SELECT_STATES:
        raise ValueError(
            f"dp_select would need {size} DP states ({len(types)} kinds among {table.n_devices} devices); "
            f"the limit is {MAX_SELECT_STATES}: use 'dp' with a chosen order, or fewer distinct devices"
        )
    return optimize(table, lambda mode, t: _select(table, types, mode, t), "dp_select")
