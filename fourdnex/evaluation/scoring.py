"""Scoring one predictor (the model or a floor) on one sample: every metric of :mod:`fourdnex.evaluation.metrics`,
with and without ground truth, under the names the reports use (:data:`METRICS`).

A predictor is what registration makes of a result (cameras and depth per frame, the residual) plus its RGB video;
the truth is reduced once per sample (:class:`Reference`) and shared by every predictor scored against it. Every
floor's RGB video is the sample's input image held: what the metrics make of it is computed once per sample
(:class:`FloorImage`) and shared by every floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fourdnex.evaluation import metrics as m
from fourdnex.evaluation.truth import Truth
from fourdnex.files import write_npy
from fourdnex.geometry.registration import RegistrationConfig, register_result

_DEPTH = (
    ("absrel", "AbsRel", "lower", "mean |d - g| / g"),
    ("delta1", "δ<1.25", "higher", "share of pixels with max(d / g, g / d) < 1.25"),
    ("rmse_log", "RMSE(log)", "lower", "sqrt(mean (log d - log g)^2)"),
)
_OTHERS = (
    (
        "points.accuracy",
        "points accuracy",
        "lower",
        "mean distance from a registered point to the nearest true point "
        "of its frame, after one Sim(3) (Umeyama) of the clip's registered points onto the true ones; in units",
    ),
    (
        "points.completeness",
        "points completeness",
        "lower",
        "mean distance from a true point to the nearest registered one of its frame (same alignment); in units",
    ),
    ("points.chamfer", "points Chamfer", "lower", "(accuracy + completeness) / 2; in units"),
    ("camera.ate", "ATE", "lower", "RMSE of the camera centres after a Sim(3) (Umeyama) of the centres; in units"),
    (
        "camera.rpe_trans",
        "RPE translation",
        "lower",
        "RMSE over consecutive frames of the relative pose's "
        "translation error (the predicted translation times the ATE scale); in units",
    ),
    (
        "camera.rpe_rot",
        "RPE rotation (deg)",
        "lower",
        "mean over consecutive frames of the relative pose's rotation error, degrees",
    ),
    (
        "camera.focal",
        "focal error",
        "lower",
        "mean over frames of |f - f*| / f* for fx and fy (pixels of the evaluated size)",
    ),
    ("rgb.psnr0", "PSNR frame 0 (dB)", "higher", "PSNR of frame 0 against the input image (is the condition kept?)"),
    ("rgb.ssim0", "SSIM frame 0", "higher", "SSIM of frame 0 against the input image"),
    ("rgb.psnr", "PSNR (dB)", "higher", "mean PSNR of frames 1..F-1 against the true video"),
    ("rgb.ssim", "SSIM", "higher", "mean SSIM of frames 1..F-1 against the true video"),
    (
        "residual.median",
        "residual median",
        "lower",
        "median registration residual (distance from the registered to the generated point), share of the extent",
    ),
    ("residual.p90", "residual p90", "lower", "90th percentile of the registration residual, share of the extent"),
    (
        "edges",
        "edge agreement",
        "higher",
        "depth edges on image edges: (p - c) / (1 - c), p the share of depth edges "
        "(top 5 % of |grad log depth|) on image edges (top 10 % of |grad luma|, widened by one grid step), c that "
        "share by chance; 0 at chance, 1 when all are; mean over frames",
    ),
    (
        "stability.static",
        "static share",
        "higher",
        "share of pixels whose registered world point, reprojected into "
        "the next frame, moves less than 1 % of the extent; mean over consecutive frames",
    ),
    (
        "stability.motion",
        "median motion",
        "lower",
        "median motion of those points, share of the extent; mean over consecutive frames",
    ),
    (
        "path.jerk",
        "path jerk",
        "lower",
        "mean |second difference of the camera centres| / mean |first difference| (0 at constant velocity)",
    ),
    (
        "path.turn",
        "angular acceleration (deg)",
        "lower",
        "mean angle between consecutive relative rotations, degrees per frame^2",
    ),
)
#: Every reported number: name -> (label, which way is better, definition). "units" are the clip's median true
#: depth, "extent" the largest side of the bounding box of the registered points.
METRICS: dict[str, tuple[str, str, str]] = {
    **{
        f"depth.{rule}.{name}": (f"depth {label} ({rule})", better, f"{text} over all frames' pixels, {rule} alignment")
        for rule in m.ALIGNMENTS
        for name, label, better, text in _DEPTH
    },
    "depth.dynamic.absrel": (
        "dynamic depth AbsRel (median)",
        "lower",
        "mean |d - g| / g over all frames' pixels on moving objects (the clip's dynamic mask), median alignment (the "
        "clip's scale, fitted over all its pixels); none for a clip without a mask or without such a pixel",
    ),
    **{
        f"depth0.{rule}.{name}": (
            f"frame-0 depth {label} ({rule})",
            better,
            f"{text} over frame 0 alone, aligned on its own: what the input image determines",
        )
        for rule in m.ALIGNMENTS
        for name, label, better, text in _DEPTH
    },
    **{name: (label, better, text) for name, label, better, text in _OTHERS},
}
#: The metrics that need ground truth.
TRUTH_METRICS = [n for n in METRICS if n.split(".")[0] in ("depth", "depth0", "points", "camera", "rgb")]


@dataclass
class Prediction:
    """One predictor's output on one sample, as the metrics read it (F frames of H x W)."""

    rgb: np.ndarray | None  # (F, H, W, 3) uint8
    K: np.ndarray  # (F, 3, 3)
    cam2world: np.ndarray  # (F, 4, 4) camera-to-world, OpenCV axes, in the pointmap's frame
    depth: np.ndarray | None = None  # (F, H, W) camera-frame z
    residual: np.ndarray | None = None  # (F, H, W) distance from the registered to the generated point

    @classmethod
    def from_registration(cls, rgb: np.ndarray | None, reg: dict[str, np.ndarray]) -> Prediction:
        """From the arrays of a registration file (``fourdnex.geometry.results.REGISTRATION_ARRAYS``)."""
        return cls(rgb, reg["K"], reg["cam2world"], reg["depth"], reg["residual"])

    def held(self, num_frames: int) -> Prediction:
        """A one-frame prediction held for ``num_frames`` frames: images as views, cameras copied (small arrays that
        torch helpers may write to)."""

        def view(x: np.ndarray | None) -> np.ndarray | None:
            return None if x is None else np.broadcast_to(x[:1], (num_frames, *x.shape[1:]))

        return Prediction(
            view(self.rgb),
            np.repeat(self.K[:1], num_frames, 0),
            np.repeat(self.cam2world[:1], num_frames, 0),
            view(self.depth),
            view(self.residual),
        )


