"""bench/paired_scores.py: two models' per-scene scores paired by clip, with bootstrap intervals."""

import json

import numpy as np
import pytest

from bench.paired_scores import bootstrap_interval, paired_by_shape, paired_rows

LINE = [[0.1 * i, 0.0, 0.0] for i in range(5)]
ARC = [[np.cos(0.3 * i), np.sin(0.3 * i), 0.0] for i in range(5)]


def _report(folder, scores, paths):
    """A metrics.json with a scored sample per clip: its ATE and Chamfer, and its true camera path."""
    folder.mkdir()
    samples = [
        {"clip_id": clip, "scores": {"model": {"camera.ate": ate, "points.chamfer": chamfer}},
         "camera_path": {"truth": paths[clip]}}
        for clip, (ate, chamfer) in scores.items()
    ]  # fmt: skip
    summary = {"model": {"camera.ate": 0.0, "points.chamfer": 0.0}}
    (folder / "metrics.json").write_text(json.dumps({"summary": summary, "samples": samples}))
    return folder


def test_a_constant_difference_has_a_point_interval_and_only_shared_clips_pair(tmp_path):
    paths = {"a": LINE, "b": ARC, "c": LINE, "only-in-a": LINE}
    a = _report(tmp_path / "a", {"a": (0.01, 0.1), "b": (0.02, 0.2), "c": (0.03, 0.3), "only-in-a": (9.0, 9.0)}, paths)
    b = _report(tmp_path / "b", {"a": (0.015, 0.1), "b": (0.025, 0.2), "c": (0.035, 0.3)}, paths)
    rows = {row["metric"]: row for row in paired_rows(a, b, draws=200, seed=0)}
    ate = rows["camera.ate"]
    assert ate["scenes"] == 3 and ate["a"] == pytest.approx(0.02) and ate["b"] == pytest.approx(0.025)
    assert ate["difference"] == pytest.approx(0.005) and ate["interval"] == pytest.approx((0.005, 0.005))
    assert rows["points.chamfer"]["difference"] == 0 and rows["points.chamfer"]["interval"] == (0, 0)
    shapes = {row["metric"]: row for row in paired_by_shape(a, b, draws=200, seed=0)}
    assert (shapes["camera.ate, straight"]["scenes"], shapes["camera.ate, curved"]["scenes"]) == (2, 1)
    assert shapes["camera.ate, straight"]["lower"] == 0


def test_the_interval_is_the_resampled_means_percentiles():
    # two values: a resample's mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4, so 2.5 % and 97.5 % are 0 and 1
    low, high = bootstrap_interval(np.array([0.0, 1.0]), draws=4000, rng=np.random.default_rng(0))
    assert (low, high) == (0.0, 1.0)
    low, high = bootstrap_interval(np.arange(100.0), draws=4000, rng=np.random.default_rng(0))
    # the mean of 100 draws of 0..99: 49.5 with a standard error of 28.87 / 10
    assert low == pytest.approx(49.5 - 1.96 * 2.887, abs=0.4) and high == pytest.approx(49.5 + 1.96 * 2.887, abs=0.4)


def test_reports_without_common_scenes_are_named(tmp_path):
    a = _report(tmp_path / "a", {"a": (0.01, 0.1)}, {"a": LINE})
    b = _report(tmp_path / "b", {"b": (0.01, 0.1)}, {"b": LINE})
    with pytest.raises(SystemExit, match="no scene scored in both"):
        paired_rows(a, b, draws=10, seed=0)


def test_a_metric_some_scene_lacks_compares_the_summaries_only(tmp_path):
    a = _report(tmp_path / "a", {"a": (0.01, 0.1), "b": (0.02, 0.2)}, {"a": LINE, "b": LINE})
    b = _report(tmp_path / "b", {"a": (0.01, 0.1), "b": (0.02, 0.2)}, {"a": LINE, "b": LINE})
    metrics = json.loads((b / "metrics.json").read_text())
    del metrics["samples"][1]["scores"]["model"]["points.chamfer"]
    metrics["summary"]["model"]["points.chamfer"] = 0.5
    (b / "metrics.json").write_text(json.dumps(metrics))
    chamfer = next(row for row in paired_rows(a, b, draws=10, seed=0) if row["metric"] == "points.chamfer")
    assert chamfer == {"metric": "points.chamfer", "scenes": 2, "a": 0.0, "b": 0.5}
