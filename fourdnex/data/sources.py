"""Training data: read 4DNeX-10M clips, normalize their pointmaps, encode them, and lay out the cache.

Input (``--data_dir``, the 4DNeX-10M layout; every path below is relative to it)::

    dynamic/<subset>/<stem>_<start>-<end>/   MonST3R-style clip: pred_traj.txt, pred_intrinsics.txt,
                                             frame_XXXX.npy, dynamic_mask_<t>.png; RGB = frames start, start + 1, ...
                                             of raw/dynamic/<subset>/<stem>.mp4 (as many as there are depth files)
    dynamic/<subset>/<stem>.npz              images, depths, intrinsic (3x3 | 1x3x3 | Tx3x3 | scalar focal), cam_c2w
    static/<subset>/<stem>.npz               pts3d (world points), poses (camera-to-world); RGB from
                                             raw/static/<subset>/<stem>.mp4 or the image folder
                                             raw/static/<subset>/<stem>/
    caption/<subset>_with_caption_upload.csv columns number (= int(stem)), caption

A clip's id is ``<kind>/<subset>/<name>`` (``dynamic/dynamic_1/10000_0-49``, ``static/static_1/10003``); clips are
processed in the sorted order of their ids.

Cache (``--out``; ``<id>`` as above, so files sit in ``<kind>/<subset>/`` sub-folders)::

    build_config.json                the settings the cache was built with (model_path, resolution_h, resolution_w,
                                     num_frames, cond_num_frames, dtype); a run with other settings is refused
    videos/<id>.mp4                  the cropped RGB video, F x H x W, 24 fps
    first_frames/<id>.png            its first frame, H x W RGB
    pointmaps/<id>.safetensors       pointmap (F, H, W, 3) float16: the normalized pointmap in [-1, 1], pixel-aligned
                                       with the video, in the first camera's frame (OpenCV axes)
                                     center (F, 3) float64, scale () float64: metric = pointmap * scale + center[f]
                                       for every point inside its frame's clipping box (2nd-98th percentile per
                                       axis), i.e. |metric - center[f]| < half_range[f]
                                     half_range (F, 3) float64: the clipping box's half sizes (metric)
                                     cam2world0 (4, 4) float64: the first camera, camera-to-world in the source's world
                                     cam2world (F, 4, 4) float64: every frame's camera, camera-to-world, source world
                                     intrinsics (F, 3, 3) float64: K of the cropped H x W frames (pixel centres at
                                       integer coordinates); metadata intrinsics_source = "given" | "fitted"
                                     frame_indices (F,) int64: the source frame of each frame (ping-pong padding)
    pointmap_previews/<id>.mp4       the normalized pointmap as colours ((xyz + 1) / 2), F x H x W
    latents/<id>.safetensors         rgb (16, T, H/8, W/8) and xyz (16, T, H/8, W/8): Wan VAE posterior mode, after the
                                       VAE's own normalization (z - latents_mean) / latents_std; xyz is NOT yet
                                       XYZ-normalized (apply (z - mean) / std with stats.json before training);
                                       T = (F - 1) / 4 + 1
                                     cond (16, Tc, H/8, 2 W/8): the condition, VAE-encoded and normalized the same way:
                                       fusion.condition_video(first frame, cond_num_frames, "rgbxyz"), i.e.
                                       [RGB | sloped plane] then zero frames; Tc = (cond_num_frames - 1) / 4 + 1
                                     metadata: num_frames, cond_num_frames, cond_layout
    clip/<id>.safetensors            clip_embeds (257, 1280) on the real model: CLIP penultimate hidden layer of
                                       the first frame
    prompt/<sha256>.safetensors      prompt_embeds (512, 4096) on the real model: UMT5 of caption + " POINTMAP_STYLE."
                                       (zero after the prompt's tokens); sha256 of that prompt text (UTF-8);
                                       metadata: prompt
    records/<id>.json                the clip's manifest line; written last, so it marks the clip done
    failures/<id>.json               why a clip could not be used ({"id", "reason"})
    manifest.jsonl                   one JSON object per clip (the records, in clip order): id, subset, format,
                                     number, caption, prompt, prompt_sha256, source_frames, num_frames, height,
                                     width, files (paths relative to --out), normalization (center, scale,
                                     cam2world0, K0), xyz_latent_sums
    prompts.txt, videos.txt          one prompt / one video path (relative to --out) per manifest line
    failures.jsonl                   every failed clip, with its reason
    stats.json                       xyz_latent_mean, xyz_latent_std (over every element of every xyz latent),
                                     per-channel means/stds, count, num_clips, and the build config

Latents and embeddings are stored in the dtype they were computed in (float32 on CPU, bfloat16 by default on GPU).
Every file is written atomically; the lists, manifest and statistics are written once every clip of the run's
``--limit`` has a record or a failure (by the last shard to finish, or by ``build_wan_dataset.py --merge``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fourdnex.config import PROMPT_SUFFIX
from fourdnex.errors import FourDNeXError, UsageError
from fourdnex.files import atomic_path, read_video, write_png, write_safetensors, write_video
from fourdnex.geometry.cameras import intrinsics_from_integer_centres, quaternion_to_rotation, unproject_depth

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MONST3R_NAME = re.compile(r"^(?P<stem>.+)_(?P<start>\d+)-(?P<end>\d+)$")
PERCENTILES = (2.0, 98.0)
CONFIG_FILE = "build_config.json"
FILE_KEYS = ("video", "first_frame", "pointmap", "pointmap_preview", "latents", "clip", "prompt")


class ClipError(FourDNeXError, ValueError):
    """A clip that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class ClipSource:
    """Where one clip's files are. ``format`` is "monst3r", "dynamic_npz" or "static_npz"."""

    id: str
    kind: str  # "dynamic" | "static"
    subset: str
    name: str
    format: str
    path: Path


