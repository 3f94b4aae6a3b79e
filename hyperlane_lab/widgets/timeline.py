"""Pipeline-bubble timeline: one lane per stage, one colour per event kind, measured vs simulated.

In each stage's lane the measured trace fills the upper band and the simulated trace (if any) the
lower band, hatched and translucent, so a glance shows where the cost model is wrong. Each source's
time axis starts at its own first event (clocks of a real run and a simulation have no common zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hyperlane_lab.types import EventKind
from hyperlane_lab.widgets._base import FigureWidget, new_figure, set_range

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["KIND_COLORS", "BubbleTimeline", "plot_timeline", "split_sources"]

KIND_COLORS: dict[str, str] = {
    EventKind.COMPUTE.value: "#2b7bba",
    EventKind.SEND.value: "#f28e2b",
    EventKind.RECEIVE.value: "#59a14f",
    EventKind.QUANTIZE.value: "#b07aa1",
    EventKind.DECODE.value: "#edc948",
    EventKind.SAMPLE.value: "#e15759",
    EventKind.QUEUE.value: "#bab0ac",
    EventKind.LAUNCH.value: "#9c755f",
}
SIMULATED = "simulated"
StepSel = int | tuple[int, int] | None


def _frame(trace: Any) -> pd.DataFrame:
    import pandas as pd

    from hyperlane_lab.tracing import events_to_frame

    if trace is None:
        return events_to_frame([])
    if isinstance(trace, pd.DataFrame):
        return trace
    if hasattr(trace, "trace_events"):  # a distributed model
        return events_to_frame(trace.trace_events())
    return events_to_frame(trace)


def split_sources(trace: Any, simulated: Any = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measured rows, simulated rows): rows of ``trace`` tagged ``source == "simulated"`` count as
    simulated too, so one combined frame can be passed alone."""
    import pandas as pd

    df, sim = _frame(trace), _frame(simulated)
    if not sim.empty:
        sim = sim.assign(source=SIMULATED)
    if "source" in df.columns and (df["source"] == SIMULATED).any():
        sim = pd.concat([sim, df[df["source"] == SIMULATED]], ignore_index=True)
        df = df[df["source"] != SIMULATED]
    return df.reset_index(drop=True), sim.reset_index(drop=True)


def _select_steps(df: pd.DataFrame, steps: StepSel) -> pd.DataFrame:
    if steps is None or df.empty:
        return df
    lo, hi = (steps, steps) if isinstance(steps, int) else (int(steps[0]), int(steps[1]))
    return df[(df["step"] >= lo) & (df["step"] <= hi)]


def _bubble_pct(df: pd.DataFrame) -> float:
    from hyperlane_lab.tracing import summarize

    if df.empty:
        return float("nan")
    return float(summarize(df)["bubble_pct"].mean())


def plot_timeline(
    trace: Any,
    simulated: Any = None,
    steps: StepSel = None,
    xlim: tuple[float, float] | None = None,
    width: float = 10.0,
) -> Figure:
    """Figure with one lane per stage (y tick labels ``stage k``), bars coloured by event kind.

    trace / simulated: TraceEvent lists or frames from ``events_to_frame``; steps: one decode step or
    an inclusive ``(lo, hi)`` range (0 = prefill); xlim: visible time window in seconds from the
    source's first event. The legend has one entry per kind drawn, plus ``simulated`` when present.
    """
    from matplotlib.patches import Patch

    measured, sim = split_sources(trace, simulated)
    # each source on its own zero, taken before step filtering so zoom windows stay comparable
    parts = []
    for label, df in (("measured", measured), (SIMULATED, sim)):
        if not df.empty:
            origin = float(df["start"].min())
            parts.append((label, _select_steps(df, steps), origin))
    stages = sorted({int(s) for _, df, _ in parts for s in df["stage"]})
    if not stages:
        stages = sorted({int(s) for _, df in (("m", measured), ("s", sim)) for s in df["stage"]})
    fig = new_figure(width, max(2.6, 0.9 + 0.6 * len(stages)))  # room for the legend
    ax = fig.add_subplot(1, 1, 1)
    lane = {s: i for i, s in enumerate(stages)}
    both = len(parts) == 2
    kinds_drawn: list[str] = []
    for label, df, origin in parts:
        is_sim = label == SIMULATED
        # lane i spans [i - 0.4, i + 0.4]; with both sources measured takes the top part, simulated the bottom
        y0, h = (-0.4, 0.8) if not both else ((0.02, 0.38) if is_sim else (-0.4, 0.38))
        for (stage, kind), g in df.groupby(["stage", "kind"], sort=True):
            kind = EventKind(kind).value
            xr = [(float(s) - origin, float(e - s)) for s, e in zip(g["start"], g["end"])]
            ax.broken_barh(
                xr,
                (lane[int(stage)] + y0, h),
                facecolors=KIND_COLORS.get(kind, "#888888"),
                alpha=0.45 if is_sim else 1.0,
                hatch="///" if is_sim else None,
                edgecolor="#333333" if is_sim else "none",
                linewidth=0.3,
            )
            if kind not in kinds_drawn:
                kinds_drawn.append(kind)
    ax.set_yticks(range(len(stages)))
    ax.set_yticklabels([f"stage {s}" for s in stages])
    ax.set_ylim(len(stages) - 0.5, -0.5)  # stage 0 on top
    ax.set_xlabel("time (s)")
    if xlim is not None:
        ax.set_xlim(*xlim)
    handles = [Patch(facecolor=KIND_COLORS.get(k, "#888888"), label=k) for k in sorted(kinds_drawn)]
    if any(label == SIMULATED for label, _, _ in parts):
        handles.append(Patch(facecolor="white", edgecolor="#333333", hatch="///", label=SIMULATED))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    titles = []
    for label, df, _ in parts:
        if not df.empty:
            titles.append(f"{label}: bubble {_bubble_pct(df):.0f}%")
    ax.set_title("pipeline timeline" + (" — " + ", ".join(titles) if titles else " (no events)"))
    ax.grid(axis="x", alpha=0.3)
    return fig


