"""pm_registration.py end to end: outputs, exports that parse back to the cameras, and bad input."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from plyfile import PlyData

from fourdnex.geometry.cameras import quaternion_to_rotation
from fourdnex.geometry.results import load_registration, save_result
from fourdnex.testing.scenes import make_truth

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True, env=env
    )


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A toy result registered once with every export (frames 0, 2, 4 of 5)."""
    folder = tmp_path_factory.mktemp("results")
    truth = make_truth(frames=5)
    save_result(folder, 0, truth.rgb.numpy(), truth.xyz.numpy(), {"prompt": "toy"})
    proc = run("pm_registration.py", "--pkl_dir", folder, "--device", "cpu", "--frame_gap", "2",
               "--export", "ply", "colmap", "nerfstudio", "depth")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return folder, truth


def test_outputs_have_the_documented_shapes(registered):
    folder, truth = registered
    reg = load_registration(folder / "00000_reg.npz")
    assert reg["frame_index"].tolist() == [0, 2, 4]
    assert reg["K"].shape == (3, 3, 3) and reg["cam2world"].shape == (3, 4, 4)
    assert reg["depth"].shape == reg["residual"].shape == (3, 48, 64) and reg["points"].shape == (3, 48, 64, 3)
    np.testing.assert_allclose(reg["K"], truth.K[[0, 2, 4]].numpy(), rtol=1e-4)
    meta = json.loads((folder / "00000_reg.json").read_text())
    assert meta["config"]["shared_intrinsics"] is True and meta["frames"]["gap"] == 2


def test_ply_holds_the_registered_points(registered):
    folder, truth = registered
    reg = load_registration(folder / "00000_reg.npz")
    vertex = PlyData.read(str(folder / "00000_export/ply/frame_00002.ply"))["vertex"]
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], -1)
    np.testing.assert_allclose(xyz, reg["points"][1].reshape(-1, 3), atol=1e-6)
    rgb = np.stack([vertex["red"], vertex["green"], vertex["blue"]], -1)
    np.testing.assert_array_equal(rgb, truth.rgb[2].reshape(-1, 3).numpy())


def test_colmap_text_reproduces_the_cameras(registered):
    folder, _ = registered
    reg = load_registration(folder / "00000_reg.npz")
    cams = [ln.split() for ln in (folder / "00000_export/colmap/cameras.txt").read_text().splitlines() if ln[0] != "#"]
    assert len(cams) == 1 and cams[0][1:4] == ["PINHOLE", "64", "48"]
    fx, fy, cx, cy = map(float, cams[0][4:])
    np.testing.assert_allclose([fx, fy, cx, cy], reg["K"][0][[0, 1, 0, 1], [0, 1, 2, 2]], rtol=1e-6)
    lines = [
        ln for ln in (folder / "00000_export/colmap/images.txt").read_text().splitlines() if not ln.startswith("#")
    ]
    images = [ln.split() for ln in lines[::2]]
    assert [im[9] for im in images] == ["frame_00000.png", "frame_00002.png", "frame_00004.png"]
    for f, im in enumerate(images):
        q, t = np.array(im[1:5], float), np.array(im[5:8], float)
        R = quaternion_to_rotation(torch.from_numpy(q)).numpy()
        world2cam = np.linalg.inv(reg["cam2world"][f].astype(np.float64))
        np.testing.assert_allclose(R, world2cam[:3, :3], atol=1e-6)
        np.testing.assert_allclose(t, world2cam[:3, 3], atol=1e-6)
        assert (folder / "00000_export/images" / im[9]).exists()


def test_nerfstudio_transforms_reproduce_the_cameras(registered):
    folder, _ = registered
    reg = load_registration(folder / "00000_reg.npz")
    meta = json.loads((folder / "00000_export/transforms.json").read_text())
    assert (meta["w"], meta["h"]) == (64, 48)
    np.testing.assert_allclose(
        [meta["fl_x"], meta["fl_y"], meta["cx"], meta["cy"]], reg["K"][0][[0, 1, 0, 1], [0, 1, 2, 2]], rtol=1e-6
    )
    for f, frame in enumerate(meta["frames"]):
        opengl = np.array(frame["transform_matrix"])
        np.testing.assert_allclose(opengl @ np.diag([1, -1, -1, 1]), reg["cam2world"][f], atol=1e-6)
        assert (folder / "00000_export" / frame["file_path"]).exists()
        assert (folder / "00000_export" / frame["depth_file_path"]).exists()


def test_depth_export_round_trips(registered):
    folder, _ = registered
    reg = load_registration(folder / "00000_reg.npz")
    cameras = json.loads((folder / "00000_export/cameras.json").read_text())
    scale = cameras["depth_scale"]
    for f, frame in enumerate(cameras["frames"]):
        depth = np.asarray(Image.open(folder / "00000_export" / frame["depth"])).astype(np.float64) * scale
        np.testing.assert_allclose(depth, reg["depth"][f], atol=scale)
        np.testing.assert_allclose(frame["K"], reg["K"][f], rtol=1e-6)
        np.testing.assert_allclose(frame["cam2world"], reg["cam2world"][f], atol=1e-6)
    with np.load(folder / "00000_export/cameras.npz") as npz:
        np.testing.assert_allclose(npz["cam2world"], reg["cam2world"])


def write_bad(kind: str, folder: Path) -> Path:
    """A results folder holding one kind of bad input; returns the path to hand to the CLI."""
    rgb = np.zeros((2, 8, 8, 3), np.uint8)
    xyz = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    if kind == "missing":
        return folder / "nothing_here"
    if kind == "wrong_shape":
        np.savez(folder / "00000.npz", rgb=rgb, xyz=xyz[:, :, :4])
    elif kind == "nan":
        xyz[1, 2, 3, 0] = np.nan
        np.savez(folder / "00000.npz", rgb=rgb, xyz=xyz)
    elif kind == "malicious":

        class RunsCode:
            def __reduce__(self):
                return (os.system, (f"touch {folder / 'ran'}",))

        (folder / "00000.pkl").write_bytes(pickle.dumps(RunsCode()))
    return folder


@pytest.mark.parametrize("script", ["pm_registration.py", "rerun_vis.py"])
@pytest.mark.parametrize("kind", ["missing", "empty", "wrong_shape", "nan", "malicious"])
def test_bad_input_one_line_nonzero_exit_nothing_written(tmp_path, kind, script):
    target = write_bad(kind, tmp_path)
    before = listing(tmp_path)
    extra = ["--rr_recording", tmp_path / "out.rrd"] if script == "rerun_vis.py" else []
    proc = run(script, "--pkl_dir", target, *extra)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: "), proc.stderr
    assert listing(tmp_path) == before


def test_pointmap_without_spread_is_refused(tmp_path):
    xyz = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    xyz[1] = 0.25  # every point of frame 1 in one place
    np.savez(tmp_path / "00000.npz", rgb=np.zeros((3, 8, 8, 3), np.uint8), xyz=xyz)
    before = listing(tmp_path)
    proc = run("pm_registration.py", "--pkl_dir", tmp_path)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        f"pm_registration.py: {tmp_path / '00000.npz'}: frames [1] have all their points in one place: "
        "no camera fits them"
    ]
    assert listing(tmp_path) == before
