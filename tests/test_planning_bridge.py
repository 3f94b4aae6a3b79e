"""Calibration of profiled layer times before they reach the cost model."""

from __future__ import annotations

import pytest

from hyperlane_lab.models import ModelSpec
from hyperlane_lab.planning import model_profile_from_spec
from hyperlane_lab.planning.cost import layer_decode_s
from hyperlane_lab.runtime.planning_bridge import calibrate_decode
from hyperlane_lab.types import DeviceProfile


@pytest.mark.parametrize("context", [64, 512, 4096])
def test_calibrated_model_reproduces_the_measurement(context):
    model = model_profile_from_spec(ModelSpec.preset("llama-2-7b"))
    measured = 0.0123  # seconds per layer, measured at `context` cached tokens
    dev = DeviceProfile("gpu", 80 * 2**30, 400e12, 2.0e12, layer_decode_s=measured)
    cal = calibrate_decode(dev, model, context)
    # the calibrated cost model, asked for the profiled point, returns the measured time
    assert layer_decode_s(model, 0, cal, 1, context, calibrated=True) == pytest.approx(measured, rel=1e-9)
    # and a longer context costs more than the profiled one
    assert layer_decode_s(model, 0, cal, 1, context * 4, calibrated=True) > measured


def test_no_measurement_is_left_alone():
    model = model_profile_from_spec(ModelSpec.preset("llama-2-7b"))
    dev = DeviceProfile("gpu", 80 * 2**30, 400e12, 2.0e12)
    assert calibrate_decode(dev, model, 512) is dev
