"""Floors: trivial predictors scored beside the model by the same code, so a reader sees how far above chance a model
is.

A floor that predicts geometry is a result (an RGB video and an XYZ video in [-1, 1]) that is registered and scored
like a model's. Every floor video is static, one frame held for all F frames: its frames are identical and so are
their fits, so the held frame is registered once and its registration held (the same numbers in 1/F of the time).
The RGB video of every floor is the input image held (frame 0 of the truth; of the result without ground truth).
Without ground truth only the plane exists; the other floors are made of ground truth.
"""

from __future__ import annotations

import numpy as np

from fourdnex.evaluation.metrics import bounds
from fourdnex.evaluation.truth import Truth
from fourdnex.geometry.cameras import unproject_depth
from fourdnex.model.fusion import sloped_plane

FLOORS = {
    "plane": "the sloped plane every sample is conditioned with (X -1..1 left to right, Y -1..1 top to bottom, "
    "Z +1 on the top row to -1 on the bottom row), held",
    "mean_depth": "the mean depth map of the evaluated set (each clip's depth over its unit, averaged per pixel "
    "over the clips and frames of that size) seen by a camera with the set's median focal length, held",
    "first_frame": "the true geometry of frame 0 held: a perfect frame 0, then nothing moves",
    "static_camera": "cameras only: identity poses with the set's median focal length (the camera never moves)",
}


def to_unit_box(points: np.ndarray) -> np.ndarray:
    """Points ``(..., 3)`` -> float32 in [-1, 1]: centred at the midpoint of their range on each axis and divided by
    the largest half-range (the training normalization with one centre for the clip and no clipping)."""
    low, high = bounds(points)
    return ((points - (low + high) / 2) / ((high - low).max() / 2)).astype(np.float32)


def plane_xyz(height: int, width: int) -> np.ndarray:
    """The plane floor's frame ``(H, W, 3)``."""
    return sloped_plane(height, width).permute(1, 2, 0).numpy()


def camera_matrix(focal: float, height: int, width: int) -> np.ndarray:
    """``K (3, 3)`` with square pixels of focal length ``focal`` and the principal point at the image centre."""
    return np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])


def _unproject(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame points ``(H, W, 3)`` of one depth map ``(H, W)`` and its ``K (3, 3)``."""
    return unproject_depth(depth[None].astype(np.float64), K[None].astype(np.float64), np.eye(4)[None])[0]


def first_frame_xyz(truth: Truth) -> np.ndarray:
    """The first-frame floor's frame ``(H, W, 3)``: the true points of frame 0 in its camera, undefined depths set
    to the frame's median depth."""
    depth = np.where(truth.valid[0], truth.depth[0], np.median(truth.depth[0][truth.valid[0]]))
    return to_unit_box(_unproject(depth, truth.K[0]))


class MeanDepth:
    """The mean depth map and median focal length of a set of truths, per frame size ``(H, W)``."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, int], np.ndarray] = {}
        self.counts: dict[tuple[int, int], np.ndarray] = {}
        self.focals: dict[tuple[int, int], list[float]] = {}

    def add(self, truth: Truth, unit: float) -> None:
        """Add one clip: its depth over its ``unit`` (the clip's unit as scored:
        :attr:`fourdnex.evaluation.scoring.Reference.unit`), summed per pixel over frames; its focal lengths (fx and
        fy)."""
        size = truth.depth.shape[1:]
        sums, counts = np.zeros(size, truth.depth.dtype), np.zeros(size, np.int64)
        for depth in truth.depth:  # frame by frame, so that the temporaries stay in cache; undefined depths are 0
            sums += depth
            counts += depth > 0
        self.sums[size] = self.sums.get(size, 0.0) + sums.astype(np.float64) / unit  # summed over clips in float64
        self.counts[size] = self.counts.get(size, 0) + counts
        self.focals.setdefault(size, []).extend(truth.K[:, [0, 1], [0, 1]].ravel().tolist())

    def merge(self, other: MeanDepth) -> None:
        """Add the clips ``other`` holds (after this one's: the sums in the order the clips were added)."""
        for size, sums in other.sums.items():
            self.sums[size] = self.sums.get(size, 0.0) + sums
            self.counts[size] = self.counts.get(size, 0) + other.counts[size]
            self.focals.setdefault(size, []).extend(other.focals[size])

    def depth(self, size: tuple[int, int]) -> np.ndarray:
        """The mean map ``(H, W)``; pixels no clip defines get 1 (the unit)."""
        counts = self.counts[size]
        return np.divide(self.sums[size], counts, out=np.ones(size), where=counts > 0)

    def focal(self, size: tuple[int, int]) -> float:
        """The median focal length in pixels of that size."""
        return float(np.median(self.focals[size]))

    def xyz(self, size: tuple[int, int]) -> np.ndarray:
        """The mean-depth floor's frame ``(H, W, 3)``."""
        return to_unit_box(_unproject(self.depth(size), camera_matrix(self.focal(size), *size)))
