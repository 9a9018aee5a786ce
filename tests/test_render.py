"""Novel views (fourdnex.geometry.render, fourdnex.geometry.paths, render.py) against ray-cast ground truth."""

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fourdnex.cli import run
from fourdnex.files import read_video
from fourdnex.geometry import figure
from fourdnex.geometry import render as render_module
from fourdnex.geometry.cameras import (
    intrinsics,
    invert_rigid,
    look_at,
    project_points,
    rotation_angle_deg,
    transform_points,
    unproject_depth,
)
from fourdnex.geometry.paths import CameraPath, camera_path
from fourdnex.geometry.render import RenderError, load_path, render_frames, render_result, splat
from fourdnex.geometry.results import load_registration, save_result
from fourdnex.testing import scenes

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    """A top-level script as a module."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_script", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grow(mask: torch.Tensor) -> torch.Tensor:
    """``mask (H, W)`` dilated by one pixel."""
    return F.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0] > 0


def render_true_cloud(source: scenes.ToyScene, K: torch.Tensor, cam2world: torch.Tensor, height: int, width: int):
    """The first view's true point cloud (its true depth unprojected by its true camera) seen by ``K``, ``cam2world``
    (one camera each)."""
    points = unproject_depth(source.depth[:1], source.K[:1], source.cam2world[:1]).float()
    keep = torch.ones(1, height, width, dtype=torch.bool)
    views = render_frames(
        points, source.rgb[:1], source.depth[:1].float(), source.K[:1], keep, K[None], cam2world[None]
    )
    return views.rgb[0], views.depth[0], views.mask[0]


def camera(fx: float, cx: float, cy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """K and an identity camera-to-world (world = camera frame)."""
    K = intrinsics(*torch.tensor([fx, fx, cx, cy], dtype=torch.float64))
    return K, torch.eye(4, dtype=torch.float64)


def test_a_point_covers_its_pixel_and_a_block_of_its_footprint():
    K, pose = camera(10.0, 4.0, 4.0)
    # Camera-frame points at depth 2 landing at (u, v) = (2.3, 5.7) and (6.5, 1.5): pixels (row 5, col 2), (1, 6).
    points = torch.tensor([[(2.3 - 4) / 5, (5.7 - 4) / 5, 2.0], [(6.5 - 4) / 5, (1.5 - 4) / 5, 2.0]])
    colors = torch.tensor([[10, 20, 30], [40, 50, 60]], dtype=torch.uint8)
    rgb, depth, mask = splat(points, colors, torch.full((2, 2), 0.2 / 10), K, pose, 8, 8, scale=1.0)
    assert (~mask).nonzero().tolist() == [[1, 6], [5, 2]]
    assert rgb[5, 2].tolist() == [10, 20, 30] and rgb[1, 6].tolist() == [40, 50, 60] and rgb[mask].max() == 0
    assert depth[5, 2] == 2.0 and depth[mask].abs().max() == 0
    # A footprint of 0.5 world units at depth 2 spans 10 * 0.5 / 2 = 2.5 pixels: centres within 2.5 / 2 of (6.5, 1.5).
    _, _, mask = splat(points[1:], colors[1:], torch.full((1, 2), 0.5), K, pose, 8, 8, scale=1.0)
    assert (~mask).nonzero().tolist() == [[r, c] for r in range(0, 3) for c in range(5, 8)]


def test_the_nearer_point_wins_whatever_the_order():
    K, pose = camera(10.0, 4.0, 4.0)
    near, far = [0.05, 0.05, 1.0], [0.1, 0.1, 2.0]  # both land at (4.5, 4.5)
    extent = torch.full((2, 2), 0.1)
    for order in ([near, far], [far, near]):
        colors = torch.tensor([[255, 0, 0], [0, 0, 255]], dtype=torch.uint8)
        colors = colors if order[0] is near else colors.flip(0)
        rgb, depth, _ = splat(torch.tensor(order), colors, extent, K, pose, 8, 8)
        assert rgb[4, 4].tolist() == [255, 0, 0] and depth[4, 4] == 1.0


def test_points_behind_or_beside_the_camera_land_nowhere():
    K, pose = camera(10.0, 4.0, 4.0)
    points = torch.tensor([[0.0, 0.0, -1.0], [5.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    for n in (3, 0):
        _, _, mask = splat(points[:n], torch.zeros(n, 3, dtype=torch.uint8), torch.full((n, 2), 0.1), K, pose, 8, 8)
        assert mask.all()


def test_chunks_change_nothing(monkeypatch):
    height, width = 24, 32
    K, cam2world = scenes.camera_intrinsics(2, height, width), scenes.trajectory(2)
    source = scenes.render(K[:1], cam2world[:1], height, width)
    whole = render_true_cloud(source, K[1], cam2world[1], height, width)
    monkeypatch.setattr(render_module, "CHUNK_PAIRS", 7)  # about 200 chunks
    for a, b in zip(whole, render_true_cloud(source, K[1], cam2world[1], height, width), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_true_point_cloud_matches_a_held_out_ray_cast_view():
    height, width = 240, 320
    K, cam2world = scenes.camera_intrinsics(5, height, width), scenes.trajectory(5)
    source = scenes.render(K[:1], cam2world[:1], height, width)
    truth = scenes.render(K[1:2], cam2world[1:2], height, width)  # held out: the next camera of the trajectory
    rgb, depth, mask = render_true_cloud(source, K[1], cam2world[1], height, width)
    covered = ~mask
    psnr = 10 * math.log10(255**2 / (rgb.double() - truth.rgb[0].double())[covered].square().mean())
    assert psnr >= 25.0, psnr
    assert covered.double().mean() > 0.8
    relative = ((depth.double() - truth.depth[0]) / truth.depth[0])[covered].abs()
    assert relative.median() < 0.005, relative.median()


@pytest.fixture
def plate_scene(monkeypatch):
    """The toy room with only a thin plate floating before the back wall, seen head-on from the source camera and
    from a camera moved 0.45 to the side: the wall beside the plate and a strip beyond the source's frustum are
    hidden from the source."""
    monkeypatch.setattr(scenes, "SPHERES", ())
    monkeypatch.setattr(scenes, "BOXES", (((-0.5, 0.7, -1.0), (0.5, 1.5, -0.98)),))
    height, width = 96, 128
    K = intrinsics(*torch.tensor([0.8 * width, 0.8 * width, width / 2, height / 2], dtype=torch.float64))
    eye = torch.tensor([[0.0, 1.1, -3.5], [-0.45, 1.1, -3.5]], dtype=torch.float64)
    cam2world = look_at(eye, eye + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))  # looking along +z
    return scenes.render(K.expand(2, 3, 3), cam2world, height, width)


def test_the_mask_is_what_the_source_camera_cannot_see(plate_scene):
    scene = plate_scene
    height, width = scene.depth.shape[1:]
    _, _, mask = render_true_cloud(scene, scene.K[1], scene.cam2world[1], height, width)
    hidden = ~scenes.seen_from(scene.points[1], scene.K[0], scene.cam2world[0], height, width)
    assert hidden.double().mean() > 0.05 and hidden[:, width // 4 : 3 * width // 4].sum() > 100  # beside the plate
    assert not (mask & ~grow(hidden)).any()  # every masked pixel is within one pixel of a hidden one
    assert not (~grow(~hidden) & ~mask).any()  # every hidden pixel one pixel in from the border is masked
    assert (mask != hidden).double().mean() < 0.01


def in_first_camera(cam2world: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """World points ``(N, 3)`` in the frame of the first camera of ``cam2world (F, 4, 4)``."""
    return transform_points(invert_rigid(cam2world[:1]), points[None])[0]


def test_orbit_turns_every_camera_about_the_scene_centre():
    K, cam2world = scenes.camera_intrinsics(5, 48, 64), scenes.trajectory(5)
    depth = 3.0
    new_K, new_pose = camera_path(CameraPath("orbit", angle=40.0), K, cam2world, depth)
    torch.testing.assert_close(new_K, K)
    torch.testing.assert_close(new_pose[0], cam2world[0])
    pivot = transform_points(cam2world[:1], torch.tensor([[[0.0, 0.0, depth]]], dtype=torch.float64))[0]  # world
    # The pivot stays where it was in every image, and each camera keeps its distance to it.
    torch.testing.assert_close(
        transform_points(invert_rigid(new_pose), pivot.expand(5, 1, 3)),
        transform_points(invert_rigid(cam2world), pivot.expand(5, 1, 3)),
    )
    turned = rotation_angle_deg(cam2world[:, :3, :3], new_pose[:, :3, :3])
    torch.testing.assert_close(turned, torch.linspace(0, 40, 5, dtype=torch.float64))
    moved = in_first_camera(cam2world, new_pose[:, :3, 3]) - in_first_camera(cam2world, cam2world[:, :3, 3])
    assert (moved[1:, 0] > 0).all() and moved[:, 1].abs().max() < 1e-9  # to the first camera's right, level


def test_spiral_widens_around_the_pivot_counter_clockwise():
    K, still = scenes.camera_intrinsics(9, 48, 64), scenes.trajectory(1).expand(9, 4, 4)
    depth = 2.0
    _, new_pose = camera_path(CameraPath("spiral", angle=12.0, turns=1.0), K, still, depth)
    centres = in_first_camera(still, new_pose[:, :3, 3])
    pivot = torch.tensor([0.0, 0.0, depth], dtype=torch.float64)
    torch.testing.assert_close((centres - pivot).norm(dim=-1), torch.full((9,), depth, dtype=torch.float64))
    angles = rotation_angle_deg(still[:, :3, :3], new_pose[:, :3, :3])
    torch.testing.assert_close(angles, torch.linspace(0, 12, 9, dtype=torch.float64))
    # A quarter turn in (t = 0.25, frame 2) the camera has moved up (-y), half a turn in (frame 4) to the left.
    assert centres[2, 1] < 0 and centres[2, 0].abs() < 1e-9
    assert centres[4, 0] < 0 and centres[4, 1].abs() < 1e-9


def test_dolly_and_fixed():
    K, cam2world = scenes.camera_intrinsics(5, 48, 64), scenes.trajectory(5)
    _, new_pose = camera_path(CameraPath("dolly", distance=0.5), K, cam2world, 4.0)
    moved = in_first_camera(cam2world, new_pose[:, :3, 3]) - in_first_camera(cam2world, cam2world[:, :3, 3])
    torch.testing.assert_close(moved, torch.tensor([[0, 0, 0.5 * f] for f in range(5)], dtype=torch.float64))
    torch.testing.assert_close(new_pose[:, :3, :3], cam2world[:, :3, :3])
    fixed_K, fixed_pose = camera_path(CameraPath("fixed"), K * torch.arange(1, 6)[:, None, None], cam2world, 4.0)
    torch.testing.assert_close(fixed_pose, cam2world[:1].expand(5, 4, 4))
    torch.testing.assert_close(fixed_K, K[:1].expand(5, 3, 3))


def write_path(path: Path, frames: list) -> Path:
    path.write_text(json.dumps({"width": 64, "height": 48, "axes": "opencv", "frames": frames}))
    return path


def test_path_files_are_checked_key_by_key(tmp_path):
    good = {"K": np.eye(3).tolist(), "cam2world": np.eye(4).tolist()}
    K, pose = load_path(write_path(tmp_path / "one.json", [good]), 3, 48, 64)
    assert K.shape == (3, 3, 3) and pose.shape == (3, 4, 4)
    cases = {
        "frames[1].K must be (3, 3)": [good, {**good, "K": np.eye(4)[:3].tolist()}, good],
        "frames[0].cam2world must be (4, 4)": [{**good, "cam2world": [[1, 0, 0]]}],
        "frames[0].cam2world must be rigid": [{**good, "cam2world": (2 * np.eye(4)).tolist()}],
        '"frames" must be a list of 3 cameras': [good, good],
    }
    for message, frames in cases.items():
        with pytest.raises(RenderError, match=re.escape(message)):
            load_path(write_path(tmp_path / "bad.json", frames), 3, 48, 64)
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(RenderError, match="not a readable JSON file"):
        load_path(tmp_path / "text.json", 3, 48, 64)
    with pytest.raises(RenderError, match='"width" is 64, but the input is 65 pixels'):
        load_path(tmp_path / "one.json", 3, 48, 65)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A toy result (5 frames, 48 x 64) registered by pm_registration.py."""
    folder = tmp_path_factory.mktemp("results")
    truth = scenes.make_truth(frames=5, height=48, width=64)
    save_result(folder, 0, truth.rgb.numpy(), truth.xyz.numpy(), {"prompt": "toy"})
    pm = script("pm_registration.py")
    run(pm.main, pm.build_parser(), ["--pkl_dir", str(folder), "--device", "cpu"])
    return folder, truth


