"""Toy scenes with known cameras for the registration tests, and error measures against them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fourdnex import toy_scene
from fourdnex.geometry import rotation_angle_deg


@dataclass
class Truth:
    """A normalized pointmap and its cameras in the pointmap's frame."""

    xyz: torch.Tensor  # (F, H, W, 3) float32, as inference writes it
    K: torch.Tensor  # (F, 3, 3)
    cam2world: torch.Tensor  # (F, 4, 4) rigid, in the pointmap's frame
    depth: torch.Tensor  # (F, H, W) in pointmap units
    rgb: torch.Tensor  # (F, H, W, 3) uint8


def make_truth(scene: toy_scene.ToyScene) -> Truth:
    """Normalize a rendered scene like inference does and move its cameras into the same frame."""
    xyz, similarity = toy_scene.normalize_like_inference(scene.points, scene.cam2world)
    scale = similarity[:3, :3].norm(dim=0)[0]
    cam2world = similarity[None] @ scene.cam2world
    cam2world[:, :3, :3] /= scale
    return Truth(xyz.float(), scene.K, cam2world, scene.depth * scale, scene.rgb)


def toy_truth(frames=5, height=48, width=64, focal=0.9, zoom=0.0, offset=(0.03, -0.04), seed=0) -> Truth:
    """The toy scene seen along its default trajectory."""
    K = toy_scene.camera_intrinsics(frames, height, width, focal, zoom, offset)
    return make_truth(toy_scene.render(K, toy_scene.trajectory(frames, seed=seed), height, width))


def errors(truth: Truth, K: torch.Tensor, cam2world: torch.Tensor, depth: torch.Tensor) -> dict[str, float]:
    """Worst focal error (relative), principal point error (pixels), rotation (deg), camera center (fraction of the
    pointmap's extent, 2) over frames, and the mean relative depth error."""
    K, cam2world, depth = K.double(), cam2world.double(), depth.double()
    focal = ((K[:, [0, 1], [0, 1]] - truth.K[:, [0, 1], [0, 1]]) / truth.K[:, [0, 1], [0, 1]]).abs().max()
    principal = (K[:, :2, 2] - truth.K[:, :2, 2]).abs().max()
    rotation = rotation_angle_deg(cam2world[:, :3, :3], truth.cam2world[:, :3, :3]).max()
    center = (cam2world[:, :3, 3] - truth.cam2world[:, :3, 3]).norm(dim=-1).max() / 2
    depth_err = ((depth - truth.depth) / truth.depth).abs().mean()
    return {k: float(v) for k, v in zip(("focal", "principal", "rotation", "center", "depth"),
                                         (focal, principal, rotation, center, depth_err), strict=True)}  # fmt: skip
