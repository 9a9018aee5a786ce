"""bench/focal_scatter.py: a model's focal lengths against the truth, split into a bias and a compression."""

import numpy as np
import pytest

from bench.focal_scatter import focal_scatter


def _true(n=40, frames=3, seed=0):
    """True focal lengths (N, F, 2) of a set: each scene its own, fy a little off fx, the same in every frame."""
    rng = np.random.default_rng(seed)
    fx = rng.uniform(80, 230, n)
    return np.broadcast_to(np.stack([fx, 1.02 * fx], -1)[:, None], (n, frames, 2)).copy()


def test_a_pure_bias_is_divided_out_and_a_compression_is_its_slope():
    true = _true()
    scatter = focal_scatter(1.25 * true, true)
    assert scatter["bias"] == pytest.approx(1.25, rel=1e-12) and scatter["slope"] == pytest.approx(1.0, rel=1e-9)
    assert scatter["error"] == pytest.approx(0.25, rel=1e-12)
    assert scatter["unbiased_error"] == pytest.approx(0, abs=1e-12)
    # predicted = 150 * (true / 150) ** 0.6: log predicted = 0.6 log true + const, the slope 0.6
    assert focal_scatter(150 * (true / 150) ** 0.6, true)["slope"] == pytest.approx(0.6, rel=1e-9)


def test_one_focal_for_every_scene_has_no_slope_and_the_constant_s_error():
    true = _true(seed=1)
    median = np.median(true.reshape(-1, 2), axis=0)
    expected = np.mean(np.abs(median - true) / true)  # the constant predictor's error, computed here
    scatter = focal_scatter(np.broadcast_to(median, true.shape), true)
    assert scatter["slope"] == pytest.approx(0, abs=1e-9)
    assert scatter["error"] == pytest.approx(expected, rel=1e-12) == scatter["constant_error"]
    assert focal_scatter(true, true)["error"] == 0 and focal_scatter(true, true)["constant_error"] > 0.2


def test_mismatched_or_too_few_samples_are_refused():
    true = _true()
    with pytest.raises(ValueError, match="focal lengths"):
        focal_scatter(true[:, :2], true)
    with pytest.raises(ValueError, match="focal lengths"):
        focal_scatter(true[:1], true[:1])
