"""Widgets and plot_* functions build and update without a display, from simulator traces, hand-built
traces, probe-like frames, fake discoveries and real partitioner plans."""

from __future__ import annotations

import threading
import time

import matplotlib
import numpy as np
import pandas as pd
import pytest

from hyperlane_lab.tracing import events_to_frame, summarize
from hyperlane_lab.types import DeviceProfile, EventKind, LayerSpan, Plan, StagePlan, TraceEvent, WorkerInfo
from hyperlane_lab.widgets import (
    BubbleTimeline,
    ClusterView,
    PlanView,
    QuantErrorView,
    plan_frame,
    plot_cluster,
    plot_plan,
    plot_quant_error,
    plot_timeline,
    workers_frame,
)

GIB = 2**30
PNG = b"\x89PNG"


def sim_events(stages: int = 3, concurrency: int = 2, steps: int = 4) -> list[TraceEvent]:
    simulator = pytest.importorskip("hyperlane_lab.planning.simulator")
    times = simulator.PipelineTimes.equal_stages(stages, prefill_s=0.010, decode_s=0.002, hop_s=0.0005)
    return list(simulator.simulate(times, concurrency, steps).events)


def measured_events() -> list[TraceEvent]:
    C, S, R = EventKind.COMPUTE, EventKind.SEND, EventKind.RECEIVE
    return [
        TraceEvent(0, R, 100.0, 100.1, step=0),
        TraceEvent(0, C, 100.1, 100.5, step=0, tokens=4),
        TraceEvent(0, S, 100.5, 100.6, step=0, nbytes=512),
        TraceEvent(1, C, 100.6, 101.0, step=0, tokens=4),
        TraceEvent(1, EventKind.SAMPLE, 101.0, 101.05, step=0),
        TraceEvent(0, C, 101.1, 101.2, step=1, tokens=1),
        TraceEvent(1, C, 101.3, 101.4, step=1, tokens=1),
    ]


def legend_texts(ax) -> list[str]:
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg else []


def n_rects(ax) -> int:
    return sum(len(c.get_paths()) for c in ax.collections)


# ---------------------------------------------------------------- timeline


def test_plot_timeline_lanes_and_legend_from_simulator_trace() -> None:
    events = sim_events(stages=3)
    backend = matplotlib.get_backend()
    fig = plot_timeline(events)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stage 0", "stage 1", "stage 2"]
    assert sorted(legend_texts(ax)) == [*sorted({e.kind.value for e in events}), "simulated"]
    assert n_rects(ax) == len(events)  # one rectangle per event
    assert matplotlib.get_backend() == backend  # no global backend switch


def test_plot_timeline_overlays_measured_and_simulated() -> None:
    measured, sim = measured_events(), sim_events(stages=3)
    fig = plot_timeline(measured, simulated=sim)
    ax = fig.axes[0]
    # lanes are the union of both traces' stages
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stage 0", "stage 1", "stage 2"]
    kinds = {e.kind.value for e in measured} | {e.kind.value for e in sim}
    assert sorted(legend_texts(ax)) == [*sorted(kinds), "simulated"]
    assert n_rects(ax) == len(measured) + len(sim)
    hatched = [c for c in ax.collections if c.get_hatch()]
    assert sum(len(c.get_paths()) for c in hatched) == len(sim)
    # measured draws in the upper half of each lane, simulated in the lower half (y grows downwards)
    for c in ax.collections:
        ys = np.concatenate([p.vertices[:, 1] for p in c.get_paths()])
        frac = ys - np.round(ys.mean())
        assert (frac >= 0).all() if c.get_hatch() else (frac <= 0).all()


def test_plot_timeline_step_filter_and_zoom() -> None:
    events = sim_events(stages=2, concurrency=1, steps=5)
    fig = plot_timeline(events, steps=(2, 3), xlim=(0.0, 0.02))
    ax = fig.axes[0]
    assert n_rects(ax) == sum(1 for e in events if 2 <= e.step <= 3)
    assert ax.get_xlim() == pytest.approx((0.0, 0.02))
    assert n_rects(plot_timeline(events, steps=0).axes[0]) == sum(1 for e in events if e.step == 0)


