"""Partitioners against brute-force oracles on random small heterogeneous instances."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperlane_lab.errors import InfeasiblePlanError
from hyperlane_lab.planning import PARTITIONERS, Links, PlanOptions, preset_profile
from hyperlane_lab.planning.catalog import device_from_catalog
from hyperlane_lab.planning.partitioners.select import device_types
from hyperlane_lab.planning.table import build_table
from hyperlane_lab.types import DeviceProfile, LinkProfile, ModelProfile, Plan

MiB = 2**20
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@dataclass(frozen=True)
class Instance:
    model: ModelProfile
    devices: tuple[DeviceProfile, ...]
    links: Links
    options: PlanOptions


@st.composite
def instances(
    draw: st.DrawFn, max_layers: int = 8, max_devices: int = 4, skip: bool | None = None, twins: bool = False
) -> Instance:
    """Random model, devices, links and options. ``twins``: devices are copies of at most two
    profiles and links are uniform, so dp_select's merging of interchangeable devices kicks in."""
    L = draw(st.integers(1, max_layers))
    D = draw(st.integers(1, max_devices))
    weights = [draw(st.integers(10, 400)) * MiB for _ in range(L)]
    model = ModelProfile(
        name="random",
        n_layers=L,
        layer_flops_per_token=tuple(float(draw(st.integers(1, 2000))) * 1e6 for _ in range(L)),
        layer_weight_bytes=tuple(weights),
        kv_bytes_per_token=draw(st.integers(0, 16)) * 256,
        act_bytes_per_token=draw(st.integers(1, 16)) * 256,
        embed_bytes=draw(st.integers(0, 300)) * MiB,
        head_bytes=draw(st.integers(0, 300)) * MiB,
        head_flops_per_token=float(draw(st.integers(0, 1000))) * 1e6,
        attn_flops_per_token_per_ctx=float(draw(st.integers(0, 100))) * 1e3,
    )
    total = sum(weights) + model.embed_bytes + model.head_bytes
    profiles = [
        (
            # from "holds about one layer" up to "holds everything": mixes feasible and infeasible
            draw(st.integers(max(weights), total + total // 2)) + 64 * MiB,
            draw(st.integers(1, 200)) * 1e12,
            draw(st.integers(50, 3000)) * 1e9,
        )
        for _ in range(2 if twins else D)
    ]
    picks = [draw(st.integers(0, 1)) if twins else i for i in range(D)]
    devices = tuple(DeviceProfile(f"d{i}", *profiles[k]) for i, k in enumerate(picks))
    default = LinkProfile(draw(st.integers(0, 2000)) * 1e-6, draw(st.integers(1, 100)) * 1e8 / 8)
    ends = ["client", *(d.name for d in devices)]
    hops = []
    for a, b in itertools.permutations(ends, 2):
        if not twins and draw(st.booleans()):
            hops.append(
                (a, b, LinkProfile(draw(st.integers(0, 5000)) * 1e-6, draw(st.integers(1, 100)) * 1e7))
            )
    options = PlanOptions(
        objective=draw(st.sampled_from(["latency", "throughput"])),
        concurrency=draw(st.integers(1, 6)),
        batch=draw(st.integers(1, 3)),
        context=draw(st.integers(0, 512)),
        headroom_bytes=draw(st.integers(0, 64)) * MiB,
        allow_skip=draw(st.booleans()) if skip is None else skip,
        codec=draw(st.sampled_from(["fp16", "int8", "int4"])),
    )
    return Instance(model, devices, Links(default, tuple(hops)), options)


def solve(name: str, inst: Instance) -> Plan | None:
    try:
        return PARTITIONERS.get(name)(inst.model, inst.devices, inst.links, inst.options)
    except InfeasiblePlanError:
        return None


def objective(plan: Plan, options: PlanOptions) -> float:
    if options.objective == "latency":
        return plan.predicted_latency_s
    return options.batch / plan.predicted_tokens_per_s  # λ, the cycle time


def memory_oracle(inst: Instance, plan: Plan) -> list[tuple[int, int]]:
    """(needed, available) per stage, from the model directly (independent of the table code)."""
    m, o = inst.model, inst.options
    mem = {d.name: d.memory_bytes for d in inst.devices}
    out = []
    for s in plan.stages:
        need = sum(m.layer_weight_bytes[s.span.start : s.span.end])
        need += m.embed_bytes if s.span.start == 0 else 0
        need += m.head_bytes if s.span.end == m.n_layers else 0
        need += len(s.span) * o.concurrency * o.batch * o.context * m.kv_bytes_per_token
        need += 8 * o.batch * max(1, o.context) * m.act_bytes_per_token + o.headroom_bytes
        out.append((need, mem[s.device]))
    return out


def assert_same_optimum(a: Plan | None, b: Plan | None, options: PlanOptions, rel: float = 1e-9) -> None:
    assert (a is None) == (b is None), f"one solver found a plan, the other did not: {a} vs {b}"
    if a is not None and b is not None:
        assert objective(a, options) == pytest.approx(objective(b, options), rel=rel)


@settings(SETTINGS, max_examples=600)
@given(instances())
def test_dp_equals_exhaustive(inst: Instance) -> None:
    assert_same_optimum(solve("dp", inst), solve("exhaustive", inst), inst.options)


@settings(SETTINGS, max_examples=400)
@given(instances())
def test_dp_select_equals_exhaustive_over_subsets_and_orders(inst: Instance) -> None:
    best = solve("dp_select", inst)
    assert_same_optimum(best, solve("exhaustive_select", inst), inst.options)
    fixed = solve("dp", inst)
    if fixed is not None:  # choosing devices can only help
        assert best is not None and objective(best, inst.options) <= objective(fixed, inst.options) * (
            1 + 1e-12
        )


@settings(SETTINGS, max_examples=300)
@given(instances(max_devices=5, max_layers=7, twins=True))
def test_dp_select_with_interchangeable_devices_equals_exhaustive(inst: Instance) -> None:
    assert_same_optimum(solve("dp_select", inst), solve("exhaustive_select", inst), inst.options)


def test_device_types_merge_twins_unless_a_hop_tells_them_apart() -> None:
    model = preset_profile("llama-2-7b")
    twins = (*tuple(device_from_catalog("rtx3090", f"g{i}") for i in range(3)), device_from_catalog("l4"))
    link = LinkProfile(1e-4, 1e9)
    table = build_table(model, twins, Links(link), PlanOptions())
    assert device_types(table) == [[0, 1, 2], [3]]
    odd = Links(link, (("client", "g1", LinkProfile(1e-3, 1e8)),))
    assert device_types(build_table(model, twins, odd, PlanOptions())) == [[0, 2], [1], [3]]


@settings(SETTINGS, max_examples=100)
@given(instances(max_layers=6, max_devices=3))
def test_ilp_equals_dp(inst: Instance) -> None:
    # HiGHS works to ~1e-6 relative (feasibility tolerances), the DPs are exact
    assert_same_optimum(solve("ilp", inst), solve("dp", inst), inst.options, rel=1e-5)


@settings(SETTINGS, max_examples=150)
@given(instances(skip=False))
def test_no_partitioner_violates_memory_and_exact_ones_beat_heuristics(inst: Instance) -> None:
    plans = {name: solve(name, inst) for name in PARTITIONERS.names() if name != "ilp"}
    for name, plan in plans.items():
        if plan is None:
            continue
        for need, have in memory_oracle(inst, plan):
            assert need <= have, name
        assert [s.memory_bytes for s in plan.stages] == [n for n, _ in memory_oracle(inst, plan)]
        assert plan.stages[-1].span.end == inst.model.n_layers
        if name in ("uniform", "greedy_memory", "knapsack", "dp", "exhaustive"):
            assert [s.device for s in plan.stages] == [d.name for d in inst.devices]  # fixed order, all used
    best = plans["dp"]
    for name in ("uniform", "greedy_memory", "knapsack"):
        plan = plans[name]
        if plan is not None:
            assert best is not None
            assert objective(best, inst.options) <= objective(plan, inst.options) * (1 + 1e-12), name


def test_infeasible_lists_needed_and_available_per_device() -> None:
    model = preset_profile("llama-2-13b")
    devices = (device_from_catalog("rtx3060", "small-a"), device_from_catalog("rtx3070", "small-b"))
    options = PlanOptions(context=4096)
    for name in PARTITIONERS.names():
        if name.startswith("exhaustive"):
            continue
        with pytest.raises(InfeasiblePlanError) as err:
            PARTITIONERS.get(name)(model, devices, LinkProfile(1e-4, 1e9), options)
        msg = str(err.value)
        for dev in devices:
            assert dev.name in msg and str(dev.memory_bytes) in msg, (name, msg)
        assert "how to fix" in msg and "int8" in msg and "context" in msg


def test_assignment_error_reports_per_device_need() -> None:
    model = preset_profile("llama-2-13b")  # 40 layers of ~0.6 GiB: 20 do not fit a 12 GiB card
    devices = (device_from_catalog("rtx3060", "tiny"), device_from_catalog("a6000", "big"))
    with pytest.raises(InfeasiblePlanError) as err:
        PARTITIONERS.get("uniform")(model, devices, LinkProfile(1e-4, 1e9), PlanOptions())
    msg = str(err.value)
    assert "tiny: layers [0, 20) need" in msg and "OVER by" in msg and "big: layers [20, 40)" in msg
    # the memory-aware exact partitioner finds a plan on the same devices
    plan = PARTITIONERS.get("dp")(model, devices, LinkProfile(1e-4, 1e9), PlanOptions())
    assert len(plan.stages[0].span) < 20


def test_dp_select_leaves_a_hopeless_device_out() -> None:
    model = preset_profile("llama-2-7b")
    fast = device_from_catalog("rtx4090", "fast")
    slow = DeviceProfile("slow", 24 * 2**30, 1e12, 5e9)  # 5 GB/s: a very slow card
    links = LinkProfile(1e-4, 1e9)
    plan = PARTITIONERS.get("dp_select")(model, (slow, fast), links, PlanOptions(context=512))
    assert [s.device for s in plan.stages] == ["fast"]


def test_plans_are_deterministic_and_unknown_name_lists_valid() -> None:
    model = preset_profile("mistral-7b")
    devices = tuple(
        device_from_catalog(n, f"{n}-{i}") for i, n in enumerate(["rtx3090", "rtx3090", "rtx4070"])
    )
    opts = PlanOptions(objective="throughput", concurrency=3, context=1024)
    for name in ("dp", "dp_select", "knapsack"):
        a = PARTITIONERS.get(name)(model, devices, LinkProfile(1e-4, 1e9), opts)
        b = PARTITIONERS.get(name)(model, devices, LinkProfile(1e-4, 1e9), opts)
        assert a.spans == b.spans and [s.device for s in a.stages] == [s.device for s in b.stages]
    with pytest.raises(ValueError, match="dp_select"):
        PARTITIONERS.get("nope")