def render_cli(*argv: str) -> None:
    module = script("render.py")
    run(module.main, module.build_parser(), list(argv))


def test_render_writes_the_documented_files(registered, tmp_path):
    folder, truth = registered
    render_cli("--pkl_dir", str(folder), "--out", str(tmp_path), "--path", "dolly", "--depth_format", "npy")
    out = tmp_path / "00000"
    novel, preview = read_video(out / "novel.mp4"), read_video(out / "preview.mp4")
    assert novel.shape == (5, 48, 64, 3) and preview.shape == (5, 48, 128, 3)
    names = [f"frame_{i:05d}" for i in range(5)]
    masks = np.stack([np.asarray(Image.open(out / "mask" / f"{n}.png")) for n in names])
    depth = np.stack([np.load(out / "depth" / f"{n}.npy") for n in names])
    assert set(np.unique(masks)) <= {0, 255} and ((masks == 255) == (depth == 0)).all()
    # The first frame's camera is the registered one: the novel view starts as the input frame (the video is lossy).
    np.testing.assert_allclose(depth[0], load_registration(folder / "00000_reg.npz")["depth"][0], rtol=1e-6)
    first = novel[0].astype(float) - truth.rgb[0].numpy()
    assert 10 * math.log10(255**2 / np.square(first).mean()) > 25
    cameras, meta = np.load(out / "cameras.npz"), json.loads((out / "cameras.json").read_text())
    assert cameras["K"].shape == (5, 3, 3) and cameras["cam2world"].shape == (5, 4, 4)
    assert meta["axes"] == "opencv" and [f["depth"] for f in meta["frames"]] == [f"depth/{n}.npy" for n in names]
    record = json.loads((out / "render.json").read_text())
    assert record["path"]["kind"] == "dolly" and 0.5 < record["coverage"]["mean"] <= 1

    # The written cameras, fed back as a path file, render the same views.
    render_cli("--pkl_dir", str(folder), "--out", str(tmp_path / "again"), "--path", str(out / "cameras.json"),
               "--depth_format", "npy")  # fmt: skip
    again = np.stack([np.load(tmp_path / "again" / "00000" / "depth" / f"{n}.npy") for n in names])
    np.testing.assert_array_equal(again, depth)


