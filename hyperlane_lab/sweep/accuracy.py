"""Codec accuracy points: how much does compressing the hidden state at a stage boundary hurt?

The measuring is done by the accuracy probe (``hyperlane_lab.probes.probe_grid``): the model runs split
into stages, once as is and once with the hidden state at the boundaries encoded and decoded by the
codec exactly as the runtime does. One row per boundary (``boundary`` = first layer after the cut, as a
string) plus a row ``boundary="all"`` with every boundary compressed; columns include ``rel_l2``,
``cosine``, ``kl``, ``top1_agreement``, ``ppl_delta_rel`` and greedy-generation agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from hyperlane_lab.sweep.config import PointConfig
    from hyperlane_lab.sweep.runner import SweepContext

__all__ = ["accuracy_point", "probe_frame"]

MAX_STAGES = 8  # probe every boundary of small models; at most this many stages of larger ones


def probe_frame(
    model: str | None = None,
    codecs: Sequence[str] = ("int8",),
    group_sizes: Sequence[int] = (64,),
    prompts: Sequence[str] | None = None,
    n_stages: int | None = None,
    max_new_tokens: int = 8,
) -> pd.DataFrame:
    """``probes.probe_grid`` over codecs x group sizes; by default the model is cut at every layer
    boundary (up to ``MAX_STAGES`` stages) and greedy agreement is judged on ``max_new_tokens`` tokens."""
    from hyperlane_lab.probes import probe_grid

    if n_stages is None:
        from hyperlane_lab.models import ModelSpec, resolve_model

        n_stages = min(ModelSpec.from_pretrained(resolve_model(model)).n_layers, MAX_STAGES)
    return probe_grid(
        list(codecs),
        list(group_sizes),
        model=model,
        prompts=list(prompts) if prompts is not None else None,
        n_stages=n_stages,
        max_new_tokens=max_new_tokens,
    )


def accuracy_point(point: PointConfig, ctx: SweepContext) -> list[dict[str, Any]]:
    """One codec x group size on the point's model: the probe's rows (per boundary, plus "all")."""
    df = probe_frame(point.model, [point.codec], [point.group_size], max_new_tokens=point.max_tokens)
    # the point's own codec / group_size columns already identify the row; keep the probe's measurements
    rows: list[dict[str, Any]] = df.drop(
        columns=[c for c in ("codec", "group_size") if c in df.columns]
    ).to_dict("records")
    return rows
