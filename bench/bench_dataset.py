"""Benchmark build_wan_dataset: clips per minute on synthetic 4DNeX-10M clips, with the VAE floor beside it.

Synthesizes ``--num_clips`` clips (one per subset in turn, so every clip format is read) of 81 x 480 x 720, builds
the encoders, warms up on one clip, then times a full build of all clips. The floor is the Wan VAE encoder's FLOPs
per clip (RGB + XYZ videos and the condition video, counted with torch.utils.flop_counter on the meta device)
over the matmul rate this machine reaches in the VAE's dtype (float32).

    python bench/bench_dataset.py --device cuda --real-size   # Wan2.1 VAE + UMT5-XXL + CLIP ViT-H/14, random
    python bench/bench_dataset.py --device cpu                # the tiny model of example/tiny-wan-i2v, fp32

The encoders run as the build runs them: UMT5 in ``--dtype`` (bf16 on GPU), the VAE and CLIP in float32.

``--encoder_precision`` instead encodes the RGB and XYZ videos of synthetic clips with the real-size Wan VAE (random
weights; the latents' scale is set by the VAE's own normalization) in float32 and in bfloat16, and prints the latent
difference relative to the latents' standard deviation: what a cache in bfloat16 would differ from inference's
float32 VAE by.

``--clipping`` instead measures the pointmap clipping of ``--center clip`` and ``per_frame`` on synthetic dynamic
clips (``--num_clips`` of ``--num_frames`` frames at ``--height x --width``): the share of points each clips, the
scale, and how far the per-frame boxes' faces travel over a clip.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from fourdnex.data.build import BuildConfig, Encoders, build
from fourdnex.data.prepare import fit_normalization
from fourdnex.data.synthetic import render_scene, write_tree
from fourdnex.model.loading import ENCODER_DTYPE, load_components

TINY = Path(__file__).resolve().parents[1] / "example" / "tiny-wan-i2v"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedEncoders(Encoders):
    """Encoders that add up the seconds spent in each encoder (synchronizing the GPU around every call)."""

    def __init__(self, pipe, device):
        super().__init__(pipe, device)
        self.seconds = {"vae": 0.0, "umt5": 0.0, "clip": 0.0}
        self.calls = {"vae": 0, "umt5": 0, "clip": 0}

    def _timed(self, key: str, fn, *args):
        _sync(self.device)
        start = time.perf_counter()
        result = fn(*args)
        _sync(self.device)
        self.seconds[key] += time.perf_counter() - start
        self.calls[key] += 1
        return result

    def encode_videos(self, videos):
        return self._timed("vae", super().encode_videos, videos)

    def encode_prompt(self, prompt):
        return self._timed("umt5", super().encode_prompt, prompt)

    def encode_image(self, image):
        return self._timed("clip", super().encode_image, image)


def real_size_components(device: str, dtype: torch.dtype) -> dict:
    """The Wan2.1-I2V-14B encoders at their real sizes with random weights, built on ``device``: UMT5 in ``dtype``,
    the VAE and CLIP in ENCODER_DTYPE, as the build loads them."""
    return common.build_components(False, torch.device(device), dtype, vision_dtype=ENCODER_DTYPE)


def vae_flops(vae_config: dict, num_frames: int, height: int, width: int, cond_num_frames: int) -> dict[str, float]:
    """Wan VAE encoder FLOPs of one clip: RGB and XYZ videos, and the fused condition video (meta device)."""
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(vae_config)
    counts = {}
    for name, shape in (
        ("video", (1, 3, num_frames, height, width)),
        ("cond", (1, 3, cond_num_frames, height, 2 * width)),
    ):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.encode(torch.empty(shape, device="meta")).latent_dist.mode()
        counts[name] = float(counter.get_total_flops())
    counts["clip"] = 2 * counts["video"] + counts["cond"]
    return counts


def encoder_flops(pipe) -> dict[str, float]:
    """FLOPs of one UMT5 prompt (512 tokens) and one CLIP image with ``pipe``'s encoder configs (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        text_encoder = type(pipe.text_encoder)(pipe.text_encoder.config)
        image_encoder = type(pipe.image_encoder)(pipe.image_encoder.config)
    size = pipe.image_encoder.config.image_size
    counts = {}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ids = torch.zeros(1, 512, dtype=torch.long, device="meta")
        text_encoder(ids)  # no mask: the count does not depend on it, and meta tensors cannot be inspected
    counts["umt5"] = float(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        image_encoder(pixel_values=torch.empty(1, 3, size, size, device="meta"), output_hidden_states=True)
    counts["clip"] = float(counter.get_total_flops())
    return counts


def _tflop(flops: float) -> str:
    """FLOPs in TFLOP, or GFLOP when small."""
    return f"{flops / 1e12:.2f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.2f} GFLOP"


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """The FLOP/s of a large square matmul in ``dtype`` on ``device``: the rate the floor is computed at."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 50 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def clipping_table(num_clips: int, num_frames: int, height: int, width: int, seed: int) -> list[tuple]:
    """Per synthetic dynamic clip ``seed + i``: its camera motion, the share of points ``--center clip`` and
    ``per_frame`` clip, the clip's scale, the scale of the union of the per-frame boxes, and how far the per-frame
    boxes' faces travel over the clip (as a share of that union's scale)."""
    rows = []
    for i in range(num_clips):
        scene = render_scene(seed + i, num_frames, height, width, dynamic=True)
        w2c0 = np.linalg.inv(scene.cam2world[0].astype(np.float64))
        points = scene.points.astype(np.float64) @ w2c0[:3, :3].T + w2c0[:3, 3]  # (F, H, W, 3) first camera
        clipped, boxes = {}, {}
        for center in ("clip", "per_frame"):
            norm = fit_normalization(points, center)
            boxes[center] = (norm.center - norm.half_range, norm.center + norm.half_range)  # (F, 3) each
            lo, hi = (b[:, None, None] for b in boxes[center])
            clipped[center] = float(((points < lo) | (points > hi)).any(-1).mean())
        lo, hi = boxes["per_frame"]
        union_scale = float((hi.max(0) - lo.min(0)).max() / 2)
        travel = float(max((lo.max(0) - lo.min(0)).max(), (hi.max(0) - hi.min(0)).max()) / union_scale)
        clip_scale = float((boxes["clip"][1] - boxes["clip"][0]).max() / 2)
        motion = scene.caption.split("camera ")[-1].rstrip(".")
        rows.append((seed + i, motion, clipped["clip"], clipped["per_frame"], clip_scale, union_scale, travel))
    return rows


def print_clipping(args: argparse.Namespace) -> None:
    """Print the --clipping table."""
    rows = clipping_table(args.num_clips, args.num_frames, args.height, args.width, args.seed)
    print(f"{args.num_clips} synthetic dynamic clips of {args.num_frames} x {args.height} x {args.width}\n")
    print("| seed | camera | clipped, one box | clipped, per-frame boxes | scale, one box | scale, per-frame union "
          "| per-frame faces travel |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for seed, motion, one, per_frame, scale, union_scale, travel in rows:
        print(f"| {seed} | {motion} | {100 * one:.2f} % | {100 * per_frame:.2f} % | {scale:.2f} | {union_scale:.2f} "
              f"| {100 * travel:.0f} % |")  # fmt: skip
    mean = [sum(r[k] for r in rows) / len(rows) for k in (2, 3)]
    print(f"| mean | | {100 * mean[0]:.2f} % | {100 * mean[1]:.2f} % | | | |")


@torch.no_grad()
def print_encoder_precision(args: argparse.Namespace) -> None:
    """Print the --encoder_precision table: bfloat16 against float32 latents of the real-size VAE."""
    from diffusers import AutoencoderKLWan

    from fourdnex.model.fusion import encode_latents

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan(**common.REAL_VAE, temperal_downsample=[False, True, True]).to(device).eval()
    print(f"real-size Wan VAE (random weights), {args.num_clips} clips of {args.num_frames} x {args.height} x "
          f"{args.width}, {device.type}\n")  # fmt: skip
    print("| seed | modality | latent std | max abs diff / std | RMS diff / std |\n|---|---|---|---|---|")
    for seed in range(args.seed, args.seed + args.num_clips):
        scene = render_scene(seed, args.num_frames, args.height, args.width)
        xyz = torch.from_numpy(scene.points.astype(np.float32))
        xyz = (xyz - xyz.amin(dim=(0, 1, 2))) / (xyz.amax(dim=(0, 1, 2)) - xyz.amin(dim=(0, 1, 2))) * 2 - 1
        videos = {
            "rgb": torch.from_numpy(scene.rgb).permute(3, 0, 1, 2).float() / 127.5 - 1,
            "xyz": xyz.permute(3, 0, 1, 2),
        }
        for name, video in videos.items():
            video = video[None].to(device)
            full = encode_latents(vae.float(), video)
            half = encode_latents(vae.to(torch.bfloat16), video)
            std, diff = full.std(), half.float() - full
            worst, rms = diff.abs().max() / std, diff.square().mean().sqrt() / std
            print(f"| {seed} | {name} | {std:.3f} | {worst:.2e} | {rms:.2e} |")
            vae.float()


def main(args: argparse.Namespace) -> None:
    """Synthesize, warm up, time one build, print the table."""
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_dataset_"))
    cond_frames = min(49, args.num_frames)

    start = time.perf_counter()
    data_dir = work / "data"
    if not (data_dir / "caption").is_dir():
        write_tree(work, args.num_clips, args.num_frames, args.height, args.width, seed=args.seed)
    synth_s = time.perf_counter() - start

    start = time.perf_counter()
    from diffusers import WanImageToVideoPipeline

    if args.real_size:
        pipe = WanImageToVideoPipeline(**real_size_components(args.device, dtype), transformer=None)
    else:
        pipe = WanImageToVideoPipeline(**load_components(TINY, dtype, transformer=False))
    encoders = TimedEncoders(pipe, device)
    _sync(device)
    load_s = time.perf_counter() - start

    def config(out: Path, limit: int | None) -> BuildConfig:
        return BuildConfig(
            data_dir=str(data_dir),
            out=str(out),
            model_path="random-real-size" if args.real_size else str(TINY),
            num_frames=args.num_frames,
            resolution_h=args.height,
            resolution_w=args.width,
            device=args.device,
            dtype=args.dtype or "auto",
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            limit=limit,
        )

    # Warm up on the first clip (in a cache of its own), so that the timed run measures the steady state.
    warm = build(config(work / f"warmup-{time.time_ns()}", 1), encoders, show_progress=False)
    for key in encoders.seconds:
        encoders.seconds[key], encoders.calls[key] = 0.0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    out = work / f"cache-{time.time_ns()}"
    start = time.perf_counter()
    summary = build(config(out, args.num_clips), encoders, show_progress=not args.quiet)
    total_s = time.perf_counter() - start
    clips = summary.processed
    if summary.failed_now:  # e.g. random weights giving non-finite latents: the work was done, so it still counts
        reasons = [json.loads(p.read_text())["reason"] for p in sorted((out / "failures").rglob("*.json"))]
        print(f"warning: {summary.failed_now} clips failed (first reason: {reasons[0] if reasons else '?'})")
        clips += summary.failed_now

    flops = vae_flops(dict(pipe.vae.config), args.num_frames, args.height, args.width, cond_frames)
    flops.update({f"{k}_encoder": v for k, v in encoder_flops(pipe).items()})
    rate = matmul_rate(device, ENCODER_DTYPE)  # the VAE's and CLIP's dtype; the floor is theirs
    floor_s = flops["clip"] / rate
    all_floor_s = (flops["clip"] + flops["umt5_encoder"] + flops["clip_encoder"]) / rate
    per_clip = {k: v / clips for k, v in encoders.seconds.items()}
    model = "real-size (random) Wan2.1 VAE + UMT5-XXL + CLIP ViT-H/14" if args.real_size else "tiny random model"
    rows = [
        (
            "device",
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        ),
        ("model / dtype", f"{model} / UMT5 {str(dtype).removeprefix('torch.')}, VAE + CLIP float32"),
        (
            "clip",
            f"{args.num_frames} x {args.height} x {args.width}, condition {cond_frames} frames, "
            f"batch {args.batch_size}",
        ),
        (
            "clips timed",
            f"{clips} (after {warm.processed + warm.failed_now} warm-up clip), {summary.failed_now} failed",
        ),
        ("**throughput**", f"**{clips / total_s * 60:.2f} clips/min** ({total_s / clips:.2f} s/clip)"),
        ("VAE encode per clip (RGB+XYZ, condition)", f"{per_clip['vae']:.2f} s"),
        (
            "UMT5 per prompt",
            f"{encoders.seconds['umt5'] / max(encoders.calls['umt5'], 1):.2f} s x {encoders.calls['umt5']}",
        ),
        ("CLIP per clip", f"{per_clip['clip']:.3f} s"),
        (
            "read + crop + normalize + media (threads)",
            f"{total_s / clips - sum(per_clip.values()):.2f} s/clip not hidden",
        ),
        (
            "VAE encoder FLOPs per clip",
            f"{_tflop(flops['clip'])} (video {_tflop(flops['video'])} x 2, condition {_tflop(flops['cond'])})",
        ),
        ("matmul rate measured", f"{_tflop(rate)}/s"),
        ("**VAE floor**", f"**{floor_s:.2f} s/clip = {60 / floor_s:.1f} clips/min**"),
        (
            "UMT5 / CLIP FLOPs",
            f"{_tflop(flops['umt5_encoder'])} per prompt / {_tflop(flops['clip_encoder'])} per image",
        ),
        (
            "floor with UMT5 + CLIP (a new prompt per clip)",
            f"{all_floor_s:.2f} s/clip = {60 / all_floor_s:.1f} clips/min",
        ),
    ]
    if device.type == "cuda":
        rows.append(("peak GPU memory", f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"))
    rows.append(("setup (not timed)", f"synthesis {synth_s:.0f} s, encoders {load_s:.0f} s"))
    print("\n| quantity | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "flops": flops, "rate": rate, "seconds": total_s}, indent=2)
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--real-size", "--real_size", dest="real_size", action="store_true")
    parser.add_argument("--num_clips", type=int, default=5, help="clips timed (the first also warms up, beforehand)")
    parser.add_argument("--num_frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="UMT5's dtype; default: bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for the synthetic clips and caches (kept; reused)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--clipping", action="store_true", help="measure the pointmap clipping instead (CPU)")
    parser.add_argument(
        "--encoder_precision", action="store_true", help="measure bfloat16 against float32 VAE latents instead"
    )
    arguments = parser.parse_args()
    if arguments.clipping:
        print_clipping(arguments)
    elif arguments.encoder_precision:
        print_encoder_precision(arguments)
    else:
        main(arguments)