def test_render_fails_in_one_line(registered, tmp_path):
    folder, _ = registered
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    save_result(lonely, 7, np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.float32), {})
    away = {
        "K": [[64, 0, 32], [0, 64, 24], [0, 0, 1]],
        "cam2world": [[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, -10], [0, 0, 0, 1]],
    }
    cases = {
        "no registration": (["--pkl_dir", str(lonely)], "00007.npz: no registration"),
        "bad path file": (["--path", str(write_path(tmp_path / "bad.json", [{"K": [[1]]}]))], "frames[0].K must be"),
        "empty view": (["--path", str(write_path(tmp_path / "away.json", [away]))], "frame 0: no point lands"),
        "flag of another path": (["--path", "dolly", "--angle", "5"], "--angle does not apply to --path dolly"),
    }
    for name, (argv, message) in cases.items():
        argv = ["--pkl_dir", str(folder), "--out", str(tmp_path / "out"), *argv]
        with pytest.raises(SystemExit) as exit_:
            render_cli(*argv)
        text = str(exit_.value.code)
        assert text.startswith("render.py: ") and message in text and "\n" not in text, (name, text)
    assert not (tmp_path / "out").exists()  # a bad input writes nothing


def test_a_first_frame_without_points_has_no_scene_centre(registered):
    folder, truth = registered
    reg = load_registration(folder / "00000_reg.npz")
    reg["depth"][0] = -1.0  # every point of the first frame behind its camera
    with pytest.raises(RenderError, match="frame 0: no point kept"):
        render_result(truth.rgb.numpy(), reg, CameraPath("orbit", angle=10.0))


