"""Partitioners by name. Each is a pure function ``(model, devices, links, options) -> Plan``.

=====================  =========================================================================
uniform                equal layer counts, given order
greedy_memory          layers ∝ device memory (exo-style), given order
knapsack               identical-item multiple knapsack by speed, capped by memory, given order
dp                     exact optimum over spans for the given order (O(L²·D) per DP run)
dp_select              exact optimum over device subsets, orders and spans (bitmask DP)
ilp                    the 'dp' problem as a MILP solved by HiGHS (independent check)
exhaustive             brute force over spans, given order (oracle for small cases)
exhaustive_select      brute force over subsets, orders and spans (oracle for small cases)
=====================  =========================================================================
"""

from __future__ import annotations

from hyperlane_lab.planning.partitioners import dp, exhaustive, heuristics, ilp, select
from hyperlane_lab.planning.partitioners.base import PARTITIONERS, Partitioner

__all__ = ["EXACT_FIXED_ORDER", "EXACT_SELECT", "PARTITIONERS", "Partitioner", "get_partitioner"]

EXACT_FIXED_ORDER = ("dp", "ilp", "exhaustive")
EXACT_SELECT = ("dp_select", "exhaustive_select")

# the modules register themselves on import
_MODULES = (dp, exhaustive, heuristics, ilp, select)


def get_partitioner(name: str) -> Partitioner:
    """The partitioner called ``name``; an unknown name raises ValueError listing valid ones."""
    return PARTITIONERS.get(name)
