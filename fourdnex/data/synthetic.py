"""Procedural 4D scenes with exact ground truth, and writers for every clip format of the 4DNeX-10M layout.

A scene is ray-cast analytically (:mod:`fourdnex.data.raycast`): a ground plane (y = 0), a background (a room of
walls or a sky dome), two to five objects of several sizes (rolling or bouncing balls, sliding and turning boxes and
pillars, a squashing-and-stretching blob), a directional light of varying strength and tint, and a pinhole camera
of varying height, pitch and field of view that orbits, dollies, trucks or hovers with a little shake. Every surface
is textured by one of the texture families (checkers, stripes, mottled noise, plain, gradients) in its own colours;
leaving one family out of the training clips gives a held-out set of appearances the model never saw. Everything is
deterministic from a seed and the families allowed.

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
import csv
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fourdnex.cli import run
from fourdnex.data.raycast import TEXTURE_FAMILIES, Lighting, SceneLayout, SceneObject, Texture, render_frame
from fourdnex.files import atomic_path, write_json, write_npy, write_npz, write_png, write_text, write_video
from fourdnex.geometry.cameras import intrinsics_to_integer_centres, look_at, rotation_to_quaternion, so3_exp
from fourdnex.runtime import cpu_threads, worker_processes

FPS = 24
#: The subsets of the 4DNeX-10M layout and the clip format each one uses.
SUBSETS: dict[str, str] = {
    "dynamic_1": "monst3r",
    "dynamic_2": "monst3r",
    "dynamic_3": "dynamic_npz",
    "static_1": "static_npz",
    "static_2": "static_npz",
}
#: Clip ``i`` of a set of clips with seed ``s`` (:func:`write_tree`, the VAE trainer's generator clips) is the scene
#: ``s * SEED_STRIDE + i`` (:func:`clip_scene`): sets of different seeds share no scene up to this many clips.
SEED_STRIDE = 100_003
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
#: Ground and wall materials: two colours each, which the surface's texture family mixes.
_GROUNDS = {
    "grassy": ((0.30, 0.55, 0.20), (0.22, 0.42, 0.14)),
    "sandy": ((0.85, 0.75, 0.55), (0.70, 0.58, 0.40)),
    "wooden": ((0.60, 0.40, 0.22), (0.42, 0.26, 0.13)),
    "tiled": ((0.65, 0.70, 0.75), (0.40, 0.45, 0.55)),
    "stony": ((0.55, 0.55, 0.52), (0.32, 0.32, 0.30)),
    "chalky": ((0.88, 0.88, 0.84), (0.25, 0.25, 0.28)),
}
_WALLS = {
    "cream": ((0.85, 0.82, 0.75), (0.60, 0.55, 0.50)),
    "brick": ((0.62, 0.28, 0.20), (0.80, 0.78, 0.72)),
    "blue": ((0.55, 0.65, 0.85), (0.35, 0.42, 0.66)),
    "green": ((0.55, 0.70, 0.55), (0.36, 0.52, 0.38)),
    "grey": ((0.70, 0.70, 0.72), (0.40, 0.40, 0.44)),
}
#: The word each texture family gives its surface in a caption.
_PATTERN_WORDS = {
    "checkers": "checkered",
    "stripes": "striped",
    "noise": "mottled",
    "plain": "plain",
    "gradients": "shaded",
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
class _Draw:
    """A scene drawn from a seed: its layout, the camera's path and the words that describe them."""

    layout: SceneLayout
    camera_kind: str
    camera: dict
    ground_name: str
    wall_name: str


def _texture(rng: np.random.Generator, families: tuple[str, ...], colors, scale: tuple[float, float],
             upright: bool) -> Texture:  # fmt: skip
    """A texture of a family drawn from ``families`` mixing ``colors``; ``upright`` turns its pattern about the
    vertical only (ground and walls), else about any axis (objects)."""
    # One uniform draw whatever the number of families, so that a scene's geometry, colours and motion do not
    # depend on which families are allowed: the held-out family's scenes are the in-distribution ones, retextured.
    family = families[min(int(rng.random() * len(families)), len(families) - 1)]
    axis = np.array([0.0, 1.0, 0.0]) if upright else rng.normal(size=3)
    axis = axis / np.linalg.norm(axis)
    return Texture(
        family=family,
        color1=np.asarray(colors[0], np.float64),
        color2=np.asarray(colors[1], np.float64),
        scale=float(rng.uniform(*scale)),
        rotation=so3_exp(axis * rng.uniform(0, 2 * math.pi)),
        offset=rng.uniform(0, 1, size=3),
    )