class BubbleTimeline(FigureWidget):
    """``plot_timeline`` with a step range slider, a time-zoom slider and a simulated on/off toggle.

    ``set_trace(trace, simulated)`` swaps the data (e.g. after another ``generate``).
    """

    def __init__(self, trace: Any, simulated: Any = None, width: float = 10.0) -> None:
        import ipywidgets as w

        self.width = width
        self.steps = w.IntRangeSlider(
            description="steps", min=0, max=1, value=(0, 1), continuous_update=False
        )
        self.zoom = w.FloatRangeSlider(
            description="time (s)",
            min=0.0,
            max=1.0,
            value=(0.0, 1.0),
            step=1e-4,
            readout_format=".4f",
            continuous_update=False,
        )
        self.show_simulated = w.Checkbox(description="simulated", value=True)
        super().__init__([self.steps, self.zoom, self.show_simulated])
        self.measured, self.simulated = split_sources(None)
        self.set_trace(trace, simulated)
        for ctl in (self.steps, self.zoom, self.show_simulated):
            ctl.observe(self.redraw, names="value")

    def set_trace(self, trace: Any, simulated: Any = None) -> None:
        """Replace the traces, reset the sliders to cover them, and redraw."""
        self.measured, self.simulated = split_sources(trace, simulated)
        frames = [df for df in (self.measured, self.simulated) if not df.empty]
        max_step = max((int(df["step"].max()) for df in frames), default=0)
        span = max((float(df["end"].max() - df["start"].min()) for df in frames), default=0.0)
        self._suspended = True
        try:
            set_range(self.steps, 0, max(max_step, 1), (0, max_step))
            self.zoom.step = max(span / 1000.0, 1e-9)
            set_range(self.zoom, 0.0, max(span, 1e-6))
            self.show_simulated.disabled = self.simulated.empty
        finally:
            self._suspended = False
        self.redraw()

    @property
    def step_range(self) -> tuple[int, int]:
        return (int(self.steps.value[0]), int(self.steps.value[1]))

    def _draw(self) -> Figure:
        sim = self.simulated if self.show_simulated.value else None
        fig = plot_timeline(
            self.measured, sim, steps=self.step_range, xlim=tuple(self.zoom.value), width=self.width
        )
        self.status.value = self._status_html()
        return fig

    def _status_html(self) -> str:
        from hyperlane_lab.tracing import summarize

        parts = []
        for label, df in (("measured", self.measured), (SIMULATED, self.simulated)):
            if df.empty:
                continue
            s = summarize(df)
            cells = ", ".join(f"stage {r.stage}: {r.bubble_pct:.0f}%" for r in s.itertuples())
            parts.append(f"<b>{label}</b> bubbles — {cells}")
        return "<br>".join(parts) or "no events"

    def summary(self) -> pd.DataFrame:
        """``tracing.summarize`` of both traces (one row per source and stage)."""
        import pandas as pd

        from hyperlane_lab.tracing import summarize

        frames: Sequence[pd.DataFrame] = [df for df in (self.measured, self.simulated) if not df.empty]
        return summarize(pd.concat(frames, ignore_index=True)) if frames else summarize(self.measured)
