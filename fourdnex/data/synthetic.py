"""Procedural 4D scenes with exact ground truth, and writers for every clip format of the 4DNeX-10M layout.

A scene is ray-cast analytically: a textured ground plane (y = 0), a background (a room of textured walls or a sky
dome), a few objects (rolling spheres, sliding and turning boxes, one squashing-and-stretching ellipsoid) and a
pinhole camera that orbits, dollies, trucks or hovers with a little shake. Everything is deterministic from a seed.

Conventions (those of :mod:`fourdnex.geometry.cameras`):
    world      y up, ground plane y = 0, metres
    cam2world  (4, 4), OpenCV camera axes (x right, y down, z forward)
    K          (3, 3), fx = fy, principal point (W / 2, H / 2), the image centre: pixel (row i, column j) looks
               along the ray through its centre (j + 0.5, i + 0.5)
    depth      z of the hit point in the camera frame, so ``points = unproject_depth(depth, K, cam2world)``
The clip files follow the 4DNeX-10M convention instead, with pixel centres on integers (their principal point is
``(W - 1) / 2, (H - 1) / 2``); the writers convert, and the dataset reader converts back.

Writing a whole 4DNeX-10M-style tree (``<out>/data/...``, see :func:`write_tree`):

    python -m fourdnex.data.synthetic --out synthetic --num_clips 10 --num_frames 49 --height 480 --width 720 \\
        --workers 4
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fourdnex.cli import run
from fourdnex.files import atomic_path, write_json, write_npy, write_npz, write_png, write_text, write_video
from fourdnex.geometry.cameras import (
    camera_rays,
    intrinsics_to_integer_centres,
    look_at,
    pixel_grid,
    rotation_to_quaternion,
    so3_exp,
)

FPS = 24
#: The subsets of the 4DNeX-10M layout and the clip format each one uses.
SUBSETS: dict[str, str] = {
    "dynamic_1": "monst3r",
    "dynamic_2": "monst3r",
    "dynamic_3": "dynamic_npz",
    "static_1": "static_npz",
    "static_2": "static_npz",
}
#: The forms ``intrinsic`` takes in dynamic_3 npz files; :func:`write_tree` cycles through them.
INTRINSIC_FORMS = ("3x3", "1x3x3", "Tx3x3", "focal")

_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.15, 0.12),
    "orange": (0.92, 0.50, 0.10),
    "yellow": (0.90, 0.80, 0.15),
    "green": (0.20, 0.65, 0.25),
    "teal": (0.10, 0.55, 0.55),
    "blue": (0.15, 0.30, 0.80),
    "purple": (0.50, 0.22, 0.70),
    "pink": (0.92, 0.50, 0.65),
    "white": (0.90, 0.90, 0.88),
    "black": (0.12, 0.12, 0.13),
}
_GROUNDS = {
    "checkered": ((0.85, 0.85, 0.82), (0.25, 0.25, 0.28)),
    "grassy": ((0.30, 0.55, 0.20), (0.22, 0.42, 0.14)),
    "sandy": ((0.85, 0.75, 0.55), (0.75, 0.64, 0.45)),
    "wooden": ((0.60, 0.40, 0.22), (0.48, 0.30, 0.16)),
    "tiled": ((0.65, 0.70, 0.75), (0.45, 0.50, 0.58)),
}
_WALLS = {
    "striped": ((0.85, 0.82, 0.75), (0.60, 0.55, 0.50)),
    "brick": ((0.62, 0.28, 0.20), (0.80, 0.78, 0.72)),
    "blue": ((0.55, 0.65, 0.85), (0.40, 0.48, 0.70)),
    "green": ((0.55, 0.70, 0.55), (0.40, 0.55, 0.42)),
}
_CAMERA_WORDS = {
    "orbit": "slowly orbits the scene",
    "dolly": "moves in towards the scene",
    "truck": "slides sideways past the scene",
    "hover": "hovers with a slight handheld shake",
}


@dataclass
class Scene:
    """A rendered clip with exact ground truth (shapes with F frames of H x W pixels)."""

    rgb: np.ndarray  # (F, H, W, 3) uint8
    depth: np.ndarray  # (F, H, W) float32, camera-frame z
    points: np.ndarray  # (F, H, W, 3) float32, world coordinates
    K: np.ndarray  # (F, 3, 3) float32
    cam2world: np.ndarray  # (F, 4, 4) float32, camera-to-world, OpenCV axes
    dynamic_mask: np.ndarray  # (F, H, W) bool, pixels on a moving object
    caption: str
    labels: np.ndarray = field(repr=False)  # (F, H, W) int16: 0 background, 1 ground, 2 + k object k
    seed: int = 0
    dynamic: bool = True


@dataclass
class _Object:
    """One primitive; its pose and size are functions of time in seconds."""

    kind: str  # "sphere" | "box" | "ellipsoid"
    color_name: str
    color: np.ndarray  # (3,)
    color2: np.ndarray  # (3,) second texture colour
    texture_freq: float
    size: np.ndarray  # sphere: (r,), box: half extents (3,), ellipsoid: radii (3,)
    start: np.ndarray  # (3,) position at t = 0 (x, z on the ground)
    velocity: np.ndarray  # (3,) ground velocity in m/s (y = 0)
    spin: float  # rad/s about y (box, ellipsoid)
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
        if self.kind == "sphere":
            # Rolling without slipping: rotate about the horizontal axis perpendicular to the motion.
            speed = float(np.linalg.norm(self.velocity))
            axis = np.array([self.velocity[2], 0.0, -self.velocity[0]]) / max(speed, 1e-9)
            rot = _axis_angle(axis, speed * t / size[0]) if speed > 1e-9 else np.eye(3)
            pos[1] = size[0] + self.bounce * abs(math.sin(2.0 * math.pi * 0.8 * t + self.phase))
        elif self.kind == "box":
            rot = _axis_angle(np.array([0.0, 1.0, 0.0]), self.phase + self.spin * t)
            pos[1] = size[1]
        else:
            s = self.pulse * math.sin(2.0 * math.pi * 1.1 * t + self.phase)
            size = size * np.array([1.0 + 0.6 * s, 1.0 - s, 1.0 + 0.6 * s])
            rot = _axis_angle(np.array([0.0, 1.0, 0.0]), self.phase + self.spin * t)
            pos[1] = size[1]
        return pos, rot, size


def _axis_angle(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix (3, 3) of ``angle`` radians about the unit ``axis``."""
    return so3_exp(np.asarray(axis, np.float64) * angle)