def register_frame(xyz: np.ndarray, config: RegistrationConfig) -> Prediction:
    """Register one frame ``xyz (H, W, 3)`` on the CPU: a one-frame prediction without RGB."""
    reg, _ = register_result(xyz[None], np.arange(1), config, torch.device("cpu"))
    return Prediction.from_registration(None, reg)


class Reference:
    """A truth reduced once for every predictor scored against it: the evaluation grid's true depths (as a grid, and
    those defined, frame by frame) and RGB, the sparse grid's true points (unprojected at the pixel centres) and their
    nearest-neighbour trees (:func:`fourdnex.evaluation.metrics.point_trees`), the clip's unit (median true depth;
    frame 0's too), the cameras, the input image (frame 0), when it has them the dynamic mask on the evaluation grid,
    and the true video and its share of SSIM (:func:`fourdnex.evaluation.metrics.ssim_terms`).

    :meth:`save` writes all but the video (an eighth of a truth's bytes at 480 x 720) and :meth:`load` reads it back:
    such a reference scores every metric but the RGB ones, to the same numbers."""

    def __init__(
        self,
        grid_depth: np.ndarray,
        sparse_depth: np.ndarray,
        grid_rgb: np.ndarray,
        image: np.ndarray,
        K: np.ndarray,
        cam2world: np.ndarray,
        rgb: np.ndarray | None = None,
        grid_dynamic: np.ndarray | None = None,
    ) -> None:
        """From the true depth on the evaluation grid ``(F, h, w)`` and on the sparse grid, the true RGB on the
        evaluation grid ``(F, h, w, 3)``, frame 0 ``(1, H, W, 3)``, the cameras and optionally the video ``(F, H, W,
        3)`` and the dynamic mask on the evaluation grid ``(F, h, w)`` bool (see :meth:`of`)."""
        frames, size = len(grid_depth), image.shape[1:3]
        self.grid_depth, self.sparse_depth, self.grid_rgb, self.image = grid_depth, sparse_depth, grid_rgb, image
        self.K, self.cam2world, self.rgb, self.grid_dynamic = K, cam2world, rgb, grid_dynamic
        self.stride, self.point_stride = m.grid_stride(*size), m.point_stride(*size)
        self.valid, self.depth = m.grid_depths(grid_depth)  # (F, h, w), (N,) frame by frame
        self.dynamic = None if grid_dynamic is None else grid_dynamic[self.valid]  # (N,) bool, as self.depth
        self.one_mask = bool((self.valid == self.valid[:1]).all())  # the same pixels defined in every frame
        self.frame = np.repeat(np.arange(frames), self.valid.reshape(frames, -1).sum(1))  # (N,)
        self.first = int((self.frame == 0).sum())  # frame 0's entries come first
        self.unit = float(np.median(self.depth))
        self.unit0 = float(np.median(self.depth[: self.first])) if self.first else float("nan")  # frame 0's
        sparse = sparse_depth.astype(np.float64)
        self.points = m.grid_points(sparse, m.grid_uv(*size, self.point_stride), K, cam2world)
        self.points_valid = sparse > 0
        self.point_trees = m.point_trees(self.points.reshape(frames, -1, 3), self.points_valid.reshape(frames, -1))
        self.ssim_terms = m.ssim_terms(rgb) if rgb is not None else None

    @classmethod
    def of(cls, truth: Truth) -> Reference:
        """The reference of a truth, its video included."""
        stride, sparse = m.grid_stride(*truth.depth.shape[1:]), m.point_stride(*truth.depth.shape[1:])
        return cls(
            m.on_grid(truth.depth, stride),
            m.on_grid(truth.depth, sparse),
            m.on_grid(truth.rgb, stride),
            truth.rgb[:1],
            truth.K,
            truth.cam2world,
            truth.rgb,
            None if truth.dynamic is None else m.on_grid(truth.dynamic, stride),
        )

    def save(self, folder: str | Path) -> None:
        """Write all but the video into ``folder`` (created), one ``.npy`` each (the dynamic mask where it has one)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (*_SAVED, "grid_dynamic"):  # grids are views: numpy writes a copy many times faster
            if getattr(self, name) is not None:
                write_npy(folder / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))

    @classmethod
    def load(cls, folder: str | Path) -> Reference:
        """What :meth:`save` wrote (no video)."""
        folder = Path(folder)
        mask = folder / "grid_dynamic.npy"
        arrays = (np.load(folder / f"{name}.npy") for name in _SAVED)
        return cls(*arrays, grid_dynamic=np.load(mask) if mask.is_file() else None)


#: The arrays :meth:`Reference.save` always writes, in the order of its arguments.
_SAVED = ("grid_depth", "sparse_depth", "grid_rgb", "image", "K", "cam2world")


@dataclass
class Score:
    """One predictor's numbers on one sample."""

    values: dict[str, float]  # METRICS names that apply
    frames: dict[str, np.ndarray] = field(default_factory=dict)  # per-frame (or per-pair) curves by METRICS name
    path: np.ndarray | None = None  # (F, 3) camera centres: aligned onto the truth's when there is one
    worst: dict | None = None  # the worst frame: its index, value and maps on the evaluation grid


