"""The Wan VAE over a whole clip at once (``fourdnex.model.whole_clip``) against diffusers' chunks, on the CPU.

Seconds, each the faster of two runs, of the demo VAE (or ``--model_path``'s): the encode of a few clip shapes, a
decode and a training step (forward and backward of the VAE trainer's loss), in diffusers' chunks and over the whole
clip; then a 25-frame fused condition encoded over the whole clip and only where it depends on its first frame. On a
GPU: ``bench_train_throughput.py --vae`` and ``bench_dataset.py --vae_variants``.

    python bench/bench_whole_clip.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.model.fusion import condition_video
from fourdnex.model.loading import load_vae
from fourdnex.model.whole_clip import decode_whole, encode_condition_moments, encode_moments, whole_clip_vae
from fourdnex.train.vae import vae_loss

ENCODES = ((1, 3, 25, 96, 288), (1, 3, 49, 96, 144), (2, 3, 25, 96, 144), (4, 3, 25, 96, 144))


def fastest(fn, runs: int = 2) -> float:
    """The fewest seconds ``fn()`` took in ``runs`` runs."""
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(Path(__file__).resolve().parents[1] / "example" / "demo" / "model"))
    args = parser.parse_args()
    vae = whole_clip_vae(load_vae(args.model_path).eval())
    print(f"{torch.get_num_threads()} torch threads\n")
    print("| call | diffusers' chunks (s) | whole clip (s) |")
    print("|---|---|---|")
    with torch.no_grad():
        for shape in ENCODES:
            x = torch.rand(shape) * 2 - 1
            chunks, whole = fastest(lambda x=x: vae.encode(x)), fastest(lambda x=x: encode_moments(vae, x))
            print(f"| encode {' x '.join(map(str, shape[:1] + shape[2:]))} | {chunks:.2f} | {whole:.2f} |")
        z = torch.randn(2, vae.config.z_dim, 7, 12, 18)
        chunks, whole = fastest(lambda: vae.decode(z)), fastest(lambda: decode_whole(vae, z))
        print(f"| decode 2 x 7 latent frames of 12 x 18 | {chunks:.2f} | {whole:.2f} |")
        condition = condition_video(torch.rand(1, 3, 96, 144) * 2 - 1, 25, "rgbxyz")  # (1, 3, 25, 96, 288)
        whole = fastest(lambda: encode_moments(vae, condition))
        given = fastest(lambda: encode_condition_moments(vae, condition))
    vae.train()
    x = torch.rand(4, 3, 25, 96, 144) * 2 - 1

    def step(whole_clip: bool) -> None:
        loss, _ = vae_loss(vae, x, 1e-3, torch.Generator().manual_seed(0), whole_clip=whole_clip)
        loss.backward()

    chunks, whole_step = fastest(lambda: step(False)), fastest(lambda: step(True))
    print(f"| training step, 4 x 25 x 96 x 144 | {chunks:.2f} | {whole_step:.2f} |")
    print(f"\na fused condition of 25 frames: {whole:.2f} s over the whole clip, {given:.2f} s only where it "
          "depends on frame 0")  # fmt: skip


if __name__ == "__main__":
    main()
