"""Novel-view rendering benchmark (render.py's splatting): quality against ray-cast ground truth, and speed.

1. Quality, at a small size: the toy scene (fourdnex/testing/scenes.py) seen by its first camera gives the true point
   cloud (true depth, true camera); it is splatted into held-out true cameras (later frames of the scene's own
   trajectory) and into the generated paths' last frames, for several splat scales, and compared with the ray-cast
   image of each view: PSNR on covered pixels, coverage, holes (masked pixels with no pixel within one pixel that the
   source camera cannot see: gaps inside seen surfaces) and leaks (pixels the source cannot see, one pixel in from
   their border, that a point covers anyway) in % of the image.
2. Speed, at the full size: every frame of the scene along its trajectory as the registration, rendered along each
   path kind (all points, one frame at a time on the device), with the memory-traffic floor beside it: the least
   bytes a renderer must move, reading each point's position, source depth and colour (19 B) and writing each pixel's
   colour, depth and mask (8 B), over the copy bandwidth measured on the device.

``--strip FILE.png`` instead writes the README's figure: a synthetic scene (fourdnex/data/synthetic.py) saved as a
result, registered by pm_registration.py and rendered by render.py (the scripts themselves), input frames over novel
frames with the mask in magenta.

Example (the CPU run; add --device cuda on a GPU):
    python bench/bench_render.py --frames 49 --height 480 --width 720
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_registration import bandwidth, row, sync
from fourdnex.geometry.paths import CAMERA_PATHS, CameraPath, camera_path
from fourdnex.geometry.render import SPLAT_SCALE, render_frames, splat
from fourdnex.runtime import device_of
from fourdnex.testing import scenes

ROOT = Path(__file__).resolve().parents[1]
#: Least bytes per point (position 12, source depth 4, colour 3) and per pixel (colour 3, depth 4, mask 1).
BYTES_PER_POINT = 19
BYTES_PER_PIXEL = 8
#: The README figure shows the mask (pixels no point covers) in magenta.
MASK_COLOR = np.array([255, 0, 255], np.uint8)


def grow(mask: torch.Tensor) -> torch.Tensor:
    """``mask (H, W)`` dilated by one pixel (3 x 3)."""
    return F.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0] > 0


def quality(height: int, width: int, scales: list[float]) -> list[str]:
    """The quality table's rows: views x splat scales."""
    K = scenes.camera_intrinsics(5, height, width)
    cam2world = scenes.trajectory(5)
    source = scenes.render(K[:1], cam2world[:1], height, width)
    depth = float(source.depth[0].median())
    views = {f"true camera, frame {f} of 5": (K[f], cam2world[f]) for f in (1, 2)}
    moves = {"orbit 10 deg": CameraPath("orbit", angle=10.0), "orbit 30 deg": CAMERA_PATHS["orbit"],
             "dolly 0.5": CAMERA_PATHS["dolly"], "dolly -0.5": CameraPath("dolly", distance=-0.5)}  # fmt: skip
    for name, move in moves.items():
        Ks, poses = camera_path(move, K[:1].expand(2, 3, 3), cam2world[:1].expand(2, 4, 4), depth)
        views[f"{name} (last frame)"] = (Ks[-1], poses[-1])
    header = ["view", "splat scale", "PSNR dB (covered)", "coverage %", "holes %", "leaks %"]
    rows = [row(header), row(["---"] * len(header))]
    for name, (Kt, pose) in views.items():
        truth = scenes.render(Kt[None], pose[None], height, width)
        hidden = ~scenes.seen_from(truth.points[0], K[0], cam2world[0], height, width)  # (H, W)
        for scale in scales:
            views_ = render_frames(
                source.points.float(), source.rgb, source.depth.float(), K[:1], torch.ones_like(hidden)[None],
                Kt[None], pose[None], scale,
            )  # fmt: skip
            rgb, mask = views_.rgb[0], views_.mask[0]
            err = (rgb.double() - truth.rgb[0].double())[~mask].square().mean()
            holes = (mask & ~grow(hidden)).double().mean()
            leaks = (~grow(~hidden) & ~mask).double().mean()
            rows.append(row([name, scale, f"{10 * math.log10(255**2 / float(err)):.2f}",
                             f"{100 * float((~mask).double().mean()):.1f}", f"{100 * float(holes):.2f}",
                             f"{100 * float(leaks):.2f}"]))  # fmt: skip
            print(rows[-1], file=sys.stderr)
    return rows


def full_scene(frames: int, height: int, width: int) -> scenes.ToyScene:
    """The toy scene along its trajectory, ray-cast one frame at a time (float32 points)."""
    K, cam2world = scenes.camera_intrinsics(frames, height, width), scenes.trajectory(frames)
    parts = [scenes.render(K[f : f + 1], cam2world[f : f + 1], height, width) for f in range(frames)]
    return scenes.ToyScene(
        K, cam2world, torch.cat([p.depth for p in parts]).float(), torch.cat([p.points for p in parts]).float(),
        torch.cat([p.rgb for p in parts]),
    )  # fmt: skip


