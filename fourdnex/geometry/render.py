"""Novel views of a registered result: its coloured points seen from new cameras by z-buffered splatting.

Conventions (those of :mod:`fourdnex.geometry.cameras`): ``K (3, 3)`` in pixels, camera-to-world ``(4, 4)`` with
OpenCV axes (x right, y down, z forward), pixel ``(row i, column j)`` centred at ``(j + 0.5, i + 0.5)``, depth is
camera-frame z. A frame's points ``(N, 3)`` are in its registration's world (the pointmap's frame and units), with
colours ``(N, 3)`` uint8 (the result's RGB) and footprints ``(N, 2)`` in world units.

The splat of one frame (:func:`splat`), in pure torch on any device:

1. footprint: a pixel seen at depth ``z_src`` by a source camera of focal lengths ``(fx, fy)`` is a patch of about
   ``z_src / fx`` by ``z_src / fy`` world units (:func:`footprints`); seen at depth ``z`` by a new camera of focal
   lengths ``(fx', fy')`` it spans ``fx' z_src / (fx z)`` by ``fy' z_src / (fy z)`` pixels. The splat is a rectangle
   :data:`SPLAT_SCALE` times that size (at least one pixel), so that neighbouring splats overlap where the new
   camera sees a surface more squarely than the source did;
2. coverage: the point's rectangle, centred on its projection, covers the pixels whose centres lie inside it (half
   open: a side ``s`` covers ``floor(s)`` or ``ceil(s)`` pixels, a side of one exactly the pixel the point falls in),
   clipped to the image; each covered pixel makes one (point, pixel) pair;
3. z-buffer: a pair's key is ``float32 bits of z << 32 | point index`` (the bits of positive floats sort like the
   floats), and ``scatter_reduce(amin)`` keeps the nearest point of every pixel (ties: the lower index); its colour
   and depth are read back from the key. Pixels no rectangle covers form the mask: what an inpainting model must fill.

Pairs are made in chunks of about :data:`CHUNK_PAIRS`, so memory stays bounded however large the rectangles grow.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fourdnex.errors import FourDNeXError
from fourdnex.files import write_json, write_png, write_video
from fourdnex.geometry.cameras import project_points
from fourdnex.geometry.exports import export_depth, frame_name
from fourdnex.geometry.paths import CameraPath, camera_path, scene_depth
from fourdnex.geometry.results import load_registration, registration_path
from fourdnex.runtime import cpu_threads

#: (point, pixel) pairs per chunk: about 70 bytes of temporaries per pair, so near 300 MB at most however large the
#: rectangles grow (a point close to the new camera covers many pixels). A 480 x 720 frame makes 1 to 3.4 pairs per
#: point (1 from its own camera, 3.4 for a dolly 0.8 of the way to the pivot; measured), so it is one chunk.
CHUNK_PAIRS = 1 << 22
#: Splat sides are this many times the source pixel's footprint, so that the rectangles of neighbouring points
#: overlap: a surface the new camera sees more squarely than the source did stays closed. Measured on the toy scene
#: against ray-cast views (bench/bench_render.py, BENCHMARKS.md): 1.0 leaves holes in 6-14 % of the image for
#: moderate moves, 1.5 in 0.4-6 %, 2.0 in 0.01-2.7 %; larger rectangles move edges towards the nearer point, costing
#: up to 1.8 dB of PSNR at 1.5 and 3.5 dB at 2.0 against the best scale of each view.
SPLAT_SCALE = 1.5
EMPTY = torch.iinfo(torch.int64).max


class RenderError(FourDNeXError, ValueError):
    """A result, registration or camera path that cannot be rendered; the message names it and what is wrong."""


@dataclass
class NovelViews:
    """Rendered frames of one result (CPU tensors)."""

    rgb: torch.Tensor  # (F, H, W, 3) uint8, black where no point lands
    depth: torch.Tensor  # (F, H, W) float32 camera-frame z, 0 where no point lands
    mask: torch.Tensor  # (F, H, W) bool, True where no point lands

    def coverage(self) -> torch.Tensor:
        """``(F,)`` the fraction of each frame's pixels some point covers."""
        return 1.0 - self.mask.flatten(1).double().mean(1)


