"""Notebook views of traces, probes, clusters and plans.

Each view has a static ``plot_*`` function returning a matplotlib ``Figure`` (drawn with the Agg
canvas, never through pyplot's global state) and an ipywidgets wrapper with controls that redraws
it. The wrappers build and update without a display (their figure is rendered to a PNG ``Image``
widget), so tests and scripts can drive them. matplotlib and ipywidgets are imported lazily.

    BubbleTimeline(model.trace_events(), simulated=sim_events)   # lanes per stage, step/zoom sliders
    QuantErrorView(probe_df)                                     # error histograms, per-boundary error
    ClusterView(discovery_manager)                               # live worker table
    PlanView(plan)                                               # layers / memory / time per device
"""

from __future__ import annotations

from hyperlane_lab.widgets.cluster import ClusterView, plot_cluster, workers_frame
from hyperlane_lab.widgets.plan import PlanView, plan_frame, plot_plan
from hyperlane_lab.widgets.quant import QuantErrorView, plot_quant_error
from hyperlane_lab.widgets.timeline import KIND_COLORS, BubbleTimeline, plot_timeline

__all__ = [
    "KIND_COLORS",
    "BubbleTimeline",
    "ClusterView",
    "PlanView",
    "QuantErrorView",
    "plan_frame",
    "plot_cluster",
    "plot_plan",
    "plot_quant_error",
    "plot_timeline",
    "workers_frame",
]
