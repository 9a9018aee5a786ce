"""One picture of a result: frames of its RGB and XYZ videos over its registered dynamic point cloud, seen from above
and behind the first camera with every frame's camera; the README's quick-start figure is one.

    python pm_registration.py --pkl_dir results               # the registration the picture shows
    python -m fourdnex.geometry.figure results/00000.npz --out docs/quickstart.png

Rows, one column per shown frame (evenly spaced over the clip, the first one the input's):

1. the RGB video;
2. the XYZ video as the result's mp4 shows it (x, y, z in [-1, 1] as red, green, blue);
3. that frame's registered points (pm_registration.py's, residual filter aside) splatted as render.py splats them,
   seen by one overview camera: lifted and pulled back from the first camera along its own axes, looking at a
   point between the centre of the first frame's points and the first camera. On them, the path of every frame's
   camera centre (white) and that frame's camera as a frustum (yellow) whose far side is a tenth of the scene's
   depth away.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fourdnex.cli import run
from fourdnex.errors import UsageError
from fourdnex.geometry.cameras import camera_rays, look_at, project_points, transform_points
from fourdnex.geometry.paths import scene_depth
from fourdnex.geometry.render import SPLAT_SCALE, find_registration, footprints, splat
from fourdnex.geometry.results import load_result, to_uint8

#: The overview camera, in units of the scene depth: behind the first camera, above it, and its focal length as a
#: share of the first camera's (wider, so the path fits).
BACK, LIFT, FOCAL = 0.8, 0.7, 0.8
#: Where the overview camera looks: this share of the way from the centre of the first frame's points to the first
#: camera, so that the cameras stay in view below a scene that reaches far (the quick start's floor pushed them to
#: the picture's bottom edge, and their path out of it, when it looked at the points' centre).
AIM = 0.3
#: render.py's splat size for the overview: a ground seen edge-on by the first camera is seen from above here, its
#: points' footprints (sized for the first camera's view) stretched several times.
SPLAT = 3 * SPLAT_SCALE
GAP = 6  # white pixels between panels
PATH_COLOR, CAMERA_COLOR = (255, 255, 255), (255, 210, 0)


def overview_camera(
    cam2world: torch.Tensor, focal: float, centre: torch.Tensor, depth: float, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``K (3, 3)`` and ``cam2world (4, 4)`` (float64) of the overview camera of the first camera ``cam2world (4,
    4)``: focal length ``focal`` in pixels of its ``height x width`` image, through whose centre it looks at
    ``centre (3,)`` (the first camera's principal point, wherever its registration put it, does not carry over),
    from ``depth`` scene units behind and above the first camera."""
    axes, origin = cam2world[:3, :3], cam2world[:3, 3]
    up = -axes[:, 1]  # OpenCV's y points down
    eye = origin - BACK * depth * axes[:, 2] + LIFT * depth * up
    pose = look_at(eye, centre, up=tuple(up.tolist()))
    K = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=cam2world.dtype)
    return K, pose


def _frustum(cam2world: torch.Tensor, K: torch.Tensor, height: int, width: int, far: float) -> torch.Tensor:
    """World points ``(5, 3)``: a camera's centre and the corners of its image at depth ``far``."""
    corners = torch.tensor([[0, 0], [width, 0], [width, height], [0, height]], dtype=K.dtype)
    world = transform_points(cam2world[None], camera_rays(corners, K[None]) * far)[0]  # (4, 3)
    return torch.cat([cam2world[None, :3, 3], world])


def draw_cameras(panel: np.ndarray, pixels: np.ndarray, frustum: np.ndarray) -> np.ndarray:
    """``panel`` with the camera path through ``pixels (F, 2)`` and one camera's ``frustum (5, 2)`` drawn on it."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(panel)
    draw = ImageDraw.Draw(image)
    draw.line([tuple(p) for p in pixels.tolist()], fill=PATH_COLOR, width=2)
    centre, *corners = [tuple(p) for p in frustum.tolist()]
    for corner in corners:
        draw.line([centre, corner], fill=CAMERA_COLOR, width=2)
    draw.line([*corners, corners[0]], fill=CAMERA_COLOR, width=2)
    return np.asarray(image)


def figure(result_path: str | Path, shown: int = 4, zoom: int = 3) -> np.ndarray:
    """The picture of the result at ``result_path`` (its registration beside it): ``(3 H z + 2 gap, shown W z + ...,
    3)`` uint8 for frames of ``H x W`` and ``zoom`` z."""
    if shown < 1 or zoom < 1:
        raise UsageError(f"--shown and --zoom must be at least 1, got {shown} and {zoom}")
    result = load_result(result_path)
    reg = find_registration(result_path)
    frames = reg["frame_index"]
    points, depth = torch.from_numpy(reg["points"]).double(), torch.from_numpy(reg["depth"]).double()
    K, cam2world = torch.from_numpy(reg["K"]).double(), torch.from_numpy(reg["cam2world"]).double()
    keep = depth > 0
    if not keep[0].any():
        raise UsageError(f"{result_path}: the registration's first frame has no point of positive depth")
    count, height, width = depth.shape
    panel_h, panel_w = height * zoom, width * zoom
    picks = np.linspace(0, count - 1, min(shown, count)).round().astype(int)
    scene = scene_depth(depth[0], keep[0])
    centre = points[0][keep[0]].median(0).values
    target = centre + AIM * (cam2world[0, :3, 3] - centre)
    focal = FOCAL * float(K[0, 0, 0] + K[0, 1, 1]) / 2 * zoom
    K_view, pose = overview_camera(cam2world[0], focal, target, scene, panel_h, panel_w)
    path, _ = project_points(cam2world[None, :, :3, 3], K_view[None], pose[None])  # (1, F, 2)
    extent = footprints(depth, K)  # (F, H, W, 2)
    rows = [[], [], []]
    for f in picks:
        frame = int(frames[f])
        rows[0].append(result.rgb[frame].repeat(zoom, 0).repeat(zoom, 1))
        rows[1].append(to_uint8(result.xyz[frame], -1.0).repeat(zoom, 0).repeat(zoom, 1))
        sel = keep[f]
        cloud, _, _ = splat(
            points[f][sel], torch.from_numpy(result.rgb[frame])[sel], extent[f][sel], K_view, pose,
            panel_h, panel_w, SPLAT,
        )  # fmt: skip
        corners, _ = project_points(_frustum(cam2world[f], K[f], height, width, scene / 10)[None], K_view[None],
                                    pose[None])  # fmt: skip
        rows[2].append(draw_cameras(cloud.numpy(), path[0].numpy(), corners[0].numpy()))
    grid = np.full((3 * panel_h + 2 * GAP, len(picks) * (panel_w + GAP) - GAP, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            y, x = r * (panel_h + GAP), c * (panel_w + GAP)
            grid[y : y + panel_h, x : x + panel_w] = panel
    return grid


def main(args: argparse.Namespace) -> None:
    """Write the picture ``args`` ask for."""
    from fourdnex.files import write_png

    picture = figure(args.result, args.shown, args.zoom)
    write_png(args.out, picture)
    print(f"wrote {args.out} ({picture.shape[1]} x {picture.shape[0]})")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.geometry.figure``."""
    parser = argparse.ArgumentParser(
        prog="fourdnex.geometry.figure", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("result", help="a result .npz as inference.py writes it, registered (NNNNN_reg.npz beside it)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--shown", type=int, default=4, help="frames shown, evenly spaced (default 4)")
    parser.add_argument("--zoom", type=int, default=3, help="pixels per result pixel (default 3)")
    return parser


if __name__ == "__main__":
    run(main, build_parser())