@dataclass
class RawClip:
    """A clip as read, at source resolution (N frames)."""

    rgb: np.ndarray  # (N, Hs, Ws, 3) uint8
    points: np.ndarray  # (N, Hp, Wp, 3) float64, world coordinates
    cam2world: np.ndarray  # (N, 4, 4) float64, camera-to-world, OpenCV axes
    K: np.ndarray | None  # (N, 3, 3) float64 for the pointmap's pixel grid, or None (to be fitted)
    caption: str
    number: int
    reader: str = "decord"


@dataclass
class PreparedClip:
    """A clip cropped to the output size, F frames, with its normalized pointmap and the normalization."""

    source: ClipSource
    rgb: np.ndarray  # (F, H, W, 3) uint8
    pointmap: np.ndarray  # (F, H, W, 3) float32 in [-1, 1], first-camera frame
    center: np.ndarray  # (F, 3) float64
    scale: float
    half_range: np.ndarray  # (F, 3) float64: the clipping box is center +- half_range
    cam2world: np.ndarray  # (F, 4, 4) float64
    intrinsics: np.ndarray  # (F, 3, 3) float64 for the H x W frames
    intrinsics_source: str
    frame_indices: np.ndarray  # (F,) int64
    caption: str
    number: int
    source_frames: int
    reader: str

    @property
    def prompt(self) -> str:
        """The text the UMT5 encoder sees: the caption plus the POINTMAP_STYLE suffix."""
        return self.caption + PROMPT_SUFFIX


# ---------------------------------------------------------------------------------------------------------------
# Finding and reading clips