@dataclass
class FloorImage:
    """The RGB video of every floor of a sample, its input image held for all F frames (frame 0 of the truth; of the
    result without ground truth), and what the metrics make of it: made once per sample (:meth:`of`) and shared by
    every floor. One frame of each is kept (sent between processes as such)."""

    image: np.ndarray  # (1, H, W, 3) uint8
    num_frames: int
    edges: np.ndarray  # (1, h, w) bool, its image edges on the evaluation grid (every frame's)
    rgb: dict[str, float]  # the RGB metrics against the true video; empty without one
    rgb_frames: dict[str, np.ndarray]  # their per-frame curves

    @classmethod
    def of(cls, image: np.ndarray, num_frames: int, ref: Reference | None) -> FloorImage:
        """The floors' video of the input image ``(1, H, W, 3)`` held for ``num_frames`` frames, scored against
        ``ref``'s video where it has one."""
        video = np.broadcast_to(image, (num_frames, *image.shape[1:]))
        edges = m.image_edges(video, m.grid_stride(*image.shape[1:3]))[:1]
        values, frames = _rgb(video, ref) if ref is not None and ref.rgb is not None else ({}, {})
        return cls(image, num_frames, edges, values, frames)

    @property
    def video(self) -> np.ndarray:
        """``(F, H, W, 3)``: the image held (a view)."""
        return np.broadcast_to(self.image, (self.num_frames, *self.image.shape[1:]))

    @property
    def near(self) -> np.ndarray:
        """``(F, h, w)``: its image edges in every frame (a view), as :func:`fourdnex.evaluation.metrics.image_edges`
        gives them."""
        return np.broadcast_to(self.edges, (self.num_frames, *self.edges.shape[1:]))