@dataclass
class _Layout:
    """Everything random about a scene, drawn once from the seed."""

    room: bool
    room_half: float
    room_height: float
    ground_name: str
    ground_colors: tuple
    ground_tile: float
    ground_angle: float
    wall_name: str
    wall_colors: tuple
    sky_top: np.ndarray
    sky_horizon: np.ndarray
    mountain_freqs: np.ndarray
    mountain_phases: np.ndarray
    light: np.ndarray
    objects: list[_Object]
    camera_kind: str
    camera: dict
    focal_ratio: float


def _sample_layout(seed: int, dynamic: bool) -> _Layout:
    """Draw a scene description from ``seed``."""
    rng = np.random.default_rng(seed)
    room = bool(rng.random() < 0.5)
    ground_name = str(rng.choice(list(_GROUNDS)))
    wall_name = str(rng.choice(list(_WALLS)))
    light = np.array([rng.uniform(-1, 1), rng.uniform(1.0, 2.0), rng.uniform(-1, 1)])
    color_names = rng.choice(list(_COLORS), size=6, replace=False)
    num_objects = int(rng.integers(2, 5))
    kinds = list(rng.choice(["sphere", "box", "sphere", "box"], size=num_objects))
    if dynamic or rng.random() < 0.5:
        kinds[int(rng.integers(num_objects))] = "ellipsoid"
    objects: list[_Object] = []
    positions: list[np.ndarray] = []
    for i, kind in enumerate(kinds):
        for _ in range(20):  # keep objects apart at t = 0
            pos = np.array([rng.uniform(-2.2, 2.2), 0.0, rng.uniform(-2.2, 2.2)])
            if all(np.linalg.norm(pos - p) > 1.4 for p in positions):
                break
        positions.append(pos)
        if kind == "sphere":
            size = np.array([rng.uniform(0.3, 0.6)])
        elif kind == "box":
            size = rng.uniform(0.2, 0.55, size=3)
        else:
            size = np.array([rng.uniform(0.3, 0.5), rng.uniform(0.45, 0.75), rng.uniform(0.3, 0.5)])
        heading = rng.uniform(0, 2 * math.pi)
        speed = rng.uniform(0.3, 1.1) if kind != "ellipsoid" else rng.uniform(0.0, 0.4)
        moving = dynamic and (i == 0 or rng.random() < 0.75)
        color = np.array(_COLORS[str(color_names[i])])
        objects.append(
            _Object(
                kind=kind,
                color_name=str(color_names[i]),
                color=color,
                color2=np.clip(color * 0.55 + rng.uniform(0.0, 0.3), 0, 1),
                texture_freq=float(rng.uniform(4.0, 9.0)),
                size=size,
                start=pos,
                velocity=speed * np.array([math.cos(heading), 0.0, math.sin(heading)]),
                spin=float(rng.uniform(-1.5, 1.5)),
                bounce=float(rng.uniform(0.0, 0.6)) if rng.random() < 0.4 else 0.0,
                pulse=float(rng.uniform(0.12, 0.25)),
                phase=float(rng.uniform(0, 2 * math.pi)),
                moving=bool(moving),
            )
        )
    camera_kind = str(rng.choice(list(_CAMERA_WORDS)))
    camera = {
        "radius": rng.uniform(4.5, 7.0),
        "height": rng.uniform(1.2, 3.2),
        "azimuth": rng.uniform(0, 2 * math.pi),
        "rate": rng.choice([-1, 1]) * rng.uniform(0.15, 0.35),  # rad/s (orbit) or m/s scale
        "target": np.array([rng.uniform(-0.5, 0.5), rng.uniform(0.2, 0.6), rng.uniform(-0.5, 0.5)]),
        "shake_freq": rng.uniform(0.5, 1.5, size=3),
        "shake_phase": rng.uniform(0, 2 * math.pi, size=3),
    }
    return _Layout(
        room=room,
        room_half=float(rng.uniform(7.0, 10.0)),
        room_height=float(rng.uniform(4.0, 6.0)),
        ground_name=ground_name,
        ground_colors=_GROUNDS[ground_name],
        ground_tile=float(rng.uniform(0.4, 1.1)),
        ground_angle=float(rng.uniform(0, math.pi / 2)),
        wall_name=wall_name,
        wall_colors=_WALLS[wall_name],
        sky_top=np.array([rng.uniform(0.2, 0.4), rng.uniform(0.4, 0.6), rng.uniform(0.8, 1.0)]),
        sky_horizon=np.array([rng.uniform(0.8, 0.95), rng.uniform(0.8, 0.95), rng.uniform(0.85, 1.0)]),
        mountain_freqs=rng.integers(2, 9, size=3).astype(np.float64),
        mountain_phases=rng.uniform(0, 2 * math.pi, size=3),
        light=light / np.linalg.norm(light),
        objects=objects,
        camera_kind=camera_kind,
        camera=camera,
        focal_ratio=float(rng.uniform(0.75, 1.25)),
    )