def _sample_scene(seed: int, dynamic: bool, families: tuple[str, ...] = TEXTURE_FAMILIES) -> _Draw:
    """Draw a scene description from ``seed``, every surface textured with a family of ``families``."""
    unknown = sorted(set(families) - set(TEXTURE_FAMILIES))
    if unknown or not families:
        raise ValueError(f"texture families must be among {TEXTURE_FAMILIES}, got {families}")
    rng = np.random.default_rng(seed)
    room = bool(rng.random() < 0.5)
    ground_name = str(rng.choice(list(_GROUNDS)))
    wall_name = str(rng.choice(list(_WALLS)))
    ground = _texture(rng, families, _GROUNDS[ground_name], (0.3, 1.4), upright=True)
    walls = _texture(rng, families, _WALLS[wall_name], (0.3, 1.2), upright=True)
    direction = np.array([rng.uniform(-1, 1), rng.uniform(0.6, 2.0), rng.uniform(-1, 1)])
    warmth = rng.uniform(-0.12, 0.12)
    light = Lighting(
        direction=direction / np.linalg.norm(direction),
        ambient=float(rng.uniform(0.3, 0.6)),
        diffuse=float(rng.uniform(0.35, 0.8)),
        tint=np.array([1.0 + warmth, 1.0, 1.0 - warmth]),
    )
    color_names = rng.choice(list(_COLORS), size=7, replace=False)
    num_objects = int(rng.integers(2, 6))
    shapes = list(rng.choice(["sphere", "box", "cylinder", "sphere", "box"], size=num_objects))
    if dynamic or rng.random() < 0.5:
        shapes[int(rng.integers(num_objects))] = "ellipsoid"
    objects: list[SceneObject] = []
    positions: list[np.ndarray] = []
    for i, shape in enumerate(shapes):
        for _ in range(20):  # keep objects apart at t = 0
            pos = np.array([rng.uniform(-2.4, 2.4), 0.0, rng.uniform(-2.4, 2.4)])
            if all(np.linalg.norm(pos - p) > 1.4 for p in positions):
                break
        positions.append(pos)
        grow = rng.uniform(0.7, 1.5)  # small and large objects
        if shape == "sphere":
            size = np.array([rng.uniform(0.25, 0.55)]) * grow
        elif shape == "box":
            size = rng.uniform(0.15, 0.55, size=3) * grow
        elif shape == "cylinder":
            radius = rng.uniform(0.15, 0.4)
            size = np.array([radius, rng.uniform(0.3, 0.9), radius]) * grow
        else:
            size = np.array([rng.uniform(0.3, 0.5), rng.uniform(0.45, 0.75), rng.uniform(0.3, 0.5)]) * grow
        heading = rng.uniform(0, 2 * math.pi)
        speed = rng.uniform(0.3, 1.1) if shape != "ellipsoid" else rng.uniform(0.0, 0.4)
        moving = dynamic and (i == 0 or rng.random() < 0.75)
        color = np.array(_COLORS[str(color_names[i])])
        second = np.clip(color * 0.5 + rng.uniform(0.0, 0.35), 0, 1)
        objects.append(
            SceneObject(
                shape=shape,
                color_name=str(color_names[i]),
                texture=_texture(rng, families, (color, second), (0.12, 0.45), upright=False),
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
        "radius": rng.uniform(3.8, 7.5),
        "height": rng.uniform(0.5, 4.0),  # low and high viewpoints: a range of pitches
        "azimuth": rng.uniform(0, 2 * math.pi),
        "rate": rng.choice([-1, 1]) * rng.uniform(0.15, 0.35),  # rad/s (orbit) or m/s scale
        "target": np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.0, 0.9), rng.uniform(-0.6, 0.6)]),
        "shake_freq": rng.uniform(0.5, 1.5, size=3),
        "shake_phase": rng.uniform(0, 2 * math.pi, size=3),
    }
    layout = SceneLayout(
        room=room,
        room_half=float(rng.uniform(7.0, 10.0)),
        room_height=float(rng.uniform(4.0, 6.0)),
        ground=ground,
        walls=walls,
        sky_top=np.array([rng.uniform(0.2, 0.4), rng.uniform(0.4, 0.6), rng.uniform(0.8, 1.0)]),
        sky_horizon=np.array([rng.uniform(0.8, 0.95), rng.uniform(0.8, 0.95), rng.uniform(0.85, 1.0)]),
        mountain_freqs=rng.integers(2, 9, size=3).astype(np.float64),
        mountain_phases=rng.uniform(0, 2 * math.pi, size=3),
        light=light,
        objects=objects,
        focal_ratio=float(rng.uniform(0.55, 1.6)),  # horizontal fields of view from 35 to 85 degrees
    )
    return _Draw(layout, camera_kind, camera, ground_name, wall_name)


