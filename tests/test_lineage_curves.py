"""bench/lineage_curves.py: a lineage of evaluate.py reports as one curve, with its floors and goals."""

import json

import pytest

from bench.lineage_curves import goal_of, lineage_markdown, plot_lineage, read_lineage


def _report(folder, set_name, frame0, ate):
    (folder / set_name).mkdir(parents=True)
    summary = {
        "model": {
            "depth0.median.absrel": frame0,
            "depth.median.absrel": 0.2,
            "points.chamfer": 0.06,
            "camera.ate": ate,
        },
        "mean_depth": {"points.chamfer": 0.12},
        "static_camera": {"camera.ate": 0.03},
    }
    (folder / set_name / "metrics.json").write_text(json.dumps({"summary": summary, "samples": []}))


def test_a_lineage_is_read_in_order_and_drawn(tmp_path):
    _report(tmp_path / "a", "held-out", 0.15, 0.011)
    _report(tmp_path / "b", "held-out", 0.10, 0.013)
    lineage = read_lineage([("a", 0, tmp_path / "a"), ("b", 256_000, tmp_path / "b")], ["held-out"])
    assert [(m["label"], m["samples"], m["model"]["camera.ate"]) for m in lineage["held-out"]] == [
        ("a", 0, 0.011),
        ("b", 256_000, 0.013),
    ]
    rows = lineage_markdown(lineage).splitlines()
    assert rows[3] == "| held-out | b | 256,000 | 0.1 | 0.2 | 0.06 | 0.013 |"
    # the goals: a number per set, or a share of the floor (Chamfer: half the mean depth map's; ATE: a third of the
    # still camera's)
    assert goal_of({"held-out": 0.08}, 0.3, "held-out") == 0.08 and goal_of({"held-out": 0.08}, 0.3, "other") is None
    assert goal_of(0.5, 0.12, "held-out") == pytest.approx(0.06) and goal_of(1 / 3, None, "held-out") is None
    plot_lineage(lineage, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_a_missing_report_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"no evaluate\.py report of a on held-out-family"):
        read_lineage([("a", 0, tmp_path / "a")], ["held-out-family"])
