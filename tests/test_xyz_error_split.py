"""bench/xyz_error_split.py: a clip's XYZ error split into what every frame shares and what changes between frames."""

import numpy as np
import pytest

from bench.xyz_error_split import error_split


def _scene(frames=4, points=500, seed=0):
    """A still scene's true points (the same in every frame, centred) and an offset field with zero mean and
    orthogonal to them (the sum of their dot products is 0)."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(points, 3))
    truth -= truth.mean(0)
    offset = rng.normal(size=(points, 3))
    offset -= offset.mean(0)
    offset -= (offset * truth).sum() / (truth * truth).sum() * truth
    return np.broadcast_to(truth, (frames, points, 3)).copy(), 0.05 * offset


def test_an_error_every_frame_shares_and_one_that_alternates():
    truth, offset = _scene()
    t2, d2, n = (truth[0] ** 2).sum(), (offset**2).sum(), len(offset)
    spread = np.sqrt(t2 / n)
    # pred = truth / 2 + (+-) offset: the least-squares scale onto the truth is s = (T / 2) / (T / 4 + D), the error
    # (s / 2 - 1) truth (+-) s offset, its two terms orthogonal
    s = (t2 / 2) / (t2 / 4 + d2)
    scaled, moved = abs(s / 2 - 1) * np.sqrt(t2 / n) / spread, s * np.sqrt(d2 / n) / spread
    assert error_split(truth / 2 + 3.0, truth) == pytest.approx((0, 0), abs=1e-12)  # scale and offset only
    assert error_split(truth / 2 + offset, truth) == pytest.approx((np.hypot(scaled, moved), 0), abs=1e-12)
    signs = np.array([1.0, -1.0, 1.0, -1.0])[:, None, None]
    assert error_split(truth / 2 + signs * offset, truth) == pytest.approx((scaled, moved), abs=1e-12)
    assert moved > 5 * scaled  # the case tells the two parts apart