def _camera_pose(draw: _Draw, t: float) -> np.ndarray:
    """Camera-to-world (4, 4) at time ``t``."""
    cam = draw.camera
    kind = draw.camera_kind
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


def _caption(draw: _Draw, dynamic: bool) -> str:
    """A one-sentence description of the scene."""
    layout = draw.layout
    parts = []
    for obj in layout.objects:
        if obj.moving:
            verb = {
                "sphere": "bounces along" if obj.bounce > 0 else "rolls along",
                "box": "slides and turns",
                "cylinder": "slides and turns",
                "ellipsoid": "squashes and stretches" if obj.velocity.any() else "squashes and stretches in place",
            }[obj.shape]
        else:
            verb = "stands still"
        pattern = _PATTERN_WORDS[obj.texture.family]
        parts.append(f"a {pattern} {obj.color_name} {obj.noun} {verb}")
    subjects = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    walls = f"{_PATTERN_WORDS[layout.walls.family]} {draw.wall_name}"
    place = f"in a room with {walls} walls" if layout.room else "in an open field under a blue sky"
    prefix = "A still scene. " if not dynamic else ""
    ground = f"{_PATTERN_WORDS[layout.ground.family]} {draw.ground_name}"
    return f"{prefix}On {ground} ground {place}, {subjects}, while the camera {_CAMERA_WORDS[draw.camera_kind]}."


def render_scene(
    seed: int,
    num_frames: int,
    height: int,
    width: int,
    dynamic: bool = True,
    num_threads: int | None = 1,
    families: tuple[str, ...] = TEXTURE_FAMILIES,
) -> Scene:
    """Render ``num_frames`` frames of the scene drawn from ``seed`` at ``height x width`` (24 fps), every surface
    textured with a family of ``families`` (:data:`fourdnex.data.raycast.TEXTURE_FAMILIES`).

    With ``dynamic=False`` the objects stand still (only the camera moves) and the dynamic mask is all False.
    The same seed and families always give the same scene; a longer clip extends a shorter one frame for frame.
    ``num_threads``: torch CPU threads while rendering (restored afterwards; None keeps the current setting). One
    thread is the default because the work per operation is small (BENCHMARKS.md, "Synthetic scenes").
    """
    if num_frames < 1 or height < 2 or width < 2:
        raise ValueError(f"need at least 1 frame of 2x2 pixels, got {num_frames} frames of {height}x{width}")
    with cpu_threads(num_threads, blas=False):
        return _render(seed, num_frames, height, width, dynamic, families)


