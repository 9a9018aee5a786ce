"""evaluate.py and fourdnex.evaluation: floors by hand, ground truth against the scenes it was written from, scoring,
and the command line end to end (reports, bad input, unscorable samples); the metrics are tests/test_metrics.py's."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_metrics import poses

from fourdnex import runtime
from fourdnex.data.synthetic import render_scene, write_captions, write_dynamic_npz, write_tree
from fourdnex.evaluation import metrics as m
from fourdnex.evaluation import report as evaluation_report
from fourdnex.evaluation import run as evaluation_run
from fourdnex.evaluation.floors import MeanDepth, first_frame_xyz, plane_xyz, to_unit_box
from fourdnex.evaluation.scoring import FloorImage, Prediction, Reference, register_frame, score
from fourdnex.evaluation.truth import EvaluationError, Truth, clip_sources, load_truth
from fourdnex.geometry.registration import FIT_VERSION, RegistrationConfig
from fourdnex.geometry.results import save_result
from fourdnex.testing.corrupted import write_corrupted
from fourdnex.testing.scenes import make_truth

ROOT = Path(__file__).resolve().parents[1]


def run(*args) -> subprocess.CompletedProcess:
    """evaluate.py with ``args``; its output decoded as written (carriage returns kept)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], capture_output=True, env=env)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


def shown(stream: str) -> list[str]:
    """The lines a terminal shows of ``stream``: what follows the last carriage return of each line (progress bars
    redraw and clear themselves with them), blank lines left out."""
    return [line.split("\r")[-1] for line in stream.split("\n") if line.split("\r")[-1].strip()]


# ---------------------------------------------------------------------------------------------------------------
# Floors


def test_plane_floor_is_the_sloped_plane():
    xyz = plane_xyz(4, 6)
    np.testing.assert_allclose(xyz[0, 0], [-1, -1, 1])
    np.testing.assert_allclose(xyz[0, -1], [1, -1, 1])
    np.testing.assert_allclose(xyz[-1, 0], [-1, 1, -1])


def test_first_frame_floor_by_hand():
    # depth 1 on a 2 x 2 image, f = 1, centre (1, 1): rays (+-0.5, +-0.5, 1); into the unit box: (+-1, +-1, 0)
    K = np.array([[[1.0, 0, 1], [0, 1, 1], [0, 0, 1]]])
    truth = Truth("toy", np.zeros((1, 2, 2, 3), np.uint8), np.ones((1, 2, 2), np.float32), K, np.eye(4)[None])
    np.testing.assert_allclose(first_frame_xyz(truth), [[[-1, -1, 0], [1, -1, 0]], [[-1, 1, 0], [1, 1, 0]]])
    np.testing.assert_allclose(to_unit_box(np.array([[0.0, 0, 4], [2, 1, 8]])), [[-0.5, -0.25, -1], [0.5, 0.25, 1]])


def test_mean_depth_floor_by_hand():
    # clip A: depth 1 2 / 3 4 (unit 2.5); clip B: 2 2 / 2 undefined, then 4 4 / 4 4 (unit 4). Over the unit:
    # A 0.4 0.8 / 1.2 1.6; B 0.5 0.5 / 0.5 -, then 1 1 / 1 1. Per pixel means: 1.9/3, 2.3/3, 2.7/3, 2.6/2.
    def truth(depth, fx, fy):
        K = np.tile(np.array([[fx, 0, 1], [0, fy, 1], [0, 0, 1]]), (len(depth), 1, 1))
        return Truth(
            "toy",
            np.zeros((len(depth), 2, 2, 3), np.uint8),
            np.array(depth, np.float32),
            K,
            np.tile(np.eye(4), (len(depth), 1, 1)),
        )

    mean = MeanDepth()
    mean.add(truth([[[1, 2], [3, 4]]], 10, 12), 2.5)
    mean.add(truth([[[2, 2], [2, 0]], [[4, 4], [4, 4]]], 20, 20), 4.0)
    np.testing.assert_allclose(mean.depth((2, 2)), [[1.9 / 3, 2.3 / 3], [2.7 / 3, 1.3]], rtol=1e-6)
    assert mean.focal((2, 2)) == 20  # median of 10, 12, 20, 20, 20, 20


