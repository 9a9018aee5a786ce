"""How a described synthetic scene is seen: its surfaces' textures, its objects' motion, and the analytic ray cast of
one frame. What scenes are drawn, and how they are written as clips, is :mod:`fourdnex.data.synthetic`.

Conventions (those of :mod:`fourdnex.geometry.cameras`): world y up, ground plane y = 0, metres; ``cam2world``
(4, 4) camera-to-world with OpenCV axes; ``K`` (3, 3) with pixel (row i, column j) looking through its centre
(j + 0.5, i + 0.5); depth is the hit point's z in the camera frame.

Every surface carries a :class:`Texture`: two colours mixed by a pattern of one of :data:`TEXTURE_FAMILIES`,
evaluated in 3D on the surface's points (world points for the ground and walls; an object's own frame for objects,
so their texture moves with them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fourdnex.geometry.cameras import camera_rays, pixel_grid, so3_exp

#: The patterns that mix a surface's two colours: a 3D checkerboard, parallel stripes, smooth mottled noise, one
#: colour, a slow ramp from one colour to the other.
TEXTURE_FAMILIES = ("checkers", "stripes", "noise", "plain", "gradients")
#: Object shapes.
Shape = Literal["sphere", "box", "ellipsoid", "cylinder"]


@dataclass
class Texture:
    """Two colours mixed by a pattern of ``family`` with period ``scale`` (metres), turned by ``rotation`` and
    shifted by ``offset`` (in periods)."""

    family: str
    color1: np.ndarray  # (3,) in [0, 1]
    color2: np.ndarray  # (3,)
    scale: float
    rotation: np.ndarray  # (3, 3)
    offset: np.ndarray  # (3,)

    def albedo(self, p: torch.Tensor) -> torch.Tensor:
        """The surface colour at points ``p`` ``(..., 3)`` (metres, in the texture's frame): ``(..., 3)``."""
        f32 = p.dtype
        q = p @ torch.from_numpy(self.rotation.T).to(f32) / self.scale + torch.from_numpy(self.offset).to(f32)
        if self.family == "checkers":
            mix = torch.remainder(torch.floor(q).sum(-1), 2.0)
        elif self.family == "stripes":
            mix = torch.remainder(torch.floor(q[..., 0]), 2.0)
        elif self.family == "noise":
            mix = (0.5 + 0.5 * _noise3(q)).clamp(0.0, 1.0)
        elif self.family == "gradients":
            mix = 0.5 + 0.5 * torch.sin(q[..., 0] * (math.pi / 4.0))
        elif self.family == "plain":
            mix = torch.zeros_like(q[..., 0])
        else:
            raise ValueError(f"texture family must be one of {TEXTURE_FAMILIES}, got {self.family!r}")
        c1, c2 = (torch.from_numpy(c).to(f32) for c in (self.color1, self.color2))
        return c1 + (c2 - c1) * mix[..., None]


def _noise3(q: torch.Tensor) -> torch.Tensor:
    """Smooth procedural noise in about [-1, 1] from a few sinusoids of the 3D point ``q`` ``(..., 3)``."""
    x, y, z = q.unbind(-1)
    return (
        torch.sin(1.7 * x + 0.4) * torch.sin(1.3 * y + 2.1) * torch.sin(1.1 * z + 0.9)
        + 0.5 * torch.sin(4.1 * x - 3.1 * y + 2.7 * z)
        + 0.25 * torch.sin(9.3 * x + 7.7 * y - 5.3 * z + 1.3)
    ) / 1.1


@dataclass
class SceneObject:
    """One primitive; its pose and size are functions of time in seconds."""

    shape: Shape
    color_name: str
    texture: Texture
    size: np.ndarray  # sphere: (r,); box: half extents (3,); ellipsoid: radii (3,); cylinder: (r, half height, r)
    start: np.ndarray  # (3,) position at t = 0 (x, z on the ground)
    velocity: np.ndarray  # (3,) ground velocity in m/s (y = 0)
    spin: float  # rad/s about y (box, ellipsoid, cylinder)
    bounce: float  # sphere: bounce height in m
    pulse: float  # ellipsoid: squash-and-stretch amplitude
    phase: float
    moving: bool

    def pose(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(center (3,), local-to-world rotation (3, 3), size (3,)) at time ``t``."""
        if not self.moving:
            t = 0.0
        pos = self.start + self.velocity * t
        size = np.broadcast_to(self.size, (3,)).astype(np.float64).copy()
        if self.shape == "sphere":
            # Rolling without slipping: rotate about the horizontal axis perpendicular to the motion.
            speed = float(np.linalg.norm(self.velocity))
            axis = np.array([self.velocity[2], 0.0, -self.velocity[0]]) / max(speed, 1e-9)
            rot = so3_exp(axis * (speed * t / size[0])) if speed > 1e-9 else np.eye(3)
            pos[1] = size[0] + self.bounce * abs(math.sin(2.0 * math.pi * 0.8 * t + self.phase))
            return pos, rot, size
        if self.shape == "ellipsoid":
            s = self.pulse * math.sin(2.0 * math.pi * 1.1 * t + self.phase)
            size = size * np.array([1.0 + 0.6 * s, 1.0 - s, 1.0 + 0.6 * s])
        rot = so3_exp(np.array([0.0, self.phase + self.spin * t, 0.0]))
        pos[1] = size[1]  # boxes, ellipsoids and cylinders stand on the ground
        return pos, rot, size

    @property
    def noun(self) -> str:
        """The shape's word in captions."""
        return {"sphere": "ball", "box": "box", "ellipsoid": "soft blob", "cylinder": "pillar"}[self.shape]


@dataclass
class Lighting:
    """A directional light: ``direction`` (unit, towards the light), ``ambient`` and ``diffuse`` strengths and a
    ``tint`` (3,) multiplying every lit colour."""

    direction: np.ndarray
    ambient: float
    diffuse: float
    tint: np.ndarray


@dataclass
class SceneLayout:
    """Everything about a scene but the camera's path: background, ground, light, objects, lens."""

    room: bool
    room_half: float
    room_height: float
    ground: Texture
    walls: Texture
    sky_top: np.ndarray
    sky_horizon: np.ndarray
    mountain_freqs: np.ndarray
    mountain_phases: np.ndarray
    light: Lighting
    objects: list[SceneObject]
    focal_ratio: float  # focal length in image widths


def _intersect_sphere_local(o: torch.Tensor, d: torch.Tensor, inside: bool = False) -> torch.Tensor:
    """Ray parameter of the unit sphere at the origin for rays ``o + t d`` ``(..., 3)``; inf where missed."""
    a = (d * d).sum(-1)
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - 1.0
    disc = b * b - a * c
    root = torch.sqrt(disc.clamp_min(0.0))
    t = (-b + root) / a if inside else (-b - root) / a
    return torch.where((disc > 0) & (t > 1e-4), t, math.inf)


def _intersect_box_local(o: torch.Tensor, d: torch.Tensor, half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab test against the box ``|p| <= half`` for rays ``(..., 3)``: (t (...), entry axis (...))."""
    inv = 1.0 / torch.where(d.abs() < 1e-9, 1e-9, d)
    t0 = (-half - o) * inv
    t1 = (half - o) * inv
    t_near, axis = torch.minimum(t0, t1).max(-1)
    t_far = torch.maximum(t0, t1).min(-1).values
    hit = (t_near <= t_far) & (t_near > 1e-4)
    return torch.where(hit, t_near, math.inf), axis


def _intersect_cylinder_local(o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit cylinder ``x^2 + z^2 <= 1, |y| <= 1`` for rays ``(..., 3)``: (t (...), hit on a cap (...) bool)."""
    a = d[..., 0] ** 2 + d[..., 2] ** 2
    b = o[..., 0] * d[..., 0] + o[..., 2] * d[..., 2]
    c = o[..., 0] ** 2 + o[..., 2] ** 2 - 1.0
    disc = b * b - a * c
    t_side = (-b - torch.sqrt(disc.clamp_min(0.0))) / a.clamp_min(1e-12)
    side_ok = (disc > 0) & (t_side > 1e-4) & ((o[..., 1] + t_side * d[..., 1]).abs() <= 1.0)
    t_side = torch.where(side_ok, t_side, math.inf)
    dy = torch.where(d[..., 1].abs() < 1e-9, 1e-9, d[..., 1])
    t_cap = torch.minimum((1.0 - o[..., 1]) / dy, (-1.0 - o[..., 1]) / dy)
    x = o[..., 0] + t_cap * d[..., 0]
    z = o[..., 2] + t_cap * d[..., 2]
    cap_ok = (t_cap > 1e-4) & (x * x + z * z <= 1.0)
    t_cap = torch.where(cap_ok, t_cap, math.inf)
    return torch.minimum(t_side, t_cap), t_cap < t_side


def _screen_box(center: np.ndarray, radius: float, c2w: np.ndarray, K: np.ndarray, height: int, width: int):
    """Pixel rectangle (v0, v1, u0, u1) that surely holds the projection of a sphere; None if it is off screen."""
    p = c2w[:3, :3].T @ (center - c2w[:3, 3])
    if p[2] - radius <= 1e-3:  # the sphere reaches behind the image plane: test every pixel
        return 0, height, 0, width
    xs = [(p[0] + a) / (p[2] + b) for a in (-radius, radius) for b in (-radius, radius)]
    ys = [(p[1] + a) / (p[2] + b) for a in (-radius, radius) for b in (-radius, radius)]
    u0 = max(0, math.floor(K[0, 0] * min(xs) + K[0, 2]))
    u1 = min(width, math.ceil(K[0, 0] * max(xs) + K[0, 2]) + 1)
    v0 = max(0, math.floor(K[1, 1] * min(ys) + K[1, 2]))
    v1 = min(height, math.ceil(K[1, 1] * max(ys) + K[1, 2]) + 1)
    return (v0, v1, u0, u1) if u0 < u1 and v0 < v1 else None


def _hit_object(obj: SceneObject, o_l: torch.Tensor, d_l: torch.Tensor, size: torch.Tensor):
    """Ray parameter ``(...)`` of an object for rays ``o_l + t d_l`` in its local frame, and a function giving the
    local normal ``(..., 3)`` (not normalized) at local points ``(..., 3)`` of the hit pixels."""
    if obj.shape == "box":
        t, axis = _intersect_box_local(o_l, d_l, size)
        return t, lambda p: torch.nn.functional.one_hot(axis, 3).to(p.dtype) * torch.sign(p)
    if obj.shape == "cylinder":
        t, cap = _intersect_cylinder_local(o_l / size, d_l / size)

        def cylinder_normal(p: torch.Tensor) -> torch.Tensor:
            q = p / size
            side = torch.stack([q[..., 0], torch.zeros_like(q[..., 1]), q[..., 2]], -1)
            top = torch.stack([torch.zeros_like(q[..., 0]), torch.sign(q[..., 1]), torch.zeros_like(q[..., 2])], -1)
            return torch.where(cap[..., None], top, side) / size

        return t, cylinder_normal
    t = _intersect_sphere_local(o_l / size, d_l / size)
    return t, lambda p: p / size / size


def render_frame(
    layout: SceneLayout, t: float, c2w: np.ndarray, K: np.ndarray, height: int, width: int, dynamic: bool
) -> tuple[torch.Tensor, ...]:
    """Ray-cast one frame: (rgb (H, W, 3) float in [0, 1], depth (H, W), points (H, W, 3), labels (H, W) long:
    0 background, 1 ground, 2 + k object k, moving (H, W) bool).

    Every surface is shaded over whole (sub-)images and picked with ``torch.where``: boolean-mask indexing is many
    times slower on a CPU.
    """
    f32 = torch.float32
    dirs_cam = camera_rays(pixel_grid(height, width, f32), torch.from_numpy(K[None]).to(f32))[0]  # (H, W, 3), z = 1
    rot = torch.from_numpy(c2w[:3, :3]).to(f32)
    origin = torch.from_numpy(c2w[:3, 3]).to(f32)
    d = dirs_cam @ rot.T  # (H, W, 3) world directions with camera-frame z = 1: the ray parameter is the depth
    inf = math.inf

    # Background: room walls/ceiling (seen from inside a box) or a sky dome (from inside a sphere).
    if layout.room:
        half = torch.tensor([layout.room_half, layout.room_height, layout.room_half], dtype=f32)
        bound = torch.where(d > 0, half, -half)
        bound[..., 1] = torch.where(d[..., 1] > 0, half[1], -1.0)  # below is the ground plane, nearer
        ts = (bound - origin) / torch.where(d.abs() < 1e-9, 1e-9, d)
        t_best, bg_axis = torch.where(ts > 0, ts, inf).min(-1)
    else:
        dome = 25.0
        t_best = _intersect_sphere_local(origin / dome, d / dome, inside=True)
        bg_axis = torch.zeros(height, width, dtype=torch.long)
    t_ground = torch.where(d[..., 1] < -1e-9, -origin[1] / d[..., 1], inf)
    labels = (t_ground < t_best).long()  # 0 background, 1 ground
    t_best = torch.minimum(t_ground, t_best)

    # Objects, each only over the pixels its bounding sphere can cover.
    poses = [obj.pose(t) for obj in layout.objects]
    regions, normal_of = [], {}
    for k, (obj, (center, orot, size)) in enumerate(zip(layout.objects, poses, strict=True)):
        radius = float(np.linalg.norm(size)) if obj.shape in ("box", "cylinder") else float(size.max())
        region = _screen_box(center, radius * 1.01 + 1e-3, c2w, K, height, width)
        regions.append(region)
        if region is None:
            continue
        v0, v1, u0, u1 = region
        c = torch.from_numpy(center).to(f32)
        r = torch.from_numpy(orot).to(f32)
        d_l = d[v0:v1, u0:u1] @ r  # world -> local: R^T d
        o_l = ((origin - c) @ r).expand_as(d_l)
        t_obj, normal_of[k] = _hit_object(obj, o_l, d_l, torch.from_numpy(size).to(f32))
        tb = t_best[v0:v1, u0:u1]
        closer = t_obj < tb
        t_best[v0:v1, u0:u1] = torch.where(closer, t_obj, tb)
        labels[v0:v1, u0:u1] = torch.where(closer, 2 + k, labels[v0:v1, u0:u1])

    points = origin + t_best[..., None] * d  # (H, W, 3)

    # Background colour and normal, for every pixel.
    if layout.room:
        normal_bg = -torch.nn.functional.one_hot(bg_axis, 3).to(f32) * torch.sign(d)
        color_bg = layout.walls.albedo(points)
        ceiling = torch.tensor([0.92, 0.92, 0.9], dtype=f32)
        color_bg = torch.where((bg_axis == 1)[..., None], ceiling, color_bg)
        lit_bg = torch.ones(height, width, dtype=torch.bool)
    else:
        dirn = points / points.norm(dim=-1, keepdim=True)
        elevation = dirn[..., 1].clamp(0, 1)
        azimuth = torch.atan2(dirn[..., 2], dirn[..., 0])
        horizon, top = (torch.from_numpy(c).to(f32) for c in (layout.sky_horizon, layout.sky_top))
        sky = horizon + (top - horizon) * elevation[..., None] ** 0.6
        ridge = 0.06 + 0.04 * sum(
            torch.sin(f * azimuth + ph) / (i + 1)
            for i, (f, ph) in enumerate(zip(layout.mountain_freqs, layout.mountain_phases, strict=True))
        )
        rock = torch.tensor([0.35, 0.42, 0.38], dtype=f32) * (0.8 + 2.0 * elevation)[..., None]
        color_bg = torch.where((elevation < ridge)[..., None], rock, sky)
        normal_bg = torch.zeros_like(points)
        lit_bg = torch.zeros(height, width, dtype=torch.bool)  # the sky is not shaded

    on_ground = (labels == 1)[..., None]
    albedo = torch.where(on_ground, layout.ground.albedo(points), color_bg)
    normals = torch.where(on_ground, torch.tensor([0.0, 1.0, 0.0], dtype=f32), normal_bg)
    lit = lit_bg | (labels >= 1)

    moving = torch.zeros(height, width, dtype=torch.bool)
    for k, (obj, (center, orot, _)) in enumerate(zip(layout.objects, poses, strict=True)):
        if regions[k] is None:
            continue
        v0, v1, u0, u1 = regions[k]
        sel = labels[v0:v1, u0:u1] == 2 + k
        if not sel.any():
            continue
        c = torch.from_numpy(center).to(f32)
        r = torch.from_numpy(orot).to(f32)
        p_l = (points[v0:v1, u0:u1] - c) @ r
        sel3 = sel[..., None]
        albedo[v0:v1, u0:u1] = torch.where(sel3, obj.texture.albedo(p_l), albedo[v0:v1, u0:u1])
        n_w = torch.nn.functional.normalize(normal_of[k](p_l) @ r.T, dim=-1)
        normals[v0:v1, u0:u1] = torch.where(sel3, n_w, normals[v0:v1, u0:u1])
        if dynamic and obj.moving:
            moving[v0:v1, u0:u1] |= sel

    light = layout.light
    diffuse = (normals * torch.from_numpy(light.direction).to(f32)).sum(-1).clamp_min(0.0)
    shading = light.ambient + light.diffuse * diffuse
    tint = torch.from_numpy(light.tint).to(f32)
    lit_color = albedo * shading[..., None] * tint
    rgb = torch.where(lit[..., None], lit_color, albedo).clamp(0, 1)
    return rgb, t_best, points, labels, moving
