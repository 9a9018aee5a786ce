"""Rerun logging of results and registrations (rerun-sdk >= 0.41; imported only by the viewer script).

Entity layout per result ``NNNNN`` under ``world/NNNNN`` (the world is the pointmap's frame, OpenCV axes), on the
``frame`` timeline:

- ``points``: the registered colored point cloud (or the raw pointmap when there is no registration);
- ``xyz``: the unregistered pointmap as an optional layer;
- ``camera``: the camera-to-world transform; ``camera/image``: the pinhole with the RGB frame and, under
  ``camera/image/depth``, the depth image;
- ``trajectory``: the camera centers of the whole clip (static).
"""

from __future__ import annotations

import numpy as np
import rerun as rr


def _cloud(points: np.ndarray, rgb: np.ndarray, stride: int, keep: np.ndarray | None = None):
    """Every ``stride``-th pixel's point ``(N, 3)`` and color ``(N, 3)``, optionally only where ``keep`` is true."""
    points, rgb = points[::stride, ::stride].reshape(-1, 3), rgb[::stride, ::stride].reshape(-1, 3)
    if keep is not None:
        mask = keep[::stride, ::stride].reshape(-1)
        points, rgb = points[mask], rgb[mask]
    return points, rgb


def log_result(
    rec: rr.RecordingStream,
    name: str,
    rgb: np.ndarray,
    xyz: np.ndarray,
    reg: dict[str, np.ndarray] | None = None,
    stride: int = 2,
    show_xyz: bool = False,
    max_residual: float | None = None,
    radius: float = 0.004,
) -> None:
    """Log one result: ``rgb (F, H, W, 3)`` uint8, ``xyz (F, H, W, 3)`` and optionally its registration ``reg``
    (the arrays of ``NNNNN_reg.npz``; it selects the frames ``reg["frame_index"]`` of the result)."""
    root = f"world/{name}"
    rec.log("world", rr.ViewCoordinates.RDF, static=True)  # the pointmap's axes: x right, y down, z forward
    frames = reg["frame_index"] if reg is not None else np.arange(len(rgb))
    if reg is not None:
        centers = reg["cam2world"][:, :3, 3]
        rec.log(f"{root}/trajectory", rr.LineStrips3D([centers], colors=[(255, 160, 0)], radii=radius / 2), static=True)
    height, width = rgb.shape[1:3]
    for f, frame in enumerate(frames):
        rec.set_time("frame", sequence=int(frame))
        image = rgb[frame]
        if reg is None or show_xyz:
            positions, colors = _cloud(xyz[frame], image, stride)
            rec.log(f"{root}/xyz", rr.Points3D(positions, colors=colors, radii=radius))
        if reg is None:
            continue
        keep = reg["residual"][f] <= max_residual if max_residual is not None else None
        positions, colors = _cloud(reg["points"][f], image, stride, keep)
        rec.log(f"{root}/points", rr.Points3D(positions, colors=colors, radii=radius))
        pose = reg["cam2world"][f]
        rec.log(f"{root}/camera", rr.Transform3D(translation=pose[:3, 3], mat3x3=pose[:3, :3]))
        pinhole = rr.Pinhole(image_from_camera=reg["K"][f], resolution=[width, height], image_plane_distance=0.1)
        rec.log(f"{root}/camera/image", pinhole)
        rec.log(f"{root}/camera/image", rr.Image(image, opacity=1.0))  # drawn over the depth, not blended
        rec.log(f"{root}/camera/image/depth", rr.DepthImage(reg["depth"][f], meter=1.0))