def test_floors_scored_by_hand():
    # two frames under one still camera (f = 10): a wall at depth 1, then at depth 2
    K = np.tile(np.array([[10.0, 0, 16], [0, 10, 12], [0, 0, 1]]), (2, 1, 1))
    rgb = np.zeros((2, 24, 32, 3), np.uint8)
    depth = np.stack([np.ones((24, 32)), np.full((24, 32), 2.0)]).astype(np.float32)
    truth = Truth("toy", rgb, depth, K, np.tile(np.eye(4), (2, 1, 1)))
    reference = Reference.of(truth)
    # first frame held: d = 1 everywhere. Median alignment s = median(1, 2) / 1 = 1.5: errors 0.5 and 0.25.
    # Least squares on a constant prediction takes the least-norm solution s = t = 0.75: the same d = 1.5.
    held = Prediction(rgb[:1], K[:1], np.eye(4)[None], depth[:1], np.zeros((1, 24, 32))).held(2)
    values = score(held, reference).values
    for rule in ("median", "lstsq"):
        assert values[f"depth.{rule}.absrel"] == pytest.approx(0.375)
        assert values[f"depth0.{rule}.absrel"] == pytest.approx(0, abs=1e-12)
    # a still camera with twice the focal length, cameras at x = 0 and 1: ATE = RMS distance to the mean centre
    # (0.5, unit = median true depth 1.5: 1/3), RPE translation 1 / 1.5, no rotation error, focal error 1
    moved = poses([np.eye(3)] * 2, [[0, 0, 0], [1, 0, 0]])
    truth = Truth("toy", rgb, depth, K, moved)
    doubled = K[:1].copy()
    doubled[0, [0, 1], [0, 1]] *= 2
    still = Prediction(None, doubled, np.eye(4)[None]).held(2)
    values = score(still, Reference.of(truth)).values
    assert values["camera.ate"] == pytest.approx(0.5 / 1.5)
    assert values["camera.rpe_trans"] == pytest.approx(1 / 1.5)
    assert values["camera.rpe_rot"] == pytest.approx(0, abs=1e-9) and values["camera.focal"] == pytest.approx(1)
    assert "depth.median.absrel" not in values  # a camera-only floor


def test_registered_first_frame_floor_keeps_frame_0():
    truth = make_truth(frames=3, height=32, width=48)
    true = Truth("toy", truth.rgb.numpy(), truth.depth.float().numpy(), truth.K.numpy(), truth.cam2world.numpy())
    floor = register_frame(first_frame_xyz(true), RegistrationConfig())
    held = Prediction(true.rgb[:1], floor.K, floor.cam2world, floor.depth, floor.residual).held(3)
    values = score(held, Reference.of(true)).values
    assert values["depth0.median.absrel"] < 1e-5 and values["camera.focal"] < 1e-5
    assert values["depth.median.absrel"] > 0.01  # later frames see other depths