def _geometry_without_truth(pred: Prediction, score: Score, image: FloorImage | None) -> np.ndarray:
    """Residual, edge and stability metrics into ``score``, the edges those of ``pred.rgb`` or of a floor's
    ``image``; returns the sparse grid's registered points."""
    frames, height, width = pred.depth.shape
    stride, sparse = m.grid_stride(height, width), m.point_stride(height, width)
    rgb = image.video if image is not None else pred.rgb
    depth = m.on_grid(pred.depth, sparse).astype(np.float64)
    points = m.grid_points(depth, m.grid_uv(height, width, sparse), pred.K, pred.cam2world)  # (F, h, w, 3)
    scene = m.extent(points)
    residual = m.distinct_frames(m.on_grid(pred.residual, stride))  # a held frame's residual once
    residual = residual.reshape(len(residual), -1) / scene
    per_frame = np.broadcast_to(np.quantile(residual, [0.5, 0.9], axis=1), (2, frames))
    if len(residual) == frames:
        clip = np.quantile(residual, [0.5, 0.9])
    else:  # a held frame's residual stands for every frame
        clip = m.repeated_quantiles(residual.ravel(), [0.5, 0.9], frames)
    score.values["residual.median"], score.values["residual.p90"] = float(clip[0]), float(clip[1])
    score.frames["residual.median"], score.frames["residual.p90"] = per_frame
    worst = int(np.argmax(per_frame[1]))
    score.worst = {
        "metric": "residual.p90",
        "frame": worst,
        "value": float(per_frame[1, worst]),
        "residual": m.on_grid(pred.residual, stride)[worst] / scene,
        "rgb": None if rgb is None else m.on_grid(rgb, stride)[worst],
    }
    if rgb is not None:
        near = image.near if image is not None else m.image_edges(rgb, stride)
        edges = m.edge_agreement(pred.depth, near, stride)
        score.values["edges"], score.frames["edges"] = _nanmean(edges), edges
    if frames > 1:
        static, motion = m.temporal_stability(pred.depth, pred.K, pred.cam2world, scene)
        score.values["stability.static"], score.values["stability.motion"] = _nanmean(static), _nanmean(motion)
        score.frames["stability.static"], score.frames["stability.motion"] = static, motion
    return points


def _nanmean(x: np.ndarray) -> float:
    """Mean over the finite entries (NaN if none)."""
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else float("nan")


def _rms(x: np.ndarray) -> float:
    """Root mean square (NaN if empty)."""
    return float(np.sqrt(np.mean(x**2))) if len(x) else float("nan")


def _dynamic_absrel(depth: np.ndarray, ref: Reference, frames: int, scale: float) -> float:
    """AbsRel of the predicted depths ``(N,)`` (``ref.depth``'s pixels) times ``scale`` over the dynamic mask's
    pixels; NaN without a mask or without a masked pixel."""
    if ref.dynamic is None or not ref.dynamic.any():
        return float("nan")
    moving = ref.dynamic
    return m.depth_errors(depth[moving], ref.depth[moving], ref.frame[moving], frames, scale)[1]["absrel"]