def _render(seed: int, num_frames: int, height: int, width: int, dynamic: bool, families: tuple[str, ...]) -> Scene:
    """:func:`render_scene` without the thread setting."""
    draw = _sample_scene(seed, dynamic, families)
    fx = draw.layout.focal_ratio * width
    K = np.array([[fx, 0.0, width / 2.0], [0.0, fx, height / 2.0], [0.0, 0.0, 1.0]])
    rgb = np.empty((num_frames, height, width, 3), np.uint8)
    depth = np.empty((num_frames, height, width), np.float32)
    points = np.empty((num_frames, height, width, 3), np.float32)
    labels = np.empty((num_frames, height, width), np.int16)
    mask = np.empty((num_frames, height, width), bool)
    c2ws = np.empty((num_frames, 4, 4), np.float64)
    for f in range(num_frames):
        t = f / FPS
        c2ws[f] = _camera_pose(draw, t)
        frame = render_frame(draw.layout, t, c2ws[f], K, height, width, dynamic)
        rgb[f] = (frame[0].numpy() * 255.0 + 0.5).astype(np.uint8)
        depth[f], points[f], labels[f], mask[f] = (x.numpy() for x in frame[1:])
    return Scene(
        rgb=rgb,
        depth=depth,
        points=points,
        K=np.repeat(K[None], num_frames, 0).astype(np.float32),
        cam2world=c2ws.astype(np.float32),
        dynamic_mask=mask,
        caption=_caption(draw, dynamic),
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


def clip_scene(seed: int, i: int) -> tuple[int, str]:
    """Clip ``i`` of a set with ``seed``: the seed of its scene (:data:`SEED_STRIDE`) and its subset (round-robin
    over :data:`SUBSETS`)."""
    return seed * SEED_STRIDE + i, list(SUBSETS)[i % len(SUBSETS)]


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
    families: tuple[str, ...] = TEXTURE_FAMILIES,
) -> Path:
    """Write ``num_clips`` synthetic clips as a 4DNeX-10M tree under ``<out>/data``; returns that data folder.

    Clips go round-robin to the subsets of :data:`SUBSETS`; clip ``i`` is rendered from seed ``seed * 100003 + i``
    (:func:`clip_scene`) and numbered ``10000 + i``; every range in a name is inclusive (``<start>-<end>`` is
    ``end - start + 1`` frames). ``layout="flat"``::

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

    and in both: ``data/caption/<subset>_with_caption_upload.csv`` (number,caption), written once every clip is, and
    ``<out>/captions.txt``, every caption in clip order, one a line (a tokenizer's corpus).
    Every surface is textured with a family of ``families``. ``workers`` processes render in parallel. A clip's
    files are written atomically and then its record in ``<out>/clips/<i>.json`` (subset, number, caption), so a
    re-run renders only the clips without a record.
    """
    if layout not in TREE_LAYOUTS:
        raise ValueError(f"layout must be one of {TREE_LAYOUTS}, got {layout!r}")
    records = Path(out) / "clips"
    records.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(num_clips) if not (records / f"{i}.json").is_file()]
    job = functools.partial(write_tree_clip, Path(out), num_frames=num_frames, height=height, width=width, seed=seed,
                            layout=layout, families=tuple(families))  # fmt: skip
    with worker_processes(workers if workers > 1 else 0) as pool:
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
    lines = [json.loads((records / f"{i}.json").read_text())["caption"] for i in range(num_clips)]
    write_text(Path(out) / "captions.txt", "\n".join(lines) + "\n")
    return data


def write_tree_clip(
    out: Path, i: int, num_frames: int, height: int, width: int, seed: int, layout: str, families: tuple[str, ...]
) -> str:
    """Render clip ``i`` of :func:`write_tree`, write its files, then its record; returns ``<subset>/<number>``."""
    data = out / "data"
    raw = data / "raw"
    scene_seed, subset = clip_scene(seed, i)
    fmt = SUBSETS[subset]
    number = 10000 + i
    kind = "dynamic" if subset.startswith("dynamic") else "static"
    nested = layout == "nested"
    start = 1 + i % 3 if nested else (i % 3 if fmt == "monst3r" else 0)
    end = start + num_frames - 1
    tail = (i // 5) % 2 if fmt == "monst3r" else 0
    scene = render_scene(scene_seed, end + 1 + tail, height, width, fmt != "static_npz", families=families)
    ranged = f"frame_{start}-frame_{end}.npz"
    if fmt == "monst3r":
        folder = f"{number}/part_{start}-{end}" if nested else f"{number}_{start}-{end}"
        write_monst3r_clip(
            scene, data / kind / subset / folder, raw / kind / subset / f"{number}.mp4", start, num_frames
        )
    elif fmt == "dynamic_npz":
        form = INTRINSIC_FORMS[(i // len(SUBSETS)) % len(INTRINSIC_FORMS)]
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
            tuple(args.texture_families),
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
    parser.add_argument(
        "--texture_families",
        nargs="+",
        default=list(TEXTURE_FAMILIES),
        choices=TEXTURE_FAMILIES,
        help="the patterns the surfaces are textured with (leave one out of training clips, keep it for a held-out "
        "set: scenes of a texture family the model never saw)",
    )
    return parser


if __name__ == "__main__":
    run(main, build_parser())