def speed(scene: scenes.ToyScene, device: torch.device, gbps: float, repeats: int) -> list[str]:
    """The speed table's rows: one per path kind, best of ``repeats``."""
    frames, height, width = scene.depth.shape
    keep = torch.ones_like(scene.depth, dtype=torch.bool)
    points = frames * height * width
    floor = (points * BYTES_PER_POINT + frames * height * width * BYTES_PER_PIXEL) / (gbps * 1e9)
    header = ["path", "frames x points", "s", "Mpoints/s", "coverage %", "floor s", "floor Mpoints/s", "x floor"]
    rows = [row(header), row(["---"] * len(header))]
    depth = float(scene.depth[0].median())
    inputs = [x.to(device) for x in (scene.points, scene.rgb, scene.depth, scene.K, keep)]
    splat(inputs[0][0, :2, :2].reshape(-1, 3), inputs[1][0, :2, :2].reshape(-1, 3),
          torch.ones(4, 2, device=device), inputs[3][0], scene.cam2world[0].to(device), 8, 8)  # warm-up  # fmt: skip
    for kind, preset in CAMERA_PATHS.items():
        K, cam2world = camera_path(preset, scene.K, scene.cam2world, depth)
        best = math.inf
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            views = render_frames(*inputs, K, cam2world, device=device)
            sync(device)
            best = min(best, time.perf_counter() - start)
        coverage = 100 * float(views.coverage().mean())
        cells = [kind, f"{frames} x {height * width:,}", f"{best:.2f}", f"{points / best / 1e6:.1f}", f"{coverage:.1f}",
                 f"{floor:.3f}", f"{points / floor / 1e6:.0f}", f"{best / floor:.0f}"]  # fmt: skip
        rows.append(row(cells))
        print(rows[-1], file=sys.stderr)
    return rows


def strip(out: Path, frames: int, height: int, width: int, shown: int) -> None:
    """The README figure: a synthetic scene through save_result -> pm_registration.py -> render.py, ``shown`` frames
    of the input over the same frames of the novel view (orbit, the defaults)."""
    from PIL import Image

    from fourdnex.data.synthetic import render_scene
    from fourdnex.files import read_video, write_png
    from fourdnex.geometry.results import save_result

    scene = render_scene(seed=3, num_frames=frames, height=height, width=width)
    xyz, _ = scenes.normalize_like_inference(torch.from_numpy(scene.points), torch.from_numpy(scene.cam2world))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        save_result(tmp, 0, scene.rgb, xyz.numpy(), {"prompt": scene.caption, "synthetic": True})
        for script, *flags in (["pm_registration.py"], ["render.py", "--out", f"{tmp}/novel"]):
            subprocess.run([sys.executable, str(ROOT / script), "--pkl_dir", tmp, "--device", "cpu", *flags],
                           check=True, env=env)  # fmt: skip
        picks = np.linspace(0, frames - 1, shown).round().astype(int)
        preview = read_video(f"{tmp}/novel/00000/preview.mp4", picks.tolist())  # (shown, H, 2W, 3): input | novel
        masks = [np.asarray(Image.open(f"{tmp}/novel/00000/mask/frame_{f:05d}.png")) > 0 for f in picks]
    gap = 4
    grid = np.full((2 * height + gap, shown * (width + gap) - gap, 3), 255, np.uint8)
    for i, (frame, mask) in enumerate(zip(preview, masks, strict=True)):
        x = i * (width + gap)
        grid[:height, x : x + width] = frame[:, :width]
        grid[height + gap :, x : x + width] = np.where(mask[..., None], MASK_COLOR, frame[:, width:])
    write_png(out, grid)
    angle = CAMERA_PATHS["orbit"].angle
    print(f"wrote {out}: frames {picks.tolist()} of {frames}; top: input, bottom: orbit {angle:g} deg, mask in magenta")


def main(args: argparse.Namespace) -> None:
    """Print the tables (or write the strip)."""
    if args.strip:
        strip(Path(args.strip), args.frames, args.height, args.width, args.shown)
        return
    device = device_of(args.device)
    gbps = bandwidth(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"`python {' '.join(sys.argv)}`\n")
    print(f"device: {name}; torch {torch.__version__}; copy bandwidth {gbps:.1f} GB/s ({torch.get_num_threads()} "
          f"threads; splatting on a CPU runs on one); load average {os.getloadavg()[0]:.1f} at start\n")  # fmt: skip
    if args.scales:
        rows = quality(*args.quality_size, args.scales)
        print(f"Quality, {args.quality_size[0]} x {args.quality_size[1]}, source: the scene's first camera:\n")
        print("\n".join(rows) + "\n")
    scene = full_scene(args.frames, args.height, args.width)
    rows = speed(scene, device, gbps, args.repeats)
    print(f"Speed, {args.frames} frames x {args.height} x {args.width}, splat scale {SPLAT_SCALE:g}:\n")
    print("\n".join(rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per path (the best is shown)")
    p.add_argument("--quality_size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    p.add_argument("--scales", type=float, nargs="*", default=[1.0, 1.25, 1.5, 1.75, 2.0],
                   help="splat scales of the quality table (none: skip it)")  # fmt: skip
    p.add_argument("--strip", default=None, help="write the README figure to this PNG instead")
    p.add_argument("--shown", type=int, default=4, help="--strip: frames shown")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
