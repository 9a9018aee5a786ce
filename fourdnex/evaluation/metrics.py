"""Evaluation metrics: pure functions of numpy arrays, batched over frames.

Conventions (those of :mod:`fourdnex.geometry.cameras`): pinhole cameras with OpenCV axes; ``K (F, 3, 3)`` in pixels,
pixel ``(row i, column j)`` centred at ``(j + 0.5, i + 0.5)``; ``cam2world (F, 4, 4)`` camera-to-world; ``depth
(F, H, W)`` is camera-frame z (depth metrics take the pixels where the truth has one, flattened frame by frame);
``rgb (F, H, W, 3)`` uint8. A value that cannot be computed (a frame without such a pixel) is NaN.

Pixels: dense metrics (depth, residual, edges) read an evaluation grid of about :data:`GRID_PIXELS` pixels per
frame, every ``s``-th row and column starting at ``s // 2`` (:func:`grid_stride`; 1.9 M of the 17 M pixels of a 49 x
480 x 720 clip); point clouds, nearest neighbours and reprojections read a sparser grid of about
:data:`POINT_PIXELS` pixels per frame (:func:`point_stride`). Both grids are the whole image at small sizes.

Units: distances against ground truth are divided by the clip's unit (its median true depth), so clips of any scale
compare; distances without ground truth are shares of the scene extent (the largest side of the bounding box of the
registered points).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from fourdnex.geometry.cameras import camera_rays, invert_rigid, rotation_angle_deg, transform_points, umeyama

#: Pixels per frame of the evaluation grid (dense metrics) and of the sparse grid (point clouds and reprojection),
#: about: means and shares over a clip's grid pixels are far more precise than the differences between models.
GRID_PIXELS, POINT_PIXELS = 32768, 2048
#: The two depth alignments, each fitted over a clip's defined pixels (or over frame 0's for the frame-0 metrics).
ALIGNMENTS = {
    "median": "one scale per clip: s = median(true) / median(predicted)",
    "lstsq": "scale and shift per clip: (s, t) minimizing sum (s * predicted + t - true)^2 (least squares)",
}
#: Ratios of aligned to true depth below this count as this much in delta and RMSE(log) (depths behind the camera).
DEPTH_FLOOR = 1e-3
#: delta < 1.25: the share of pixels whose aligned depth is within this factor of the truth.
DELTA = 1.25
#: SSIM as in Wang et al. (2004) and their reference code: luma, an 11 x 11 Gaussian window of std 1.5 (valid part
#: only), K1 = 0.01, K2 = 0.03, after f x f block means with f = max(1, round(min(H, W) / 256)).
SSIM_SIGMA, SSIM_RADIUS, SSIM_K1, SSIM_K2, SSIM_SIDE = 1.5, 5, 0.01, 0.03, 256
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601
#: The SSIM window's weights at distances 0..SSIM_RADIUS from its centre, float32 (the whole window sums to 1).
_SSIM_WINDOW = np.exp(-0.5 * (np.arange(SSIM_RADIUS + 1) / SSIM_SIGMA) ** 2)
_SSIM_WINDOW = (_SSIM_WINDOW / (2 * _SSIM_WINDOW.sum() - _SSIM_WINDOW[0])).astype(np.float32)
#: Edges: depth edges are a frame's strongest EDGE_DEPTH_SHARE of grid pixels by |grad log depth|, image edges its
#: strongest EDGE_IMAGE_SHARE by |grad luma|, widened by one grid step. Depth edges are sparser than image edges
#: (texture has edges, flat colour does not), so the shares differ.
EDGE_DEPTH_SHARE, EDGE_IMAGE_SHARE = 0.05, 0.10
#: A registered world point that moves less than this share of the scene extent to the next frame counts as static.
STATIC_MOTION = 0.01
#: Element-wise work on a clip's pixels runs over groups of whole frames of about this many entries
#: (:func:`frame_blocks`), so that its temporaries stay in a core's cache: on whole-clip arrays, element-wise numpy
#: gained little from a second worker on a 2-core machine, memory being the bottleneck (BENCHMARKS.md, Evaluation).
BLOCK_ENTRIES = 1 << 16


def grid_stride(height: int, width: int) -> int:
    """Stride of the evaluation grid of ``H x W`` frames: about :data:`GRID_PIXELS` pixels per frame."""
    return max(1, round((height * width / GRID_PIXELS) ** 0.5))


def point_stride(height: int, width: int) -> int:
    """Stride of the sparse grid: about :data:`POINT_PIXELS` pixels per frame."""
    return max(1, round((height * width / POINT_PIXELS) ** 0.5))


def on_grid(x: np.ndarray, stride: int) -> np.ndarray:
    """The grid pixels of frames ``(F, H, W, ...)`` -> ``(F, h, w, ...)`` (a view)."""
    return x[:, stride // 2 :: stride, stride // 2 :: stride]


def grid_depths(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The true depths the depth metrics read, of a truth's depth on the evaluation grid ``(F, h, w)``: where it is
    defined ``(F, h, w)`` bool, and those depths frame by frame ``(N,)`` float64 (their median is the clip's unit)."""
    valid = grid > 0
    return valid, grid[valid].astype(np.float64)