def test_dynamic_depth_absrel_by_hand(tmp_path):
    # 3 frames of 240 x 320: the evaluation grid is every 2nd row and column from the 2nd (32k of 77k pixels)
    rng = np.random.default_rng(5)
    frames, height, width = 3, 240, 320
    true = rng.uniform(1, 4, (frames, height, width)).astype(np.float32)
    true[:, :, :20] = 0  # undefined depths
    moving = np.zeros(true.shape, bool)
    moving[:, 100:150, 10:120] = True  # partly on undefined depths
    moving[1] = False  # a frame without a moving object
    pred = true * rng.uniform(0.9, 1.1, true.shape).astype(np.float32) + 0.5
    pred[moving] *= 1.4  # worse on the moving objects than elsewhere
    K = np.tile(np.array([[300.0, 0, 160], [0, 300, 120], [0, 0, 1]]), (frames, 1, 1))
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    rgb = rng.integers(0, 256, (frames, height, width, 3), np.uint8)
    truth = Truth("toy", rgb, true, K, c2w, moving)

    def expected(depth: np.ndarray, mask: np.ndarray = moving) -> float:
        g, d, mask = true[:, 1::2, 1::2], depth[:, 1::2, 1::2].astype(np.float64), mask[:, 1::2, 1::2]
        defined = g > 0
        scale = np.median(g[defined]) / np.median(d[defined])  # the clip's median alignment, over every pixel
        g, d = g[defined & mask], d[defined & mask]
        return float(np.mean(np.abs(scale * d - g) / g))

    model = Prediction(rgb, K, c2w, pred, np.zeros(pred.shape, np.float32))
    floor = Prediction(None, K[:1], c2w[:1], pred[:1], np.zeros((1, height, width))).held(frames)
    memory = Reference.of(truth)
    memory.save(tmp_path / "reference")
    for ref in (memory, Reference.load(tmp_path / "reference")):
        values = score(model, ref).values
        assert values["depth.dynamic.absrel"] == pytest.approx(expected(pred), rel=1e-12)
        assert values["depth.dynamic.absrel"] > 2 * values["depth.median.absrel"]
        held = np.broadcast_to(pred[:1], pred.shape)
        assert score(floor, ref).values["depth.dynamic.absrel"] == pytest.approx(expected(held), rel=1e-12)
    unmasked = dataclasses.replace(truth, dynamic=None)
    Reference.of(unmasked).save(tmp_path / "unmasked")
    assert not (tmp_path / "unmasked/grid_dynamic.npy").exists()
    on_undefined = np.zeros(true.shape, bool)
    on_undefined[:, :, :20] = True
    for ref in (
        Reference.of(unmasked),
        Reference.load(tmp_path / "unmasked"),
        Reference.of(dataclasses.replace(truth, dynamic=on_undefined)),
    ):
        values = score(model, ref).values
        assert math.isnan(values["depth.dynamic.absrel"]) and values["depth.median.absrel"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Ground truth


def test_truth_matches_the_scene_it_was_written_from(tmp_path):
    scene = render_scene(3, 5, 32, 48)
    write_dynamic_npz(scene, tmp_path / "dynamic/dynamic_3/10000.npz", "focal")
    write_captions(tmp_path / "caption/dynamic_3_with_caption_upload.csv", {10000: scene.caption})
    source = clip_sources(tmp_path)["dynamic/dynamic_3/10000"]
    truth = load_truth(tmp_path, source, 4, 32, 48)
    np.testing.assert_allclose(truth.depth, scene.depth[:4], rtol=1e-5)
    np.testing.assert_allclose(truth.K, scene.K[:4], rtol=1e-6)
    first = np.linalg.inv(scene.cam2world[0].astype(np.float64))
    np.testing.assert_allclose(truth.cam2world, first @ scene.cam2world[:4], atol=1e-5)
    assert (truth.rgb == scene.rgb[:4]).all()
    with pytest.raises(EvaluationError, match="has 5 frames, the result 9"):
        load_truth(tmp_path, source, 9, 32, 48)
    with pytest.raises(EvaluationError, match="smaller than the result's 64x96"):
        load_truth(tmp_path, source, 5, 64, 96)


def test_truth_takes_the_mask_at_the_depth_s_pixels(tmp_path):
    data = write_tree(tmp_path, 1, 5, 48, 64)  # one MonST3R clip: frames 0-4 of scene 0
    scene = render_scene(0, 5, 48, 64)
    source = clip_sources(data)["dynamic/dynamic_1/10000_0-4"]
    half = load_truth(data, source, 4, 24, 32)  # halved, nearest: source pixel 2 i + 1
    np.testing.assert_array_equal(half.dynamic, scene.dynamic_mask[:4, 1::2, 1::2])
    np.testing.assert_array_equal(half.depth, scene.depth[:4, 1::2, 1::2])
    cut = load_truth(data, source, 5, 48, 48)  # not resized, the centre 48 columns
    np.testing.assert_array_equal(cut.dynamic, scene.dynamic_mask[:, :, 8:56])
    np.testing.assert_array_equal(cut.depth, scene.depth[:, :, 8:56])


# ---------------------------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny synthetic tree (5 clips, one per layout, 9 x 32 x 48) and the exact ground truth as results."""
    root = tmp_path_factory.mktemp("evaluation")
    data = write_tree(root / "synthetic", 5, 9, 32, 48)
    exact = write_corrupted(data, root / "exact", 9, 32, 48, noise=0.0, warp=0.0, rgb_noise=0.0)
    return root, data, exact[0].parent


def test_reference_saved_and_read_back_scores_the_same(tmp_path):
    # a reduced truth read back from disk scores every number but the RGB ones exactly as the truth in memory
    scene = make_truth(frames=4, height=96, width=144)  # grids of stride 1 (evaluation) and 3 (points)
    truth = Truth("toy", scene.rgb.numpy(), scene.depth.float().numpy(), scene.K.numpy(), scene.cam2world.numpy())
    truth.depth[1, :10] = 0  # undefined depths
    truth.dynamic = np.zeros(truth.depth.shape, bool)
    truth.dynamic[:, 5:40, 50:90] = True  # a moving object
    rng = np.random.default_rng(0)
    rgb = np.clip(truth.rgb + rng.normal(0, 20, truth.rgb.shape), 0, 255).astype(np.uint8)
    depth = truth.depth * rng.uniform(0.9, 1.1, truth.depth.shape).astype(np.float32) + 0.05
    pred = Prediction(rgb, truth.K * 1.05, truth.cam2world, depth, rng.random(depth.shape, np.float32))
    memory = Reference.of(truth)
    memory.save(tmp_path / "reference")
    back = Reference.load(tmp_path / "reference")
    assert back.rgb is None and back.ssim_terms is None
    np.testing.assert_array_equal(back.image, truth.rgb[:1])
    expected, got = score(pred, memory), score(pred, back)
    rgb_metrics = {name for name in expected.values if name.startswith("rgb.")}
    assert rgb_metrics == {"rgb.psnr0", "rgb.ssim0", "rgb.psnr", "rgb.ssim"} and not rgb_metrics & set(got.values)
    assert got.values == {k: v for k, v in expected.values.items() if k not in rgb_metrics}
    for name, curve in got.frames.items():
        np.testing.assert_array_equal(curve, expected.frames[name])
    for name in ("true", "pred", "rgb"):
        np.testing.assert_array_equal(got.worst[name], expected.worst[name])


def test_every_floor_scores_the_input_image_held(tmp_path):
    # a floor's RGB numbers and edges are those of the input image repeated F times (a copy, not a view), against
    # the truth in memory and against the reduced truth read back without its video alike
    scene = make_truth(frames=4, height=96, width=144)
    truth = Truth("toy", scene.rgb.numpy(), scene.depth.float().numpy(), scene.K.numpy(), scene.cam2world.numpy())
    memory = Reference.of(truth)
    memory.save(tmp_path / "reference")
    back = Reference.load(tmp_path / "reference")
    image = FloorImage.of(truth.rgb[:1], 4, memory)
    floor = register_frame(plane_xyz(96, 144), RegistrationConfig()).held(4)
    repeated = np.repeat(truth.rgb[:1], 4, axis=0)
    psnr, ssim = m.psnr(repeated, truth.rgb), m.ssim(repeated, truth.rgb)
    stride = m.grid_stride(96, 144)
    edges = m.edge_agreement(np.repeat(floor.depth[:1], 4, 0), m.image_edges(repeated, stride), stride)
    for ref in (memory, back):
        got = score(floor, ref, image)
        assert got.values["rgb.psnr0"] == pytest.approx(psnr[0], rel=1e-12)
        assert got.values["rgb.psnr"] == pytest.approx(psnr[1:].mean(), rel=1e-12)
        assert got.values["rgb.ssim0"] == pytest.approx(ssim[0], rel=1e-6)
        assert got.values["rgb.ssim"] == pytest.approx(ssim[1:].mean(), rel=1e-6)
        np.testing.assert_allclose(got.frames["rgb.ssim"], ssim, rtol=1e-6)
        np.testing.assert_allclose(got.frames["edges"], edges, rtol=1e-12)
    assert image.image.shape == (1, 96, 144, 3) and image.edges.shape[0] == 1  # one frame kept of each
    with pytest.raises(ValueError, match="its own rgb must be None"):
        score(dataclasses.replace(floor, rgb=repeated), memory, image)


def test_exact_results_score_zero_error(synthetic, tmp_path):
    _, data, exact = synthetic
    proc = run("--results", exact, "--gt", data, "--out", tmp_path / "report")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report/metrics.json").read_text())
    assert report["samples_scored"] == 5 and set(report["summary"]) == {"model", *report["floors"]}
    model = report["summary"]["model"]
    for key in ("depth.median.absrel", "depth.lstsq.absrel", "points.chamfer", "camera.ate", "camera.rpe_trans"):
        assert model[key] < 1e-4, key
    assert model["depth.dynamic.absrel"] < 1e-4 and report["summary_samples"]["model"]["depth.dynamic.absrel"] == 2
    assert model["depth.median.delta1"] == 1 and model["rgb.psnr0"] == "inf"
    assert model["rgb.ssim"] == pytest.approx(1)
    assert report["summary"]["plane"]["depth.median.absrel"] > 0.1
    summary = (tmp_path / "report/summary.md").read_text()
    assert "| depth AbsRel (median) | lower | " in summary and summary.count("| scored |") == 5
    for plot in ("camera_paths.png", "per_frame.png", "worst_samples.png"):
        assert (tmp_path / "report" / plot).stat().st_size > 1000
    assert len(list(exact.glob("*_reg.npz"))) == 5  # the registrations were computed and kept
    assert not list((tmp_path / "report").glob(".truth-*"))


def test_a_registration_saved_by_another_fit_revision_is_fitted_again(synthetic, tmp_path):
    """A registration beside a result is reused only when the fit revision that saved it is the current one."""
    _, data, exact = synthetic
    results = tmp_path / "results"
    results.mkdir()
    for name in ("00000.npz", "00000.json", "00001.npz", "00001.json"):
        (results / name).write_bytes((exact / name).read_bytes())
    first = evaluation_run.evaluate(results, tmp_path / "first", data)
    assert [s.registration for s in first.samples] == ["computed", "computed"]
    old = results / "00001_reg.json"
    meta = json.loads(old.read_text())
    assert meta["fit"] == FIT_VERSION
    old.write_text(json.dumps({k: v for k, v in meta.items() if k != "fit"}))  # as saved before revisions
    again = evaluation_run.evaluate(results, tmp_path / "again", data)
    assert [s.registration for s in again.samples] == ["read", "computed"]
    assert json.loads(old.read_text())["fit"] == FIT_VERSION
    smoothed = evaluation_run.evaluate(results, tmp_path / "smoothed", data, config=RegistrationConfig(smooth_frames=2))
    assert [s.registration for s in smoothed.samples] == ["computed", "computed"]  # other settings: fitted again
    assert json.loads(old.read_text())["config"]["smooth_frames"] == 2


def test_without_ground_truth_and_an_unscorable_sample(synthetic, tmp_path):
    _, _, exact = synthetic
    results = tmp_path / "results"
    results.mkdir()
    for name in ("00000.npz", "00000.json"):
        (results / name).write_bytes((exact / name).read_bytes())
    with np.load(exact / "00001.npz") as data:
        xyz = data["xyz"].copy()
        xyz[2] = 0.5  # frame 2 collapsed to one point: no camera fits it
        save_result(results, 1, data["rgb"], xyz, {})
        xyz[2, 0, 0, 0] = np.nan  # a generated NaN
        np.savez(results / "00002.npz", rgb=data["rgb"], xyz=xyz)
    proc = run("--results", results, "--out", tmp_path / "report")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report/metrics.json").read_text())
    assert report["floors"].keys() == {"plane"} and "depth.median.absrel" not in report["metrics"]
    status = {s["result"]: s["status"] for s in report["samples"]}
    assert status["00000"] == "scored"
    assert status["00001"].startswith("not scored: registration failed: frames [2]")
    assert status["00002"].endswith("00002.npz: xyz holds NaN or infinite values")
    assert report["summary"]["model"]["residual.p90"] < 1e-4
    assert "| 00001 | — | not scored: registration failed" in (tmp_path / "report/summary.md").read_text()


def test_dynamic_depth_absrel_of_written_clips_and_its_summary(synthetic, tmp_path):
    _, data, _ = synthetic
    noisy = write_corrupted(data, tmp_path / "noisy", 9, 32, 48)[0].parent
    results = tmp_path / "results"
    results.mkdir()
    for name in ("00000", "00001", "00002"):  # two MonST3R clips (with masks), a dynamic_3 npz (without)
        shutil.copy(noisy / f"{name}.npz", results)
        shutil.copy(noisy / f"{name}.json", results)
    evaluation = evaluation_run.evaluate(results, tmp_path / "out", data, workers=1)
    assert [s.status for s in evaluation.samples] == ["scored"] * 3
    with_mask = {"00000": "dynamic/dynamic_1/10000_0-8", "00001": "dynamic/dynamic_2/10001_1-9"}
    for sample in evaluation.samples[:2]:  # the clip's own files, at the result's size (32 x 48: every pixel)
        folder = data / with_mask[sample.name]
        true = np.stack([np.load(folder / f"frame_{t:04d}.npy") for t in range(9)]).astype(np.float64)
        moving = np.stack([np.asarray(Image.open(folder / f"dynamic_mask_{t}.png")) == 255 for t in range(9)])
        with np.load(results / f"{sample.name}_reg.npz") as reg:
            depth = reg["depth"].astype(np.float64)
        defined = true > 0
        scale = np.median(true[defined]) / np.median(depth[defined])
        g, d = true[moving & defined], depth[moving & defined]
        assert 0 < len(g) < 0.5 * true.size
        expected = np.mean(np.abs(scale * d - g) / g)
        assert sample.scores["model"].values["depth.dynamic.absrel"] == pytest.approx(expected, rel=1e-9)
        for floor in ("plane", "mean_depth", "first_frame"):
            assert sample.scores[floor].values["depth.dynamic.absrel"] > 0
        assert "depth.dynamic.absrel" not in sample.scores["static_camera"].values
    no_mask = evaluation.samples[2].scores
    assert all(math.isnan(no_mask[name].values["depth.dynamic.absrel"]) for name in no_mask if name != "static_camera")
    summary = evaluation_report.summarize(evaluation)
    counts = evaluation_report.summary_samples(evaluation)
    for name in ("model", "plane", "mean_depth", "first_frame"):
        values = [s.scores[name].values["depth.dynamic.absrel"] for s in evaluation.samples[:2]]
        assert summary[name]["depth.dynamic.absrel"] == pytest.approx(np.mean(values), rel=1e-12)
        assert counts[name]["depth.dynamic.absrel"] == 2 and counts[name]["depth.median.absrel"] == 3
    assert counts["static_camera"]["depth.dynamic.absrel"] == 0
    assert math.isnan(summary["static_camera"]["depth.dynamic.absrel"])
    report = evaluation_report.metrics_json(evaluation)
    assert report["samples"][2]["scores"]["model"]["depth.dynamic.absrel"] is None
    assert report["summary_samples"]["first_frame"] == counts["first_frame"]
    lines = evaluation_report.summary_markdown(evaluation, []).splitlines()
    row = next(line for line in lines if line.startswith("| dynamic depth AbsRel (median) | lower |"))
    assert row.count(" (n=2) |") == 4 and row.endswith(" | — |")
    assert "(n=" not in next(line for line in lines if line.startswith("| depth AbsRel (median) |"))


def test_bad_input_stops_with_one_line(synthetic, tmp_path):
    _, data, exact = synthetic
    no_xyz = tmp_path / "no_xyz"
    no_xyz.mkdir()
    np.savez(no_xyz / "00000.npz", rgb=np.zeros((9, 32, 48, 3), np.uint8))
    xyz = np.random.default_rng(0).uniform(-1, 1, (13, 32, 48, 3)).astype(np.float32)
    (tmp_path / "longer").mkdir()
    save_result(tmp_path / "longer", 0, np.zeros(xyz.shape, np.uint8), xyz, {"clip_id": "dynamic/dynamic_3/10002"})
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"00000": "dynamic/dynamic_3/99999"}))
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    mask = broken / "dynamic/dynamic_1/10000_0-8/dynamic_mask_3.png"
    mask.write_bytes(b"not a png")
    cases = {
        f"cannot read dynamic mask {mask}": ["--results", exact, "--gt", broken],
        "00000.npz: missing arrays ['xyz']": ["--results", no_xyz],
        "ground truth dynamic/dynamic_3/10002 has 9 frames, the result 13": [
            "--results",
            tmp_path / "longer",
            "--gt",
            data,
        ],
        "00000 names clip 'dynamic/dynamic_3/99999', which is not in the ground truth": [
            "--results",
            exact,
            "--gt",
            data,
            "--mapping",
            mapping,
        ],
    }
    for message, args in cases.items():
        proc = run(*args, "--out", tmp_path / "report")
        lines = shown(proc.stderr)
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("evaluate.py: "), proc.stderr
        assert message in lines[0]
        assert not (tmp_path / "report/metrics.json").exists()


