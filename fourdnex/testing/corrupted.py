"""A stand-in "model" for evaluation tests, benchmarks and the README's example report: ground truth made worse on
purpose and written as result files.

Each clip of a 4DNeX-10M tree becomes one result: its true pointmap (the first camera's frame, one centre and scale
for the clip, in [-1, 1]) with Gaussian noise and a smooth warp (fourdnex.testing.scenes.perturb), and its true RGB
video with Gaussian noise; the result's ``.json`` names the clip (``clip_id``).

    python -m fourdnex.testing.corrupted --gt synthetic/data --out corrupted --num_frames 49 --height 480 --width 720
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fourdnex.cli import run
from fourdnex.evaluation.floors import to_unit_box
from fourdnex.evaluation.truth import clip_sources, load_truth
from fourdnex.geometry.cameras import unproject_depth
from fourdnex.geometry.results import save_result
from fourdnex.testing.scenes import perturb


def write_corrupted(
    gt: str | Path,
    out: str | Path,
    num_frames: int,
    height: int,
    width: int,
    noise: float = 0.01,
    warp: float = 0.02,
    rgb_noise: float = 4.0,
    seed: int = 0,
) -> list[Path]:
    """One result per clip of ``gt`` (in id order) into ``out``; returns the result files.

    ``noise`` and ``warp`` are in pointmap units (its extent is 2), ``rgb_noise`` the standard deviation of the RGB
    noise in 8-bit levels.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, (clip_id, source) in enumerate(sorted(clip_sources(gt).items())):
        truth = load_truth(gt, source, num_frames, height, width)
        xyz = to_unit_box(unproject_depth(truth.depth.astype(np.float64), truth.K, truth.cam2world))
        xyz = perturb(torch.from_numpy(xyz).double(), noise, warp, seed=seed + index).clamp(-1, 1).float().numpy()
        rgb = (truth.rgb + rng.normal(0.0, rgb_noise, truth.rgb.shape)).round().clip(0, 255).astype(np.uint8)
        meta = {
            "clip_id": clip_id,
            "note": f"corrupted ground truth: noise {noise}, warp {warp}, rgb noise {rgb_noise}",
        }
        paths.append(save_result(out, index, rgb, xyz, meta))
    return paths


def main(args: argparse.Namespace) -> None:
    """Write the results and say where."""
    files = write_corrupted(
        args.gt, args.out, args.num_frames, args.height, args.width, args.noise, args.warp, args.rgb_noise, args.seed
    )
    print(f"wrote {len(files)} results to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.testing.corrupted``."""
    p = argparse.ArgumentParser(prog="fourdnex.testing.corrupted", description=__doc__.split("\n\n")[0])
    p.add_argument("--gt", required=True, help="a 4DNeX-10M data folder")
    p.add_argument("--out", required=True, help="results folder to write")
    p.add_argument("--num_frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--noise", type=float, default=0.01, help="Gaussian noise on the pointmap (extent 2)")
    p.add_argument("--warp", type=float, default=0.02, help="smooth warp of the pointmap (extent 2)")
    p.add_argument("--rgb_noise", type=float, default=4.0, help="Gaussian noise on the RGB video (8-bit levels)")
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    run(main, build_parser())