def _camera_pose(layout: _Layout, t: float) -> np.ndarray:
    """Camera-to-world (4, 4) at time ``t``."""
    cam = layout.camera
    kind = layout.camera_kind
    azimuth, radius, target = cam["azimuth"], cam["radius"], cam["target"].copy()
    if kind == "orbit":
        azimuth = azimuth + cam["rate"] * t
    elif kind == "dolly":
        radius = radius - 2.5 * abs(cam["rate"]) * t
    eye = np.array([radius * math.cos(azimuth), cam["height"], radius * math.sin(azimuth)])
    if kind == "truck":
        side = np.array([-math.sin(azimuth), 0.0, math.cos(azimuth)])
        eye = eye + side * 3.0 * cam["rate"] * t
        target = target + side * 2.0 * cam["rate"] * t
    shake = 0.06 if kind == "hover" else 0.02
    eye = eye + shake * np.sin(cam["shake_freq"] * 2 * math.pi * t + cam["shake_phase"])
    return look_at(eye, np.asarray(target, np.float64))


def _caption(layout: _Layout, dynamic: bool) -> str:
    """A one-sentence description of the scene."""
    parts = []
    for obj in layout.objects:
        noun = {"sphere": "ball", "box": "box", "ellipsoid": "soft blob"}[obj.kind]
        if obj.moving:
            verb = {
                "sphere": "bounces along" if obj.bounce > 0 else "rolls along",
                "box": "slides and turns",
                "ellipsoid": "squashes and stretches" if obj.velocity.any() else "squashes and stretches in place",
            }[obj.kind]
        else:
            verb = "stands still"
        article = "an" if obj.color_name[0] in "aeiou" else "a"
        parts.append(f"{article} {obj.color_name} {noun} {verb}")
    subjects = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    place = f"in a room with {layout.wall_name} walls" if layout.room else "in an open field under a blue sky"
    prefix = "A still scene. " if not dynamic else ""
    camera = _CAMERA_WORDS[layout.camera_kind]
    return f"{prefix}On {layout.ground_name} ground {place}, {subjects}, while the camera {camera}."


