"""A small ray-cast scene seen by a moving pinhole camera: ground truth for registration tests and benchmarks.

The world is y-up: a room (floor at y = 0, walls, ceiling) holding a few spheres and boxes, so that every ray hits
something. The camera moves on a smooth arc around the objects with varying height, roll and (optionally) zoom.
:func:`normalize_like_inference` turns the world pointmap into the form inference produces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fourdnex.geometry.cameras import (
    camera_rays,
    intrinsics,
    invert_rigid,
    look_at,
    pixel_grid,
    rotation_angle_deg,
    transform_points,
)

ROOM = ((-6.0, 0.0, -6.0), (6.0, 5.0, 6.0))
SPHERES = (((0.0, 0.8, 0.0), 0.8), ((1.8, 0.5, 1.0), 0.5), ((-1.5, 0.6, -1.2), 0.6))
BOXES = (((-2.2, 0.0, 0.8), (-1.2, 1.2, 1.8)), ((1.0, 0.0, -2.2), (2.2, 0.7, -1.2)))
COLORS = ((200, 60, 50), (60, 160, 70), (50, 90, 200), (220, 180, 40), (160, 70, 190), (140, 140, 140))


@dataclass
class ToyScene:
    """Rendered views of the toy scene; world points in the scene's own (metric) world frame."""

    K: torch.Tensor  # (F, 3, 3)
    cam2world: torch.Tensor  # (F, 4, 4), OpenCV axes
    depth: torch.Tensor  # (F, H, W)
    points: torch.Tensor  # (F, H, W, 3) world points
    rgb: torch.Tensor  # (F, H, W, 3) uint8


def trajectory(num_frames: int, arc_deg: float = 40.0, radius: float = 4.5, seed: int = 0) -> torch.Tensor:
    """A smooth camera path ``(F, 4, 4)``: an arc around the objects with a bobbing height, drifting target and roll."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(3, generator=g, dtype=torch.float64) * 2 * math.pi
    s = torch.linspace(0.0, 1.0, num_frames, dtype=torch.float64)
    angle = math.radians(arc_deg) * (s - 0.5) + phase[0] * 0.2
    r = radius - 0.6 * torch.sin(math.pi * s)
    eye = torch.stack(
        [r * torch.sin(angle), 1.7 + 0.3 * torch.sin(2 * math.pi * s + phase[1]), -r * torch.cos(angle)], -1
    )
    target = torch.stack([0.3 * torch.sin(math.pi * s), 0.6 + 0.1 * s, 0.2 * s], -1)
    roll = torch.deg2rad(4.0 * torch.sin(2 * math.pi * s + phase[2]))
    return look_at(eye, target, roll)


def camera_intrinsics(
    num_frames: int,
    height: int,
    width: int,
    focal: float = 1.0,
    zoom: float = 0.0,
    offset: tuple[float, float] = (0.03, -0.04),
    aspect: float = 1.02,
) -> torch.Tensor:
    """``K (F, 3, 3)``: ``fx = focal * W``, ``fy = aspect * fx``, the principal point ``offset`` (fractions of W, H) off
    the center; ``zoom`` > 0 scales the focal length linearly by up to ``1 + zoom`` over the clip."""
    s = torch.linspace(0.0, 1.0, num_frames, dtype=torch.float64)
    fx = focal * width * (1 + zoom * s)
    cx = torch.full_like(fx, width * (0.5 + offset[0]))
    cy = torch.full_like(fx, height * (0.5 + offset[1]))
    return intrinsics(fx, aspect * fx, cx, cy)


def _ray_sphere(o: torch.Tensor, d: torch.Tensor, center: tuple, radius: float) -> torch.Tensor:
    """Nearest positive hit distance ``(...)`` of rays ``o, d (..., 3)`` with a sphere, ``inf`` on a miss."""
    oc = o - torch.tensor(center, dtype=o.dtype)
    a = (d * d).sum(-1)
    b = (oc * d).sum(-1)
    c = (oc * oc).sum(-1) - radius**2
    disc = b * b - a * c
    t = (-b - disc.clamp_min(0).sqrt()) / a
    return torch.where((disc > 0) & (t > 1e-6), t, torch.full_like(t, math.inf))


def _ray_box(o: torch.Tensor, d: torch.Tensor, lo: tuple, hi: tuple) -> torch.Tensor:
    """Entry distance ``(...)`` of rays with an axis-aligned box (slab test), ``inf`` on a miss."""
    inv = 1.0 / d
    t0 = (torch.tensor(lo, dtype=o.dtype) - o) * inv
    t1 = (torch.tensor(hi, dtype=o.dtype) - o) * inv
    near = torch.minimum(t0, t1).amax(-1)
    far = torch.maximum(t0, t1).amin(-1)
    return torch.where((near <= far) & (near > 1e-6), near, torch.full_like(near, math.inf))


def _ray_room(o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Exit distance ``(...)`` of rays starting inside the room."""
    lo, hi = (torch.tensor(b, dtype=o.dtype) for b in ROOM)
    return torch.where(d > 0, (hi - o) / d, (lo - o) / d).amin(-1)