def _depth_with_truth(pred: Prediction, points: np.ndarray, ref: Reference, score: Score) -> None:
    """Depth and point metrics against the truth into ``score``."""
    frames = len(points)
    depth = m.on_grid(pred.depth, ref.stride)[ref.valid].astype(np.float64)  # (N,) as ref.depth
    first = slice(0, ref.first)
    if pred.depth.strides[0] == 0 and ref.one_mask:  # a held map on the same pixels of every frame: frame 0's, F times
        median = float(m.repeated_quantiles(depth[first], [0.5], frames)[0])
    else:
        median = float(np.median(depth))
    for rule in m.ALIGNMENTS:
        scale, shift = m.align_depth(depth, ref.depth, rule, ref.unit, median)
        per_frame, clip = m.depth_errors(depth, ref.depth, ref.frame, frames, scale, shift)
        scale0, shift0 = m.align_depth(depth[first], ref.depth[first], rule, ref.unit0)
        _, clip0 = m.depth_errors(depth[first], ref.depth[first], ref.frame[first], 1, scale0, shift0)
        for name in clip:
            score.values[f"depth.{rule}.{name}"], score.frames[f"depth.{rule}.{name}"] = clip[name], per_frame[name]
            score.values[f"depth0.{rule}.{name}"] = clip0[name]
        if rule == "median":
            score.values["depth.dynamic.absrel"] = _dynamic_absrel(depth, ref, frames, scale)
            worst = int(np.nanargmax(per_frame["absrel"]))
            score.worst = {
                "metric": "depth.median.absrel",
                "frame": worst,
                "value": float(per_frame["absrel"][worst]),
                "true": ref.grid_depth[worst],
                "pred": scale * m.on_grid(pred.depth, ref.stride)[worst] + shift,
                "rgb": ref.grid_rgb[worst],
            }
    valid = ref.points_valid
    aligned = m.apply_sim3(points, *m.sim3_align(points[valid], ref.points[valid]))
    per_frame, clip = m.point_errors(
        aligned.reshape(frames, -1, 3), ref.points.reshape(frames, -1, 3), valid.reshape(frames, -1), ref.point_trees
    )
    for name in clip:
        score.values[f"points.{name}"] = clip[name] / ref.unit
        score.frames[f"points.{name}"] = per_frame[name] / ref.unit


def score(pred: Prediction, ref: Reference | None, image: FloorImage | None = None) -> Score:
    """Every metric that applies to ``pred``: those without ground truth, and with ``ref`` those against it.

    A floor's prediction has no RGB video of its own (``pred.rgb`` is None): it holds the sample's input image, whose
    metrics ``image`` brings (:class:`FloorImage`, made once per sample).
    """
    if image is not None and pred.rgb is not None:
        raise ValueError("a floor's prediction takes its RGB video from image: its own rgb must be None")
    result = Score({})
    jerk, turn = m.path_smoothness(pred.cam2world)
    result.values["path.jerk"], result.values["path.turn"] = jerk, turn
    result.path = pred.cam2world[:, :3, 3].astype(np.float64)
    points = _geometry_without_truth(pred, result, image) if pred.depth is not None else None
    if ref is None:
        return result
    cams = m.camera_errors(pred.cam2world, ref.cam2world)
    result.path = cams["centres"]
    result.values["camera.ate"] = _rms(cams["ate"]) / ref.unit
    result.values["camera.rpe_trans"] = _rms(cams["rpe_trans"]) / ref.unit  # no pairs in a one-frame video: NaN
    result.values["camera.rpe_rot"] = _nanmean(cams["rpe_rot"])
    focal = m.focal_error(pred.K, ref.K)
    result.values["camera.focal"] = float(focal.mean())
    result.frames |= {
        "camera.ate": cams["ate"] / ref.unit,
        "camera.rpe_trans": cams["rpe_trans"] / ref.unit,
        "camera.rpe_rot": cams["rpe_rot"],
        "camera.focal": focal,
    }
    if points is not None:
        _depth_with_truth(pred, points, ref, result)
    if image is not None:
        result.values |= image.rgb
        result.frames |= image.rgb_frames
    elif pred.rgb is not None and ref.rgb is not None:
        values, frames = _rgb(pred.rgb, ref)
        result.values |= values
        result.frames |= frames
    return result


def _rgb(pred: np.ndarray, ref: Reference) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """PSNR and SSIM of frame 0 and of the later frames, and their per-frame curves."""
    psnr, ssim = m.psnr(pred, ref.rgb), m.ssim(pred, ref.rgb, true_terms=ref.ssim_terms)
    values = {
        "rgb.psnr0": float(psnr[0]),
        "rgb.ssim0": float(ssim[0]),
        "rgb.psnr": float(psnr[1:].mean()) if len(psnr) > 1 else float("nan"),
        "rgb.ssim": float(ssim[1:].mean()) if len(ssim) > 1 else float("nan"),
    }
    return values, {"rgb.psnr": psnr, "rgb.ssim": ssim}
