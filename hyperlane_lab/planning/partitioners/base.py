"""The partitioner registry, the Plan builder and the memory-infeasibility reports.

A partitioner is a pure function ``(model, devices, links, options) -> Plan``. Each one is written
as a *solver* ``(CostTable) -> (order, bounds)``: device indices in ring order and layer bounds
``0 = b_0 < … < b_p = L``. ``register`` wraps it: builds the table, runs the solver, checks memory,
evaluates the assignment and fills every prediction of the Plan (solve_s times all of that).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from hyperlane_lab.errors import InfeasiblePlanError
from hyperlane_lab.planning.cost import Links, stage_memory
from hyperlane_lab.planning.table import CostTable, Evaluation, PlanOptions, build_table, evaluate
from hyperlane_lab.registry import Registry
from hyperlane_lab.types import DeviceProfile, LayerSpan, LinkProfile, ModelProfile, Plan, StagePlan

__all__ = [
    "PARTITIONERS",
    "Assignment",
    "Partitioner",
    "Solver",
    "build_plan",
    "capacity_error",
    "assignment_error",
    "register",
]

GIB = 2**30
Assignment = tuple[tuple[int, ...], tuple[int, ...]]  # (order, bounds)
Solver = Callable[[CostTable], Assignment]


class Partitioner(Protocol):
    def __call__(
        self,
        model: ModelProfile,
        devices: Sequence[DeviceProfile],
        links: Links | LinkProfile,
        options: PlanOptions | None = None,
    ) -> Plan: ...


PARTITIONERS: Registry[Partitioner] = Registry("partitioner")


def build_plan(table: CostTable, ev: Evaluation, name: str, solve_s: float) -> Plan:
    o = table.options
    stages = []
    for i, k in enumerate(ev.order):
        dev = table.devices[k]
        stages.append(
            StagePlan(
                device=dev.name,
                span=LayerSpan(ev.bounds[i], ev.bounds[i + 1]),
                memory_bytes=ev.memory[i],
                predicted_s=ev.stage_s[i],
                codec=o.codec,
                address=dev.address,
            )
        )
    return Plan(
        stages=tuple(stages),
        partitioner=name,
        objective=o.objective,
        predicted_latency_s=ev.round_trip_s,
        predicted_tokens_per_s=o.batch / ev.cycle_s,
        bottleneck_s=ev.bottleneck_s,
        solve_s=solve_s,
    )


def register(name: str) -> Callable[[Solver], Solver]:
    """Decorator: make ``solver`` available as partitioner ``name`` in PARTITIONERS."""

    def deco(solver: Solver) -> Solver:
        def partition(
            model: ModelProfile,
            devices: Sequence[DeviceProfile],
            links: Links | LinkProfile,
            options: PlanOptions | None = None,
        ) -> Plan:
            t0 = time.perf_counter()
            table = build_table(model, devices, Links.of(links), options or PlanOptions())
            order, bounds = solver(table)
            ev = evaluate(table, order, bounds)
            if not ev.feasible:
                raise assignment_error(table, ev, name)
            return build_plan(table, ev, name, time.perf_counter() - t0)

        partition.__name__ = partition.__qualname__ = name
        partition.__doc__ = solver.__doc__
        PARTITIONERS.add(name, partition)
        return solver

    return deco


# ------------------------------------------------------------------ infeasibility reports


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _fix_hint(table: CostTable) -> str:
    m, o = table.model, table.options
    kv_all = m.n_layers * o.kv_tokens * m.kv_bytes_per_token
    weights = sum(m.layer_weight_bytes) + m.embed_bytes + m.head_bytes
    return (
        "how to fix: add devices or larger ones; lower the context (now "
        f"{o.context} tokens: the KV cache of all layers takes {_gib(kv_all)} for "
        f"{o.concurrency}×{o.batch} resident sequences); lower concurrency or batch; store weights in "
        f"int8 (dtype: int8; weights now take {_gib(weights)}); or lower the headroom "
        f"(now {_gib(o.headroom_bytes)} per stage)"
    )


def assignment_error(table: CostTable, ev: Evaluation, name: str) -> InfeasiblePlanError:
    """Per-device needed vs available bytes of one concrete assignment."""
    o = table.options
    lines = [f"the {name!r} plan does not fit device memory (needed vs available per device):"]
    for i, k in enumerate(ev.order):
        dev = table.devices[k]
        span = LayerSpan(ev.bounds[i], ev.bounds[i + 1])
        mem = stage_memory(table.model, span, o.kv_tokens, o.act_tokens, o.headroom_bytes)
        verdict = "ok" if mem.total <= dev.memory_bytes else f"OVER by {_gib(mem.total - dev.memory_bytes)}"
        lines.append(
            f"  {dev.name}: layers {span} need {_gib(mem.total)} ({mem.total} B = weights {_gib(mem.weights)} "
            f"+ KV {_gib(mem.kv)} + activations {_gib(mem.activations)} + headroom {_gib(mem.headroom)}), "
            f"available {_gib(dev.memory_bytes)} ({dev.memory_bytes} B): {verdict}"
        )
    lines.append(_fix_hint(table) + "; or try partitioner 'dp' / 'dp_select', which place layers by memory")
    return InfeasiblePlanError("\n".join(lines))


def capacity_error(table: CostTable, name: str, reason: str = "") -> InfeasiblePlanError:
    """No assignment exists: per device, its memory and how many layers it could hold at most."""
    m, o = table.model, table.options
    L = m.n_layers
    per_layer = [m.layer_weight_bytes[i] + o.kv_tokens * m.kv_bytes_per_token for i in range(L)]
    fixed = o.headroom_bytes + stage_memory(m, LayerSpan(0, 1), 0, o.act_tokens, 0).activations
    lines = [f"partitioner {name!r} found no plan that fits device memory{': ' + reason if reason else ''}."]
    lines.append(
        f"  each layer needs about {_gib(max(per_layer))} (weights + KV for {o.kv_tokens} tokens), every stage "
        f"{_gib(fixed)} more (activations + headroom), the first {_gib(m.embed_bytes)} for the embedding, "
        f"the last {_gib(m.head_bytes)} for the LM head"
    )
    for k, dev in enumerate(table.devices):
        lengths = [e - j for j in range(L) for e in range(j + 1, L + 1) if table.fits[k, j, e]]
        most = max(lengths, default=0)
        lines.append(
            f"  {dev.name}: available {_gib(dev.memory_bytes)} ({dev.memory_bytes} B); "
            f"holds at most {most} of {L} layers"
        )
    need_all = sum(per_layer) + m.embed_bytes + m.head_bytes + len(table.devices) * fixed
    have = sum(d.memory_bytes for d in table.devices)
    lines.append(f"  in total the model needs at least {_gib(need_all)}; all devices have {_gib(have)}")
    lines.append(_fix_hint(table))
    return InfeasiblePlanError("\n".join(lines))
