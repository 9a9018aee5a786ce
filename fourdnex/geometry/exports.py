"""Exports of a registered result for other tools, all written atomically into one folder:

- ``images/frame_NNNNN.png``: the RGB frames the camera files refer to;
- ``ply/frame_NNNNN.ply``: per-frame colored point clouds in one world frame (binary PLY, via plyfile);
- ``transforms.json``: nerfstudio's convention (camera-to-world in OpenGL axes, intrinsics in pixels);
- ``colmap/{cameras,images,points3D}.txt``: COLMAP's text model (PINHOLE cameras, world-to-camera poses);
- ``depth/frame_NNNNN.png`` (16-bit, depth = value * ``depth_scale``) or ``.npy`` (float32), with
  ``cameras.json`` / ``cameras.npz`` holding K, camera-to-world (OpenCV axes) and the depth scale, e.g. for a
  novel-view renderer such as TrajectoryCrafter.

Arrays are numpy: ``K (F, 3, 3)``, ``cam2world (F, 4, 4)`` OpenCV axes, ``depth (F, H, W)``, ``points (F, H, W, 3)``,
``rgb (F, H, W, 3)`` uint8. ``frame_index (F,)`` names the files (the source video's frame numbers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fourdnex.files import atomic_path, write_json, write_npy, write_npz, write_png, write_text
from fourdnex.geometry.cameras import rotation_to_quaternion

EXPORTS = ("ply", "colmap", "nerfstudio", "depth")
DEPTH_FORMATS = ("png16", "npy")
#: OpenCV camera axes (x right, y down, z forward) -> OpenGL's (x right, y up, z back): flip y and z.
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


def frame_name(index: int) -> str:
    """The file stem of frame ``index`` in every export."""
    return f"frame_{index:05d}"


def write_ply(path: str | Path, points: np.ndarray, colors: np.ndarray) -> None:
    """A binary PLY of ``points (N, 3)`` float32 with ``colors (N, 3)`` uint8, atomically."""
    from plyfile import PlyData, PlyElement

    vertex = np.empty(len(points), dtype=[(n, "f4") for n in "xyz"] + [(n, "u1") for n in ("red", "green", "blue")])
    for i, n in enumerate("xyz"):
        vertex[n] = points[:, i]
    for i, n in enumerate(("red", "green", "blue")):
        vertex[n] = colors[:, i]
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp))


def export_images(out: Path, rgb: np.ndarray, frame_index: np.ndarray) -> list[str]:
    """Write the RGB frames; returns their paths relative to ``out``."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = [f"images/{frame_name(i)}.png" for i in frame_index]
    for name, frame in zip(names, rgb, strict=True):
        write_png(out / name, frame)
    return names


def export_ply(out: Path, points: np.ndarray, rgb: np.ndarray, frame_index: np.ndarray, stride: int = 1) -> None:
    """Per-frame point clouds, every ``stride``-th pixel along rows and columns."""
    (out / "ply").mkdir(parents=True, exist_ok=True)
    for i, p, c in zip(frame_index, points, rgb, strict=True):
        write_ply(
            out / "ply" / f"{frame_name(i)}.ply",
            p[::stride, ::stride].reshape(-1, 3),
            c[::stride, ::stride].reshape(-1, 3),
        )


def _shared(K: np.ndarray) -> bool:
    """Whether every frame has the same intrinsics."""
    return bool(np.allclose(K, K[:1], rtol=1e-6, atol=0))


def export_nerfstudio(
    out: Path,
    K: np.ndarray,
    cam2world: np.ndarray,
    size: tuple[int, int],
    images: list[str],
    depths: list[str] | None = None,
    depth_scale: float | None = None,
) -> None:
    """``transforms.json`` in nerfstudio's convention (shared intrinsics at the top level, else per frame)."""
    height, width = size

    def intrinsics(k: np.ndarray) -> dict:
        return {"fl_x": float(k[0, 0]), "fl_y": float(k[1, 1]), "cx": float(k[0, 2]), "cy": float(k[1, 2])}

    shared = _shared(K)
    meta: dict = {"camera_model": "OPENCV", "w": width, "h": height}
    if shared:
        meta.update(intrinsics(K[0]))
    if depth_scale is not None:
        meta["depth_unit_scale_factor"] = depth_scale
    frames = []
    for f, name in enumerate(images):
        frame = {"file_path": name, "transform_matrix": (cam2world[f] @ OPENCV_TO_OPENGL).tolist()}
        if not shared:
            frame.update(intrinsics(K[f]))
        if depths is not None:
            frame["depth_file_path"] = depths[f]
        frames.append(frame)
    meta["frames"] = frames
    write_json(out / "transforms.json", meta)


