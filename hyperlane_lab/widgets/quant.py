"""Quantization-error views of an accuracy-probe frame.

A probe frame (``hyperlane_lab.probes.probe_grid``) has one row per measurement with at least
``boundary`` and ``codec`` columns, usually ``group_size``, and metric columns such as ``rel_l2``,
``cosine``, ``kl``, ``top1_agreement``, ``ppl_delta_rel``. Boundaries may be ints or strings; the
probe's ``"all"`` row (every boundary compressed) is drawn as its own bar, after the numbered ones,
and left out of the histogram. A *series* is one (codec, group size) pair, labelled ``int4/g32``
(``fp16`` when the codec has no groups).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hyperlane_lab.widgets._base import FigureWidget, new_figure

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "METRICS",
    "QuantErrorView",
    "default_metric",
    "filter_probe",
    "metric_columns",
    "plot_quant_error",
    "series_label",
]

# preferred order of metric columns (the first one present is the default)
METRICS = (
    "rel_l2", "rel_error", "rel_l2_non_outlier", "cosine", "max_abs", "kl", "top1_agreement",
    "ppl_delta_rel", "ppl_delta", "greedy_prefix_agreement", "greedy_agreement",
)  # fmt: skip
NOT_METRICS = ("boundary", "group_size", "prompt", "positions", "tokens", "greedy_tokens", "bytes_per_token")
ALL = "all"


def series_label(codec: str, group_size: Any) -> str:
    try:
        g = int(group_size)
    except (TypeError, ValueError):
        g = 0
    return f"{codec}/g{g}" if g > 0 else str(codec)


def default_metric(df: pd.DataFrame) -> str:
    """The first of ``METRICS`` the frame has (else its first numeric non-key column)."""
    for m in (*METRICS, *metric_columns(df)):
        if m in df.columns:
            return m
    raise ValueError(f"probe frame has no metric column (has {list(df.columns)}); expected one of {METRICS}")


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric measurement columns, known metrics first."""
    numeric = [c for c in df.columns if c not in NOT_METRICS and df[c].dtype.kind in "fiu"]
    return [m for m in METRICS if m in numeric] + [c for c in numeric if c not in METRICS]


def _boundary_key(b: Any) -> tuple[int, float, str]:
    """Numbered boundaries in numeric order, then anything else (the probe's "all") by name."""
    try:
        return (0, float(b), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(b))


def _check(df: pd.DataFrame, metric: str) -> None:
    missing = [c for c in ("boundary", "codec", metric) if c not in df.columns]
    if missing:
        raise ValueError(
            f"probe frame lacks column(s) {missing} (has {list(df.columns)}); pass the frame returned by "
            "hyperlane_lab.probes.probe_grid or choose metric= among its numeric columns"
        )


def filter_probe(
    df: pd.DataFrame, codec: str | None = None, group_size: int | str | None = None
) -> pd.DataFrame:
    """Rows of one codec and/or group size (None or ``"all"`` keeps every value)."""
    if codec not in (None, ALL):
        df = df[df["codec"] == codec]
    if group_size not in (None, ALL) and "group_size" in df.columns:
        df = df[df["group_size"] == int(group_size)]
    return df