def scene_caption(seed: int, dynamic: bool = True) -> str:
    """The caption of the scene drawn from ``seed`` (what :func:`render_scene` gives it), without rendering."""
    return _caption(_sample_layout(seed, dynamic), dynamic)


def _noise(x: torch.Tensor, y: torch.Tensor, seed: float) -> torch.Tensor:
    """Cheap smooth procedural noise in [-1, 1] from a few sinusoids."""
    return (
        torch.sin(1.7 * x + 2.3 * seed) * torch.sin(1.3 * y + 0.7 * seed)
        + 0.5 * torch.sin(4.1 * x - 3.1 * y + seed)
        + 0.25 * torch.sin(9.3 * x + 7.7 * y - 1.9 * seed)
    ) / 1.75


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


def _render_frame(layout: _Layout, t: float, c2w: np.ndarray, K: np.ndarray, height: int, width: int, dynamic: bool):
    """Ray-cast one frame: (rgb (H, W, 3) float, depth (H, W), points (H, W, 3), labels (H, W), moving (H, W)).

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
    regions, box_axes = [], {}
    for k, (obj, (center, orot, size)) in enumerate(zip(layout.objects, poses, strict=True)):
        radius = float(np.linalg.norm(size)) if obj.kind == "box" else float(size.max())
        region = _screen_box(center, radius * 1.01 + 1e-3, c2w, K, height, width)
        regions.append(region)
        if region is None:
            continue
        v0, v1, u0, u1 = region
        c = torch.from_numpy(center).to(f32)
        r = torch.from_numpy(orot).to(f32)
        d_l = d[v0:v1, u0:u1] @ r  # world -> local: R^T d
        o_l = ((origin - c) @ r).expand_as(d_l)
        if obj.kind == "box":
            t_obj, axis = _intersect_box_local(o_l, d_l, torch.from_numpy(size).to(f32))
            box_axes[k] = axis
        else:
            s = torch.from_numpy(size).to(f32)
            t_obj = _intersect_sphere_local(o_l / s, d_l / s)
        tb = t_best[v0:v1, u0:u1]
        closer = t_obj < tb
        t_best[v0:v1, u0:u1] = torch.where(closer, t_obj, tb)
        labels[v0:v1, u0:u1] = torch.where(closer, 2 + k, labels[v0:v1, u0:u1])

    points = origin + t_best[..., None] * d  # (H, W, 3)
    light = torch.from_numpy(layout.light).to(f32)

    # Background colour and normal, for every pixel.
    if layout.room:
        normal_bg = -torch.nn.functional.one_hot(bg_axis, 3).to(f32) * torch.sign(d)
        horizontal = torch.where(bg_axis == 0, points[..., 2], points[..., 0])
        height_w = points[..., 1]
        c1, c2 = (torch.tensor(c, dtype=f32) for c in layout.wall_colors)
        if layout.wall_name == "brick":
            row = torch.floor(height_w / 0.25)
            mortar = torch.remainder(height_w, 0.25) > 0.02
            pattern = (torch.remainder(horizontal / 0.5 + 0.5 * row, 1.0) < 0.92) & mortar
        else:
            pattern = torch.remainder(horizontal / 0.6, 1.0) < 0.5
        shade = 0.9 + 0.1 * _noise(horizontal, height_w, 3.0)
        color_bg = torch.where(pattern[..., None], c1, c2) * shade[..., None]
        color_bg = torch.where((bg_axis == 1)[..., None], torch.tensor([0.92, 0.92, 0.9], dtype=f32), color_bg)
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

    # Ground colour, for every pixel; then pick per pixel.
    ca, sa = math.cos(layout.ground_angle), math.sin(layout.ground_angle)
    gx = ca * points[..., 0] + sa * points[..., 2]
    gz = -sa * points[..., 0] + ca * points[..., 2]
    checker = (torch.floor(gx / layout.ground_tile) + torch.floor(gz / layout.ground_tile)) % 2 == 0
    c1, c2 = (torch.tensor(c, dtype=f32) for c in layout.ground_colors)
    grain = 0.85 + 0.15 * _noise(gx * 2.0, gz * 2.0, 1.0)
    color_ground = torch.where(checker[..., None], c1, c2) * grain[..., None]
    on_ground = (labels == 1)[..., None]
    albedo = torch.where(on_ground, color_ground, color_bg)
    normals = torch.where(on_ground, torch.tensor([0.0, 1.0, 0.0], dtype=f32), normal_bg)
    lit = lit_bg | (labels >= 1)

    moving = torch.zeros(height, width, dtype=torch.bool)
    for k, (obj, (center, orot, size)) in enumerate(zip(layout.objects, poses, strict=True)):
        if regions[k] is None:
            continue
        v0, v1, u0, u1 = regions[k]
        sel = labels[v0:v1, u0:u1] == 2 + k
        if not sel.any():
            continue
        c = torch.from_numpy(center).to(f32)
        r = torch.from_numpy(orot).to(f32)
        s = torch.from_numpy(size).to(f32)
        p_l = (points[v0:v1, u0:u1] - c) @ r
        q = p_l / s
        # Local normal: the box face the ray entered through, or the sphere/ellipsoid gradient.
        n_l = torch.nn.functional.one_hot(box_axes[k], 3).to(f32) * torch.sign(p_l) if k in box_axes else q / s
        freq = obj.texture_freq
        pattern = torch.sin(freq * q[..., 0]) * torch.sin(freq * q[..., 1]) * torch.sin(freq * q[..., 2])
        color1, color2 = (torch.from_numpy(c).to(f32) for c in (obj.color, obj.color2))
        sel3 = sel[..., None]
        albedo[v0:v1, u0:u1] = torch.where(
            sel3, torch.where((pattern > 0)[..., None], color1, color2), albedo[v0:v1, u0:u1]
        )
        n_w = torch.nn.functional.normalize(n_l @ r.T, dim=-1)
        normals[v0:v1, u0:u1] = torch.where(sel3, n_w, normals[v0:v1, u0:u1])
        if dynamic and obj.moving:
            moving[v0:v1, u0:u1] |= sel

    diffuse = (normals * light).sum(-1).clamp_min(0.0)
    shading = torch.where(lit, 0.45 + 0.6 * diffuse, 1.0)
    rgb = (albedo * shading[..., None]).clamp(0, 1)
    return rgb, t_best, points, labels, moving


def render_scene(
    seed: int, num_frames: int, height: int, width: int, dynamic: bool = True, num_threads: int | None = 1
) -> Scene:
    """Render ``num_frames`` frames of the scene drawn from ``seed`` at ``height x width`` (24 fps).

    With ``dynamic=False`` the objects stand still (only the camera moves) and the dynamic mask is all False.
    The same seed always gives the same scene; a longer clip extends a shorter one frame for frame.
    ``num_threads``: torch CPU threads while rendering (restored afterwards; None keeps the current setting). One
    thread is the default because the work per operation is small: on a busy 2-core machine two threads were 18x
    slower than one (0.17 s per 480 x 720 frame).
    """
    if num_frames < 1 or height < 2 or width < 2:
        raise ValueError(f"need at least 1 frame of 2x2 pixels, got {num_frames} frames of {height}x{width}")
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _render(seed, num_frames, height, width, dynamic)
    finally:
        torch.set_num_threads(previous)


def _render(seed: int, num_frames: int, height: int, width: int, dynamic: bool) -> Scene:
    """:func:`render_scene` without the thread setting."""
    layout = _sample_layout(seed, dynamic)
    fx = layout.focal_ratio * width
    K = np.array([[fx, 0.0, width / 2.0], [0.0, fx, height / 2.0], [0.0, 0.0, 1.0]])
    rgb = np.empty((num_frames, height, width, 3), np.uint8)
    depth = np.empty((num_frames, height, width), np.float32)
    points = np.empty((num_frames, height, width, 3), np.float32)
    labels = np.empty((num_frames, height, width), np.int16)
    mask = np.empty((num_frames, height, width), bool)
    c2ws = np.empty((num_frames, 4, 4), np.float64)
    for f in range(num_frames):
        t = f / FPS
        c2ws[f] = _camera_pose(layout, t)
        frame = _render_frame(layout, t, c2ws[f], K, height, width, dynamic)
        rgb[f] = (frame[0].numpy() * 255.0 + 0.5).astype(np.uint8)
        depth[f], points[f], labels[f], mask[f] = (x.numpy() for x in frame[1:])
    return Scene(
        rgb=rgb,
        depth=depth,
        points=points,
        K=np.repeat(K[None], num_frames, 0).astype(np.float32),
        cam2world=c2ws.astype(np.float32),
        dynamic_mask=mask,
        caption=_caption(layout, dynamic),
        labels=labels,
        seed=seed,
        dynamic=dynamic,
    )


# ---------------------------------------------------------------------------------------------------------------
# Writers for the 4DNeX-10M clip formats


def window(scene: Scene, start: int, length: int) -> Scene:
    """Frames ``start .. start + length - 1`` of ``scene`` as a scene of their own."""
    if start < 0 or length < 1 or start + length > len(scene.rgb):
        raise ValueError(f"frames {start}..{start + length - 1} are not all in a scene of {len(scene.rgb)} frames")
    frames = slice(start, start + length)
    return replace(
        scene,
        rgb=scene.rgb[frames],
        depth=scene.depth[frames],
        points=scene.points[frames],
        K=scene.K[frames],
        cam2world=scene.cam2world[frames],
        dynamic_mask=scene.dynamic_mask[frames],
        labels=scene.labels[frames],
    )


def write_monst3r_clip(scene: Scene, clip_dir: str | Path, video_path: str | Path, start: int, length: int) -> Path:
    """MonST3R-style clip: frames ``start .. start + length - 1`` of ``scene`` in ``clip_dir``; the whole scene as mp4.

    ``clip_dir`` gets ``pred_traj.txt`` (one line per frame: timestamp tx ty tz qw qx qy qz, camera-to-world),
    ``pred_intrinsics.txt`` (one line of 9 numbers per frame, the row-major 3x3 K, pixel centres on integers),
    ``frame_{t:04d}.npy`` (depth (H, W) float32) and ``dynamic_mask_{t}.png`` (0/255). ``video_path`` gets all of
    ``scene.rgb``. The folder name should end in ``_<start>-<end>`` with the inclusive ``end = start + length - 1``,
    as :func:`write_tree` names it.
    """
    clip = window(scene, start, length)
    clip_dir = Path(clip_dir)
    clip_dir.mkdir(parents=True, exist_ok=True)
    Path(video_path).parent.mkdir(parents=True, exist_ok=True)
    write_video(video_path, scene.rgb, fps=FPS)
    traj, intr = [], []
    for t in range(length):
        c2w = clip.cam2world[t].astype(np.float64)
        q = rotation_to_quaternion(c2w[:3, :3])
        traj.append(" ".join(f"{x:.9g}" for x in [(start + t) / FPS, *c2w[:3, 3], *q]))
        intr.append(" ".join(f"{x:.9g}" for x in intrinsics_to_integer_centres(clip.K[t]).reshape(-1)))
        write_npy(clip_dir / f"frame_{t:04d}.npy", clip.depth[t].astype(np.float32))
        write_png(clip_dir / f"dynamic_mask_{t}.png", clip.dynamic_mask[t].astype(np.uint8) * 255)
    write_text(clip_dir / "pred_traj.txt", "\n".join(traj) + "\n")
    write_text(clip_dir / "pred_intrinsics.txt", "\n".join(intr) + "\n")
    return clip_dir


def write_dynamic_npz(scene: Scene, path: str | Path, intrinsic_form: str = "Tx3x3") -> Path:
    """dynamic_3 clip: one ``.npz`` with images (T, H, W, 3) uint8, depths (T, H, W), intrinsic, cam_c2w (T, 4, 4).

    ``intrinsic_form`` is one of :data:`INTRINSIC_FORMS`: a (3, 3), (1, 3, 3) or (T, 3, 3) matrix, or a scalar
    focal length in pixels (principal point at the image centre). Matrices put pixel centres on integers.
    """
    K = intrinsics_to_integer_centres(scene.K).astype(np.float32)  # the files' convention
    forms = {"3x3": K[0], "1x3x3": K[:1], "Tx3x3": K, "focal": np.float32(K[0, 0, 0])}
    if intrinsic_form not in forms:
        raise ValueError(f"intrinsic_form must be one of {INTRINSIC_FORMS}, got {intrinsic_form!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(path, images=scene.rgb, depths=scene.depth, intrinsic=forms[intrinsic_form], cam_c2w=scene.cam2world)
    return path


def write_static_npz(
    scene: Scene, path: str | Path, raw: str | Path, start: int = 0, length: int | None = None
) -> Path:
    """static clip: ``.npz`` with pts3d (T, H, W, 3) world points and poses (T, 4, 4) camera-to-world of frames
    ``start .. start + length - 1`` (default: all); every frame's RGB goes to ``raw``.

    ``raw`` is an ``.mp4`` file when it ends in ``.mp4``, otherwise an image folder of ``{t:05d}.png`` files.
    """
    clip = window(scene, start, len(scene.rgb) - start if length is None else length)
    path, raw = Path(path), Path(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(path, pts3d=clip.points, poses=clip.cam2world)
    if raw.suffix == ".mp4":
        raw.parent.mkdir(parents=True, exist_ok=True)
        write_video(raw, scene.rgb, fps=FPS)
    else:
        raw.mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(scene.rgb):
            write_png(raw / f"{t:05d}.png", frame)
    return path


def write_captions(path: str | Path, captions: dict[int, str]) -> Path:
    """Caption CSV with columns ``number,caption`` (``number`` = integer clip id = video file stem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["number", "caption"])
        for number, caption in sorted(captions.items()):
            writer.writerow([number, caption])
    return path