def find_clips(data_dir: str | Path) -> tuple[list[ClipSource], list[str]]:
    """All clips under ``data_dir`` in id order, and the entries that are not clips (relative paths)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UsageError(f"data_dir {data_dir} is not a folder")
    clips, ignored = [], []
    for kind in ("dynamic", "static"):
        root = data_dir / kind
        if not root.is_dir():
            continue
        for subset_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for entry in sorted(subset_dir.iterdir()):
                rel = entry.relative_to(data_dir).as_posix()
                if entry.is_dir() and kind == "dynamic":
                    fmt, name = "monst3r", entry.name
                elif entry.suffix == ".npz":
                    fmt, name = f"{kind}_npz", entry.stem
                else:
                    ignored.append(rel)
                    continue
                clips.append(ClipSource(f"{kind}/{subset_dir.name}/{name}", kind, subset_dir.name, name, fmt, entry))
    if not clips:
        raise UsageError(f"no clips under {data_dir}/dynamic or {data_dir}/static")
    clips.sort(key=lambda c: c.id)
    return clips, ignored


def read_captions(data_dir: str | Path, subset: str) -> dict[int, str]:
    """``caption/<subset>_with_caption_upload.csv`` as {number: caption}; ClipError if missing or malformed."""
    path = Path(data_dir) / "caption" / f"{subset}_with_caption_upload.csv"
    if not path.is_file():
        raise ClipError(f"caption file {path} is missing")
    captions = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"number", "caption"} <= set(reader.fieldnames):
            raise ClipError(f"{path} needs the columns number,caption, has {reader.fieldnames}")
        for row in reader:
            try:
                captions[int(row["number"])] = row["caption"] or ""
            except ValueError as err:
                raise ClipError(f"{path}: number {row['number']!r} is not an integer") from err
    return captions


def _read_video(path: Path, indices: list[int]) -> tuple[np.ndarray, str]:
    """Frames ``indices`` of a video at full size, ``(N, H, W, 3)`` uint8 RGB, and the reader that decoded them."""
    from decord import VideoReader, cpu
    from decord._ffi.base import DECORDError

    try:
        reader = VideoReader(str(path), ctx=cpu(0))
    except (RuntimeError, DECORDError) as err:
        raise ClipError(f"cannot open video {path}: {str(err).splitlines()[0]}") from err
    if max(indices) >= len(reader):
        raise ClipError(f"video {path} has {len(reader)} frames, the clip needs frames up to {max(indices)}")
    try:
        return reader.get_batch(indices).asnumpy(), "decord"
    except DECORDError:
        # decord 0.6 fails to copy out frames of some sizes (e.g. 48 x 32); PyAV reads them.
        return _read_video_pyav(path, indices), "pyav"


def _read_video_pyav(path: Path, indices: list[int]) -> np.ndarray:
    """Frames ``indices`` of a video through PyAV, ``(N, H, W, 3)`` uint8; failures become ClipErrors."""
    import av

    try:
        return read_video(path, indices)
    except av.FFmpegError as err:
        raise ClipError(f"cannot decode video {path}: {err}") from err
    except ValueError as err:  # read_video's own checks, which name the file
        raise ClipError(str(err)) from err


def _numbered(paths: Iterable[Path]) -> list[Path]:
    """Sort paths by the integers in their names (frame_2 before frame_10)."""
    return sorted(paths, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def _read_images(folder: Path) -> np.ndarray:
    """Every image of ``folder`` in name order, ``(N, H, W, 3)`` uint8 RGB."""
    from PIL import Image

    files = _numbered(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ClipError(f"image folder {folder} holds no images")
    frames = []
    for f in files:
        try:
            with Image.open(f) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise ClipError(f"cannot read image {f}: {err}") from err
    if len({f.shape for f in frames}) != 1:
        raise ClipError(f"images in {folder} differ in size")
    return np.stack(frames)


def _find_raw(data_dir: Path, source: ClipSource, stem: str) -> Path:
    """The raw video file or image folder of ``stem`` in ``raw/<kind>/<subset>/``."""
    base = data_dir / "raw" / source.kind / source.subset / stem
    for ext in VIDEO_EXTENSIONS:
        if base.with_name(stem + ext).is_file():
            return base.with_name(stem + ext)
    if base.is_dir():
        return base
    raise ClipError(f"no raw video or image folder for {source.id} at {base}.mp4 or {base}/")


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an npz (no pickle); ClipError if unreadable or incomplete."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise ClipError(f"{path} lacks {missing} (has {npz.files})")
            return {k: npz[k] for k in keys}
    except ClipError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ClipError(f"cannot read {path}: {type(err).__name__}: {err}") from err


def _intrinsics(value: np.ndarray, frames: int, height: int, width: int, path: Path) -> np.ndarray:
    """``intrinsic`` of a dynamic npz (3x3, 1x3x3, Tx3x3 with pixel centres on integers, or a scalar focal) ->
    ``(T, 3, 3)`` in fourdnex's convention (pixel centres at +0.5)."""
    value = np.asarray(value, np.float64)
    if value.size == 1:  # a focal length, the principal point at the image centre
        f = float(value.reshape(()))
        return np.repeat(np.array([[[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]]]), frames, 0)
    if value.shape == (3, 3):
        value = value[None]
    if value.shape == (1, 3, 3):
        value = np.repeat(value, frames, 0)
    if value.shape != (frames, 3, 3):
        raise ClipError(f"{path}: intrinsic must be 3x3, 1x3x3, {frames}x3x3 or a scalar, got {value.shape}")
    return intrinsics_from_integer_centres(value)



