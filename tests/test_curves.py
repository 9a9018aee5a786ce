"""Learning curves (python -m fourdnex.evaluation.curves): the reports of a run's checkpoints against the samples each
had seen."""

import json

import pytest

from fourdnex.cli import run
from fourdnex.evaluation import curves


def write_run(work, name: str, steps: list[int], batch: int, world: int, values: list[float]) -> None:
    """A run's checkpoints (trainer_state.json as finetune.py writes it) and a report of each on two sets."""
    for step, value in zip(steps, values, strict=True):
        checkpoint = work / name / "checkpoints" / f"checkpoint-{step:06d}"
        checkpoint.mkdir(parents=True)
        config = {"train_batch_size": batch, "gradient_accumulation_steps": 2}
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world,
                                                                    "config": config}))  # fmt: skip
        for set_name, offset in (("curve-image", 0.0), ("curve-family-image", 0.1)):
            report = work / "reports" / name / checkpoint.name / set_name
            report.mkdir(parents=True)
            model = dict.fromkeys(curves.CURVE_METRICS, value + offset)
            floors = {f: dict.fromkeys(curves.CURVE_METRICS, 0.5) for f in ("plane", "mean_depth", "static_camera")}
            (report / "metrics.json").write_text(json.dumps({"summary": {"model": model, **floors}}))


def test_points_have_the_samples_each_checkpoint_had_seen(tmp_path):
    write_run(tmp_path, "4dnex", [100, 200], batch=8, world=2, values=[0.3, 0.2])
    write_run(tmp_path, "full", [150], batch=4, world=1, values=[0.25])
    points = curves.read_points(tmp_path)
    seen = {(p["run"], p["set"], p["step"]): p["samples_seen"] for p in points}
    assert seen[("4dnex", "curve-image", 200)] == 200 * 8 * 2 * 2  # steps x batch x accumulation x processes
    assert seen[("full", "curve-family-image", 150)] == 150 * 4 * 2
    last = [p for p in points if p["run"] == "4dnex" and p["set"] == "curve-family-image"][-1]
    assert last["model"]["depth0.median.absrel"] == pytest.approx(0.3) and last["floors"]["plane"]["camera.ate"] == 0.5
    table = curves.curves_markdown(points)
    assert "| 4dnex | 6,400 | 0.2 |" in table and "| floor: mean_depth | | 0.5 |" in table
    run(curves.main, curves.build_parser(), ["--work", str(tmp_path), "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "curves.json").read_text()) == points
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000


def test_the_vae_round_trip_is_the_ceiling_of_its_set(tmp_path):
    write_run(tmp_path, "4dnex", [100, 200], batch=8, world=1, values=[0.3, 0.2])
    report = tmp_path / curves.CEILING_REPORTS / "curve-image"
    report.mkdir(parents=True)
    (report / "metrics.json").write_text(json.dumps({"summary": {"model": dict.fromkeys(curves.CURVE_METRICS, 0.05)}}))
    points = curves.read_points(tmp_path)
    assert all(p["ceiling"]["camera.focal"] == 0.05 for p in points if p["set"] == "curve-image")
    assert not any("ceiling" in p for p in points if p["set"] == "curve-family-image")  # no round trip of that set
    table = curves.curves_markdown(points)
    assert table.count("| ceiling: the VAE's round trip | | 0.05 |") == 1
    run(curves.main, curves.build_parser(), ["--work", str(tmp_path), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000


def test_a_report_without_its_checkpoint_or_no_report_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no report of a checkpoint"):
        run(curves.main, curves.build_parser(), ["--work", str(tmp_path), "--out", str(tmp_path / "out")])
    write_run(tmp_path, "4dnex", [100], batch=8, world=1, values=[0.3])
    (tmp_path / "4dnex" / "checkpoints" / "checkpoint-000100" / "trainer_state.json").unlink()
    with pytest.raises(SystemExit, match=r"trainer_state\.json for its checkpoint"):
        run(curves.main, curves.build_parser(), ["--work", str(tmp_path), "--out", str(tmp_path / "out")])