def test_the_figure_shows_both_videos_over_the_cloud_and_its_cameras(registered, tmp_path):
    folder, _ = registered
    out = tmp_path / "figure.png"
    argv = [str(folder / "00000.npz"), "--out", str(out), "--shown", "3", "--zoom", "2"]
    run(figure.main, figure.build_parser(), argv)
    picture = np.asarray(Image.open(out).convert("RGB"))
    h, w, gap = 48 * 2, 64 * 2, figure.GAP
    assert picture.shape == (3 * h + 2 * gap, 3 * (w + gap) - gap, 3)
    result = np.load(folder / "00000.npz")
    for column, frame in enumerate([0, 2, 4]):  # 3 of 5 frames, evenly spaced
        x = column * (w + gap)
        xyz = np.round((result["xyz"][frame] + 1) / 2 * 255).clip(0, 255).astype(np.uint8)
        assert np.array_equal(picture[:h, x : x + w], result["rgb"][frame].repeat(2, 0).repeat(2, 1))
        assert np.array_equal(picture[h + gap : 2 * h + gap, x : x + w], xyz.repeat(2, 0).repeat(2, 1))
        cloud = picture[2 * (h + gap) :, x : x + w]
        assert (cloud.sum(-1) > 0).mean() > 0.2  # the points cover much of the overview
        assert (cloud == figure.CAMERA_COLOR).all(-1).any()  # and that frame's camera is drawn on them