#: ``layout`` choices of :func:`write_tree`.
TREE_LAYOUTS = ("flat", "nested")


def write_tree(
    out: str | Path,
    num_clips: int,
    num_frames: int = 49,
    height: int = 480,
    width: int = 720,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    layout: str = "flat",
    workers: int = 1,
) -> Path:
    """Write ``num_clips`` synthetic clips as a 4DNeX-10M tree under ``<out>/data``; returns that data folder.

    Clips go round-robin to the subsets of :data:`SUBSETS`; clip ``i`` is rendered from seed ``seed * 100003 + i``
    and numbered ``10000 + i``; every range in a name is inclusive (``<start>-<end>`` is ``end - start + 1``
    frames). ``layout="flat"``::

        data/dynamic/dynamic_{1,2}/<number>_<start>-<end>/   pred_traj.txt, pred_intrinsics.txt, frame_XXXX.npy,
                                                              dynamic_mask_<t>.png
        data/raw/dynamic/dynamic_{1,2}/<number>.mp4          the whole video, the clip starts at frame <start>
        data/dynamic/dynamic_3/<number>.npz                  images, depths, intrinsic (cycling forms), cam_c2w
        data/static/static_1/<number>.npz  + data/raw/static/static_1/<number>.mp4
        data/static/static_2/<number>.npz  + data/raw/static/static_2/<number>/{t:05d}.png

    ``layout="nested"``, the layouts the 4DNeX reference reads (clips start at frame ``1 + i % 3``)::

        data/dynamic/dynamic_{1,2}/<number>/part_<start>-<end>/  + data/raw/dynamic/dynamic_{1,2}/<number>.mp4
        data/dynamic/dynamic_3/<number>/frame_<start>-frame_<end>.npz    (holding frames start..end)
        data/static/static_1/<number>/frame_<start>-frame_<end>.npz      + data/raw/static/static_1/<number>/images_4/
        data/static/static_2/group_<i%2>/<number>/frame_<start>-frame_<end>.npz
                                                                 + data/raw/static/static_2/<number>.mp4

    and in both: ``data/caption/<subset>_with_caption_upload.csv`` (number,caption), written once every clip is.
    ``workers`` processes render in parallel. A clip's files are written atomically and then its record in
    ``<out>/clips/<i>.json`` (subset, number, caption), so a re-run renders only the clips without a record.
    """
    if layout not in TREE_LAYOUTS:
        raise ValueError(f"layout must be one of {TREE_LAYOUTS}, got {layout!r}")
    records = Path(out) / "clips"
    records.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(num_clips) if not (records / f"{i}.json").is_file()]
    job = functools.partial(_write_clip, Path(out), num_frames=num_frames, height=height, width=width, seed=seed,
                            layout=layout)  # fmt: skip
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for name in pool.map(job, todo, chunksize=8) if pool else map(job, todo):
            if progress is not None:
                progress(name)
    captions: dict[str, dict[int, str]] = {name: {} for name in SUBSETS}
    for i in range(num_clips):
        record = json.loads((records / f"{i}.json").read_text())
        captions[record["subset"]][record["number"]] = record["caption"]
    data = Path(out) / "data"
    for subset, caps in captions.items():
        if caps:
            write_captions(data / "caption" / f"{subset}_with_caption_upload.csv", caps)
    return data


