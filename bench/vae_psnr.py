"""A model folder's VAE on held-out trees, each at its own frame size: the reconstruction PSNR of each modality.

Each tree's clips (the first ``--limit`` by id) are read and prepared as the cache build prepares them
(``fourdnex.train.vae.load_clips``), coded and decoded through the posterior's mode, and scored as the VAE trainer
scores its held-out clips (``fourdnex.train.vae.reconstruction_psnr``: the mean squared error over every clip, in dB
for values in [-1, 1]). The same scenes written at two sizes tell how the VAE's 8 x 8-pixel latent grid codes a
scene at each: at twice the size a latent pixel covers a quarter of the scene.

    python bench/vae_psnr.py --model_path example/demo/model --tree held-out-96/data 96 144 \\
        --tree held-out-192/data 192 288 --json vae_psnr.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.files import write_json
from fourdnex.model.loading import load_vae
from fourdnex.runtime import device_of
from fourdnex.train.vae import load_clips, reconstruction_psnr


def vae_psnr(model_path: str, trees: list[tuple[str, int, int]], num_frames: int, limit: int, workers: int,
             device: torch.device) -> list[dict]:  # fmt: skip
    """One row per tree: ``{"tree", "height", "width", "clips", "rgb", "xyz"}`` (PSNR in dB)."""
    vae = load_vae(model_path).to(device).eval()
    rows = []
    for tree, height, width in trees:
        clips = load_clips(tree, num_frames, height, width, limit, workers)
        psnr = reconstruction_psnr(vae, clips, device)
        rows.append({"tree": str(tree), "height": height, "width": width, "clips": len(clips), **psnr})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="a model folder with a vae/")
    parser.add_argument(
        "--tree", nargs=3, action="append", required=True, metavar=("DATA", "HEIGHT", "WIDTH"),
        help="a 4DNeX-10M tree's data folder and the size its clips are prepared at (repeat for more)",
    )  # fmt: skip
    parser.add_argument("--num_frames", type=int, default=25)
    parser.add_argument("--limit", type=int, default=64, help="the first N clips of each tree")
    parser.add_argument("--workers", type=int, default=4, help="threads reading clips")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    trees = []
    for data, height, width in args.tree:
        if not (height.isdigit() and width.isdigit()):
            parser.error(f"--tree {data} {height} {width}: the height and width must be whole numbers")
        trees.append((data, int(height), int(width)))
    rows = vae_psnr(args.model_path, trees, args.num_frames, args.limit, args.workers, device_of(args.device))
    print("| tree | size | clips | RGB PSNR (dB) | XYZ PSNR (dB) |\n|---|---|---|---|---|")
    for row in rows:
        size = f"{row['height']} x {row['width']}"
        print(f"| {row['tree']} | {size} | {row['clips']} | {row['rgb']:.2f} | {row['xyz']:.2f} |")
    if args.json:
        write_json(args.json, {"model_path": args.model_path, "num_frames": args.num_frames, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
