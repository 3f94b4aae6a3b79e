"""bench/copy_model.py: the copy's latency + bandwidth fit and the score a kernel would get at the copy's cost."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "copy_model", Path(__file__).parents[1] / "bench" / "copy_model.py"
)
assert _spec is not None and _spec.loader is not None
cm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cm)
MB = 1 << 20


def _rows(t0: float, per_byte: float) -> list[dict]:
    """Copy rows exactly on the model, and one int4-like encoder row per size moving input + input / 4 on it."""
    rows = []
    for mb in (4, 16, 32, 64):
        size = mb * MB
        rows.append(dict(op="copy", codec="-", impl="torch", size_bytes=size, us=t0 + per_byte * 2 * size))
        moved = size + size // 4
        us = t0 + per_byte * moved
        pct = 100 * (moved / us) / (2 * size / (t0 + per_byte * 2 * size))
        rows.append(dict(op="encode", codec="int4", impl="kernel", size_bytes=size, us=us, pct_copy=pct,
                         payload_bytes=size // 4))  # fmt: skip
    return rows


def test_fit_recovers_the_model_and_a_kernel_on_it_scores_its_expectation():
    rows = _rows(6.5, 0.31e-6)
    t0, per_byte = cm.copy_model(rows)
    assert t0 == pytest.approx(6.5) and per_byte == pytest.approx(0.31e-6)
    got = cm.expected_rows(rows)
    assert [r["mb"] for r in got] == [16, 32, 64]  # 4 MB is below the default minimum
    assert all(r["of_expected"] == pytest.approx(100.0) for r in got)
    # moving 1.25x the input instead of 2x costs the share of the fixed cost: below 100%, rising with size
    assert [round(r["expected_pct"], 6) for r in got] == sorted(round(r["expected_pct"], 6) for r in got)
    assert got[0]["expected_pct"] < got[-1]["expected_pct"] < 100
    # a kernel that moves what a copy moves scores 100% at the copy's cost; with no fixed cost every kernel does
    assert cm.expected_pct(16 * MB, 16 * MB, (t0, per_byte)) == pytest.approx(100.0)
    assert cm.expected_pct(16 * MB, 4 * MB, (0.0, per_byte)) == pytest.approx(100.0)


def test_fit_needs_two_sizes():
    rows = [dict(op="copy", codec="-", impl="torch", size_bytes=16 * MB, us=17.0)]
    with pytest.raises(ValueError, match="two sizes"):
        cm.copy_model(rows)