def _scores(sample) -> dict:
    """Everything a sample's scores hold, as nested dicts and arrays."""
    return {name: dataclasses.asdict(score) for name, score in sample.scores.items()}


def test_worker_processes_score_as_one_thread(synthetic, tmp_path, monkeypatch):
    _, data, _ = synthetic
    noisy = write_corrupted(data, tmp_path / "noisy", 9, 32, 48)[0].parent
    results = tmp_path / "results"
    results.mkdir()
    for name in ("00000", "00001", "00002"):
        shutil.copy(noisy / f"{name}.npz", results)
        shutil.copy(noisy / f"{name}.json", results)
    with np.load(noisy / "00001.npz") as arrays:
        xyz = arrays["xyz"].copy()
        xyz[2] = 0.5  # frame 2 collapsed to one point: no camera fits it
        np.savez(results / "00001.npz", rgb=arrays["rgb"], xyz=xyz)
    pools = []

    class Recorded(runtime.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(runtime, "ProcessPoolExecutor", Recorded)
    runs, threads = {}, torch.get_num_threads()
    for workers in (1, 2):
        shutil.copytree(results, tmp_path / f"results{workers}")  # each run computes the registrations
        runs[workers] = evaluation_run.evaluate(tmp_path / f"results{workers}", tmp_path / f"out{workers}", data,
                                                workers=workers)  # fmt: skip
        assert torch.get_num_threads() == threads  # one torch thread in each worker, not here
    assert len(pools) == 1 and pools[0]._max_workers == 2
    alone, pooled = runs[1], runs[2]
    assert [s.name for s in pooled.samples] == ["00000", "00001", "00002"]
    assert pooled.samples[1].status.startswith("not scored: registration failed: frames [2]")
    for one, other in zip(alone.samples, pooled.samples, strict=True):
        assert (other.name, other.status, other.registration) == (one.name, one.status, one.registration)
        assert other.seconds.keys() == one.seconds.keys() and all(t > 0 for t in other.seconds.values())
        np.testing.assert_equal(_scores(other), _scores(one))
    np.testing.assert_equal(pooled.truth_paths, alone.truth_paths)
    with np.load(tmp_path / "results2/00000.npz") as arrays:
        rgb, xyz = arrays["rgb"][:5], arrays["xyz"][:5]
    np.savez(tmp_path / "results2/00000.npz", rgb=rgb, xyz=xyz)  # 5 frames: its saved registration has 9
    for workers in (1, 2):  # a user error in a worker ends the run with its message, as in one thread
        with pytest.raises(EvaluationError, match=r"not all 5 frames of 00000\.npz"):
            evaluation_run.evaluate(tmp_path / "results2", tmp_path / "out3", data, workers=workers)


@pytest.mark.filterwarnings("error")
def test_a_one_frame_video_has_no_pairs():
    K = np.array([[[10.0, 0, 16], [0, 10, 12], [0, 0, 1]]])
    rgb = np.zeros((1, 24, 32, 3), np.uint8)
    depth = np.ones((1, 24, 32), np.float32)
    truth = Truth("toy", rgb, depth, K, np.eye(4)[None])
    values = score(Prediction(rgb, K, np.eye(4)[None], depth, np.zeros((1, 24, 32))), Reference.of(truth)).values
    assert values["depth.median.absrel"] == 0 and values["camera.ate"] == 0
    assert all(math.isnan(values[k]) for k in ("camera.rpe_trans", "camera.rpe_rot", "rgb.psnr", "path.jerk"))
    assert "stability.static" not in values