def grid_uv(height: int, width: int, stride: int) -> np.ndarray:
    """Pixel centres ``(h, w, 2)`` as ``(u, v)`` of the grid of stride ``stride``, float64."""
    v, u = np.meshgrid(
        np.arange(stride // 2, height, stride) + 0.5, np.arange(stride // 2, width, stride) + 0.5, indexing="ij"
    )
    return np.stack([u, v], -1)


def grid_points(depth: np.ndarray, uv: np.ndarray, K: np.ndarray, cam2world: np.ndarray) -> np.ndarray:
    """World points ``(F, h, w, 3)`` of depths ``(F, h, w)`` at pixels ``uv (h, w, 2)``, float64."""
    rays = camera_rays(torch.from_numpy(uv), torch.from_numpy(np.array(K, np.float64))).numpy()
    return transform_points(np.asarray(cam2world, np.float64), rays * depth[..., None])


# ---------------------------------------------------------------------------------------------------------------
# Depth


def align_depth(
    pred: np.ndarray, true: np.ndarray, rule: str, true_median: float | None = None, pred_median: float | None = None
) -> tuple[float, float]:
    """Scale and shift ``(s, t)`` of the alignment ``rule`` (a key of :data:`ALIGNMENTS`) mapping predicted depths
    onto true ones, over corresponding depths ``(N,)`` (the pixels where the truth is defined); ``true_median`` and
    ``pred_median``: ``np.median(true)`` and ``np.median(pred)`` when already known."""
    if rule == "median":
        true_median = np.median(true) if true_median is None else true_median
        return float(true_median / (np.median(pred) if pred_median is None else pred_median)), 0.0
    if rule != "lstsq":
        raise ValueError(f"rule must be one of {list(ALIGNMENTS)}, got {rule!r}")
    total = pred.sum()
    normal = np.array([[pred @ pred, total], [total, len(pred)]])
    (s, t), *_ = np.linalg.lstsq(normal, np.array([pred @ true, true.sum()]), rcond=None)  # least norm: p constant
    return float(s), float(t)


def frame_blocks(entries: np.ndarray) -> list[tuple[int, int]]:
    """Groups ``[f0, f1)`` of consecutive frames holding about :data:`BLOCK_ENTRIES` entries each (at least one
    frame), given the entries of each frame ``(F,)``."""
    blocks, start, held = [], 0, 0
    for f, count in enumerate(entries):
        held += int(count)
        if held >= BLOCK_ENTRIES:
            blocks.append((start, f + 1))
            start, held = f + 1, 0
    if start < len(entries):
        blocks.append((start, len(entries)))
    return blocks


def depth_errors(
    depth: np.ndarray, true: np.ndarray, frame: np.ndarray, frames: int, scale: float = 1.0, shift: float = 0.0
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """AbsRel, delta < 1.25 and RMSE(log) of depths ``scale * depth + shift`` against true ones, ``(N,)`` each, the
    pixel of entry n in frame ``frame[n]`` of ``frames`` (entries frame by frame: ``frame`` never decreases): per
    frame ``(F,)`` and pooled over the pixels.

    AbsRel = mean |d - g| / g; delta = share with max(d / g, g / d) < 1.25; RMSE(log) = sqrt(mean (log d - log g)^2),
    with d / g raised to :data:`DEPTH_FLOOR` in the last two (a depth behind the camera counts as a tiny one).
    """
    counts = np.bincount(frame, minlength=frames)
    starts = np.cumsum(counts) - counts  # where each frame's entries begin
    sums = np.zeros((3, frames))
    for f0, f1 in frame_blocks(counts):
        begin, end = starts[f0], starts[f1 - 1] + counts[f1 - 1]
        if begin == end:
            continue
        ratio = (scale * depth[begin:end] + shift) / true[begin:end]
        terms = (
            np.abs(ratio - 1),
            ((ratio < DELTA) & (ratio > 1 / DELTA)).astype(np.float64),
            np.log(np.maximum(ratio, DEPTH_FLOOR)) ** 2,
        )
        present = counts[f0:f1] > 0
        for row, x in zip(sums, terms, strict=True):
            row[f0:f1][present] = np.add.reduceat(x, starts[f0:f1][present] - begin)
    per_frame, clip = {}, {}
    for name, row in zip(("absrel", "delta1", "rmse_log"), sums, strict=True):
        per_frame[name] = np.divide(row, counts, out=np.full(frames, np.nan), where=counts > 0)
        clip[name] = float(row.sum() / counts.sum()) if counts.sum() else float("nan")
    per_frame["rmse_log"], clip["rmse_log"] = np.sqrt(per_frame["rmse_log"]), clip["rmse_log"] ** 0.5
    return per_frame, clip


# ---------------------------------------------------------------------------------------------------------------
# Points and cameras


def sim3_align(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The similarity ``(s, R (3, 3), t (3,))`` minimizing ``sum |s R src + t - dst|^2`` over points ``(N, 3)``
    (Umeyama). Points in one place (a still camera) have no best rotation or scale: then ``s = 0``, ``R = I`` and
    ``t`` = the mean of ``dst``, which is that least-squares optimum."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if (src == src[0]).all():
        return 0.0, np.eye(3), dst.mean(0)
    scale, rotation, translation = umeyama(src, dst)
    return float(scale), rotation, translation


def apply_sim3(points: np.ndarray, scale: float, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """``s R x + t`` for points ``(..., 3)``."""
    return scale * points @ rotation.T + translation


def point_trees(points: np.ndarray, valid: np.ndarray) -> list[cKDTree]:
    """One nearest-neighbour tree per frame of the points ``(F, N, 3)`` where ``valid (F, N)``: balanced, slower to
    build but faster to query, as a truth's trees are queried by every predictor scored against it."""
    return [cKDTree(p[v]) for p, v in zip(points, valid, strict=True)]


def point_errors(
    pred: np.ndarray, true: np.ndarray, valid: np.ndarray, true_trees: list[cKDTree] | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """Accuracy, completeness and Chamfer distance between point clouds ``pred`` and ``true`` ``(F, N, 3)`` (already
    in one frame), per frame ``(F,)`` and pooled over the clip, over the points where ``valid (F, N)``;
    ``true_trees``: :func:`point_trees` of ``true`` when already built (shared by every prediction of one truth).

    Accuracy: mean distance from a predicted point to the nearest true point of the same frame; completeness: from a
    true point to the nearest predicted one; Chamfer: the mean of the two.
    """
    frames = len(pred)
    true_trees = point_trees(true, valid) if true_trees is None else true_trees
    sums, counts, tree = np.zeros((2, frames)), np.zeros((2, frames)), None
    for f in range(frames):
        p, g = pred[f][valid[f]], true[f][valid[f]]
        if len(g):
            # the previous frame's tree when its points are these (a held prediction); unbalanced: faster to build
            held = tree is not None and np.array_equal(valid[f], valid[f - 1]) and np.array_equal(pred[f], pred[f - 1])
            tree = tree if held else cKDTree(p, balanced_tree=False, compact_nodes=False)
            sums[0, f], sums[1, f] = true_trees[f].query(p)[0].sum(), tree.query(g)[0].sum()
            counts[:, f] = len(p), len(g)
    mean = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
    pooled = sums.sum(1) / counts.sum(1) if counts.sum() else np.full(2, np.nan)
    per_frame = {"accuracy": mean[0], "completeness": mean[1], "chamfer": mean.mean(0)}
    clip = {"accuracy": float(pooled[0]), "completeness": float(pooled[1]), "chamfer": float(pooled.mean())}
    return per_frame, clip


def _rotation_angle_deg(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """Angles in degrees ``(...)`` between rotations ``(..., 3, 3)``."""
    return rotation_angle_deg(torch.from_numpy(np.array(r1, np.float64)), torch.from_numpy(np.array(r2))).numpy()


def camera_errors(pred: np.ndarray, true: np.ndarray) -> dict:
    """Trajectory errors of predicted cameras against true ones, ``cam2world (F, 4, 4)`` each (in their own frames).

    Returns ``alignment`` (the Sim(3) ``(s, R, t)`` mapping predicted camera centres onto true ones, least squares),
    ``centres`` (the aligned predicted centres ``(F, 3)``), ``ate`` (``(F,)``: distance of each aligned centre to the
    true one), and over consecutive pairs ``(F - 1,)``: ``rpe_trans``, the translation error of the relative pose
    (the predicted one's translation scaled by ``s``), and ``rpe_rot``, its rotation error in degrees.
    """
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    scale, rotation, translation = sim3_align(pred[:, :3, 3], true[:, :3, 3])
    centres = apply_sim3(pred[:, :3, 3], scale, rotation, translation)
    rel_pred = invert_rigid(pred[:-1]) @ pred[1:]  # (F - 1, 4, 4) frame f+1 in camera f
    rel_true = invert_rigid(true[:-1]) @ true[1:]
    return {
        "alignment": (scale, rotation, translation),
        "centres": centres,
        "ate": np.linalg.norm(centres - true[:, :3, 3], axis=-1),
        "rpe_trans": np.linalg.norm(scale * rel_pred[:, :3, 3] - rel_true[:, :3, 3], axis=-1),
        "rpe_rot": _rotation_angle_deg(rel_true[:, :3, :3], rel_pred[:, :3, :3]),
    }


def focal_error(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Relative focal-length error ``(F,)`` of ``K (F, 3, 3)`` of the same image size: mean of |fx - fx*| / fx* and
    |fy - fy*| / fy*."""
    f_pred, f_true = np.diagonal(pred, axis1=1, axis2=2)[:, :2], np.diagonal(true, axis1=1, axis2=2)[:, :2]
    return (np.abs(f_pred - f_true) / f_true).mean(-1)


# ---------------------------------------------------------------------------------------------------------------
# RGB


def psnr(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """PSNR in dB ``(F,)`` of uint8 videos ``(F, H, W, 3)``: peak 255, MSE over pixels and channels; inf if equal."""
    mse = np.empty(len(pred))
    for f in range(len(pred)):
        diff = np.subtract(pred[f], true[f], dtype=np.float32).ravel()
        mse[f] = float(np.dot(diff, diff)) / diff.size
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0**2 / mse)


def _luma(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Luma ``(F, H // f, W // f)`` float32 of uint8 frames ``(F, H, W, 3)``, as ``f x f`` block means: a block's
    rows summed exactly in 16 bits, then its columns' channels weighted in one product."""
    frames, height, width, _ = rgb.shape
    h, w = height // factor * factor, width // factor * factor
    blocks = rgb[:, :h, :w].reshape(frames, h // factor, factor, w // factor, factor * 3)
    rows = blocks[:, :, 0].astype(np.uint16)  # (F, h / f, w / f, f * 3): a block's columns side by side
    for i in range(1, factor):
        rows += blocks[:, :, i]
    return rows.astype(np.float32) @ np.tile(LUMA / factor**2, factor)


def distinct_frames(video: np.ndarray) -> np.ndarray:
    """The frames of ``video (F, ...)`` that per-frame work has to see: the first alone when every frame is the
    first (a held frame, broadcast with frame stride 0), else all of them; results broadcast back over the F."""
    return video[:1] if video.strides[0] == 0 else video


def _ssim_factor(rgb: np.ndarray) -> int:
    """SSIM's block-mean factor for frames ``(F, H, W, 3)`` (see :data:`SSIM_SIDE`)."""
    return max(1, round(min(rgb.shape[1:3]) / SSIM_SIDE))


def ssim_terms(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What SSIM needs of one uint8 video ``(F, H, W, 3)`` alone: its luma x (:data:`SSIM_SIDE`) less 128, the local
    mean m of that, the luma's local mean m + 128 and its local variance (local mean of x^2 minus m^2: centred, so
    that float32 keeps it), ``(F', h, w)`` each (F' = 1 for a held frame, see :func:`distinct_frames`); shared by
    every video it is compared with. Computed in blocks of frames (:data:`BLOCK_ENTRIES`)."""
    rgb = distinct_frames(rgb)
    factor = _ssim_factor(rgb)
    shape = (len(rgb), rgb.shape[1] // factor, rgb.shape[2] // factor)
    if min(shape[1:]) <= 2 * SSIM_RADIUS:
        raise ValueError(f"SSIM needs frames larger than {2 * SSIM_RADIUS + 1} pixels, got {shape[1:]}")
    x = np.empty(shape, np.float32)
    valid = (len(rgb), shape[1] - 2 * SSIM_RADIUS, shape[2] - 2 * SSIM_RADIUS)
    centred, mean, variance = (np.empty(valid, np.float32) for _ in range(3))
    for f0, f1 in frame_blocks(np.full(len(rgb), shape[1] * shape[2])):
        np.subtract(_luma(rgb[f0:f1], factor), 128, out=x[f0:f1])
        centred[f0:f1] = _ssim_blur(x[f0:f1])
        np.add(centred[f0:f1], 128, out=mean[f0:f1])
        np.subtract(_ssim_blur(x[f0:f1] * x[f0:f1]), centred[f0:f1] ** 2, out=variance[f0:f1])
    return x, centred, mean, variance


def _ssim_blur(z: np.ndarray) -> np.ndarray:
    """SSIM's Gaussian window over frames ``(F, h, w)`` float32, the valid part ``(F, h - 2 r, w - 2 r)``: one axis
    at a time, the two taps at each distance from the centre added before they are weighted."""
    r = SSIM_RADIUS
    for axis in (1, 2):
        size = z.shape[axis] - 2 * r

        def part(start: int, x: np.ndarray = z, axis: int = axis, size: int = size) -> np.ndarray:
            return x[(slice(None),) * axis + (slice(start, start + size),)]

        out, pair = np.multiply(part(r), _SSIM_WINDOW[0]), np.empty(part(r).shape, np.float32)
        for offset in range(1, r + 1):
            np.add(part(r - offset), part(r + offset), out=pair)
            pair *= _SSIM_WINDOW[offset]
            out += pair
        z = out
    return z


def ssim(
    pred: np.ndarray,
    true: np.ndarray,
    pred_terms: tuple[np.ndarray, ...] | None = None,
    true_terms: tuple[np.ndarray, ...] | None = None,
) -> np.ndarray:
    """SSIM ``(F,)`` of uint8 videos ``(F, H, W, 3)`` (see :data:`SSIM_SIGMA`); their :func:`ssim_terms` when
    already computed (a held video's are computed once, another's block by block: :data:`BLOCK_ENTRIES`).

    (2 mx my + c1) (2 cov + c2) / ((mx^2 + my^2 + c1) (vx + vy + c2)) per window, evaluated in place.
    """
    videos = [distinct_frames(pred), distinct_frames(true)]
    terms = [pred_terms, true_terms]
    for i, video in enumerate(videos):
        if terms[i] is None and len(video) == 1:
            terms[i] = ssim_terms(video)
    frames = max(len(v) for v in videos)
    factor = _ssim_factor(videos[0])
    pixels = (videos[0].shape[1] // factor) * (videos[0].shape[2] // factor)
    scores = np.empty(frames)
    for f0, f1 in frame_blocks(np.full(frames, pixels)):
        parts = [
            ssim_terms(v[f0:f1]) if t is None else tuple(a[f0:f1] if len(a) > 1 else a for a in t)
            for v, t in zip(videos, terms, strict=True)
        ]
        scores[f0:f1] = _ssim_of(*parts[0], *parts[1])
    return np.broadcast_to(scores, (max(len(pred), len(true)),)).astype(np.float64)


def _ssim_of(x, cx, mx, vx, y, cy, my, vy) -> np.ndarray:
    """Mean SSIM per frame of the :func:`ssim_terms` of two videos (or of a held frame's, which broadcast):
    l (2 cov + c2) / (vx + vy + c2) with l = (2 mx my + c1) / (mx^2 + my^2 + c1), whose denominator is its numerator
    plus (mx - my)^2 = (cx - cy)^2; evaluated in place."""
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    cov = _ssim_blur(x * y)
    cov -= cx * cy
    cov *= 2
    cov += c2
    luminance = mx * my
    luminance *= 2
    luminance += c1
    cov *= luminance
    difference = cx - cy
    difference *= difference
    difference += luminance
    variance = vx + vy
    variance += c2
    difference *= variance
    cov /= difference
    return cov.reshape(len(cov), -1).mean(1)


# ---------------------------------------------------------------------------------------------------------------
# Without ground truth


def repeated_quantiles(values: np.ndarray, q: list[float], repeats: int) -> np.ndarray:
    """The quantiles ``q`` (linear interpolation, numpy's default) of ``values (n,)`` repeated ``repeats`` times,
    without making the repetition: the sorted repetition's entry k is the sorted values' entry k // repeats."""
    ordered = np.sort(values)
    position = np.asarray(q, np.float64) * (len(ordered) * repeats - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, len(ordered) * repeats - 1)
    below, above = ordered[low // repeats], ordered[high // repeats]
    return below + (position - low) * (above - below)


def bounds(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest coordinate ``(3,)`` each of points ``(..., 3)`` (axis by axis: numpy reduces an
    ``(N, 3)`` array over its first axis many times slower)."""
    flat = points.reshape(-1, 3)
    return tuple(np.array([reduce(flat[:, axis]) for axis in range(3)]) for reduce in (np.min, np.max))


def extent(points: np.ndarray) -> float:
    """The largest side of the axis-aligned bounding box of points ``(..., 3)``."""
    low, high = bounds(points)
    return float((high - low).max())


def _neighbours(x: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The left, right, upper and lower full-resolution neighbours ``(F, h, w, ...)`` of the grid pixels of frames
    ``(F, H, W, ...)`` (the pixel itself where a neighbour would fall outside)."""
    _, height, width = x.shape[:3]

    def at(rows: slice | np.ndarray, cols: slice | np.ndarray) -> np.ndarray:
        return x[:, rows][:, :, cols]

    return (
        at(_moved(height, stride, 0), _moved(width, stride, -1)),
        at(_moved(height, stride, 0), _moved(width, stride, 1)),
        at(_moved(height, stride, -1), _moved(width, stride, 0)),
        at(_moved(height, stride, 1), _moved(width, stride, 0)),
    )


def _moved(size: int, stride: int, shift: int) -> slice | np.ndarray:
    """The grid's indices along an axis of ``size`` pixels moved by ``shift`` and kept inside: a slice (a view) where
    none had to be kept inside, else the indices."""
    index = np.clip(np.arange(stride // 2, size, stride) + shift, 0, size - 1)
    if (np.diff(index) == stride).all():
        return slice(int(index[0]), int(index[-1]) + 1, stride)
    return index


def image_edges(rgb: np.ndarray, stride: int) -> np.ndarray:
    """Where image edges are, for :func:`edge_agreement`: ``(F, h, w)`` bool on the evaluation grid, the
    :data:`EDGE_IMAGE_SHARE` of pixels with the largest |grad luma| (central differences of the full-resolution
    neighbours), widened by one grid step. ``rgb (F, H, W, 3)`` uint8 (a held frame is seen once, see
    :func:`distinct_frames`)."""
    frames, rgb = len(rgb), distinct_frames(rgb)
    grad = np.empty((len(rgb), *on_grid(rgb[:1], stride).shape[1:3]), np.float32)  # (F, h, w)
    for f0, f1 in frame_blocks(np.full(len(grad), grad[0].size)):
        left, right, up, down = _neighbours(rgb[f0:f1], stride)
        across = np.subtract(right, left, dtype=np.float32) @ LUMA  # exact differences of the channels
        grad[f0:f1] = np.hypot(across, np.subtract(down, up, dtype=np.float32) @ LUMA)
    flat = grad.reshape(len(grad), -1)
    edges = (flat > np.quantile(flat, 1 - EDGE_IMAGE_SHARE, axis=1, keepdims=True)).reshape(grad.shape)
    for axis in (1, 2):  # widened by one pixel each way: rows, then columns
        edges = _widened(edges, axis)
    return np.broadcast_to(edges, (frames, *edges.shape[1:]))


def _widened(mask: np.ndarray, axis: int) -> np.ndarray:
    """``mask (F, h, w)`` bool or-ed with its neighbours one step before and after along ``axis``."""
    out = mask.copy()
    before, after = (slice(None),) * axis + (slice(None, -1),), (slice(None),) * axis + (slice(1, None),)
    out[after] |= mask[before]
    out[before] |= mask[after]
    return out


def edge_agreement(depth: np.ndarray, near: np.ndarray, stride: int) -> np.ndarray:
    """How well depth edges fall on image edges, per frame ``(F,)``: 0 at chance, 1 when every depth edge does.

    Depth edges are the :data:`EDGE_DEPTH_SHARE` of the evaluation grid's pixels with the largest |grad log depth|
    (scale-free; central differences of the full-resolution neighbours), image edges ``near`` (:func:`image_edges`).
    With p the share of depth edges on image edges and c the share of pixels that are, the score is
    (p - c) / (1 - c). NaN for a frame without depth edges or image edges (a constant map). ``depth (F, H, W)``
    (depths below :data:`DEPTH_FLOOR` times the median magnitude count as that). A held depth map against held
    edges is scored once (see :func:`distinct_frames`).
    """
    total = len(depth)
    floor = float(DEPTH_FLOOR * np.median(np.abs(on_grid(distinct_frames(depth), stride))))
    floor += float(np.finfo(np.float32).tiny)
    if depth.strides[0] == 0 and near.strides[0] == 0:
        depth, near = depth[:1], near[:1]
    frames = len(depth)
    grad = np.empty(near.shape, np.result_type(depth.dtype, np.float32)).reshape(frames, -1)
    for f0, f1 in frame_blocks(np.full(frames, grad.shape[1])):
        left, right, up, down = (np.maximum(d, floor) for d in _neighbours(depth[f0:f1], stride))
        grad[f0:f1] = np.hypot(np.log(right / left), np.log(down / up)).reshape(f1 - f0, -1)
    edges = grad > np.quantile(grad, 1 - EDGE_DEPTH_SHARE, axis=1, keepdims=True)
    near = near.reshape(frames, -1)
    chance, count = near.mean(1), edges.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = ((near & edges).sum(1) / count - chance) / (1 - chance)
    return np.broadcast_to(np.where((count > 0) & near.any(1), score, np.nan), (total,))


def temporal_stability(
    depth: np.ndarray, K: np.ndarray, cam2world: np.ndarray, scene_extent: float
) -> tuple[np.ndarray, np.ndarray]:
    """How still the registered scene stays between consecutive frames, per pair ``(F - 1,)``.

    Each sparse-grid pixel of frame f is lifted to its registered world point, projected into frame f+1 and
    compared with the world point frame f+1 registers at the pixel it lands on. Returns the share of the pixels
    that land inside frame f+1 (in front of its camera) whose point moves less than :data:`STATIC_MOTION` of the
    scene extent (the static share: all of them for a static scene with exact geometry), and their median motion as
    a share of the extent; NaN for a pair where none lands inside. ``depth (F, H, W)``, ``K (F, 3, 3)``,
    ``cam2world (F, 4, 4)``; a held prediction (one depth map, broadcast, and one camera) is computed once.
    """
    frames, height, width = depth.shape
    K, cam2world = np.asarray(K, np.float64), np.asarray(cam2world, np.float64)
    one_camera = all(np.array_equal(x, np.broadcast_to(x[0], x.shape)) for x in (K, cam2world))
    if frames > 2 and depth.strides[0] == 0 and one_camera:
        once = temporal_stability(depth[:2], K[:2], cam2world[:2], scene_extent)  # held: every pair is the first
        return tuple(np.broadcast_to(x, (frames - 1,)) for x in once)
    stride = point_stride(height, width)
    points = grid_points(
        on_grid(depth[:-1], stride).astype(np.float64), grid_uv(height, width, stride), K[:-1], cam2world[:-1]
    ).reshape(frames - 1, -1, 3)  # (F - 1, n, 3) world points of frames 0..F-2
    seen = transform_points(invert_rigid(cam2world[1:]), points)  # in the next frame's camera
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (seen @ K[1:].transpose(0, 2, 1))[..., :2] / seen[..., 2:]
    inside = (seen[..., 2] > 0) & (uv >= 0).all(-1) & (uv[..., 0] < width) & (uv[..., 1] < height)
    col = np.where(inside, np.floor(np.nan_to_num(uv[..., 0])), 0).astype(np.int64)
    row = np.where(inside, np.floor(np.nan_to_num(uv[..., 1])), 0).astype(np.int64)
    landed = np.stack([col + 0.5, row + 0.5, np.ones(col.shape)], -1)  # homogeneous pixel centres landed on
    rays = landed @ np.linalg.inv(K[1:]).transpose(0, 2, 1)  # K^-1 [u, v, 1]: rays with z = 1
    again = transform_points(cam2world[1:], rays * depth[np.arange(1, frames)[:, None], row, col][..., None])
    motion = np.linalg.norm(again - points, axis=-1) / scene_extent  # (F - 1, n)
    static, median = np.full(frames - 1, np.nan), np.full(frames - 1, np.nan)
    for f in np.flatnonzero(inside.any(1)):
        static[f], median[f] = (motion[f][inside[f]] < STATIC_MOTION).mean(), np.median(motion[f][inside[f]])
    return static, median


def path_smoothness(cam2world: np.ndarray) -> tuple[float, float]:
    """Jerkiness of a camera path ``(F, 4, 4)`` (NaN below 3 frames): ``(jerk, angular_acceleration)``.

    jerk = mean |c[f+1] - 2 c[f] + c[f-1]| / mean |c[f+1] - c[f]| over the camera centres c (dimensionless: 0 at
    constant velocity; 0 for a still camera); angular acceleration = mean angle, in degrees per frame^2, between
    consecutive relative rotations R[f]^T R[f+1] and R[f+1]^T R[f+2].
    """
    if len(cam2world) < 3:
        return float("nan"), float("nan")
    c2w = np.asarray(cam2world, np.float64)
    centres = c2w[:, :3, 3]
    step = np.linalg.norm(np.diff(centres, axis=0), axis=-1).mean()
    second = np.linalg.norm(np.diff(centres, n=2, axis=0), axis=-1).mean()
    relative = c2w[:-1, :3, :3].transpose(0, 2, 1) @ c2w[1:, :3, :3]
    turn = _rotation_angle_deg(relative[:-1], relative[1:]).mean()
    return float(second / step) if step > 0 else 0.0, float(turn)
