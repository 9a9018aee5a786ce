"""Ground truth for evaluation: which clip each result shows, and that clip prepared at the result's frame count and
size exactly as training prepares it.

A clip comes from a 4DNeX-10M tree (``--gt DATA_DIR``: any layout the dataset reader accepts, including the trees
``fourdnex.data.synthetic`` writes). Which clip a result shows is named by ``--mapping FILE.json`` (``{"00000":
"dynamic/dynamic_3/10002", ...}``, result number to clip id; it wins) or by a ``clip_id`` key in the result's
``.json``. The clip goes through the training preprocessing (``prepare_frames``, which ``prepare_clip`` calls: its
first F frames, resized to cover H x W and centre-cropped, RGB bilinear, geometry nearest); its RGB video, cameras
and cropped intrinsics are used as they come out. Its geometry is taken before the pointmap normalization, whose
percentile clipping moves the outermost points, and cropped the same way (``crop_geometry``): each frame's depth is
the stored depth where the clip holds depth maps, else the camera-frame z of its world points. Where the clip has a
dynamic mask (the moving objects' pixels; MonST3R folders), it is taken at the same frames and cropped the same way.

Conventions (those of :mod:`fourdnex.geometry.cameras`): ``K`` in pixels of the H x W frames with pixel centres at
+0.5, ``cam2world`` camera-to-world with OpenCV axes, expressed in the first camera's frame (``cam2world[0] = I``),
depth = camera-frame z in the clip's own units, 0 where the clip defines none.

This module is the one place evaluation reads the dataset code from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fourdnex.data.prepare import crop_geometry, prepare_frames
from fourdnex.data.sources import Captions, ClipSource, find_clips, read_clip
from fourdnex.errors import FourDNeXError
from fourdnex.geometry.cameras import invert_rigid


class EvaluationError(FourDNeXError, ValueError):
    """An evaluation input that cannot be used: the message names the file or value and the problem."""


@dataclass
class Truth:
    """One clip's ground truth at a result's frame count F and size H x W."""

    clip_id: str
    rgb: np.ndarray  # (F, H, W, 3) uint8; frame 0 is the image the result was generated from
    depth: np.ndarray  # (F, H, W) float32 camera-frame z, 0 where undefined
    K: np.ndarray  # (F, 3, 3) float64
    cam2world: np.ndarray  # (F, 4, 4) float64, first camera's frame
    dynamic: np.ndarray | None = None  # (F, H, W) bool, pixels on moving objects; None: the clip has no mask

    @property
    def valid(self) -> np.ndarray:
        """``(F, H, W)`` bool: where the depth is defined."""
        return self.depth > 0


def read_mapping(path: str | Path) -> dict[str, str]:
    """A mapping file: a JSON object from result numbers (``"00000"``) to clip ids."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EvaluationError(f"--mapping {path}: not a readable JSON file ({err})") from err
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise EvaluationError(f'--mapping {path}: must be a JSON object like {{"00000": "dynamic/dynamic_3/10002"}}')
    return mapping


def clip_sources(data_dir: str | Path) -> dict[str, ClipSource]:
    """Every clip of a 4DNeX-10M tree by id."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvaluationError(f"--gt {data_dir}: no such folder")
    try:
        clips = find_clips(data_dir).clips
    except FourDNeXError as err:
        raise EvaluationError(f"--gt {data_dir}: {err}") from err
    return {clip.id: clip for clip in clips}


def clip_of(result: Path, meta: dict, mapping: dict[str, str], mapping_path: Path | None, clips: dict) -> str:
    """The id of the clip a result shows: the mapping's entry for its number, else its ``clip_id``; checked to be
    one of ``clips``."""
    if result.stem in mapping:
        clip_id, where = mapping[result.stem], f"--mapping {mapping_path}: {result.stem} names"
    elif "clip_id" in meta:
        clip_id, where = meta["clip_id"], f"{result.with_suffix('.json')}: clip_id"
    else:
        raise EvaluationError(f"{result}: no clip named for it (add it to --mapping, or a clip_id to its .json)")
    if clip_id not in clips:
        known = ", ".join(sorted(clips)[:3])
        raise EvaluationError(f"{where} clip {clip_id!r}, which is not in the ground truth (it has {known}, ...)")
    return clip_id


def load_truth(data_dir: str | Path, source: ClipSource, num_frames: int, height: int, width: int) -> Truth:
    """Read and prepare a clip as the truth of a result of ``num_frames`` frames of ``height x width``; refuses a clip
    with fewer frames (training would pad it by playing it backwards) or one that would have to be upsampled."""
    if source.problem:
        raise EvaluationError(f"ground truth {source.id}: {source.problem}")
    raw = read_clip(source, Captions(data_dir))
    frames = len(raw.rgb)
    if frames < num_frames:
        raise EvaluationError(f"ground truth {source.id} has {frames} frames, the result {num_frames}")
    for what, shape in (("video", raw.rgb.shape), ("geometry", raw.geometry_shape)):
        if max(height / shape[1], width / shape[2]) > 1:
            raise EvaluationError(
                f"ground truth {source.id}: its {what} is {shape[1]}x{shape[2]}, smaller than the result's "
                f"{height}x{width} (it would have to be upsampled)"
            )
    clip = prepare_frames(raw, num_frames, height, width)
    depth = np.empty((num_frames, height, width), np.float32)
    dynamic = None if raw.dynamic is None else np.empty((num_frames, height, width), bool)
    for f, i in enumerate(clip.frame_indices):  # frame by frame, so that the temporaries stay in cache
        if raw.depth is not None:  # the stored depth is the camera-frame z of the points it unprojects to
            stored = raw.depth[i]
        else:  # each world point's distance along its camera's viewing axis (before the crop, which picks pixels)
            axis, centre = clip.cam2world[f, :3, 2], clip.cam2world[f, :3, 3]
            stored = (raw.points[i] @ axis - axis @ centre).astype(np.float32)
        frame = crop_geometry(stored[None, ..., None], height, width)[0, ..., 0].astype(np.float32, copy=False)
        depth[f] = np.where(np.isfinite(frame) & (frame > 0), frame, np.float32(0))
        if dynamic is not None:  # the same source pixels as the depth's (nearest)
            dynamic[f] = crop_geometry(raw.dynamic[i, None, ..., None].view(np.uint8), height, width)[0, ..., 0]
    if not depth.any():
        raise EvaluationError(f"ground truth {source.id}: no pixel has a depth in front of its camera")
    cam2world = invert_rigid(clip.cam2world[:1]) @ clip.cam2world
    return Truth(source.id, clip.rgb, depth, clip.intrinsics.astype(np.float64), cam2world, dynamic)
