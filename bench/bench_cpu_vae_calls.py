"""Inference's VAE calls for one sample on the CPU, the way they ran and the way they run now, at the demo's sizes.

An image's condition (frame 0, zeros after it; 25 frames, fused width) encoded in diffusers' chunks against
:func:`fourdnex.model.fusion.encode_image_conditions` (only what depends on frame 0, where that spends fewer FLOPs;
its FLOP count included, as inference pays it once per shape), a condition given every frame in the chunks against
:func:`fourdnex.model.fusion.encode_on_cpu` (over the whole clip), and the decode of a sample's RGB and XYZ latents as
one VAE call each against one call for both (:meth:`fourdnex.generate.pipeline.FourDNeXPipeline.decode_latents`),
the new ones with contiguous weights, then with the convolutions' weights in channels-last memory (as inference
holds them on a CPU: :func:`fourdnex.generate.acceleration.apply_acceleration`). Seconds, each the fastest of
``--runs`` runs, torch's default threads, with the largest difference of the new path's output over the old one's
standard deviation.

    python bench/bench_cpu_vae_calls.py --height 192 --width 288
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.model import whole_clip
from fourdnex.model.fusion import condition_video, encode_image_conditions, encode_latents, encode_on_cpu
from fourdnex.model.loading import channels_last_convolutions, load_vae


def fastest(fn, runs: int) -> tuple[float, torch.Tensor]:
    """The fewest seconds ``fn()`` took in ``runs`` runs, and its output."""
    best = float("inf")
    for _ in range(runs):
        tic = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - tic)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(Path(__file__).resolve().parents[1] / "example" / "demo" / "model"))
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=144)
    parser.add_argument("--num_frames", type=int, default=25)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    vae = load_vae(args.model_path).eval()
    generator = torch.Generator().manual_seed(0)
    first = torch.rand(1, 3, args.height, args.width, generator=generator) * 2 - 1
    condition = condition_video(first, args.num_frames, "rgbxyz")  # (1, 3, F, H, 2W)
    frames = 1 + (args.num_frames - 1) // 4
    latents = torch.randn(2, vae.config.z_dim, frames, args.height // 8, args.width // 8, generator=generator)

    def new_condition() -> torch.Tensor:
        whole_clip._skips_zero_tail.cache_clear()  # the FLOP count, paid once per shape in a process
        return encode_image_conditions(vae, condition)

    separate = lambda: torch.cat([vae.decode(z[None], return_dict=False)[0] for z in latents])  # noqa: E731
    together = lambda: vae.decode(latents, return_dict=False)[0]  # noqa: E731
    video = torch.rand(condition.shape, generator=generator) * 2 - 1  # a condition given every frame
    with torch.no_grad():
        condition_rows = [fastest(lambda: encode_latents(vae, condition), args.runs), fastest(new_condition, args.runs)]
        video_rows = [fastest(lambda: encode_latents(vae, video), args.runs), fastest(lambda: encode_on_cpu(vae, video),
                                                                                      args.runs)]  # fmt: skip
        decode_rows = [fastest(separate, args.runs), fastest(together, args.runs)]
        channels_last_convolutions(vae)
        condition_rows.append(fastest(new_condition, args.runs))
        video_rows.append(fastest(lambda: encode_on_cpu(vae, video), args.runs))
        decode_rows.append(fastest(together, args.runs))
    print(f"{torch.get_num_threads()} torch threads\n")
    print("| call | before (s) | now, contiguous weights (s) | now, channels-last weights (s) | speed-up | largest "
          "difference / std |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    shape = " x ".join(map(str, condition.shape[2:]))
    names = (f"image condition 1 x {shape}", f"video condition 1 x {shape}",
             f"decode RGB and XYZ, {frames} latent frames of {args.height // 8} x {args.width // 8}")  # fmt: skip
    rows = (condition_rows, video_rows, decode_rows)
    for name, ((old, before), (new, _), (last, after)) in zip(names, rows, strict=True):
        difference = float((after - before).abs().max() / before.std())
        print(f"| {name} | {old:.2f} | {new:.2f} | {last:.2f} | {old / last:.2f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
