"""The Wan VAE over a whole clip at once (``fourdnex.model.whole_clip``) against diffusers' chunks.

On the CPU: seconds, each the faster of two runs, of the demo VAE (or ``--model_path``'s): the encode of a few clip
shapes, a decode and a training step (forward and backward of the VAE trainer's loss), in diffusers' chunks and over
the whole clip; then a 25-frame fused condition encoded over the whole clip and only where it depends on its first
frame. On a GPU (``--device cuda``): the conditions that the any-frame trainer encodes at each step
(:class:`fourdnex.train.data.VaeConditionEncoder`; ``--condition_batch`` fused 25 x 96 x 144 conditions given random
keyframes, a fifth of the recipe's 128-sample micro-batch by default), in diffusers' chunks, over the whole clip, and
over the whole clip on channels-last convolutions, float32 as the trainer runs them; each the median of ``--repeats``
timed calls after a warm-up call, synchronized, and the latents' largest difference from the chunks'. The VAE's own
training step on a GPU: ``bench_train_throughput.py --vae``; the build's: ``bench_dataset.py --vae_variants``.

    python bench/bench_whole_clip.py
    python bench/bench_whole_clip.py --device cuda --json encode.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import timed
from fourdnex.files import write_json
from fourdnex.model.fusion import condition_frames, condition_video, encode_latents, mode_latents, video_pixels
from fourdnex.model.loading import load_vae
from fourdnex.model.whole_clip import decode_whole, encode_condition_moments, encode_moments, whole_clip_vae
from fourdnex.train.data import VaeConditionEncoder, draw_given
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


def keyframe_conditions(batch: int, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``batch`` fused condition videos ``(B, 3, F, H, 2W)`` of random frames, given the frames the any-frame trainer
    draws for its keyframe samples (:func:`fourdnex.train.data.draw_given`: frame 0 and 2-4 random others)."""
    generator = torch.Generator().manual_seed(seed)
    given = draw_given({"keyframes": 1.0}, frames, batch, generator)
    videos = torch.randint(0, 256, (batch, frames, height, width, 3), dtype=torch.uint8, generator=generator)
    return condition_frames(video_pixels(videos), given, "rgbxyz")


def gpu_conditions(args: argparse.Namespace) -> None:
    """The any-frame trainer's per-step condition encode on a GPU, three ways, side by side; each gives the
    VAE-normalized latents the transformer sees."""
    device = torch.device(args.device)
    videos = keyframe_conditions(args.condition_batch, 25, 96, 144).to(device)
    chunked = load_vae(args.model_path).to(device).eval()
    whole = whole_clip_vae(load_vae(args.model_path).to(device).eval())
    encoder = VaeConditionEncoder(load_vae(args.model_path), device)
    ways = {
        "diffusers' chunks": lambda: encode_latents(chunked, videos),
        "whole clip": lambda: mode_latents(whole, encode_moments(whole, videos)),
        "whole clip, channels-last (the trainer's encoder)": lambda: encoder(videos),
    }
    rows, reference = [], None
    with torch.no_grad():
        for name, fn in ways.items():
            fn()  # warm-up
            seconds, latents = timed(fn, device, args.repeats)
            reference = latents if reference is None else reference
            difference = float((latents - reference).abs().max() / reference.std())
            rows.append({"way": name, "seconds": seconds, "max_diff_over_std": difference})
    print(f"{torch.cuda.get_device_name(device)}; {args.condition_batch} fused conditions of 25 x 96 x 144, float32\n")
    print("| encode | ms | against the chunks | max difference / std |")
    print("|---|---|---|---|")
    for row in rows:
        speedup = rows[0]["seconds"] / row["seconds"]
        print(f"| {row['way']} | {row['seconds'] * 1e3:.1f} | {speedup:.2f}x | {row['max_diff_over_std']:.1e} |")
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name(device), "rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(Path(__file__).resolve().parents[1] / "example" / "demo" / "model"))
    parser.add_argument("--device", default="cpu", help="cpu (default) or a GPU: cuda, cuda:N")
    parser.add_argument("--condition_batch", type=int, default=26, help="conditions encoded at once on a GPU")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls on a GPU")
    parser.add_argument("--json", help="on a GPU: write the rows here")
    args = parser.parse_args()
    if args.device != "cpu":
        gpu_conditions(args)
        return
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
