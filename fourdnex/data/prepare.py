"""Preparing a clip for the cache: pick its frames, crop RGB and pointmap to the output size, normalize the pointmap.

Frames: the first ``num_frames`` frames; a shorter clip is padded by playing it backwards (0 1 2 1 0 1 ...).
Crop: resize so the frame covers ``height x width``, then cut out the centre (RGB bilinear with antialiasing,
pointmaps nearest, so no point is invented between two surfaces); K follows the resize and the crop.

Pointmap normalization, in the first camera's frame (OpenCV axes), computed on the source frames the clip uses
(before the crop, as the reference does) and stored so that ``metric = pointmap * scale + center[f]`` holds for
every point inside its clipping box (``|metric - center[f]| <= half_range[f]``):

``center="clip"`` (the default)
    one clipping box for the whole clip (2nd-98th percentile per axis over every point of every frame), one centre
    (its midpoint) and one scale (its largest half-range): a static point keeps its normalized position in every
    frame, so what moves in the pointmap video is what moves in the scene.
``center="per_frame"``
    the reference's normalization: per frame and axis, clip to that frame's 2nd-98th percentile and subtract that
    frame's own centre; one scale (the largest half-range of any frame). Static points move between frames by each
    frame's centre offset, which a model learns and registration reads as camera motion: on two static synthetic
    scenes built and registered by ``tests/test_build_dataset.py``, the recovered camera centres are off by 7.9 %
    and 11.4 % of the path, against 0.09 % and 0.13 % with one centre per clip. It exists to train an adapter
    compatible with the released one.

Why the clip mode clips per clip: both ways clip the same share of points, because both cut 2 % per side and axis
(8 synthetic dynamic clips of 81 frames at 60 x 90: 9.84 % of the points per clip, 9.87 % per frame on average,
9.1-10.2 % each; ``python bench/bench_dataset.py --clipping --num_clips 8 --height 60 --width 90``). But one box
clips a static point the same way in every frame, where per-frame boxes move a clipped static point between frames
(their faces travel by up to 80 % of the scale under orbiting cameras), and its scale is up to 21 % smaller than
that of the union of the per-frame boxes, so the [-1, 1] range is used more finely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fourdnex.config import PROMPT_SUFFIX
from fourdnex.data.sources import ClipError, ClipSource, RawClip
from fourdnex.model.fusion import video_pixels

PERCENTILES = (2.0, 98.0)
#: ``--center`` choices: how the pointmap is centred (and clipped).
CENTER_MODES = ("clip", "per_frame")
#: Clips without intrinsics: K is fitted on every FIT_STEP-th row and column of the source pixels.
FIT_STEP = 4


@dataclass(frozen=True)
class Normalization:
    """What maps metric points to the normalized pointmap and back, per frame (F rows; equal rows for ``clip``)."""

    center: np.ndarray  # (F, 3) float64
    half_range: np.ndarray  # (F, 3) float64: the clipping box is center +- half_range
    scale: float

    def take(self, frames: np.ndarray) -> Normalization:
        """The normalization of frames ``frames`` ``(F',)`` (e.g. the ping-pong padded order)."""
        return Normalization(self.center[frames], self.half_range[frames], self.scale)


@dataclass
class PreparedClip:
    """A clip cropped to the output size, F frames, with its normalized pointmap and the normalization."""

    source: ClipSource
    rgb: np.ndarray  # (F, H, W, 3) uint8
    pointmap: np.ndarray  # (F, H, W, 3) float32 in [-1, 1], first-camera frame
    center: np.ndarray  # (F, 3) float64
    scale: float
    half_range: np.ndarray  # (F, 3) float64: the clipping box is center +- half_range
    center_mode: str  # one of CENTER_MODES
    cam2world: np.ndarray  # (F, 4, 4) float64
    intrinsics: np.ndarray  # (F, 3, 3) float64 for the H x W frames
    intrinsics_source: str  # "given" | "fitted"
    frame_indices: np.ndarray  # (F,) int64
    caption: str
    number: int
    source_frames: int
    reader: str

    @property
    def prompt(self) -> str:
        """The text the UMT5 encoder sees: the caption plus the POINTMAP_STYLE suffix."""
        return self.caption + PROMPT_SUFFIX


def frame_indices(source_frames: int, num_frames: int) -> np.ndarray:
    """The first ``num_frames`` frames, padding a short clip by playing it backwards (0 1 2 1 0 1 ...), ``(F,)``."""
    if source_frames == 1:
        return np.zeros(num_frames, np.int64)
    period = 2 * source_frames - 2
    j = np.arange(num_frames) % period
    return np.where(j < source_frames, j, period - j).astype(np.int64)


def _cover(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(new_h, new_w, y0, x0)``: the size a ``src_h x src_w`` frame is resized to so it covers ``height x width``,
    and the offset of the centre crop in the resized frame."""
    s = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * s)), max(width, round(src_w * s))
    return new_h, new_w, (new_h - height) // 2, (new_w - width) // 2


def cover_crop(
    x: torch.Tensor, height: int, width: int, mode: str
) -> tuple[torch.Tensor, tuple[float, float, int, int]]:
    """Resize ``(N, C, H, W)`` so it covers ``height x width``, then crop the centre.

    Returns the crop and ``(sx, sy, x0, y0)``: the resize factors and the crop's offset in the resized image.
    """
    src_h, src_w = x.shape[-2:]
    new_h, new_w, y0, x0 = _cover(src_h, src_w, height, width)
    if (new_h, new_w) != (src_h, src_w):
        if mode == "nearest-exact":
            x = F.interpolate(x, size=(new_h, new_w), mode=mode)
        else:
            x = F.interpolate(x, size=(new_h, new_w), mode=mode, align_corners=False, antialias=True)
    return x[..., y0 : y0 + height, x0 : x0 + width], (new_w / src_w, new_h / src_h, x0, y0)


def crop_video(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """RGB frames ``(F, Hs, Ws, 3)`` uint8 -> ``(F, H, W, 3)`` uint8 by :func:`cover_crop` (bilinear with
    antialiasing, rounded back to 8 bits); frames that need no resize are only cropped, which gives the same bytes."""
    new_h, new_w, y0, x0 = _cover(*rgb.shape[1:3], height, width)
    if (new_h, new_w) == rgb.shape[1:3]:
        return np.ascontiguousarray(rgb[:, y0 : y0 + height, x0 : x0 + width])
    frames = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float()
    frames, _ = cover_crop(frames, height, width, "bilinear")
    return np.ascontiguousarray(frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())


def crop_geometry(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Geometry frames ``(F, Hp, Wp, C)`` (points, depths) -> ``(F, H, W, C)`` by :func:`cover_crop` (nearest, so no
    point is invented between two surfaces)."""
    frames = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    cropped, _ = cover_crop(frames, height, width, "nearest-exact")
    return cropped.permute(0, 2, 3, 1).numpy()


def crop_intrinsics(K: np.ndarray, sx: float, sy: float, x0: int, y0: int) -> np.ndarray:
    """K ``(..., 3, 3)`` of the source grid -> K of the resized-and-cropped grid (both with pixel centres at +0.5,
    so the image spans [0, W] x [0, H] and a resize scales it)."""
    out = np.array(K, np.float64, copy=True)
    out[..., 0, :] *= sx
    out[..., 1, :] *= sy
    out[..., 0, 2] -= x0
    out[..., 1, 2] -= y0
    return out


def fit_intrinsics(points_cam: np.ndarray, step: int = FIT_STEP) -> np.ndarray:
    """Least-squares pinhole K ``(N, 3, 3)`` from camera-frame points ``(N, h, w, 3)`` of every ``step``-th row and
    column of their pixel grid (pixel ``(i, j)`` of the points is pixel ``(step * i, step * j)`` of the frame)."""
    _, rows, cols, _ = points_cam.shape
    v, u = np.meshgrid(np.arange(rows) * step + 0.5, np.arange(cols) * step + 0.5, indexing="ij")  # pixel centres
    Ks = []
    for pts in points_cam:
        z = pts[..., 2]
        ok = z > 1e-6
        if ok.sum() < 3:
            raise ClipError("cannot fit intrinsics: fewer than 3 points in front of the camera")
        K = np.eye(3)
        for axis, pix in ((0, u), (1, v)):
            a = np.stack([pts[..., axis][ok] / z[ok], np.ones(int(ok.sum()))], -1)
            (f, c), *_ = np.linalg.lstsq(a, pix[ok], rcond=None)
            K[axis, axis], K[axis, 2] = f, c
        Ks.append(K)
    return np.stack(Ks)


def fit_normalization(points: np.ndarray, center: str = "clip") -> Normalization:
    """The normalization of a pointmap video ``(F, H, W, 3)`` (first-camera frame) by ``center`` (see the module):
    clipping boxes, centres ``(F, 3)`` and the one scale."""
    if center not in CENTER_MODES:
        raise ValueError(f"center must be one of {CENTER_MODES}, got {center!r}")
    flat = points.reshape(len(points), -1, 3)
    if center == "clip":
        lo, hi = np.percentile(flat.reshape(-1, 3), PERCENTILES, axis=0)  # (3,) each
        lo, hi = np.broadcast_to(lo, (len(points), 3)), np.broadcast_to(hi, (len(points), 3))
    else:
        lo, hi = np.percentile(flat, PERCENTILES, axis=1)  # (F, 3) each
    half_range = (hi - lo) / 2.0
    scale = float(half_range.max())
    if not scale > 0:
        raise ClipError(f"the pointmap is degenerate (its largest half-range is {scale})")
    return Normalization(np.array((lo + hi) / 2.0), np.array(half_range), scale)


def normalize_pointmap(points: np.ndarray, norm: Normalization) -> np.ndarray:
    """Clip ``points`` ``(F, H, W, 3)`` to their frames' boxes, centre and scale them: ``(F, H, W, 3)`` in [-1, 1]."""
    lo = (norm.center - norm.half_range)[:, None, None]
    hi = (norm.center + norm.half_range)[:, None, None]
    return (np.clip(points, lo, hi) - norm.center[:, None, None]) / norm.scale


def metric_pointmap(pointmap: np.ndarray, center: np.ndarray, scale: float) -> np.ndarray:
    """Undo :func:`normalize_pointmap`: metric points ``(F, H, W, 3)`` in the first camera's frame from a normalized
    pointmap ``(F, H, W, 3)``, its centres ``(F, 3)`` and scale (exact for every point inside its clipping box)."""
    return np.asarray(pointmap, np.float64) * scale + np.asarray(center, np.float64)[:, None, None, :]


@dataclass
class ClipFrames:
    """What the preprocessing makes of a clip besides its pointmap: the F frames it picks, their RGB cropped to the
    output size, their cameras and the intrinsics of the cropped grid."""

    frame_indices: np.ndarray  # (F,) int64
    rgb: np.ndarray  # (F, H, W, 3) uint8
    cam2world: np.ndarray  # (F, 4, 4) float64, the source's world
    intrinsics: np.ndarray  # (F, 3, 3) float64 for the H x W frames
    intrinsics_source: str  # "given" | "fitted"


def prepare_frames(raw: RawClip, num_frames: int, height: int, width: int) -> ClipFrames:
    """Pick ``num_frames`` frames and crop their RGB to ``height x width``; K follows the geometry's crop (fitted on
    the frames' points when the clip has none). The pointmap itself is left alone (see :func:`prepare_clip`)."""
    idx = frame_indices(len(raw.rgb), num_frames)
    c2w = raw.cam2world[idx]
    if raw.K is None:
        w2c = np.linalg.inv(c2w)
        grid = raw.points[idx, ::FIT_STEP, ::FIT_STEP]  # the pixels the fit reads, in world
        cam_f = grid @ w2c[:, None, :3, :3].transpose(0, 1, 3, 2) + w2c[:, None, None, :3, 3]
        K_src, intrinsics_source = fit_intrinsics(cam_f), "fitted"
    else:
        K_src, intrinsics_source = raw.K[idx], "given"
    src_h, src_w = raw.geometry_shape[1:]
    new_h, new_w, y0, x0 = _cover(src_h, src_w, height, width)
    intrinsics = crop_intrinsics(K_src, new_w / src_w, new_h / src_h, x0, y0)
    return ClipFrames(idx, crop_video(raw.rgb[idx], height, width), c2w, intrinsics, intrinsics_source)


def prepare_clip(
    source: ClipSource, raw: RawClip, num_frames: int, height: int, width: int, center: str = "clip"
) -> PreparedClip:
    """Pick ``num_frames`` frames, crop RGB and pointmap to ``height x width``, normalize the pointmap by ``center``.

    The normalization is fitted on the source frames the clip uses, at source resolution, before the crop.
    """
    frames = prepare_frames(raw, num_frames, height, width)
    idx = frames.frame_indices
    used = int(idx.max()) + 1  # frames 0 .. used - 1 appear
    world_to_cam0 = np.linalg.inv(raw.cam2world[0])
    cam0 = raw.points[:used] @ world_to_cam0[:3, :3].T + world_to_cam0[:3, 3]  # (used, Hp, Wp, 3) first camera
    norm = fit_normalization(cam0, center).take(idx)
    normalized = normalize_pointmap(crop_geometry(cam0[idx], height, width), norm)
    return PreparedClip(
        source=source,
        rgb=frames.rgb,
        pointmap=normalized.astype(np.float32),
        center=norm.center,
        scale=norm.scale,
        half_range=norm.half_range,
        center_mode=center,
        cam2world=frames.cam2world,
        intrinsics=frames.intrinsics,
        intrinsics_source=frames.intrinsics_source,
        frame_indices=idx,
        caption=raw.caption,
        number=raw.number,
        source_frames=len(raw.rgb),
        reader=raw.reader,
    )


def as_videos(rgb: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
    """The VAE's input of prepared clips held in tensors (``rgb`` uint8, ``xyz`` float16 or float32, both
    ``(B, F, H, W, 3)``): their RGB videos then their XYZ videos, ``(2B, 3, F, H, W)`` float32 in [-1, 1]."""
    return torch.cat([video_pixels(rgb), xyz.permute(0, 4, 1, 2, 3).float()])