def render(K: torch.Tensor, cam2world: torch.Tensor, height: int, width: int) -> ToyScene:
    """Ray-cast the scene: depth, world points and a shaded RGB image for every camera (float64 geometry)."""
    K, cam2world = K.double(), cam2world.double()
    rays = camera_rays(pixel_grid(height, width, torch.float64), K)  # (F, H, W, 3), camera z = 1
    d = rays @ cam2world[:, None, :3, :3].transpose(-1, -2)  # world directions with unit camera depth
    o = cam2world[:, None, None, :3, 3].expand_as(d)
    hits = [_ray_room(o, d)]
    hits += [_ray_sphere(o, d, c, r) for c, r in SPHERES]
    hits += [_ray_box(o, d, lo, hi) for lo, hi in BOXES]
    t, which = torch.stack(hits, -1).min(-1)
    points = o + t[..., None] * d
    rgb = _shade(points, which)
    return ToyScene(K, cam2world, t, points, rgb)


def seen_from(points: torch.Tensor, K: torch.Tensor, cam2world: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Whether the camera ``K (3, 3)``, ``cam2world (4, 4)`` of a ``height x width`` image sees each of the scene's
    surface points ``(..., 3)``: the point projects inside the image, in front, and a ray cast from the camera's centre
    towards it hits nothing nearer. Returns ``(...)`` bool."""
    flat = points.reshape(-1, 3).double()
    K, cam2world = K.double(), cam2world.double()
    cam = (flat - cam2world[:3, 3]) @ cam2world[:3, :3]  # (N, 3) camera frame
    u = K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2]
    v = K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]
    inside = (cam[:, 2] > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    # One single-pixel camera per point, looking straight at it: its depth is the distance to the first hit.
    eye = cam2world[:3, 3].expand_as(flat)
    one = torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=torch.float64).expand(len(flat), 4)
    hit = render(intrinsics(*one.unbind(-1)), look_at(eye, flat), 1, 1).depth.reshape(-1)
    unoccluded = hit >= (flat - eye).norm(dim=-1) * (1 - 1e-7)
    return (inside & unoccluded).reshape(points.shape[:-1])


def _shade(points: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """A checkered room and flat-colored objects with a light/dark pattern, as ``(..., 3)`` uint8."""
    colors = torch.tensor(((225, 215, 200), *COLORS), dtype=torch.float64)
    base = colors[which.clamp_max(len(COLORS))]
    # The offset keeps faces that lie on a check boundary (the floor at y = 0, walls at x = +-6) on one side of it;
    # without it rounding flips their checks from pixel to pixel.
    checker = (torch.floor(points / 0.5 + 1e-9).sum(-1) % 2)[..., None]
    shade = torch.where(which[..., None] == 0, 0.65 + 0.35 * checker, 0.8 + 0.2 * checker)
    return (base * shade).round().clamp(0, 255).to(torch.uint8)


def normalize_like_inference(points: torch.Tensor, cam2world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World points ``(F, H, W, 3)`` -> the pointmap inference produces, ``(F, H, W, 3)`` in [-1, 1], and the 4x4
    similarity ``(4, 4)`` that maps world points to it (used to bring ground-truth cameras into the same frame).

    As in training data: points moved into the first camera's frame, centered (midpoint of the min/max over the clip)
    and divided by the largest half-range.
    """
    world2first = invert_rigid(cam2world[:1])[0]
    first = transform_points(world2first[None].expand(points.shape[0], -1, -1), points)
    lo, hi = first.reshape(-1, 3).amin(0), first.reshape(-1, 3).amax(0)
    center, scale = (lo + hi) / 2, ((hi - lo) / 2).max()
    similarity = torch.eye(4, dtype=points.dtype)
    similarity[:3, :3] = world2first[:3, :3] / scale
    similarity[:3, 3] = (world2first[:3, 3] - center) / scale
    return (first - center) / scale, similarity


def perturb(xyz: torch.Tensor, noise: float, warp: float, seed: int = 0) -> torch.Tensor:
    """A generator-like corruption of a normalized pointmap ``(F, H, W, 3)``: i.i.d. Gaussian noise of std ``noise``
    plus a smooth warp (low-frequency sinusoids over image and time) of amplitude ``warp``; both in pointmap units."""
    g = torch.Generator().manual_seed(seed)
    frames, height, width, _ = xyz.shape
    out = xyz + noise * torch.randn(xyz.shape, generator=g, dtype=xyz.dtype)
    if warp > 0:
        s = torch.linspace(0, 1, frames, dtype=xyz.dtype)[:, None, None]
        y = torch.linspace(0, 1, height, dtype=xyz.dtype)[None, :, None]
        x = torch.linspace(0, 1, width, dtype=xyz.dtype)[None, None, :]
        for axis in range(3):
            freq = 0.5 + 1.5 * torch.rand(3, generator=g, dtype=xyz.dtype)
            phase = 2 * math.pi * torch.rand(3, generator=g, dtype=xyz.dtype)
            field = torch.sin(2 * math.pi * freq[0] * x + phase[0]) * torch.cos(2 * math.pi * freq[1] * y + phase[1])
            out[..., axis] += warp * field * torch.cos(math.pi * freq[2] * s + phase[2])
    return out


@dataclass
class ToyTruth:
    """A pointmap as inference writes it and its ground-truth cameras, moved into the pointmap's frame."""

    xyz: torch.Tensor  # (F, H, W, 3) float32 in [-1, 1]
    K: torch.Tensor  # (F, 3, 3)
    cam2world: torch.Tensor  # (F, 4, 4) rigid, OpenCV axes, in the pointmap's frame
    depth: torch.Tensor  # (F, H, W) in pointmap units
    rgb: torch.Tensor  # (F, H, W, 3) uint8

    def frames(self, index) -> ToyTruth:
        """The truth of some frames only."""
        return ToyTruth(self.xyz[index], self.K[index], self.cam2world[index], self.depth[index], self.rgb[index])


def truth_of(scene: ToyScene) -> ToyTruth:
    """Normalize a rendered scene like inference does and move its cameras into the same frame."""
    xyz, similarity = normalize_like_inference(scene.points, scene.cam2world)
    scale = similarity[:3, :3].norm(dim=0)[0]
    cam2world = similarity[None] @ scene.cam2world
    cam2world[:, :3, :3] /= scale
    return ToyTruth(xyz.float(), scene.K, cam2world, scene.depth * scale, scene.rgb)


def make_truth(
    frames: int = 5, height: int = 48, width: int = 64, focal: float = 1.0, zoom: float = 0.0, seed: int = 0, **kwargs
) -> ToyTruth:
    """The toy scene along its default trajectory (``kwargs`` go to :func:`camera_intrinsics`), normalized."""
    K = camera_intrinsics(frames, height, width, focal, zoom, **kwargs)
    return truth_of(render(K, trajectory(frames, seed=seed), height, width))


def registration_errors(
    truth: ToyTruth, K: torch.Tensor, cam2world: torch.Tensor, depth: torch.Tensor
) -> dict[str, float]:
    """Errors of fitted cameras against the truth, worst over frames: ``focal`` (relative, fx and fy), ``principal``
    (pixels), ``rotation`` (degrees), ``center`` (fraction of the pointmap's extent, 2); and ``depth``, the mean
    relative depth error over all pixels."""
    K, cam2world, depth = K.double().cpu(), cam2world.double().cpu(), depth.double().cpu()
    diag = truth.K[:, [0, 1], [0, 1]]
    errs = {
        "focal": ((K[:, [0, 1], [0, 1]] - diag) / diag).abs().max(),
        "principal": (K[:, :2, 2] - truth.K[:, :2, 2]).abs().max(),
        "rotation": rotation_angle_deg(cam2world[:, :3, :3], truth.cam2world[:, :3, :3]).max(),
        "center": (cam2world[:, :3, 3] - truth.cam2world[:, :3, 3]).norm(dim=-1).max() / 2,
        "depth": ((depth - truth.depth) / truth.depth).abs().mean(),
    }
    return {k: float(v) for k, v in errs.items()}
