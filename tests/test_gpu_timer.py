"""The GPU-timed wait (runtime/gpu_timer.py): the clock rate's checks on CPU; on a GPU, waits that last what
they were asked for by the host's clock."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from hyperlane_lab.runtime.gpu_timer import CALIBRATION_CYCLES, GpuTimer, cycles_for, rate_from


def test_the_rate_is_cycles_over_the_timed_spin():
    assert rate_from(1_000_000, 0.5) == pytest.approx(2e9)
    assert cycles_for(300e-6, 2e9) == 600_000
    assert cycles_for(0.0, 2e9) == 1  # never a zero-cycle kernel


@pytest.mark.parametrize(("cycles", "ms", "what"), [(1_000_000, 0.0, "did not time it"),
                                                    (1_000_000, 10.0, "0.10 GHz"),
                                                    (1_000_000, 0.1, "10.00 GHz")])  # fmt: skip
def test_a_rate_no_gpu_runs_at_is_refused_with_the_figures(cycles, ms, what):
    with pytest.raises(ValueError, match=what):
        rate_from(cycles, ms)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_waits_last_what_they_were_asked_for():
    """Waits of 200 µs to 1 ms: the median, by the host's clock, within 10% + 30 µs (a launch) of the ask, and
    none ends early by more than 5%; ``since`` counts them. The calibration spun ``CALIBRATION_CYCLES`` at a GPU's rate."""
    t = GpuTimer("cuda:0")
    with pytest.raises(RuntimeError, match="before calibrate"):
        t.wait(1e-3)
    assert 0.3e9 <= t.calibrate() <= 4e9 and t.rate is not None
    for ask in (200e-6, 500e-6, 1e-3):
        took = []
        for _ in range(30):
            t0 = time.perf_counter()
            t.wait(ask)
            took.append(time.perf_counter() - t0)
        med = statistics.median(took)
        assert abs(med - ask) <= 0.1 * ask + 30e-6, (ask, med, CALIBRATION_CYCLES / t.rate)
        assert min(took) >= 0.95 * ask, (ask, sorted(took)[:3])
    assert t.waits == 90
    ev = torch.cuda.Event(enable_timing=True)  # since: the GPU's time from an event to now
    ev.record(t.stream)
    t.wait(1e-3)
    assert 0.95e-3 <= t.since(ev) <= 1.3e-3