def export_colmap(out: Path, K: np.ndarray, cam2world: np.ndarray, size: tuple[int, int], images: list[str]) -> None:
    """COLMAP's text model: ``cameras.txt`` (PINHOLE fx fy cx cy; one camera when intrinsics are shared),
    ``images.txt`` (world-to-camera ``QW QX QY QZ TX TY TZ``) and an empty ``points3D.txt``. Image names are
    relative to ``out/images``."""
    height, width = size
    folder = out / "colmap"
    folder.mkdir(parents=True, exist_ok=True)
    cams = K[:1] if _shared(K) else K
    lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    lines += [
        f"{c + 1} PINHOLE {width} {height} {k[0, 0]:.10g} {k[1, 1]:.10g} {k[0, 2]:.10g} {k[1, 2]:.10g}"
        for c, k in enumerate(cams)
    ]
    write_text(folder / "cameras.txt", "\n".join(lines) + "\n")
    world2cam = np.linalg.inv(cam2world)
    quats = rotation_to_quaternion(torch.from_numpy(world2cam[:, :3, :3])).numpy()
    lines = [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)",
    ]
    for f, name in enumerate(images):
        q, t = quats[f], world2cam[f, :3, 3]
        camera = 1 if len(cams) == 1 else f + 1
        pose = " ".join(f"{x:.12g}" for x in (*q, *t))
        lines.append(f"{f + 1} {pose} {camera} {Path(name).name}")
        lines.append("")
    write_text(folder / "images.txt", "\n".join(lines) + "\n")
    write_text(folder / "points3D.txt", "# 3D point list (empty: the dense points are in ply/)\n")


def export_depth(
    out: Path,
    depth: np.ndarray,
    K: np.ndarray,
    cam2world: np.ndarray,
    frame_index: np.ndarray,
    depth_format: str = "png16",
) -> tuple[list[str], float | None]:
    """Per-frame depth plus ``cameras.json`` and ``cameras.npz``; returns the depth paths and the PNG depth scale.

    16-bit PNGs store ``round(depth / depth_scale)`` with ``depth_scale = max depth / 65535``; 0 marks pixels with
    no valid (positive) depth.
    """
    if depth_format not in DEPTH_FORMATS:
        raise ValueError(f"depth_format must be one of {DEPTH_FORMATS}, got {depth_format!r}")
    (out / "depth").mkdir(parents=True, exist_ok=True)
    suffix = ".png" if depth_format == "png16" else ".npy"
    names = [f"depth/{frame_name(i)}{suffix}" for i in frame_index]
    scale = None
    if depth_format == "png16":
        scale = float(max(depth.max(), 1e-12)) / 65535
        for name, d in zip(names, depth, strict=True):
            write_png(out / name, np.clip(np.round(d / scale), 0, 65535).astype(np.uint16))
    else:
        for name, d in zip(names, depth, strict=True):
            write_npy(out / name, d.astype(np.float32))
    height, width = depth.shape[1:]
    frames = [{"depth": name, "K": K[f].tolist(), "cam2world": cam2world[f].tolist()} for f, name in enumerate(names)]
    meta = {"width": width, "height": height, "axes": "opencv", "depth_scale": scale, "frames": frames}
    write_json(out / "cameras.json", meta)
    write_npz(
        out / "cameras.npz",
        K=K.astype(np.float32),
        cam2world=cam2world.astype(np.float32),
        frame_index=frame_index,
        depth_scale=np.float32(scale or 1.0),
    )
    return names, scale


def export_all(
    out: str | Path, kinds: list[str], reg: dict, rgb: np.ndarray, depth_format: str = "png16", ply_stride: int = 1
) -> None:
    """Write the ``kinds`` of :data:`EXPORTS` for a registration ``reg`` (the arrays of ``NNNNN_reg.npz``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    K, cam2world, frame_index = reg["K"].astype(np.float64), reg["cam2world"].astype(np.float64), reg["frame_index"]
    size = reg["depth"].shape[1:]
    images = export_images(out, rgb, frame_index) if {"colmap", "nerfstudio"} & set(kinds) else []
    depths, scale = (
        export_depth(out, reg["depth"], K, cam2world, frame_index, depth_format) if "depth" in kinds else (None, None)
    )
    if "ply" in kinds:
        export_ply(out, reg["points"], rgb, frame_index, ply_stride)
    if "colmap" in kinds:
        export_colmap(out, K, cam2world, size, images)
    if "nerfstudio" in kinds:
        export_nerfstudio(out, K, cam2world, size, images, depths if depth_format == "png16" else None, scale)