def _check_finite(name: str, array: np.ndarray, path: Path) -> None:
    """ClipError naming the first frame of ``array`` (frames first) that holds NaN or inf."""
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(1)
    if bad.any():
        raise ClipError(f"{path}: {name} holds NaN or inf in frame {int(np.argmax(bad))} ({int(bad.sum())} frames)")



def _read_table(path: Path, columns: int) -> np.ndarray:
    """A whitespace-separated text table with ``columns`` numbers per line, ``(N, columns)`` float64."""
    if not path.is_file():
        raise ClipError(f"{path} is missing")
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise ClipError(f"cannot parse {path}: {err}") from err
    if table.shape[1] != columns:
        raise ClipError(f"{path} must have {columns} numbers per line, has {table.shape[1]}")
    return table


def read_clip(data_dir: str | Path, source: ClipSource, captions: dict[int, str]) -> RawClip:
    """Read one clip in any of the three formats; ClipError names the problem (file, frame, value)."""
    data_dir = Path(data_dir)
    path = source.path
    stem = source.name
    if source.format == "monst3r":
        match = MONST3R_NAME.match(source.name)
        if not match:
            raise ClipError(f"{path}: a MonST3R clip folder's name must end in _<start>-<end>")
        stem, start = match["stem"], int(match["start"])
    try:
        number = int(stem)
    except ValueError as err:
        raise ClipError(f"{path}: the clip's stem {stem!r} is not an integer clip number") from err
    caption = " ".join(captions.get(number, "").split())
    if not caption:
        raise ClipError(f"no caption for number {number} in caption/{source.subset}_with_caption_upload.csv")

    if source.format == "monst3r":
        depth_files = sorted(path.glob("frame_*.npy"))
        if not depth_files:
            raise ClipError(f"{path} holds no frame_XXXX.npy depth files")
        names = [p.name for p in depth_files]
        expected = [f"frame_{t:04d}.npy" for t in range(len(depth_files))]
        if names != expected:
            missing = sorted(set(expected) - set(names))
            raise ClipError(f"{path}: depth frames are not contiguous from frame_0000.npy (missing {missing[:3]})")
        n = len(depth_files)
        traj = _read_table(path / "pred_traj.txt", 8)
        intr = _read_table(path / "pred_intrinsics.txt", 9)
        if len(traj) != n or len(intr) != n:
            raise ClipError(f"{path}: {n} depth frames but {len(traj)} poses and {len(intr)} intrinsics")
        try:
            depth = np.stack([np.load(f, allow_pickle=False) for f in depth_files]).astype(np.float64)
        except (OSError, ValueError) as err:
            raise ClipError(f"{path}: cannot read depth: {err}") from err
        if depth.ndim != 3:
            raise ClipError(f"{path}: depth frames must be (H, W), got {depth.shape[1:]}")
        _check_finite("depth", depth, path)
        c2w = np.tile(np.eye(4), (n, 1, 1))
        c2w[:, :3, :3] = quaternion_to_rotation(traj[:, 4:8])
        c2w[:, :3, 3] = traj[:, 1:4]
        K = intrinsics_from_integer_centres(intr.reshape(n, 3, 3))
        video = _find_raw(data_dir, source, stem)
        rgb, reader = _read_video(video, list(range(start, start + n)))
        points = unproject_depth(depth, K, c2w)
    elif source.format == "dynamic_npz":
        arrays = _load_npz(path, ("images", "depths", "intrinsic", "cam_c2w"))
        rgb, depth = arrays["images"], arrays["depths"].astype(np.float64)
        if rgb.ndim != 4 or rgb.shape[-1] != 3 or depth.shape != rgb.shape[:3]:
            raise ClipError(f"{path}: images {rgb.shape} and depths {depth.shape} must be (T, H, W, 3) and (T, H, W)")
        n = len(depth)
        c2w = arrays["cam_c2w"].astype(np.float64)
        if c2w.shape != (n, 4, 4):
            raise ClipError(f"{path}: cam_c2w must be ({n}, 4, 4), got {c2w.shape}")
        _check_finite("depth", depth, path)
        K = _intrinsics(arrays["intrinsic"], n, *depth.shape[1:], path)
        rgb, reader = rgb.astype(np.uint8), "npz"
        points = unproject_depth(depth, K, c2w)
    else:
        arrays = _load_npz(path, ("pts3d", "poses"))
        points, c2w = arrays["pts3d"].astype(np.float64), arrays["poses"].astype(np.float64)
        n = len(points)
        if points.ndim != 4 or points.shape[-1] != 3 or c2w.shape != (n, 4, 4):
            raise ClipError(f"{path}: pts3d {points.shape} and poses {c2w.shape} must be (T, H, W, 3) and (T, 4, 4)")
        K = None
        raw = _find_raw(data_dir, source, stem)
        if raw.is_dir():
            rgb, reader = _read_images(raw), "images"
            if len(rgb) < n:
                raise ClipError(f"{raw} has {len(rgb)} images, the clip has {n} frames")
            rgb = rgb[:n]
        else:
            rgb, reader = _read_video(raw, list(range(n)))
    _check_finite("pointmap", points, path)
    _check_finite("cam2world", c2w, path)
    if len(rgb) != n:
        raise ClipError(f"{path}: {len(rgb)} RGB frames for {n} geometry frames")
    return RawClip(rgb=rgb, points=points, cam2world=c2w, K=K, caption=caption, number=number, reader=reader)


