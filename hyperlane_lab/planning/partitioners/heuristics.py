"""Baseline partitioners: uniform, greedy_memory (exo-style) and knapsack. Devices keep their order."""

from __future__ import annotations

import math

from hyperlane_lab.planning.cost import layer_decode_s
from hyperlane_lab.planning.partitioners.base import Assignment, capacity_error, register
from hyperlane_lab.planning.table import CostTable

__all__ = ["greedy_memory", "knapsack", "proportional_bounds", "uniform"]


def _check_count(table: CostTable, name: str) -> None:
    D, L = table.n_devices, table.n_layers
    if D > L:
        raise capacity_error(
            table,
            name,
            f"{D} devices but only {L} layers and every device needs one; use fewer devices or 'dp_select'",
        )


def proportional_bounds(weights: list[float], n_layers: int) -> tuple[int, ...]:
    """Layer bounds with device i getting about ``n_layers·w_i/Σw`` layers (cumulative rounding, ≥ 1 each)."""
    D, total = len(weights), float(sum(weights))
    bounds, cum = [0], 0.0
    for i, w in enumerate(weights[:-1]):
        cum += w
        b = math.floor(n_layers * cum / total + 0.5)  # round half up, not banker's rounding
        b = max(b, bounds[-1] + 1)  # at least one layer here
        b = min(b, n_layers - (D - 1 - i))  # and one for each device still to come
        bounds.append(b)
    bounds.append(n_layers)
    return tuple(bounds)


@register("uniform")
def uniform(table: CostTable) -> Assignment:
    """Equal layer counts (earlier devices get the extra ones), devices in the given order."""
    _check_count(table, "uniform")
    D, L = table.n_devices, table.n_layers
    return tuple(range(D)), proportional_bounds([1.0] * D, L)


@register("greedy_memory")
def greedy_memory(table: CostTable) -> Assignment:
    """Layers proportional to device memory, as exo's ring memory-weighted strategy does.

    Unlike exo (which sorts by memory) the given device order is kept, so all fixed-order
    partitioners are comparable; speed is ignored entirely.
    """
    _check_count(table, "greedy_memory")
    weights = [float(d.memory_bytes) for d in table.devices]
    return tuple(range(table.n_devices)), proportional_bounds(weights, table.n_layers)


def _capacity(table: CostTable, k: int) -> int:
    """Most layers device k can hold at its position (first: with embedding, last: with head)."""
    D, L = table.n_devices, table.n_layers
    if D == 1:
        return L if table.fits[0, 0, L] else 0
    if k == 0:
        return max((e for e in range(1, L + 1) if table.fits[k, 0, e]), default=0)
    if k == D - 1:
        return max((L - j for j in range(L) if table.fits[k, j, L]), default=0)
    return max((e - j for j in range(1, L) for e in range(j + 1, L) if table.fits[k, j, e]), default=0)


@register("knapsack")
def knapsack(table: CostTable) -> Assignment:
    """Multiple knapsack with identical items, devices in the given order.

    Formulation: items are the L layers, treated as identical with cost ``t_k`` on device k (the
    mean per-layer decode time there); knapsack k holds ``1 <= n_k <= c_k`` layers where ``c_k`` is
    the most layers its memory holds at its position (first/last stage pay for embedding/head).
    Choose integer counts with ``Σ n_k = L`` minimizing

    * throughput: ``max_k n_k·t_k`` — greedy: start from n_k = 1, give each further layer to the
      device whose time would grow least, ``argmin (n_k+1)·t_k`` over devices with room (ties to
      the earlier device). For identical items this greedy is optimal (the makespan of unit jobs
      on machines of different speeds).
    * latency: ``Σ n_k·t_k`` — after one layer each, fill the fastest devices up to capacity.

    Embedding/head time and links are left out of the objective (they are in the prediction), so
    the result is a fast approximation of 'dp', which is exact.
    """
    _check_count(table, "knapsack")
    D, L, o = table.n_devices, table.n_layers, table.options
    caps = [_capacity(table, k) for k in range(D)]
    if min(caps) < 1 or sum(caps) < L:
        raise capacity_error(
            table, "knapsack", f"layer capacities {caps} cannot hold {L} layers one or more each"
        )
    t = [
        sum(layer_decode_s(table.model, i, dev, o.batch, o.context, o.calibrated) for i in range(L)) / L
        for dev in table.devices
    ]
    n = [1] * D
    if o.objective == "throughput":
        for _ in range(L - D):
            k = min((k for k in range(D) if n[k] < caps[k]), key=lambda k: ((n[k] + 1) * t[k], k))
            n[k] += 1
    else:
        left = L - D
        for k in sorted(range(D), key=lambda k: (t[k], k)):
            extra = min(left, caps[k] - 1)
            n[k] += extra
            left -= extra
    bounds = [0]
    for c in n:
        bounds.append(bounds[-1] + c)
    return tuple(range(D)), tuple(bounds)
