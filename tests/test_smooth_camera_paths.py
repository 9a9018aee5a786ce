"""bench/smooth_camera_paths.py: the ATE of camera centres smoothed over time, from evaluate.py's metrics.json."""

import json
import subprocess
import sys

import numpy as np
from conftest import ROOT

from bench.smooth_camera_paths import smoothed_ates


def _report(tmp_path, jitter: float, unit: float = 2.0):
    """A report of two samples whose true camera drifts slowly along a line and whose predicted centres are the
    truth plus a jitter alternating from frame to frame, 20x the step; ATE in units of ``unit``."""
    frames = np.arange(25, dtype=float)
    truth = np.stack([0.002 * frames, 0.001 * frames, np.zeros(25)], axis=1)
    pred = truth + jitter * np.stack([(-1.0) ** frames, np.zeros(25), np.zeros(25)], axis=1)
    ate = jitter / unit  # the alternating offset has zero mean: the best Sim(3) is the identity, RMS = jitter
    sample = {
        "camera_path": {"model": pred.tolist(), "truth": truth.tolist()},
        "scores": {"model": {"camera.ate": ate}},
    }
    (tmp_path / "metrics.json").write_text(json.dumps({"samples": [sample, sample]}))
    return ate


def test_smoothing_removes_frame_to_frame_jitter_and_keeps_a_steady_motion(tmp_path):
    ate = _report(tmp_path, jitter=0.05)
    got = smoothed_ates(tmp_path, [2.0])
    assert got["samples"] == 2 and np.isclose(got["as scored"], ate)
    # A Gaussian of 2 frames passes exp(-pi^2 sigma^2 / 2) ~ 3e-9 of the alternating jitter inside the clip; the
    # ends, where the filter holds the last frame and the jitter no longer cancels, keep about 0.45 of the RMS
    assert got["sigma 2"] < 0.5 * ate
    assert got["truth, sigma 2"] < 0.1 * ate


def test_the_cross_validated_smoother_removes_jitter_and_leaves_a_line(tmp_path):
    ate = _report(tmp_path, jitter=0.05)
    got = smoothed_ates(tmp_path, [], gcv=True)
    # a line has no second differences: the smoother keeps it whatever its weight, and GCV, free to smooth, takes
    # the largest weight it may, where only the line through the jittered centres remains (RMS 0.05 / 25 of the jitter
    # at most, from the unbalanced last frame)
    assert got["truth, GCV"] < 1e-9
    assert got["GCV"] < 0.05 * ate


def test_paths_are_split_by_their_shape():
    from bench.smooth_camera_paths import path_shape

    t = np.linspace(0, 1, 25)[:, None]
    line = t * np.array([[1.0, 0.5, 0.0]])
    arc = np.concatenate([np.cos(t), np.sin(t), 0 * t], axis=1)  # a radian over 24 steps: bends 0.042 of a step
    quarter = np.concatenate([np.cos(t * np.pi / 2), np.sin(t * np.pi / 2), 0 * t], axis=1)  # bends 0.065
    assert [path_shape(p) for p in (line, arc, quarter)] == ["straight", "straight", "curved"]


def test_the_command_prints_a_row_per_report(tmp_path):
    _report(tmp_path, jitter=0.05)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "smooth_camera_paths.py"), str(tmp_path), "--sigmas", "1", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    header, rule, row = out.strip().splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == 8 and row.startswith(f"| {tmp_path} | 2 |")