# ---------------------------------------------------------------------------------------------------------------
# Preparing: frames, crop, pointmap normalization


def frame_indices(source_frames: int, num_frames: int) -> np.ndarray:
    """The first ``num_frames`` frames, padding a short clip by playing it backwards (0 1 2 1 0 1 ...), ``(F,)``."""
    if source_frames == 1:
        return np.zeros(num_frames, np.int64)
    period = 2 * source_frames - 2
    j = np.arange(num_frames) % period
    return np.where(j < source_frames, j, period - j).astype(np.int64)


def cover_crop(
    x: torch.Tensor, height: int, width: int, mode: str
) -> tuple[torch.Tensor, tuple[float, float, int, int]]:
    """Resize ``(N, C, H, W)`` so it covers ``height x width``, then crop the centre.

    Returns the crop and ``(sx, sy, x0, y0)``: the resize factors and the crop's offset in the resized image.
    """
    src_h, src_w = x.shape[-2:]
    s = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * s)), max(width, round(src_w * s))
    if (new_h, new_w) != (src_h, src_w):
        if mode == "nearest-exact":
            x = F.interpolate(x, size=(new_h, new_w), mode=mode)
        else:
            x = F.interpolate(x, size=(new_h, new_w), mode=mode, align_corners=False, antialias=True)
    y0, x0 = (new_h - height) // 2, (new_w - width) // 2
    return x[..., y0 : y0 + height, x0 : x0 + width], (new_w / src_w, new_h / src_h, x0, y0)


def crop_intrinsics(K: np.ndarray, sx: float, sy: float, x0: int, y0: int) -> np.ndarray:
    """K ``(..., 3, 3)`` of the source grid -> K of the resized-and-cropped grid (both with pixel centres at +0.5,
    so the image spans [0, W] x [0, H] and a resize scales it)."""
    out = np.array(K, np.float64, copy=True)
    out[..., 0, :] *= sx
    out[..., 1, :] *= sy
    out[..., 0, 2] -= x0
    out[..., 1, 2] -= y0
    return out


def fit_intrinsics(points_cam: np.ndarray, step: int = 4) -> np.ndarray:
    """Least-squares pinhole K ``(N, 3, 3)`` from camera-frame points ``(N, H, W, 3)`` on their pixel grid."""
    _, height, width, _ = points_cam.shape
    rows, cols = np.arange(0, height, step) + 0.5, np.arange(0, width, step) + 0.5  # pixel centres
    v, u = np.meshgrid(rows, cols, indexing="ij")
    Ks = []
    for pts in points_cam[:, ::step, ::step]:
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