def _write_clip(out: Path, i: int, num_frames: int, height: int, width: int, seed: int, layout: str) -> str:
    """Render clip ``i`` of :func:`write_tree`, write its files, then its record; returns ``<subset>/<number>``."""
    data = out / "data"
    raw = data / "raw"
    names = list(SUBSETS)
    subset = names[i % len(names)]
    fmt = SUBSETS[subset]
    number = 10000 + i
    kind = "dynamic" if subset.startswith("dynamic") else "static"
    nested = layout == "nested"
    start = 1 + i % 3 if nested else (i % 3 if fmt == "monst3r" else 0)
    end = start + num_frames - 1
    tail = (i // 5) % 2 if fmt == "monst3r" else 0
    scene = render_scene(seed * 100003 + i, end + 1 + tail, height, width, dynamic=fmt != "static_npz")
    ranged = f"frame_{start}-frame_{end}.npz"
    if fmt == "monst3r":
        folder = f"{number}/part_{start}-{end}" if nested else f"{number}_{start}-{end}"
        write_monst3r_clip(
            scene, data / kind / subset / folder, raw / kind / subset / f"{number}.mp4", start, num_frames
        )
    elif fmt == "dynamic_npz":
        form = INTRINSIC_FORMS[(i // len(names)) % len(INTRINSIC_FORMS)]
        path = data / kind / subset / (f"{number}/{ranged}" if nested else f"{number}.npz")
        write_dynamic_npz(window(scene, start, num_frames), path, form)
    elif nested and subset == "static_1":
        path = data / kind / subset / str(number) / ranged
        write_static_npz(scene, path, raw / kind / subset / str(number) / "images_4", start, num_frames)
    elif nested:
        path = data / kind / subset / f"group_{i % 2}" / str(number) / ranged
        write_static_npz(scene, path, raw / kind / subset / f"{number}.mp4", start, num_frames)
    else:
        rgb = raw / kind / subset / (f"{number}.mp4" if subset == "static_1" else str(number))
        write_static_npz(scene, data / kind / subset / f"{number}.npz", rgb)
    write_json(out / "clips" / f"{i}.json", {"subset": subset, "number": number, "caption": scene.caption})
    return f"{subset}/{number}"


def main(args: argparse.Namespace) -> None:
    """Write the tree described by ``args``."""
    from tqdm import tqdm

    with tqdm(total=args.num_clips, unit="clip", desc="synthetic clips") as bar:
        data = write_tree(
            args.out,
            args.num_clips,
            args.num_frames,
            args.height,
            args.width,
            args.seed,
            lambda _: bar.update(),
            args.layout,
            args.workers,
        )
    print(f"wrote {args.num_clips} clips to {data}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.data.synthetic``."""
    parser = argparse.ArgumentParser(
        prog="fourdnex.data.synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder to create data/ in")
    parser.add_argument("--num_clips", type=int, default=10)
    parser.add_argument("--num_frames", type=int, default=49, help="frames per clip")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--seed", type=int, default=0, help="clip i renders seed * 100003 + i")
    parser.add_argument("--layout", choices=TREE_LAYOUTS, default="flat", help="flat ids or the nested layouts")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering clips in parallel")
    return parser


if __name__ == "__main__":
    run(main, build_parser())
