"""bench/depth_error_where.py's split of a frame's depth error, on depths whose errors are known by construction."""

import math

import numpy as np
import pytest

from bench.depth_error_where import where


def test_a_prediction_right_up_to_scale_has_no_error_anywhere():
    true = np.linspace(1.0, 5.0, 48 * 64, dtype=np.float32).reshape(48, 64)
    row = where(3 * true, true, np.ones_like(true, bool))
    for key, value in row.items():  # the truth averaged over squares is not the truth: those rows are its own
        if key != "edge share of pixels" and not key.startswith("truth at"):
            assert value == pytest.approx(0, abs=1e-6), key


def test_an_error_in_the_top_third_is_counted_there_and_on_the_moving_pixels_it_covers():
    true = np.full((48, 48), 2.0, np.float32)
    pred = true.copy()
    pred[:16] = 2.4  # 20 % too far on the top third; the median ratio stays 1
    moving = np.zeros_like(true, bool)
    moving[:32, :8] = True  # half on the top third, half below
    row = where(pred, true, moving)
    assert row["top third"] == pytest.approx(0.2) and row["all pixels"] == pytest.approx(0.2 / 3)
    assert row["middle third"] == 0 and row["bottom third"] == 0
    assert row["moving objects"] == pytest.approx(0.1)
    assert math.isnan(row["edges"]) and row["edge share of pixels"] == 0  # a flat truth has no edge
    assert row["smooth surfaces"] == pytest.approx(0.2 / 3)
    assert row["truth at 8 px"] == 0 and row["truth at 16 px"] == 0
    assert 0 < row["coarse, 16 px"] < 0.2 / 3 * 1.5  # averaged over squares, the step is spread, not lost