def test_plot_timeline_combined_frame_splits_by_source() -> None:
    df = pd.concat([events_to_frame(measured_events()), events_to_frame(sim_events(2))], ignore_index=True)
    ax = plot_timeline(df).axes[0]
    assert "simulated" in legend_texts(ax)
    assert any(c.get_hatch() for c in ax.collections)


def test_bubble_timeline_widget_updates() -> None:
    sim = sim_events(stages=2, concurrency=2, steps=6)
    w = BubbleTimeline(measured_events(), simulated=sim)
    assert w.image.value[:4] == PNG
    assert w.steps.max == 6 and w.steps.value == (0, 6)
    assert n_rects(w.figure.axes[0]) == len(measured_events()) + len(sim)
    w.steps.value = (1, 1)  # slider callback redraws
    assert n_rects(w.figure.axes[0]) == sum(1 for e in measured_events() + sim if e.step == 1)
    w.show_simulated.value = False
    assert n_rects(w.figure.axes[0]) == sum(1 for e in measured_events() if e.step == 1)
    w.zoom.value = (0.0, 0.5)
    assert w.figure.axes[0].get_xlim() == pytest.approx((0.0, 0.5))
    # new data resets the sliders
    w.set_trace(measured_events())
    assert w.steps.max == 1 and w.steps.value == (0, 1)
    assert w.simulated.empty and w.show_simulated.disabled
    expected = summarize(measured_events())
    got = w.summary()
    assert got["bubble_pct"].tolist() == pytest.approx(expected["bubble_pct"].tolist())
    assert "stage 0" in w.status.value
    assert "application/vnd.jupyter.widget-view+json" in w._repr_mimebundle_()


# ---------------------------------------------------------------- quantization error