def _series(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    keys = ["codec", "group_size"] if "group_size" in df.columns else ["codec"]
    out = []
    for key, g in df.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        out.append((series_label(key[0], key[1] if len(key) > 1 else 0), g))
    return out


def plot_quant_error(
    probe_df: pd.DataFrame,
    codec: str | None = None,
    group_size: int | str | None = None,
    metric: str | None = None,
    bins: int = 30,
) -> Figure:
    """Two panels: a histogram of ``metric`` per series (left) and its mean per boundary (right).

    Each series is one bar container in each panel; the right panel's legend lists the series.
    ``metric`` defaults to the first of ``METRICS`` in the frame.
    """
    import numpy as np

    metric = metric or default_metric(probe_df)
    _check(probe_df, metric)
    df = filter_probe(probe_df, codec, group_size)
    fig = new_figure(11.0, 3.8)
    ax_hist, ax_bound = fig.subplots(1, 2)
    series = _series(df)
    per_cut = df[df["boundary"].map(lambda b: _boundary_key(b)[0] == 0)]  # histogram: numbered boundaries
    values = per_cut[metric].astype(float).to_numpy()
    values = values[np.isfinite(values)]
    edges = np.histogram_bin_edges(values, bins=bins) if values.size else np.linspace(0, 1, bins + 1)
    boundaries = sorted(df["boundary"].unique().tolist(), key=_boundary_key) if not df.empty else []
    xpos = np.arange(len(boundaries))
    width = 0.8 / max(1, len(series))
    for i, (label, g) in enumerate(series):
        v = g.loc[g.index.isin(per_cut.index), metric].astype(float).to_numpy()
        ax_hist.hist(v[np.isfinite(v)], bins=edges, alpha=0.55, label=label)
        means = g.groupby("boundary")[metric].mean().reindex(boundaries)
        ax_bound.bar(
            xpos + (i - (len(series) - 1) / 2) * width, means.to_numpy(dtype=float), width, label=label
        )
    ax_hist.set_xlabel(metric)
    ax_hist.set_ylabel("count")
    ax_hist.set_title(f"{metric} distribution")
    ax_bound.set_xticks(xpos)
    ax_bound.set_xticklabels([str(b) for b in boundaries])
    ax_bound.set_xlabel("boundary (first layer after the cut)")
    ax_bound.set_ylabel(f"mean {metric}")
    ax_bound.set_title(f"{metric} per boundary")
    if series:
        ax_bound.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax_hist.set_title(f"{metric}: no rows match codec={codec}, group_size={group_size}")
    return fig


class QuantErrorView(FigureWidget):
    """``plot_quant_error`` with codec, group-size and metric dropdowns; ``set_frame(df)`` swaps data."""

    def __init__(self, probe_df: pd.DataFrame, metric: str | None = None) -> None:
        import ipywidgets as w

        metric = metric or default_metric(probe_df)
        self.codec = w.Dropdown(description="codec", options=[ALL], value=ALL)
        self.group_size = w.Dropdown(description="group", options=[ALL], value=ALL)
        self.metric = w.Dropdown(description="metric", options=[metric], value=metric)
        super().__init__([self.codec, self.group_size, self.metric])
        self.df = probe_df
        self.set_frame(probe_df, metric)
        for ctl in (self.codec, self.group_size, self.metric):
            ctl.observe(self.redraw, names="value")

    def set_frame(self, probe_df: pd.DataFrame, metric: str | None = None) -> None:
        """Replace the probe frame, refresh the dropdown choices, and redraw."""
        metric = metric or (
            self.metric.value if self.metric.value in probe_df.columns else default_metric(probe_df)
        )
        _check(probe_df, metric)
        self.df = probe_df
        metrics = metric_columns(probe_df)
        groups = (
            sorted(int(g) for g in probe_df["group_size"].dropna().unique())
            if "group_size" in probe_df
            else []
        )
        self._suspended = True
        try:
            self.metric.options = metrics or [metric]
            self.metric.value = metric
            self.codec.options = [ALL, *sorted(str(c) for c in probe_df["codec"].unique())]
            self.codec.value = ALL
            self.group_size.options = [ALL, *groups]
            self.group_size.value = ALL
        finally:
            self._suspended = False
        self.redraw()

    def selection(self) -> pd.DataFrame:
        """The rows the current dropdowns select."""
        return filter_probe(self.df, self.codec.value, self.group_size.value)

    def _draw(self) -> Figure:
        sel = self.selection()
        self.status.value = f"{len(sel)} rows; mean {self.metric.value} = {sel[self.metric.value].mean():.4g}"
        return plot_quant_error(self.df, self.codec.value, self.group_size.value, self.metric.value)