def test_the_overview_looks_at_the_scene_centre_from_behind_and_above_the_first_camera():
    first = torch.eye(4, dtype=torch.float64)  # OpenCV axes: x right, y down, z forward
    centre = torch.tensor([0.3, 0.2, 2.0], dtype=torch.float64)
    K, pose = figure.overview_camera(first, 100.0, centre, 2.0, 60, 80)
    uv, z = project_points(torch.stack([centre, first[:3, 3]])[None], K[None], pose[None])
    assert torch.allclose(uv[0, 0], torch.tensor([40.0, 30.0], dtype=torch.float64), atol=1e-9) and z[0, 0] > 0
    assert uv[0, 1, 1] > 30 and z[0, 1] > 0  # the first camera is in view, below the centre
    assert pose[2, 3] < 0 and pose[1, 3] < 0  # behind it and above it (y points down)


def test_the_figure_of_an_unregistered_result_says_how_to_register_it(tmp_path):
    truth = scenes.make_truth(frames=5, height=48, width=64)
    save_result(tmp_path, 0, truth.rgb.numpy(), truth.xyz.numpy(), {"prompt": "toy"})
    with pytest.raises(SystemExit, match=r"python pm_registration\.py --pkl_dir"):
        run(figure.main, figure.build_parser(), [str(tmp_path / "00000.npz"), "--out", str(tmp_path / "f.png")])
