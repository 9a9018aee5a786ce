"""fourdnex.evaluation.metrics against closed-form values and computations by hand: depth alignment and errors,
points and cameras (similarity, ATE, RPE, focal), RGB (PSNR, SSIM) and the metrics without ground truth (path
smoothness, edge agreement, temporal stability)."""

import math

import numpy as np
import pytest

from fourdnex.evaluation import metrics as m
from fourdnex.geometry.cameras import so3_exp


def rotation_y(theta: float) -> np.ndarray:
    return so3_exp(np.array([0.0, theta, 0.0]))


def poses(rotations: list[np.ndarray], centres: list[list[float]]) -> np.ndarray:
    """Camera-to-world ``(F, 4, 4)`` of rotations and centres."""
    out = np.tile(np.eye(4), (len(centres), 1, 1))
    out[:, :3, :3], out[:, :3, 3] = rotations, centres
    return out


# ---------------------------------------------------------------------------------------------------------------
# Depth


def depth_numbers(pred, true, rule):
    """Alignment and pooled errors of one frame of depths, over the pixels with a true depth."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    pred, true = pred[true > 0], true[true > 0]
    scale, shift = m.align_depth(pred, true, rule)
    return (scale, shift), m.depth_errors(scale * pred + shift, true, np.zeros(len(true), int), 1)[1]


@pytest.mark.parametrize("rule", ["median", "lstsq"])
def test_identical_depth_has_no_error(rule):
    true = np.linspace(1, 9, 24)
    scale, shift = m.align_depth(true, true, rule)
    per_frame, clip = m.depth_errors(scale * true + shift, true, np.repeat([0, 1], 12), 2)
    assert (scale, shift) == pytest.approx((1, 0), abs=1e-12)
    assert clip == pytest.approx({"absrel": 0, "delta1": 1, "rmse_log": 0}, abs=1e-12)
    np.testing.assert_allclose(per_frame["delta1"], [1, 1])


@pytest.mark.parametrize("rule", ["median", "lstsq"])
def test_a_depth_scaling_is_aligned_away(rule):
    (scale, shift), clip = depth_numbers([2, 4, 6, 10], [1, 2, 3, 5], rule)
    assert (scale, shift) == pytest.approx((0.5, 0), abs=1e-12)
    assert clip == pytest.approx({"absrel": 0, "delta1": 1, "rmse_log": 0}, abs=1e-12)


def test_a_depth_shift_under_each_alignment():
    # pred = true + 1 on true = 1, 2, 3. Median: s = 2 / 3, d = 4/3, 2, 8/3: relative errors 1/3, 0, 1/9.
    (scale, _), clip = depth_numbers([2, 3, 4], [1, 2, 3], "median")
    assert scale == pytest.approx(2 / 3)
    rmse_log = math.sqrt((math.log(4 / 3) ** 2 + math.log(8 / 9) ** 2) / 3)
    assert clip == pytest.approx({"absrel": 4 / 27, "delta1": 2 / 3, "rmse_log": rmse_log})
    (scale, shift), clip = depth_numbers([2, 3, 4], [1, 2, 3], "lstsq")  # scale and shift undo it exactly
    assert (scale, shift) == pytest.approx((1, -1))
    assert clip == pytest.approx({"absrel": 0, "delta1": 1, "rmse_log": 0}, abs=1e-12)


def test_least_squares_alignment_by_hand():
    # s p + t on p = 1, 1, 2, 2 against g = 1, 2, 3, 4: normal equations give s = 2, t = -0.5, so d = 1.5, 1.5, 3.5,
    # 3.5; relative errors 1/2, 1/4, 1/6, 1/8 (mean 25/96); ratios 1.5, 0.75, 7/6, 7/8 (two within 1.25).
    (scale, shift), clip = depth_numbers([1, 1, 2, 2], [1, 2, 3, 4], "lstsq")
    assert (scale, shift) == pytest.approx((2, -0.5))
    assert clip["absrel"] == pytest.approx(25 / 96) and clip["delta1"] == 0.5


def test_undefined_true_depth_is_left_out():
    # the last pixel's truth is undefined: its prediction (100) must neither move the median nor count
    (scale, _), clip = depth_numbers([2, 4, 6, 100], [1, 2, 3, 0], "median")
    assert scale == 0.5 and clip["absrel"] == pytest.approx(0, abs=1e-12)


def test_frame_blocks_cover_every_frame_once(monkeypatch):
    for entries in (np.zeros(4, int), np.array([m.BLOCK_ENTRIES * 3]), np.full(10, m.BLOCK_ENTRIES // 3 + 1)):
        blocks = m.frame_blocks(entries)
        assert [f for f0, f1 in blocks for f in range(f0, f1)] == list(range(len(entries)))
        assert all(entries[f0 : f1 - 1].sum() < m.BLOCK_ENTRIES for f0, f1 in blocks)  # each ends once it is full
    monkeypatch.setattr(m, "BLOCK_ENTRIES", 7)
    assert m.frame_blocks(np.array([3, 0, 4, 9, 1, 1])) == [(0, 3), (3, 4), (4, 6)]


def test_blocked_metrics_equal_whole_clip_ones(monkeypatch):
    rng = np.random.default_rng(5)
    frames, height, width = 6, 40, 56
    true = rng.uniform(1, 5, (frames, height, width))
    pred = true * rng.uniform(0.7, 1.3, true.shape)
    pred[2, :3] = -1.0  # behind the camera
    counts = rng.integers(0, 300, frames)
    counts[3] = 0  # a frame without pixels
    frame = np.repeat(np.arange(frames), counts)
    d, g = pred.ravel()[: len(frame)], true.ravel()[: len(frame)]
    rgb = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    whole = (
        m.depth_errors(d, g, frame, frames, 1.5, 0.25),
        m.ssim(rgb, rgb[::-1].copy()),
        m.edge_agreement(pred, m.image_edges(rgb, 2), 2),
    )
    monkeypatch.setattr(m, "BLOCK_ENTRIES", 37)  # many blocks, some of one frame
    per_frame, clip = m.depth_errors(d, g, frame, frames, 1.5, 0.25)
    ratio = (1.5 * d + 0.25) / g  # direct: every entry at once
    for name, x in {
        "absrel": np.abs(ratio - 1),
        "delta1": (np.maximum(ratio, 1 / ratio) < m.DELTA).astype(float),
        "rmse_log": np.log(np.maximum(ratio, m.DEPTH_FLOOR)) ** 2,
    }.items():
        expected = [x[frame == f].mean() if counts[f] else np.nan for f in range(frames)]
        pooled = x.mean()
        if name == "rmse_log":
            expected, pooled = np.sqrt(expected), np.sqrt(pooled)
        np.testing.assert_allclose(per_frame[name], expected, rtol=1e-12)
        assert clip[name] == pytest.approx(pooled, rel=1e-12)
    np.testing.assert_allclose(per_frame["absrel"], whole[0][0]["absrel"], rtol=1e-12)
    np.testing.assert_array_equal(m.ssim(rgb, rgb[::-1].copy()), whole[1])
    np.testing.assert_array_equal(m.edge_agreement(pred, m.image_edges(rgb, 2), 2), whole[2])


def test_per_frame_and_pooled_depth_errors():
    # frame 0 at depth 1, frame 1 at depth 2; frame 0's depth held and median-aligned (s = 1.5 / 1): d = 1.5
    per_frame, clip = m.depth_errors(np.full(4, 1.5), np.array([1.0, 1, 2, 2]), np.array([0, 0, 1, 1]), 3)
    np.testing.assert_allclose(per_frame["absrel"], [0.5, 0.25, np.nan])  # frame 2 has no pixel
    assert clip["absrel"] == pytest.approx(0.375)
    # a depth behind the camera: its ratio counts as DEPTH_FLOOR in the logarithm
    _, clip = m.depth_errors(np.array([-1.0]), np.array([1.0]), np.zeros(1, int), 1)
    assert clip["rmse_log"] == pytest.approx(-math.log(m.DEPTH_FLOOR)) and clip["delta1"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Points and cameras


def test_a_known_similarity_is_recovered_exactly():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(3, 50, 3))
    s, R, t = 2.5, so3_exp(np.array([0.3, -0.2, 0.9])), np.array([1.0, -2.0, 0.5])
    pred = (true - t) @ R / s  # the truth seen through the inverse similarity
    scale, rotation, translation = m.sim3_align(pred.reshape(-1, 3), true.reshape(-1, 3))
    assert scale == pytest.approx(s)
    np.testing.assert_allclose(rotation, R, atol=1e-12)
    np.testing.assert_allclose(translation, t, atol=1e-12)
    aligned = m.apply_sim3(pred, scale, rotation, translation)
    _, clip = m.point_errors(aligned, true, np.ones((3, 50), bool))
    assert clip == pytest.approx({"accuracy": 0, "completeness": 0, "chamfer": 0}, abs=1e-9)


def test_point_errors_by_hand():
    # predicted (0,0,0), (0,0,0.5) against true (0,0,0), (1,0,0): accuracy (0 + 0.5) / 2; completeness (0 + 1) / 2
    pred = np.array([[[0.0, 0, 0], [0, 0, 0.5]]])
    true = np.array([[[0.0, 0, 0], [1, 0, 0]]])
    _, clip = m.point_errors(pred, true, np.ones((1, 2), bool))
    assert clip == pytest.approx({"accuracy": 0.25, "completeness": 0.5, "chamfer": 0.375})

    trees = m.point_trees(true, np.ones((1, 2), bool))  # the true side built once, as a Reference shares it
    _, shared = m.point_errors(pred, true, np.ones((1, 2), bool), trees)
    assert shared == pytest.approx({"accuracy": 0.25, "completeness": 0.5, "chamfer": 0.375})


def test_points_in_one_place_align_to_the_mean():
    scale, rotation, translation = m.sim3_align(np.ones((4, 3)), np.arange(12.0).reshape(4, 3))
    assert scale == 0 and (rotation == np.eye(3)).all()
    np.testing.assert_allclose(translation, [4.5, 5.5, 6.5])


def test_a_similarity_of_the_true_trajectory_has_no_error():
    true = poses([rotation_y(0.1 * f) for f in range(5)], [[f, 0.2 * f * f, 1 - f] for f in range(5)])
    s, R, t = 0.4, so3_exp(np.array([0.5, 0.1, -0.3])), np.array([3.0, 1.0, 2.0])
    pred = true.copy()
    pred[:, :3, :3] = R @ true[:, :3, :3]
    pred[:, :3, 3] = s * true[:, :3, 3] @ R.T + t
    errors = m.camera_errors(pred, true)
    assert errors["alignment"][0] == pytest.approx(1 / s)
    for key in ("ate", "rpe_trans", "rpe_rot"):
        np.testing.assert_allclose(errors[key], 0, atol=1e-6)


def test_a_rotated_camera_gives_its_known_rpe():
    # cameras at x = 0, 1, 2 looking the same way; camera 1 turned by theta about y. Centres are untouched (ATE 0).
    # Pair (0, 1): rotation error theta, translation error 0. Pair (1, 2): the next centre seen from the turned camera
    # is off by |R^T e_x - e_x| = 2 sin(theta / 2), rotation error theta.
    theta = 0.2
    true = poses([np.eye(3)] * 3, [[0, 0, 0], [1, 0, 0], [2, 0, 0]])
    pred = poses([np.eye(3), rotation_y(theta), np.eye(3)], [[0, 0, 0], [1, 0, 0], [2, 0, 0]])
    errors = m.camera_errors(pred, true)
    np.testing.assert_allclose(errors["ate"], 0, atol=1e-12)
    np.testing.assert_allclose(errors["rpe_rot"], np.degrees([theta, theta]), rtol=1e-9)
    np.testing.assert_allclose(errors["rpe_trans"], [0, 2 * math.sin(theta / 2)], atol=1e-12)


def test_a_perturbation_no_similarity_absorbs_gives_its_known_ate():
    # Centres on the corners of a square in the x-z plane, lifted by +e, -e, +e, -e in y (a saddle): orthogonal to
    # every similarity's motion, so the Umeyama fit is R = I, t = 0 with scale s = 2 / (2 + e^2), and every aligned
    # centre is |(s - 1) p + s delta| = sqrt(2 (s - 1)^2 + s^2 e^2) from its true place.
    e = 0.1
    corners = np.array([[1.0, 0, 1], [-1, 0, 1], [-1, 0, -1], [1, 0, -1]])
    lifted = corners + np.array([[0, e, 0], [0, -e, 0], [0, e, 0], [0, -e, 0]])
    errors = m.camera_errors(poses([np.eye(3)] * 4, lifted), poses([np.eye(3)] * 4, corners))
    s = 2 / (2 + e * e)
    assert errors["alignment"][0] == pytest.approx(s)
    np.testing.assert_allclose(errors["ate"], math.sqrt(2 * (s - 1) ** 2 + s * s * e * e), rtol=1e-9)
    # consecutive centres differ by 2 along one axis and 2e in y: |(s - 1) 2 e_axis + s 2e e_y|
    np.testing.assert_allclose(errors["rpe_trans"], 2 * math.sqrt((s - 1) ** 2 + s * s * e * e), rtol=1e-9)


def test_focal_error_is_relative():
    true = np.array([[[100.0, 0, 50], [0, 200, 40], [0, 0, 1]]])
    pred = true.copy()
    pred[0, 0, 0] = 110.0  # fx 10 % off, fy exact
    np.testing.assert_allclose(m.focal_error(pred, true), [0.05])


# ---------------------------------------------------------------------------------------------------------------
# RGB and the metrics without ground truth


def test_psnr_and_ssim_closed_form():
    true = np.full((2, 32, 48, 3), 100, np.uint8)
    assert m.psnr(true, true).tolist() == [math.inf, math.inf]
    np.testing.assert_allclose(m.ssim(true, true), 1.0, atol=1e-6)
    np.testing.assert_allclose(m.psnr(true + 1, true), 20 * math.log10(255), rtol=1e-9)  # MSE 1
    # constant images a, b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 255)^2
    c1 = (0.01 * 255) ** 2
    np.testing.assert_allclose(m.ssim(true + 10, true), (2 * 110 * 100 + c1) / (110**2 + 100**2 + c1), rtol=1e-5)


@pytest.mark.parametrize("size", [(2, 30, 44), (3, 600, 90)])  # block-mean factors 1 and 2
def test_ssim_equals_a_direct_window_computation(size):
    # SSIM by its definition in float64: luma of f x f block means, every 11 x 11 window of the valid part weighted
    # by the normalized Gaussian of std 1.5 (an outer product), the SSIM map's mean per frame
    rng = np.random.default_rng(3)
    frames, height, width = size
    smooth = rng.uniform(0, 255, (frames, height // 6 + 1, width // 6 + 1, 3)).repeat(6, 1).repeat(6, 2)
    a = np.clip(smooth[:, :height, :width] + rng.normal(0, 20, (frames, height, width, 3)), 0, 255).astype(np.uint8)
    b = np.clip(a * 0.8 + rng.normal(0, 30, a.shape) + 20, 0, 255).astype(np.uint8)
    f = max(1, round(min(height, width) / 256))

    def luma(rgb):
        blocks = rgb[:, : height // f * f, : width // f * f].astype(np.float64)
        blocks = blocks.reshape(frames, height // f, f, width // f, f, 3).mean((2, 4))
        return blocks @ np.array([0.299, 0.587, 0.114])

    g = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
    window = np.outer(g, g) / np.outer(g, g).sum()

    def local_mean(z):  # (F, h, w) -> (F, h - 10, w - 10)
        return np.einsum("fijkl,kl->fij", np.lib.stride_tricks.sliding_window_view(z, (11, 11), axis=(1, 2)), window)

    x, y = luma(a), luma(b)
    mx, my = local_mean(x), local_mean(y)
    vx, vy, cov = local_mean(x * x) - mx**2, local_mean(y * y) - my**2, local_mean(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    direct = ((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean((1, 2))
    assert direct.min() > 0.2 and direct.max() < 0.95  # far from both ends
    np.testing.assert_allclose(m.ssim(a, b), direct, rtol=1e-5)
    np.testing.assert_allclose(m.ssim(a[:1], b), m.ssim(np.repeat(a[:1], frames, 0), b), rtol=1e-6)  # held frame


def test_path_smoothness_closed_form():
    steady = poses([rotation_y(0.1 * f) for f in range(4)], [[f, 0, 0] for f in range(4)])
    assert m.path_smoothness(steady) == pytest.approx((0, 0), abs=1e-6)
    assert m.path_smoothness(np.tile(np.eye(4), (4, 1, 1))) == (0, 0)  # a still camera
    # x = 0, 1, 0, 1: steps of 1, second differences of 2; turning +theta then -theta: 2 theta between them
    zigzag = poses(
        [np.eye(3), rotation_y(0.1), np.eye(3), rotation_y(0.1)], [[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]]
    )
    jerk, turn = m.path_smoothness(zigzag)
    assert jerk == pytest.approx(2) and turn == pytest.approx(math.degrees(0.2))


def test_edge_agreement_closed_form():
    # a depth step and an image step between columns 19 and 20 of a 48 x 64 frame: central differences mark two
    # columns (96 pixels: within the top 5 % and 10 %); widened image edges cover 4 columns, chance = 1/16
    depth = np.ones((1, 48, 64))
    depth[:, :, 20:] = 2.0
    rgb = np.zeros((1, 48, 64, 3), np.uint8)
    rgb[:, :, 20:] = 200
    near = m.image_edges(rgb, 1)
    assert near.sum() == 4 * 48  # columns 18 to 21
    np.testing.assert_allclose(m.edge_agreement(depth, near, 1), [1.0])
    far = np.ones((1, 48, 64))
    far[:, :, 50:] = 2.0  # the depth step far from the image step: none on it, (0 - 1/16) / (1 - 1/16)
    np.testing.assert_allclose(m.edge_agreement(far, near, 1), [-1 / 15])


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_grid_neighbours_by_hand(stride):
    # pixel values encode their row and column: each neighbour is the grid pixel moved by one, kept inside the frame
    rows, cols = np.meshgrid(np.arange(7), np.arange(10), indexing="ij")
    x = (100 * rows + cols)[None]
    grid_rows, grid_cols = np.arange(stride // 2, 7, stride), np.arange(stride // 2, 10, stride)
    left, right, up, down = m._neighbours(x, stride)
    r, c = grid_rows[:, None], grid_cols[None]
    np.testing.assert_array_equal(left[0], 100 * r + np.maximum(c - 1, 0))
    np.testing.assert_array_equal(right[0], 100 * r + np.minimum(c + 1, 9))
    np.testing.assert_array_equal(up[0], 100 * np.maximum(r - 1, 0) + c)
    np.testing.assert_array_equal(down[0], 100 * np.minimum(r + 1, 6) + c)


def test_temporal_stability_closed_form():
    # a wall at depth 2 (fx = fy = 10); the camera moves 0.2 sideways, so every point lands exactly one pixel over
    K = np.tile(np.array([[10.0, 0, 16], [0, 10, 12], [0, 0, 1]]), (2, 1, 1))
    moved = poses([np.eye(3)] * 2, [[0, 0, 0], [0.2, 0, 0]])
    static, motion = m.temporal_stability(np.full((2, 24, 32), 2.0), K, moved, 1.0)
    assert static.tolist() == [1.0] and motion[0] == pytest.approx(0, abs=1e-12)
    # the wall moves back to depth 3 under a still camera: every point moves by its ray's length (>= 1)
    depth = np.stack([np.full((24, 32), 2.0), np.full((24, 32), 3.0)])
    static, motion = m.temporal_stability(depth, K, np.tile(np.eye(4), (2, 1, 1)), 1.0)
    assert static.tolist() == [0.0] and motion[0] >= 1


def test_quantiles_of_a_held_frame_are_those_of_its_repetition():
    rng = np.random.default_rng(3)
    for values, repeats in ((rng.random(7), 5), (rng.random(40), 1), (np.array([2.0, 1.0]), 3), (np.ones(4), 9)):
        q = [0.0, 0.1, 0.5, 0.9, 0.97, 1.0]
        expected = np.quantile(np.tile(values, repeats), q)
        np.testing.assert_allclose(m.repeated_quantiles(values, q, repeats), expected, rtol=1e-12, atol=0)