def footprints(depth: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """World extents ``(F, H, W, 2)`` (along x and y) of the pixels of source cameras ``K (F, 3, 3)`` at depths
    ``depth (F, H, W)``: ``depth / fx`` and ``depth / fy``."""
    focal = K[:, [0, 1], [0, 1]].to(depth.dtype)  # (F, 2)
    return depth[..., None] / focal[:, None, None, :]


def splat(
    points: torch.Tensor,
    colors: torch.Tensor,
    extent: torch.Tensor,
    K: torch.Tensor,
    cam2world: torch.Tensor,
    height: int,
    width: int,
    scale: float = SPLAT_SCALE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render points ``(N, 3)`` with colours ``(N, 3)`` uint8 and world footprints ``extent (N, 2)`` from the camera
    ``K (3, 3)``, ``cam2world (4, 4)`` at ``height x width``: returns colours ``(H, W, 3)`` uint8, depth ``(H, W)``
    float32 and the mask ``(H, W)`` bool of pixels no point covers (black and depth 0 there). See the module's
    docstring for the method; every tensor stays on the points' device."""
    device = points.device
    if len(points) == 0:
        empty = torch.zeros((height, width), dtype=torch.float32, device=device)
        return empty.to(torch.uint8)[..., None].expand(-1, -1, 3), empty, empty == 0
    uv, z = project_points(points[None], K[None], cam2world[None])
    uv, z = uv[0], z[0]  # (N, 2), (N,)
    focal = K[[0, 1], [0, 1]].to(z.dtype)
    half = (scale * focal * extent.to(z.dtype) / z[:, None]).clamp_min(1.0) / 2  # (N, 2) half sides in pixels
    size = torch.tensor([width, height], dtype=z.dtype, device=device)
    lo, hi = uv - half - 0.5, uv + half - 0.5  # the covered centres' indices are the integers in [lo, hi)
    valid = (z > 0) & torch.isfinite(lo).all(-1) & torch.isfinite(hi).all(-1)
    first = torch.where(valid[:, None], lo, 0).clamp(torch.zeros_like(size), size).ceil().long()  # (N, 2) col, row
    last = torch.where(valid[:, None], hi, 0).clamp(torch.zeros_like(size), size).ceil().long()  # exclusive
    span = last - first  # (N, 2) covered columns and rows, 0 off screen
    count = span[:, 0] * span[:, 1]  # (N,) pairs per point
    base = first[:, 1] * width + first[:, 0]  # (N,) the top-left covered pixel
    key = (z.float().view(torch.int32).long() << 32) | torch.arange(len(z), device=device)  # (N,)

    zbuf = torch.full((height * width,), EMPTY, dtype=torch.int64, device=device)
    end = count.cumsum(0)  # (N,) pairs up to and including each point
    start = end - count
    cuts = torch.arange(1, int(end[-1]) // CHUNK_PAIRS + 1, device=device) * CHUNK_PAIRS
    bounds = [0, *torch.searchsorted(end, cuts, right=True).tolist(), len(count)]
    for lo_point, hi_point in itertools.pairwise(bounds):
        owner = torch.repeat_interleave(count[lo_point:hi_point]) + lo_point  # (P,) the point of each pair
        k = torch.arange(len(owner), device=device) + start[lo_point] - start[owner]  # (P,) index in the rectangle
        cols = span[owner, 0]
        row = k // cols
        pixel = base[owner] + row * width + (k - row * cols)  # (P,)
        zbuf.scatter_reduce_(0, pixel, key[owner], "amin")

    hit = zbuf != EMPTY  # (H W,)
    index = torch.where(hit, zbuf & 0xFFFFFFFF, 0)
    rgb = torch.where(hit[:, None], colors[index], 0).to(torch.uint8)
    depth = torch.where(hit, (zbuf >> 32).to(torch.int32).view(torch.float32), 0.0)
    return rgb.view(height, width, 3), depth.view(height, width), ~hit.view(height, width)


def render_frames(
    points: torch.Tensor,
    colors: torch.Tensor,
    depth: torch.Tensor,
    K_src: torch.Tensor,
    keep: torch.Tensor,
    K: torch.Tensor,
    cam2world: torch.Tensor,
    scale: float = SPLAT_SCALE,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> NovelViews:
    """Render every frame's registered points ``(F, H, W, 3)`` with colours ``(F, H, W, 3)`` uint8, seen at depths
    ``depth (F, H, W)`` by source cameras ``K_src (F, 3, 3)``, where ``keep (F, H, W)``, from the frame's new camera
    ``K (F, 3, 3)``, ``cam2world (F, 4, 4)`` at the input's size; one frame at a time on ``device``, with a progress
    bar titled ``desc`` when given; on one thread on a CPU (:func:`fourdnex.runtime.cpu_threads`). Returns CPU
    tensors.
    """
    frames, height, width = keep.shape
    rgb = torch.empty((frames, height, width, 3), dtype=torch.uint8)
    out_depth = torch.empty((frames, height, width), dtype=torch.float32)
    mask = torch.empty((frames, height, width), dtype=torch.bool)
    with cpu_threads(1, device, blas=False):
        for f in tqdm(range(frames), desc=desc, disable=desc is None):
            sel = keep[f].to(device)
            extent = footprints(depth[f : f + 1].to(device), K_src[f : f + 1].to(device))[0]  # (H, W, 2)
            views = splat(
                points[f].to(device)[sel],
                colors[f].to(device)[sel],
                extent[sel],
                K[f].to(device),
                cam2world[f].to(device),
                height,
                width,
                scale,
            )
            rgb[f], out_depth[f], mask[f] = (x.cpu() for x in views)
    return NovelViews(rgb, out_depth, mask)


def find_registration(result_path: str | Path, reg_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """The registration of a result (``NNNNN_reg.npz`` beside it, or in ``reg_dir``); raises RenderError naming the
    pm_registration.py command to run when there is none."""
    reg_path = registration_path(result_path, reg_dir)
    if not reg_path.exists():
        out = f" --out_dir {reg_dir}" if reg_dir else ""
        raise RenderError(
            f"{result_path}: no registration {reg_path}; run: python pm_registration.py --pkl_dir {result_path}{out}"
        )
    return load_registration(reg_path)


def _matrix(value, shape: tuple[int, int], where: str) -> torch.Tensor:
    """A JSON nested list as a float64 tensor of ``shape``; RenderError naming ``where`` otherwise."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise RenderError(f"{where} must be {shape} numbers, got {value!r}") from err
    if array.shape != shape:
        raise RenderError(f"{where} must be {shape} numbers, got {array.shape}")
    if not np.isfinite(array).all():
        raise RenderError(f"{where} must be {shape} finite numbers, got {array.tolist()}")
    return torch.from_numpy(array)


def load_path(path: str | Path, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras ``K (F, 3, 3)``, ``cam2world (F, 4, 4)`` (float64) from a path file in the format of the
    ``cameras.json`` this module and pm_registration.py's depth export write: ``{"frames": [{"K": 3x3, "cam2world":
    4x4}, ...]}`` with camera-to-world in OpenCV axes in the registration's world, and optionally ``"width"``,
    ``"height"`` (they must be the input's) and ``"axes": "opencv"``. ``frames`` holds ``F`` cameras, or one for
    every frame. Raises RenderError naming the key and the expected shape."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RenderError(f"{path}: not a readable JSON file ({err})") from err
    cameras = data.get("frames") if isinstance(data, dict) else None
    if not isinstance(cameras, list) or len(cameras) not in (1, frames):
        got = f"{len(cameras)} cameras" if isinstance(cameras, list) else "no list"
        raise RenderError(
            f'{path}: "frames" must be a list of {frames} cameras (or 1 for all frames), each'
            f' {{"K": (3, 3), "cam2world": (4, 4)}}; got {got}'
        )
    for key, expected in (("width", width), ("height", height)):
        if key in data and data[key] != expected:
            raise RenderError(f'{path}: "{key}" is {data[key]!r}, but the input is {expected} pixels')
    if data.get("axes", "opencv") != "opencv":
        raise RenderError(f'{path}: "axes" must be "opencv" (x right, y down, z forward), got {data["axes"]!r}')
    Ks, poses = [], []
    for i, camera in enumerate(cameras):
        if not isinstance(camera, dict):
            raise RenderError(f'{path}: frames[{i}] must be {{"K": (3, 3), "cam2world": (4, 4)}}, got {camera!r}')
        Ks.append(_matrix(camera.get("K"), (3, 3), f"{path}: frames[{i}].K"))
        pose = _matrix(camera.get("cam2world"), (4, 4), f"{path}: frames[{i}].cam2world")
        rotation = pose[:3, :3]
        orthonormal = torch.allclose(rotation @ rotation.T, torch.eye(3, dtype=torch.float64), atol=1e-4)
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
        if not orthonormal or torch.det(rotation) < 0 or not torch.equal(pose[3], bottom):
            raise RenderError(
                f"{path}: frames[{i}].cam2world must be rigid: a rotation (R R^T = I, det 1) and last row 0 0 0 1"
            )
        poses.append(pose)
    K, cam2world = torch.stack(Ks), torch.stack(poses)
    return K.expand(frames, 3, 3).clone(), cam2world.expand(frames, 4, 4).clone()


def render_result(
    rgb: np.ndarray,
    reg: dict[str, np.ndarray],
    path: CameraPath | Path,
    max_residual: float | None = None,
    scale: float = SPLAT_SCALE,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> tuple[NovelViews, torch.Tensor, torch.Tensor, dict]:
    """Novel views of one result: its RGB video ``(F_all, H, W, 3)`` uint8 and registration ``reg`` (the arrays of
    ``NNNNN_reg.npz``, which pick the frames ``reg["frame_index"]``), seen along ``path`` (a generated path or a path
    file, see :func:`load_path`), leaving out points whose registration residual exceeds ``max_residual``.

    Returns the views, the new cameras ``K (F, 3, 3)``, ``cam2world (F, 4, 4)`` (float64) and a few facts for the
    record (scene depth, the fraction of points kept, coverage). Raises RenderError naming the first frame (its
    number in the result) in whose view no point lands.
    """
    frame_index = reg["frame_index"]
    depth = torch.from_numpy(reg["depth"])
    frames, height, width = depth.shape
    if rgb.shape[1:3] != (height, width) or frame_index.max() >= len(rgb):
        raise RenderError(f"the registration ({frames} frames of {height}x{width}) does not fit the result {rgb.shape}")
    keep = depth > 0
    if max_residual is not None:
        keep &= torch.from_numpy(reg["residual"]) <= max_residual
    if not keep[0].any():
        raise RenderError(
            f"frame {frame_index[0]}: no point kept (positive depth, residual <= {max_residual}); the scene centre"
            " is taken from this frame"
        )
    K_src, cam2world_src = torch.from_numpy(reg["K"]), torch.from_numpy(reg["cam2world"])
    info: dict = {"points_kept": float(keep.double().mean())}
    if isinstance(path, CameraPath):
        info["scene_depth"] = scene_depth(depth[0], keep[0])
        K, cam2world = camera_path(path, K_src, cam2world_src, info["scene_depth"])
    else:
        K, cam2world = load_path(path, frames, height, width)
    colors = torch.from_numpy(rgb[frame_index])
    points = torch.from_numpy(reg["points"])
    views = render_frames(points, colors, depth, K_src, keep, K, cam2world, scale, device, desc)
    coverage = views.coverage()
    if (coverage == 0).any():
        frame = int(frame_index[int((coverage == 0).nonzero()[0])])
        raise RenderError(f"frame {frame}: no point lands in the new camera's view")
    info["coverage"] = {"mean": float(coverage.mean()), "min": float(coverage.min())}
    return views, K, cam2world, info


def write_novel_views(
    out: str | Path,
    views: NovelViews,
    input_rgb: np.ndarray,
    K: np.ndarray,
    cam2world: np.ndarray,
    frame_index: np.ndarray,
    depth_format: str = "png16",
    meta: dict | None = None,
) -> None:
    """Write one result's novel views into ``out`` (the files are documented in README.md, "Novel views"), each
    atomically, ``render.json`` last: the views ``(F, H, W, ...)``, the input frames ``(F, H, W, 3)`` uint8 for the
    preview, the new cameras ``K (F, 3, 3)``, ``cam2world (F, 4, 4)`` and the result's ``frame_index (F,)``."""
    out = Path(out)
    (out / "mask").mkdir(parents=True, exist_ok=True)
    rgb = views.rgb.numpy()
    write_video(out / "novel.mp4", rgb)
    write_video(out / "preview.mp4", np.concatenate([input_rgb, rgb], axis=2))
    for index, mask in zip(frame_index, views.mask.numpy(), strict=True):
        write_png(out / "mask" / f"{frame_name(index)}.png", mask.astype(np.uint8) * 255)
    export_depth(out, views.depth.numpy(), K, cam2world, frame_index, depth_format)
    write_json(out / "render.json", meta or {})
