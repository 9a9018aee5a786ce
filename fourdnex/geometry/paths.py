"""Novel-view camera paths, defined relative to a registration's cameras.

Conventions (those of :mod:`fourdnex.geometry.cameras`): ``K (F, 3, 3)`` in pixels, ``cam2world (F, 4, 4)``
camera-to-world with OpenCV axes (x right, y down, z forward), in the registration's world (the pointmap's frame and
units). Frame ``f`` of ``F`` is at ``t = f / (F - 1)`` along the path.

Every path but ``fixed`` carries each registered camera by a rigid motion of the world that grows linearly from
nothing at ``t = 0`` (the first frame is seen as in the input) to its full size at ``t = 1``, and keeps the camera's K.
The motions are stated in the first camera's axes; the pivot is the scene centre, the point on the first camera's
optical axis at the scene depth ``D`` (the median depth of the first frame). The input's own camera motion is kept.

- ``orbit``: a rotation by ``t * angle`` about the first camera's y axis through the pivot; a positive angle moves
  the cameras to the first camera's right, turned so that the pivot stays where it was in each image;
- ``spiral``: a rotation by ``t * angle`` about the pivot towards a direction on the first camera's screen that
  starts to the right and turns ``turns`` times counter-clockwise: the cameras leave the input views on a widening
  spiral, the pivot staying where it was in each image;
- ``dolly``: a move by ``t * distance * D`` along the first camera's optical axis (positive: forward);
- ``fixed``: every frame seen by the first frame's camera (a locked-off view of the scene's motion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fourdnex.geometry.cameras import invert_rigid, rigid, so3_exp


@dataclass(frozen=True)
class CameraPath:
    """A novel-view camera path relative to a registration's cameras; render.py's ``--path`` and its flags. Each
    move grows linearly from nothing at the first frame to its full size at the last.
    """

    kind: str  # one of CAMERA_PATHS
    angle: float = 0.0  # degrees about the scene centre: orbit's turn (positive: to the right); spiral's radius
    turns: float = 0.0  # spiral: turns around the input view over the clip, counter-clockwise on screen
    distance: float = 0.0  # dolly: travel along the first camera's axis in scene depths (positive: forward)


#: ``--path`` choices and their defaults: moves with clear parallax that leave most of the view covered by points (on
#: bench/bench_render.py's scene 75 % of the pixels for the orbit, 89 % for the spiral, 93 % for the dolly, averaged
#: over 49 frames); the dolly ends halfway to the scene centre.
CAMERA_PATHS: dict[str, CameraPath] = {
    "orbit": CameraPath("orbit", angle=30.0),
    "spiral": CameraPath("spiral", angle=10.0, turns=2.0),
    "dolly": CameraPath("dolly", distance=0.5),
    "fixed": CameraPath("fixed"),
}
#: The CameraPath fields each kind of path uses (the rest must stay unset).
PATH_PARAMETERS: dict[str, tuple[str, ...]] = {
    "orbit": ("angle",),
    "spiral": ("angle", "turns"),
    "dolly": ("distance",),
    "fixed": (),
}


def scene_depth(depth: torch.Tensor, keep: torch.Tensor) -> float:
    """The median of the first frame's depths ``(H, W)`` where ``keep (H, W)`` is true: the pivot's depth."""
    return float(depth[keep].median())


def relative_motion(path: CameraPath, frames: int, depth: float) -> torch.Tensor:
    """The path's motions ``(F, 4, 4)`` float64 in the first camera's frame, for a scene depth ``depth``: frame ``f``'s
    new camera-to-world is ``C @ motion[f] @ C^-1 @ cam2world[f]`` with ``C`` the first camera's camera-to-world."""
    t = torch.linspace(0.0, 1.0, frames, dtype=torch.float64) if frames > 1 else torch.zeros(1, dtype=torch.float64)
    pivot = torch.tensor([0.0, 0.0, depth], dtype=torch.float64)
    if path.kind == "dolly":
        return rigid(torch.eye(3, dtype=torch.float64).expand(frames, 3, 3), t[:, None] * path.distance * pivot)
    if path.kind not in ("orbit", "spiral"):
        raise ValueError(f"relative_motion: no motion for a path of kind {path.kind!r}")
    angle = math.radians(path.angle) * t  # (F,) how far the camera has turned about the pivot
    heading = 2 * math.pi * path.turns * t if path.kind == "spiral" else torch.zeros_like(t)  # on screen, from right
    # Moving the camera along (cos h, -sin h) on screen (y is down) means turning about (sin h, cos h, 0) by -angle.
    axis = torch.stack([torch.sin(heading), torch.cos(heading), torch.zeros_like(t)], dim=-1)
    rotation = so3_exp(-angle[:, None] * axis)  # (F, 3, 3)
    return rigid(rotation, pivot - rotation @ pivot)


def camera_path(
    path: CameraPath, K: torch.Tensor, cam2world: torch.Tensor, depth: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The path's cameras ``K (F, 3, 3)``, ``cam2world (F, 4, 4)`` (float64) from the registered ones (same shapes)
    and the scene depth ``depth`` (see :func:`scene_depth`)."""
    K, cam2world = K.double(), cam2world.double()
    if path.kind == "fixed":
        return K[:1].expand_as(K).clone(), cam2world[:1].expand_as(cam2world).clone()
    first = cam2world[0]
    motion = first @ relative_motion(path, len(cam2world), depth) @ invert_rigid(first)  # (F, 4, 4) in the world
    return K.clone(), motion @ cam2world