def normalize_pointmap(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """The 4DNeX pointmap normalization, returning what undoes it.

    ``points`` ``(F, H, W, 3)`` in the first camera's frame. Per frame and axis, clip to the 2nd-98th percentile;
    subtract the per-frame centre (midpoint of the clipped range); divide by one scale (the largest half-range).
    Returns ``(normalized (F, H, W, 3) in [-1, 1], center (F, 3), scale, half_range (F, 3))``; a point with
    ``|points - center[f]| < half_range[f]`` (not clipped) is ``normalized * scale + center[f]``.
    """
    flat = points.reshape(len(points), -1, 3)
    lo, hi = np.percentile(flat, PERCENTILES, axis=1)  # (F, 3) each
    center = (lo + hi) / 2.0
    scale = float(((hi - lo) / 2.0).max())
    if not scale > 0:
        raise ClipError(f"the pointmap is degenerate (its largest half-range is {scale})")
    normalized = (np.clip(flat, lo[:, None], hi[:, None]) - center[:, None]) / scale
    return normalized.reshape(points.shape), center, scale, (hi - lo) / 2.0


def prepare_clip(source: ClipSource, raw: RawClip, num_frames: int, height: int, width: int) -> PreparedClip:
    """Pick ``num_frames`` frames, crop RGB and pointmap to ``height x width``, normalize the pointmap."""
    n = len(raw.rgb)
    idx = frame_indices(n, num_frames)
    rgb = torch.from_numpy(np.ascontiguousarray(raw.rgb[idx])).permute(0, 3, 1, 2).float()
    rgb, _ = cover_crop(rgb, height, width, "bilinear")
    rgb = rgb.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    c2w = raw.cam2world[idx]
    world_to_cam0 = np.linalg.inv(raw.cam2world[0])
    rot, trans = world_to_cam0[:3, :3], world_to_cam0[:3, 3]
    cam0 = raw.points[idx] @ rot.T + trans  # (F, Hp, Wp, 3) in the first camera's frame
    if raw.K is None:
        w2c = np.linalg.inv(c2w)
        cam_f = np.einsum("fij,fhwj->fhwi", w2c[:, :3, :3], raw.points[idx]) + w2c[:, None, None, :3, 3]
        K_src, intrinsics_source = fit_intrinsics(cam_f), "fitted"
    else:
        K_src, intrinsics_source = raw.K[idx], "given"
    pts = torch.from_numpy(np.ascontiguousarray(cam0)).permute(0, 3, 1, 2)
    pts, (sx, sy, x0, y0) = cover_crop(pts, height, width, "nearest-exact")
    cam0 = pts.permute(0, 2, 3, 1).numpy()
    normalized, center, scale, half_range = normalize_pointmap(cam0)
    return PreparedClip(
        source=source,
        rgb=rgb,
        pointmap=normalized.astype(np.float32),
        center=center,
        scale=scale,
        half_range=half_range,
        cam2world=c2w,
        intrinsics=crop_intrinsics(K_src, sx, sy, x0, y0),
        intrinsics_source=intrinsics_source,
        frame_indices=idx,
        caption=raw.caption,
        number=raw.number,
        source_frames=n,
        reader=raw.reader,
    )


def metric_pointmap(pointmap: np.ndarray, center: np.ndarray, scale: float) -> np.ndarray:
    """Undo :func:`normalize_pointmap`: metric points ``(F, H, W, 3)`` in the first camera's frame."""
    return np.asarray(pointmap, np.float64) * scale + np.asarray(center, np.float64)[:, None, None, :]


# ---------------------------------------------------------------------------------------------------------------
# Cache paths and writers


def prompt_hash(prompt: str) -> str:
    """The sha256 (hex) of a prompt's UTF-8 text: the name of its embedding file."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def clip_files(clip_id: str, prompt: str) -> dict[str, str]:
    """Every cached file of a clip, relative to the cache root."""
    return {
        "video": f"videos/{clip_id}.mp4",
        "first_frame": f"first_frames/{clip_id}.png",
        "pointmap": f"pointmaps/{clip_id}.safetensors",
        "pointmap_preview": f"pointmap_previews/{clip_id}.mp4",
        "latents": f"latents/{clip_id}.safetensors",
        "clip": f"clip/{clip_id}.safetensors",
        "prompt": f"prompt/{prompt_hash(prompt)}.safetensors",
    }



def write_clip_media(out: Path, clip: PreparedClip, files: dict[str, str]) -> None:
    """The video, first frame, pointmap (+ normalization) and preview of a prepared clip."""

    for key in ("video", "first_frame", "pointmap", "pointmap_preview"):
        (out / files[key]).parent.mkdir(parents=True, exist_ok=True)
    write_video(out / files["video"], clip.rgb)
    write_png(out / files["first_frame"], clip.rgb[0])
    preview = ((clip.pointmap + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    write_video(out / files["pointmap_preview"], preview)
    write_safetensors(
        out / files["pointmap"],
        {
            "pointmap": torch.from_numpy(clip.pointmap).half(),
            "center": torch.from_numpy(clip.center),
            "scale": torch.tensor(clip.scale, dtype=torch.float64),
            "half_range": torch.from_numpy(clip.half_range),
            "cam2world0": torch.from_numpy(clip.cam2world[0]),
            "cam2world": torch.from_numpy(clip.cam2world),
            "intrinsics": torch.from_numpy(clip.intrinsics),
            "frame_indices": torch.from_numpy(clip.frame_indices),
        },
        {"frame": "first camera, OpenCV axes", "intrinsics_source": clip.intrinsics_source},
    )


def xyz_sums(xyz: torch.Tensor) -> dict:
    """Sums for the dataset statistics of one xyz latent ``(16, T, h, w)``, in float64."""
    z = xyz.double()
    return {
        "count": int(z.numel()),
        "sum": float(z.sum()),
        "sumsq": float((z * z).sum()),
        "channel_count": int(z[0].numel()),
        "channel_sum": z.sum(dim=(1, 2, 3)).tolist(),
        "channel_sumsq": (z * z).sum(dim=(1, 2, 3)).tolist(),
    }


def merge_stats(records: list[dict], config: dict) -> dict:
    """Dataset statistics of the xyz latents from the clips' sums (population mean and std)."""
    if not records:
        return {"num_clips": 0, "count": 0, "xyz_latent_mean": None, "xyz_latent_std": None, **config}
    count = sum(r["xyz_latent_sums"]["count"] for r in records)
    total = math.fsum(r["xyz_latent_sums"]["sum"] for r in records)
    total_sq = math.fsum(r["xyz_latent_sums"]["sumsq"] for r in records)
    mean = total / count
    ch_count = sum(r["xyz_latent_sums"]["channel_count"] for r in records)
    ch_sum = np.sum([r["xyz_latent_sums"]["channel_sum"] for r in records], 0)
    ch_sumsq = np.sum([r["xyz_latent_sums"]["channel_sumsq"] for r in records], 0)
    ch_mean = ch_sum / ch_count
    return {
        "xyz_latent_mean": mean,
        "xyz_latent_std": math.sqrt(max(total_sq / count - mean * mean, 0.0)),
        "xyz_latent_channel_mean": ch_mean.tolist(),
        "xyz_latent_channel_std": np.sqrt(np.maximum(ch_sumsq / ch_count - ch_mean**2, 0.0)).tolist(),
        "count": count,
        "num_clips": len(records),
        "note": "over every element of the cached xyz latents, after the VAE's own normalization",
        **config,
    }


def is_done(out: Path, clip_id: str) -> bool:
    """Whether a clip's record and every file it names exist (files are written atomically, the record last)."""
    record_path = out / "records" / f"{clip_id}.json"
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    return all((out / p).is_file() for p in record["files"].values())


@dataclass
class MergeResult:
    """What a merge found: clips done, failed and not yet processed (by any shard)."""

    done: int
    failed: int
    pending: int
    written: bool


def merge(out: str | Path, clips: list[ClipSource], config: dict) -> MergeResult:
    """Write manifest.jsonl, prompts.txt, videos.txt, failures.jsonl and stats.json once no clip is pending."""
    out = Path(out)
    records, failures, pending = [], [], 0
    for clip in clips:
        record_path = out / "records" / f"{clip.id}.json"
        failure_path = out / "failures" / f"{clip.id}.json"
        if record_path.is_file():
            records.append(json.loads(record_path.read_text()))
        elif failure_path.is_file():
            failures.append(json.loads(failure_path.read_text()))
        else:
            pending += 1
    if pending:
        return MergeResult(len(records), len(failures), pending, False)
    lines = {
        "manifest.jsonl": [json.dumps(r, sort_keys=True) for r in records],
        "prompts.txt": [r["prompt"] for r in records],
        "videos.txt": [r["files"]["video"] for r in records],
        "failures.jsonl": [json.dumps(f, sort_keys=True) for f in failures],
    }
    texts = {name: "".join(line + "\n" for line in content) for name, content in lines.items()}
    texts["stats.json"] = json.dumps(merge_stats(records, config), indent=2) + "\n"
    for name, text in texts.items():
        path = out / name
        if not path.is_file() or path.read_text() != text:  # a re-run with nothing new touches nothing
            with atomic_path(path) as tmp:
                tmp.write_text(text)
    return MergeResult(len(records), len(failures), 0, True)
