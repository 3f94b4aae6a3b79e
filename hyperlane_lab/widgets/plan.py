"""A partition plan at a glance: which layers each device holds, its memory use, its predicted time.

``plot_plan(plan, devices=...)`` draws three panels sharing one lane per stage (y tick labels
``k: device``); with device profiles given, the memory panel also outlines each device's capacity.
``PlanView({"uniform": p1, "dp": p2})`` adds a dropdown to compare several plans.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from hyperlane_lab.types import DeviceProfile, Plan
from hyperlane_lab.widgets._base import FigureWidget, new_figure

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["PlanView", "plan_frame", "plot_plan"]

GIB = 2**30


def _capacities(devices: Any) -> dict[str, int]:
    """``{device name: memory_bytes}`` from DeviceProfiles (a list or a name -> profile mapping)."""
    if devices is None:
        return {}
    items: Iterable[Any] = devices.values() if isinstance(devices, Mapping) else devices
    out = {}
    for d in items:
        if not isinstance(d, DeviceProfile):
            raise TypeError(f"devices must be DeviceProfile objects, got {type(d).__name__}")
        out[d.name] = d.memory_bytes
    return out


def plan_frame(plan: Plan, devices: Any = None) -> pd.DataFrame:
    """One row per stage: device, layer span, layer count, memory GiB (+ capacity), predicted ms, codec."""
    import pandas as pd

    caps = _capacities(devices)
    rows = []
    for i, st in enumerate(plan.stages):
        row = {
            "stage": i,
            "device": st.device,
            "layers": str(st.span),
            "n_layers": len(st.span),
            "memory_gib": round(st.memory_bytes / GIB, 3),
            "predicted_ms": round(st.predicted_s * 1e3, 4),
            "codec": st.codec,
            "address": st.address or "",
        }
        if caps:
            cap = caps.get(st.device)
            row["capacity_gib"] = round(cap / GIB, 3) if cap else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def plot_plan(plan: Plan, devices: Any = None, width: float = 11.0) -> Figure:
    """Three panels, one lane per stage: layer span, memory use (GiB), predicted decode time (ms)."""
    import numpy as np

    caps = _capacities(devices)
    n = len(plan.stages)
    fig = new_figure(width, 1.2 + 0.45 * n)
    ax_layers, ax_mem, ax_time = fig.subplots(1, 3, sharey=True, gridspec_kw={"width_ratios": [2, 1, 1]})
    y = np.arange(n)
    colors = [f"C{i % 10}" for i in range(n)]
    starts = [st.span.start for st in plan.stages]
    lengths = [len(st.span) for st in plan.stages]
    bars = ax_layers.barh(y, lengths, left=starts, color=colors, height=0.6)
    for b, st in zip(bars, plan.stages):
        ax_layers.text(
            b.get_x() + b.get_width() / 2,
            b.get_y() + b.get_height() / 2,
            str(st.span),
            ha="center",
            va="center",
            fontsize="small",
            color="white",
        )
    ax_layers.set_xlim(0, plan.n_layers)
    ax_layers.set_xlabel("decoder layers")
    mem = [st.memory_bytes / GIB for st in plan.stages]
    ax_mem.barh(y, mem, color=colors, height=0.6, label="planned")
    if caps:
        cap = [caps.get(st.device, 0) / GIB for st in plan.stages]
        ax_mem.barh(y, cap, height=0.6, fill=False, edgecolor="#333333", linestyle="--", label="capacity")
        ax_mem.legend(fontsize="small", loc="lower right")
    ax_mem.set_xlabel("memory (GiB)")
    ax_time.barh(y, [st.predicted_s * 1e3 for st in plan.stages], color=colors, height=0.6)
    ax_time.set_xlabel("predicted step (ms)")
    ax_layers.set_yticks(y)
    ax_layers.set_yticklabels([f"{i}: {st.device}" for i, st in enumerate(plan.stages)])
    ax_layers.set_ylim(n - 0.5, -0.5)  # stage 0 on top
    tps = f", {plan.predicted_tokens_per_s:.1f} tok/s" if plan.predicted_tokens_per_s else ""
    lat = f", {plan.predicted_latency_s * 1e3:.2f} ms/token" if plan.predicted_latency_s else ""
    fig.suptitle(f"plan: {plan.partitioner} ({plan.objective}){lat}{tps}")
    return fig


class PlanView(FigureWidget):
    """``plot_plan`` plus a stage table; a mapping of plans gets a dropdown to switch between them."""

    def __init__(self, plan: Plan | Mapping[str, Plan], devices: Any = None) -> None:
        import ipywidgets as w

        self.devices = devices
        self.table = w.HTML()
        self.choice = w.Dropdown(description="plan", options=["plan"], value="plan")
        super().__init__([self.choice])
        self.widget.children = (self.controls, self.image, self.table, self.status)
        self.plans: dict[str, Plan] = {}
        self.set_plans(plan)
        self.choice.observe(self.redraw, names="value")

    def set_plans(self, plan: Plan | Mapping[str, Plan], devices: Any = None) -> None:
        """Replace the plan(s) shown (and optionally the device profiles), then redraw."""
        plans = {"plan": plan} if isinstance(plan, Plan) else dict(plan)
        if not plans or not all(isinstance(p, Plan) for p in plans.values()):
            raise TypeError("PlanView needs a Plan or a non-empty mapping name -> Plan")
        self.plans = plans
        if devices is not None:
            self.devices = devices
        self._suspended = True
        try:
            self.choice.options = list(plans)
            self.choice.value = next(iter(plans))
            self.choice.layout.display = "none" if len(plans) == 1 else None
        finally:
            self._suspended = False
        self.redraw()

    @property
    def plan(self) -> Plan:
        return self.plans[self.choice.value]

    def _draw(self) -> Figure:
        self.table.value = plan_frame(self.plan, self.devices).to_html(index=False, border=0)
        p = self.plan
        self.status.value = (
            f"bottleneck {p.bottleneck_s * 1e3:.3f} ms, predicted {p.predicted_tokens_per_s:.1f} tok/s, "
            f"solved in {p.solve_s * 1e3:.1f} ms"
        )
        return plot_plan(p, self.devices)
