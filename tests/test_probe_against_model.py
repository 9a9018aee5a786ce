"""bench/probe_against_model.py on hand-made reports: its numbers against ones computed here."""

import json

import numpy as np
import pytest

from bench.probe_against_model import main


def write(tmp_path, model: dict, probes: list[dict], set_name: str = "held-out"):
    samples = [{"clip_id": c, "status": "scored", "scores": {"model": {"depth0.median.absrel": v}}}
               for c, v in model.items()]  # fmt: skip
    samples.append({"clip_id": "failed", "status": "failed"})
    (tmp_path / "metrics.json").write_text(json.dumps({"samples": samples, "summary": {"model": {}}}))
    paths = []
    for i, probe in enumerate(probes):
        path = tmp_path / f"probe{i}.json"
        path.write_text(json.dumps({"held_out_frames": {set_name: {c: {"absrel": v} for c, v in probe.items()}}}))
        paths.append(path)
    return tmp_path, paths


def test_a_model_twice_the_probe_s_error_correlates_fully_and_is_never_better(tmp_path):
    probe = {f"clip{i}": 0.05 + 0.01 * i for i in range(6)}
    report, (p,) = write(tmp_path, {c: 2 * v for c, v in probe.items()}, [probe])
    row = main(["--probe", str(p), "--report", "held-out", str(report)])["held-out"]
    assert row["scenes"] == 6 and row["log_correlation"] == pytest.approx(1.0)
    assert row["model_better_share"] == 0 and row["model_mean"] == pytest.approx(2 * row["probe_mean"])


def test_only_scenes_both_scored_count_and_the_seeds_agreement_is_reported(tmp_path):
    rng = np.random.default_rng(0)
    probe = {f"clip{i}": float(v) for i, v in enumerate(rng.uniform(0.05, 0.2, 20))}
    other = {c: v * float(rng.uniform(0.8, 1.2)) for c, v in probe.items()}
    model = {c: v * float(rng.uniform(0.5, 1.5)) for c, v in list(probe.items())[:15]}
    model["not in the probe"] = 0.5
    report, paths = write(tmp_path, model, [probe, other])
    row = main(["--probe", str(paths[0]), "--probe", str(paths[1]), "--report", "held-out", str(report)])["held-out"]
    scenes = [f"clip{i}" for i in range(15)]
    m, p, q = (np.log([d[c] for c in scenes]) for d in (model, probe, other))
    assert row["scenes"] == 15
    assert row["log_correlation"] == pytest.approx(np.corrcoef(m, p)[0, 1])
    assert row["probe_seeds_log_correlation"] == pytest.approx(np.corrcoef(p, q)[0, 1])
    assert row["model_better_share"] == pytest.approx(np.mean(m < p))
    assert row["probe_median"] == pytest.approx(np.median(np.exp(p)))


def test_a_set_the_probe_did_not_score_is_one_line(tmp_path):
    report, (p,) = write(tmp_path, {"a": 0.1, "b": 0.2, "c": 0.3}, [{"a": 0.1, "b": 0.2, "c": 0.3}])
    with pytest.raises(SystemExit, match=r"no held-out set 'held-out-family' \(it has held-out\)"):
        main(["--probe", str(p), "--report", "held-out-family", str(report)])
