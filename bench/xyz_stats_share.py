"""How well the XYZ latents' statistics of K synthetic clips stand for those of many: the reason for
:data:`fourdnex.train.config.STATS_CLIPS`, the clips whose statistics normalize every clip of a run that trains while
its clips are made (``finetune.py --synthetic_clips_per_step``).

Renders and prepares clips ``0 .. N-1`` of the generator as ``finetune.py --synthetic_clips`` does
(:func:`fourdnex.train.rendered.prepare_rendered_clip`), encodes each XYZ video with the model folder's VAE on this
CPU (diffusers' chunks, one clip a call), keeps each clip's sums (:func:`fourdnex.data.cache.xyz_sums`), and prints
the mean and standard deviation of the N clips (:func:`fourdnex.data.build.merge_stats`, the build's) and, for K of
8-64, the spread over ``--draws`` random K-clip subsets of the K clips' mean and standard deviation (corrected for
drawing without replacement from N), as a share of the N clips' standard deviation and scaled by sqrt(K / 256) to 256
clips. The sums are written to ``--sums`` as they come, and a run given the same file goes on from where it stopped.

    python bench/xyz_stats_share.py --model_path example/demo/model --clips 128 --sums xyz_sums.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.data.build import merge_stats
from fourdnex.data.cache import xyz_sums
from fourdnex.files import write_text
from fourdnex.model.fusion import encode_latents
from fourdnex.model.loading import load_vae
from fourdnex.train.config import STATS_CLIPS
from fourdnex.train.rendered import prepare_rendered_clip

FAMILIES = ("checkers", "noise", "plain", "gradients")  # the demo recipe's training families


def clip_sums(args: argparse.Namespace) -> list[dict]:
    """Each clip's XYZ latent sums, those of ``--sums`` first."""
    path = Path(args.sums)
    sums = json.loads(path.read_text()) if path.is_file() else []
    vae = load_vae(args.model_path)
    for i in tqdm(range(len(sums), args.clips), initial=len(sums), total=args.clips, desc="clips", unit="clip"):
        clip, _ = prepare_rendered_clip(i, args.seed, args.num_frames, args.height, args.width, FAMILIES, False, False)
        with torch.no_grad():
            sums.append(xyz_sums(encode_latents(vae, clip.videos[1:2])[0]))
        write_text(path, json.dumps(sums))
    return sums


def mean_std(sums: list[dict]) -> tuple[float, float]:
    merged = merge_stats([{"xyz_latent_sums": s} for s in sums], {})
    return merged["xyz_latent_mean"], merged["xyz_latent_std"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default="example/demo/model")
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--seed", type=int, default=4, help="the generator's seed (--synthetic_seed)")
    parser.add_argument("--num_frames", type=int, default=25)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=288)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--sums", required=True, help="the clips' sums, JSON (written as they come; resumed from)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sums = clip_sums(args)[: args.clips]
    n = len(sums)
    mean, std = mean_std(sums)
    print(f"{n} clips: mean {mean:.4f}, std {std:.4f}")
    print(f"| K | spread of the mean (% of std) | spread of the std (%) | at {STATS_CLIPS}: mean | std |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for k in (8, 16, 32, 64):
        if k > n // 2:
            break
        drawn = np.array([mean_std([sums[i] for i in rng.choice(n, k, replace=False)]) for _ in range(args.draws)])
        spread = drawn.std(axis=0) / math.sqrt((n - k) / (n - 1)) / std * 100
        scaled = spread * math.sqrt(k / STATS_CLIPS)
        print(f"| {k} | {spread[0]:.2f} | {spread[1]:.2f} | {scaled[0]:.2f} | {scaled[1]:.2f} |")


if __name__ == "__main__":
    main()
