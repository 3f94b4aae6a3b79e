"""Brute-force oracles for small instances: every assignment is evaluated with ``table.evaluate``.

* 'exhaustive': the given device order; every composition of L layers into D non-empty spans
  (with ``allow_skip``: every non-empty ordered subsequence of the devices, too).
* 'exhaustive_select': every non-empty subset of the devices in every order.

Ties keep the first assignment found (enumeration order is deterministic).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

from hyperlane_lab.planning.partitioners.base import Assignment, capacity_error, register
from hyperlane_lab.planning.table import CostTable, evaluate

__all__ = ["MAX_ASSIGNMENTS", "count_assignments", "exhaustive", "exhaustive_select"]

MAX_ASSIGNMENTS = 2_000_000  # refuse instances larger than this (they would take minutes)


def _compositions(n_layers: int, parts: int) -> Iterator[tuple[int, ...]]:
    for cuts in itertools.combinations(range(1, n_layers), parts - 1):
        yield (0, *cuts, n_layers)


def _orders(table: CostTable, select: bool) -> Iterator[tuple[int, ...]]:
    D = table.n_devices
    if select:
        for r in range(1, D + 1):
            yield from itertools.permutations(range(D), r)
    elif table.options.allow_skip:
        for r in range(1, D + 1):
            yield from itertools.combinations(range(D), r)
    else:
        yield tuple(range(D))


def count_assignments(n_layers: int, n_devices: int, select: bool = False, allow_skip: bool = False) -> int:
    """How many assignments the oracle would evaluate."""
    total = 0
    for r in range(1, n_devices + 1):
        if not (select or allow_skip) and r != n_devices:
            continue
        orders = math.perm(n_devices, r) if select else math.comb(n_devices, r)
        total += orders * math.comb(n_layers - 1, r - 1)
    return total


def _search(table: CostTable, select: bool, name: str) -> Assignment:
    n = count_assignments(table.n_layers, table.n_devices, select, table.options.allow_skip)
    if n > MAX_ASSIGNMENTS:
        raise ValueError(
            f"{name}: {n} assignments is too many to enumerate (limit {MAX_ASSIGNMENTS}); use 'dp'"
        )
    objective = table.options.objective
    best: Assignment | None = None
    best_value = math.inf
    for order in _orders(table, select):
        if len(order) > table.n_layers:
            continue
        for bounds in _compositions(table.n_layers, len(order)):
            if not all(table.fits[k, bounds[i], bounds[i + 1]] for i, k in enumerate(order)):
                continue
            value = evaluate(table, order, bounds).objective(objective)
            if value < best_value:
                best, best_value = (order, bounds), value
    if best is None:
        raise capacity_error(table, name)
    return best


@register("exhaustive")
def exhaustive(table: CostTable) -> Assignment:
    """Brute force over all spans for the given order (and skipped devices with allow_skip)."""
    return _search(table, False, "exhaustive")


@register("exhaustive_select")
def exhaustive_select(table: CostTable) -> Assignment:
    """Brute force over all device subsets, orders and spans."""
    return _search(table, True, "exhaustive_select")