def probe_like(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for b in (1, 2, 3, 4):
        for codec, scale in (("int8", 0.01), ("int4", 0.1)):
            for g in (32, 128):
                for p in range(6):
                    err = scale * (1 + g / 128) * rng.random()
                    rows.append(
                        dict(
                            boundary=b,
                            codec=codec,
                            group_size=g,
                            prompt=p,
                            rel_error=err,
                            cosine=1 - err**2 / 2,
                            kl=err**2,
                            top1_agreement=1 - err,
                            ppl_delta=err,
                        )
                    )
    return pd.DataFrame(rows)


def test_plot_quant_error_series_and_bar_heights() -> None:
    df = probe_like()
    fig = plot_quant_error(df)
    ax_hist, ax_bound = fig.axes
    assert len(ax_hist.containers) == 4 and len(ax_bound.containers) == 4
    assert sorted(legend_texts(ax_bound)) == sorted(["int8/g32", "int8/g128", "int4/g32", "int4/g128"])
    assert [t.get_text() for t in ax_bound.get_xticklabels()] == ["1", "2", "3", "4"]
    for container, label in zip(ax_bound.containers, legend_texts(ax_bound)):
        codec, g = label.split("/g")
        sel = df[(df.codec == codec) & (df.group_size == int(g))]
        want = [sel[sel.boundary == b].rel_error.mean() for b in (1, 2, 3, 4)]
        assert [r.get_height() for r in container] == pytest.approx(want)
    for container in ax_hist.containers:  # every row lands in one histogram bin
        assert sum(r.get_height() for r in container) == 4 * 6


def test_plot_quant_error_filters() -> None:
    df = probe_like()
    ax = plot_quant_error(df, codec="int8").axes[1]
    assert sorted(legend_texts(ax)) == ["int8/g128", "int8/g32"]
    ax = plot_quant_error(df, group_size=32, metric="kl").axes[1]
    assert sorted(legend_texts(ax)) == ["int4/g32", "int8/g32"]
    assert ax.get_ylabel() == "mean kl"
    with pytest.raises(ValueError, match="lacks column"):
        plot_quant_error(df.drop(columns=["boundary"]))


def probe_grid_like() -> pd.DataFrame:
    """The schema of hyperlane_lab.probes.probe_grid: string boundaries plus an "all" row."""
    rows = []
    for codec, scale in (("int8", 0.006), ("int4", 0.11)):
        for i, b in enumerate(["2", "4", "10", "all"]):
            rows.append(
                dict(
                    boundary=b,
                    codec=codec,
                    group_size=32,
                    bytes_per_token=36,
                    rel_l2=scale * (1 + i),
                    cosine=1 - scale,
                    kl=scale**2,
                    top1_agreement=1 - scale,
                    ppl_delta_rel=scale / 10,
                    positions=384,
                )
            )
    return pd.DataFrame(rows)


def test_plot_quant_error_on_probe_grid_schema() -> None:
    df = probe_grid_like()
    fig = plot_quant_error(df)  # default metric: the probe's rel_l2
    ax_hist, ax_bound = fig.axes
    assert ax_hist.get_xlabel() == "rel_l2"
    # numbered boundaries in numeric order, the whole-model row last
    assert [t.get_text() for t in ax_bound.get_xticklabels()] == ["2", "4", "10", "all"]
    int4 = ax_bound.containers[legend_texts(ax_bound).index("int4/g32")]
    assert [r.get_height() for r in int4] == pytest.approx([0.11, 0.22, 0.33, 0.44])
    for container in ax_hist.containers:  # the "all" row is not a single cut: not in the histogram
        assert sum(r.get_height() for r in container) == 3
    view = QuantErrorView(df)
    assert view.metric.value == "rel_l2"
    assert "positions" not in view.metric.options and "bytes_per_token" not in view.metric.options


def test_quant_error_view_dropdowns() -> None:
    view = QuantErrorView(probe_like())
    assert view.image.value[:4] == PNG
    assert set(view.codec.options) == {"all", "int4", "int8"}
    assert list(view.group_size.options) == ["all", 32, 128]
    assert list(view.metric.options)[:5] == ["rel_error", "cosine", "kl", "top1_agreement", "ppl_delta"]
    view.codec.value = "int4"
    assert len(view.figure.axes[1].containers) == 2
    view.group_size.value = 128
    assert len(view.figure.axes[1].containers) == 1
    assert len(view.selection()) == 4 * 6
    view.metric.value = "cosine"
    assert view.figure.axes[0].get_xlabel() == "cosine"
    view.set_frame(probe_like(1)[lambda d: d.codec == "int8"])
    assert set(view.codec.options) == {"all", "int8"} and view.codec.value == "all"


# ---------------------------------------------------------------- cluster


def worker(i: int, total_gib: float, free_gib: float) -> WorkerInfo:
    return WorkerInfo(
        f"w{i}",
        "127.0.0.1",
        50051 + i,
        60051 + i,
        device_kind="cuda",
        gpu_name="RTX 3090",
        total_memory=int(total_gib * GIB),
        free_memory=int(free_gib * GIB),
        flops=7.1e13,
        mem_bw=9.36e11,
    )


class FakeDiscovery:
    """The public surface of DiscoveryManager that ClusterView uses."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        self.callbacks: dict[str, list] = {"add": [], "update": [], "remove": []}

    @property
    def discovered_workers(self) -> dict[str, WorkerInfo]:
        return dict(self._workers)

    def on_add(self, fn):
        self.callbacks["add"].append(fn)
        return fn

    def on_update(self, fn):
        self.callbacks["update"].append(fn)
        return fn

    def on_remove(self, fn):
        self.callbacks["remove"].append(fn)
        return fn

    def add(self, info: WorkerInfo) -> None:
        event = "update" if info.worker_id in self._workers else "add"
        self._workers[info.worker_id] = info
        for fn in self.callbacks[event]:
            fn(info)

    def remove(self, worker_id: str) -> None:
        info = self._workers.pop(worker_id)
        for fn in self.callbacks["remove"]:
            fn(info)


def test_plot_cluster_bars() -> None:
    ws = [worker(1, 24, 20), worker(0, 12, 3)]
    ax = plot_cluster(ws).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["w0", "w1"]
    used, free = ax.containers
    assert [r.get_height() for r in used] == pytest.approx([9.0, 4.0])
    assert [r.get_height() for r in free] == pytest.approx([3.0, 20.0])
    assert legend_texts(ax) == ["used", "free"]
    df = workers_frame({w.worker_id: w for w in ws})
    assert df["worker_id"].tolist() == ["w0", "w1"]
    assert df["total_gib"].tolist() == [12.0, 24.0]


def test_cluster_view_follows_discovery_callbacks() -> None:
    disc = FakeDiscovery()
    view = ClusterView(disc)
    assert "no workers" in view.table.value
    assert all(len(v) == 1 for v in disc.callbacks.values())  # registered on add/update/remove
    disc.add(worker(0, 24, 24))
    disc.add(worker(1, 12, 12))
    assert view.table.value.count("<tr") == 1 + 2  # header + 2 workers
    disc.add(worker(1, 12, 2))  # update: less free memory
    assert view.frame().set_index("worker_id").loc["w1", "free_gib"] == 2.0
    assert "2.0" in view.table.value
    disc.remove("w0")
    assert view.table.value.count("<tr") == 1 + 1
    assert view.image.value[:4] == PNG
    assert "1 worker(s)" in view.status.value
    view.close()
    before = view.refreshes
    disc.add(worker(2, 8, 8))  # closed: callbacks no longer refresh
    assert view.refreshes == before


def test_cluster_view_timer_refreshes_and_stops() -> None:
    disc = FakeDiscovery()
    view = ClusterView(disc, refresh_s=0.02, show_plot=False)
    deadline = time.monotonic() + 10
    while view.refreshes < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert view.refreshes >= 3
    view.close()
    assert not any(t.name == "cluster-view-refresh" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(ValueError, match="refresh_s"):
        ClusterView(disc, refresh_s=0)


# ---------------------------------------------------------------- plan


def real_plan() -> tuple[Plan, list[DeviceProfile]]:
    partitioners = pytest.importorskip("hyperlane_lab.planning.partitioners")
    from hyperlane_lab.planning.catalog import device_from_catalog
    from hyperlane_lab.planning.cost import Links
    from hyperlane_lab.planning.shapes import preset_profile
    from hyperlane_lab.types import LinkProfile

    devices = [device_from_catalog("rtx4090"), device_from_catalog("rtx3060"), device_from_catalog("rtx3090")]
    plan = partitioners.get_partitioner("dp")(
        preset_profile("llama-2-7b"), devices, Links(LinkProfile(3e-4, 1.25e8))
    )
    return plan, devices


def test_plot_plan_lanes_and_values() -> None:
    plan, devices = real_plan()
    fig = plot_plan(plan, devices=devices)
    ax_layers, ax_mem, ax_time = fig.axes
    assert [t.get_text() for t in ax_layers.get_yticklabels()] == [
        f"{i}: {s.device}" for i, s in enumerate(plan.stages)
    ]
    bars = ax_layers.containers[0]
    assert [(r.get_x(), r.get_width()) for r in bars] == [(s.span.start, len(s.span)) for s in plan.stages]
    assert sum(r.get_width() for r in bars) == plan.n_layers
    planned, capacity = ax_mem.containers
    assert [r.get_width() for r in planned] == pytest.approx([s.memory_bytes / GIB for s in plan.stages])
    caps = {d.name: d.memory_bytes / GIB for d in devices}
    assert [r.get_width() for r in capacity] == pytest.approx([caps[s.device] for s in plan.stages])
    assert [r.get_width() for r in ax_time.containers[0]] == pytest.approx(
        [s.predicted_s * 1e3 for s in plan.stages]
    )
    df = plan_frame(plan, devices)
    assert df["n_layers"].sum() == plan.n_layers and "capacity_gib" in df


def test_plan_view_switches_plans() -> None:
    plan, devices = real_plan()
    other = Plan(
        (StagePlan("a", LayerSpan(0, 16), memory_bytes=GIB), StagePlan("b", LayerSpan(16, 32))),
        partitioner="hand",
    )
    view = PlanView({"dp": plan, "hand": other}, devices=devices)
    assert list(view.choice.options) == ["dp", "hand"]
    assert view.image.value[:4] == PNG
    assert plan.stages[0].device in view.table.value
    view.choice.value = "hand"
    assert view.plan is other
    assert [t.get_text() for t in view.figure.axes[0].get_yticklabels()] == ["0: a", "1: b"]
    assert "[16, 32)" in view.table.value
    single = PlanView(other)
    assert single.choice.layout.display == "none"
