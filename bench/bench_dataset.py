"""Benchmark build_wan_dataset: clips per minute on synthetic 4DNeX-10M clips, with the VAE floor beside it.

Synthesizes ``--num_clips`` clips (one per subset in turn, so every clip format is read) of 81 x 480 x 720, builds
the encoders, warms up on one clip, then times a full build of all clips. The floor is the Wan VAE encoder's FLOPs
per clip (RGB + XYZ videos and the condition video, counted with torch.utils.flop_counter on the meta device)
over the matmul rate this machine reaches in the VAE's dtype (float32).

    python bench/bench_dataset.py --device cuda --real-size   # Wan2.1 VAE + UMT5-XXL + CLIP ViT-H/14, random
    python bench/bench_dataset.py --device cpu                # the tiny model of example/tiny-wan-i2v, fp32

The encoders run as the build runs them: UMT5 in ``--dtype`` (bf16 on GPU), the VAE and CLIP in ``--encoder_dtype``
(float32 by default), the clips read, prepared and written by
``--num_workers`` worker processes. The table gives the rate, the CPU seconds per clip of every process, each
encoder's share, what the encoders did not hide, and the floor.

``--stages`` instead times each step of the build (read, prepare, write each file, the VAE, CLIP, UMT5) one clip after
another in this process (on one torch thread on a CPU, with CPU seconds beside the wall-clock ones): where the time
goes. ``--vae_variants`` times one clip's VAE work (RGB + XYZ videos and both conditions) for each of ``--variants``
(dtype, compiled, channels-last 3D convolution weights, cuDNN's algorithm search, each layer over the whole clip at
once, the conditions encoded only where they depend on their first frame: ``fourdnex.model.whole_clip``; the RMS
norms fused with their SiLU, the causal convolutions padding their own borders: ``fourdnex.model.fast_vae``) with
its rate (the clip's full FLOP count over the time) and its deviation from the first variant; with ``--profile``, also
the operators that launched its kernels, by their kernels' time, over one more clip under ``torch.profiler``.

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
import copy
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from fourdnex.cli import dtype_flag, field_flag
from fourdnex.data.build import ENCODER_DTYPES, BuildConfig, Encoders, build
from fourdnex.data.prepare import fit_normalization
from fourdnex.data.synthetic import render_scene, write_tree
from fourdnex.model.loading import ENCODER_DTYPE, channels_last_convolutions, load_components, load_vae
from fourdnex.runtime import device_of, dtype_of

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

    def encode_condition(self, first, num_frames, modalities):
        return self._timed("vae", super().encode_condition, first, num_frames, modalities)

    def encode_prompt(self, prompt):
        return self._timed("umt5", super().encode_prompt, prompt)

    def encode_image(self, image):
        return self._timed("clip", super().encode_image, image)


def real_size_components(device: str, dtype: torch.dtype, vision_dtype: torch.dtype = ENCODER_DTYPE) -> dict:
    """The Wan2.1-I2V-14B encoders at their real sizes with random weights, built on ``device``: UMT5 in ``dtype``,
    the VAE and CLIP in ``vision_dtype``, as the build loads them."""
    return common.build_components(False, device_of(device), dtype, vision_dtype=vision_dtype)


def vae_flops(vae_config: dict, num_frames: int, height: int, width: int, cond_num_frames: int) -> dict[str, float]:
    """Wan VAE encoder FLOPs of one clip, as the build encodes it: the RGB and XYZ videos (diffusers' chunks), the fused
    and the RGB condition videos (the cheaper of the chunks and ``encode_condition_moments``), on the meta device."""
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    from fourdnex.model.whole_clip import condition_flops

    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(vae_config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(torch.empty(1, 3, num_frames, height, width, device="meta"))
    counts = {"video": float(counter.get_total_flops())}
    counts["cond"] = min(condition_flops(vae_config, (1, 3, cond_num_frames, height, 2 * width)))
    counts["cond_rgb"] = min(condition_flops(vae_config, (1, 3, cond_num_frames, height, width)))
    counts["clip"] = 2 * counts["video"] + counts["cond"] + counts["cond_rgb"]
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

    device = device_of(args.device)
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


def load_pipe(args: argparse.Namespace, dtype: torch.dtype, vision_dtype: torch.dtype):
    """The encoders' pipeline: the real-size random ones on the device, or a model folder's, in the build's dtypes."""
    from diffusers import WanImageToVideoPipeline

    if args.real_size:
        return WanImageToVideoPipeline(**real_size_components(args.device, dtype, vision_dtype), transformer=None)
    components = load_components(args.model_path, dtype, transformer=False, encoder_dtype=vision_dtype)
    return WanImageToVideoPipeline(**components)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the build's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def print_stages(args: argparse.Namespace) -> None:
    """Print the --stages table: one clip after another in this process, each step of the build timed alone."""
    from fourdnex.data import cache
    from fourdnex.data.build import encode_batch, load_clip
    from fourdnex.data.prepare import prepare_clip
    from fourdnex.data.sources import Captions, find_clips, read_clip
    from fourdnex.files import write_png, write_safetensors, write_video

    device = device_of(args.device)
    dtype = dtype_of(args.dtype, device)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_dataset_"))
    data_dir = work / "data"
    if not (data_dir / "caption").is_dir():
        write_tree(work, args.num_clips, args.num_frames, args.height, args.width, seed=args.seed)
    encoders = Encoders(load_pipe(args, dtype, ENCODER_DTYPES[args.encoder_dtype]), device)
    cfg = BuildConfig(
        data_dir=str(data_dir),
        out=str(work / f"stages-{time.time_ns()}"),
        model_path=str(args.model_path),
        num_frames=args.num_frames,
        resolution_h=args.height,
        resolution_w=args.width,
        num_workers=0,
    )
    out, captions = Path(cfg.out), Captions(data_dir)
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU seconds are then the work, whatever else runs on the machine
    seconds: dict[str, list[float]] = {}

    def timed(name: str, fn, *fn_args):
        _sync(device)
        tic, cpu = time.perf_counter(), time.process_time()
        result = fn(*fn_args)
        _sync(device)
        wall, cpu = time.perf_counter() - tic, time.process_time() - cpu
        seconds.setdefault(name, [0.0, 0.0])
        seconds[name] = [seconds[name][0] + wall, seconds[name][1] + cpu]
        return result

    sources = find_clips(data_dir).clips[: args.num_clips]
    timed("warm-up clip (not counted)", encode_batch, encoders, [load_clip(cfg, captions, out, sources[0], False)], 1)
    seconds.clear()
    wall, cpu = time.perf_counter(), time.process_time()
    for source in sources:
        raw = timed("read (decode video, npz, depth)", read_clip, source, captions)
        clip = timed("prepare (crop, normalize the pointmap)", prepare_clip, source, raw, *cfg_size(cfg), cfg.center)
        files = cache.clip_files(source.id, clip.prompt)
        for key in ("video", "first_frame", "pointmap", "pointmap_preview"):
            (out / files[key]).parent.mkdir(parents=True, exist_ok=True)
        timed("write video (H.264)", write_video, out / files["video"], clip.rgb)
        timed("write first frame (png)", write_png, out / files["first_frame"], clip.rgb[0])
        preview = ((clip.pointmap + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        timed("write pointmap preview (H.264)", write_video, out / files["pointmap_preview"], preview)
        pointmap = {"pointmap": torch.from_numpy(clip.pointmap).half()}
        timed("write pointmap (safetensors)", write_safetensors, out / files["pointmap"], pointmap)
        loaded = timed("VAE input (float videos)", load_clip_from, clip)
        latents = timed("VAE (RGB, XYZ and conditions)", encode_batch, encoders, [loaded], cfg.cond_num_frames)[0]
        timed("write latents", cache.write_latents, out, files, latents, cfg.cache_config())
        embeds = timed("CLIP", encoders.encode_image, clip.rgb[0])
        timed("write CLIP embedding", cache.write_clip_embeds, out, files, embeds)
        prompt = timed("UMT5", encoders.encode_prompt, clip.prompt)
        timed("write UMT5 embedding", cache.write_prompt_embeds, out, files, clip.prompt, prompt)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    count = len(sources)
    print(f"{count} clips of {args.num_frames} x {args.height} x {args.width}, {device.type}, one after another on "
          f"{torch.get_num_threads()} torch threads: {wall / count:.3f} s per clip "
          f"({cpu / count:.3f} s CPU)\n")  # fmt: skip
    print("| step | ms per clip | CPU ms per clip | share of the CPU time |\n|---|---|---|---|")
    for name, (total, total_cpu) in sorted(seconds.items(), key=lambda item: -item[1][1]):
        print(f"| {name} | {total / count * 1e3:.1f} | {total_cpu / count * 1e3:.1f} | {total_cpu / cpu:.1%} |")
    if args.json:
        numbers = {"seconds_per_clip": wall / count, "cpu_seconds_per_clip": cpu / count, "steps": seconds}
        Path(args.json).write_text(json.dumps({**numbers, "clips": count}, indent=2))


def cfg_size(cfg: BuildConfig) -> tuple[int, int, int]:
    return cfg.num_frames, cfg.resolution_h, cfg.resolution_w


def load_clip_from(clip):
    """What a worker hands the encoders, from a prepared clip (``fourdnex.data.build.load_clip``'s last steps)."""
    from fourdnex.data.build import LoadedClip, _to_video

    videos = torch.stack([_to_video(clip.rgb), torch.from_numpy(clip.pointmap).permute(3, 0, 1, 2)])
    return LoadedClip(clip, videos)


@torch.no_grad()
def print_vae_variants(args: argparse.Namespace) -> None:
    """Print the --vae_variants table: one clip's VAE work (RGB + XYZ videos, both conditions) per variant."""
    from diffusers import AutoencoderKLWan

    from fourdnex.model.fast_vae import fuse_norm_silu, pad_in_convolutions
    from fourdnex.model.fusion import condition_video, encode_latents, mode_latents
    from fourdnex.model.whole_clip import encode_condition_moments, encode_moments, skips_zero_tail, whole_clip_vae

    device = device_of(args.device)
    torch.manual_seed(args.seed)
    if args.real_size:
        vae = AutoencoderKLWan(**common.REAL_VAE, temperal_downsample=[False, True, True])
    else:
        vae = load_vae(args.model_path)
    vae = vae.to(device).eval()
    cond_frames = min(49, args.num_frames)
    g = torch.Generator().manual_seed(args.seed)
    videos = (torch.rand(2, 3, args.num_frames, args.height, args.width, generator=g) * 2 - 1).to(device)
    first = videos[:1, :, 0]
    inputs = [videos, condition_video(first, cond_frames, "rgbxyz"), condition_video(first, cond_frames, "rgb")]
    flops = vae_flops(dict(vae.config), args.num_frames, args.height, args.width, cond_frames)["clip"]
    # per input: whether its zero tail is skipped, as the build decides (the videos are whole)
    tail_pays = [False] + [skips_zero_tail(dict(vae.config), tuple(x.shape)) for x in inputs[1:]]
    reference = None
    rows = []
    for name in args.variants.split(","):
        dtype_name, *options = name.split("+")
        model = copy.deepcopy(vae).to(dtype_of(dtype_name))  # each variant's rewrites on its own copy
        if "fused_norm" in options:
            fuse_norm_silu(model)
        if "conv_pad" in options:
            pad_in_convolutions(model)
        if "channels_last" in options:
            channels_last_convolutions(model)
        if "whole_clip" in options or "zero_tail" in options:
            whole_clip_vae(model)
        encoder = model.encoder
        torch.backends.cudnn.benchmark = "cudnn_benchmark" in options  # cuDNN times its algorithms per shape
        if "compiled" in options:
            model.encoder = torch.compile(encoder)

        def encode(x: torch.Tensor, skip_tail: bool, model=model, options=options) -> torch.Tensor:
            """The build's encode_latents, as the variant runs it."""
            if skip_tail and "zero_tail" in options:  # only what depends on the condition's first frame
                moments = encode_condition_moments(model, x.to(model.dtype))
            elif "whole_clip" in options:  # each layer over all frames at once
                moments = encode_moments(model, x.to(model.dtype))
            else:
                return encode_latents(model, x)
            return mode_latents(model, moments)

        try:
            tic = time.perf_counter()
            out = [encode(x, skip) for x, skip in zip(inputs, tail_pays, strict=True)]  # warm-up (compiles)
            _sync(device)
            first_s = time.perf_counter() - tic
            tic = time.perf_counter()
            for _ in range(args.repeats):
                out = [encode(x, skip) for x, skip in zip(inputs, tail_pays, strict=True)]
            _sync(device)
            seconds = (time.perf_counter() - tic) / args.repeats
            reference = out if reference is None else reference
            deviation = max(((a - b).abs().max() / b.std()).item() for a, b in zip(out, reference, strict=True))
            rows.append({"variant": name, "seconds": seconds, "flops_per_second": flops / seconds,
                         "clips_per_min": 60 / seconds, "first_call_seconds": first_s,
                         "max_abs_dev_over_std": deviation})  # fmt: skip
            if args.profile:
                rows[-1]["ops"] = profile_ops(lambda: [encode(x, s) for x, s in zip(inputs, tail_pays, strict=True)])
        except RuntimeError as err:  # a variant that does not fit (memory, 32-bit indexing) is one of the results
            rows.append({"variant": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
        out = model = encoder = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nVAE of one {args.num_frames} x {args.height} x {args.width} clip ({_tflop(flops)}: RGB + XYZ "
          f"videos, fused and RGB conditions), {device.type}\n")  # fmt: skip
    print("| variant | s per clip | rate | clips/min (VAE alone) | first call s | max abs dev / std vs first |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['variant']} | {row['error']} | | | | |")
            continue
        rate, deviation = _tflop(row["flops_per_second"]), row["max_abs_dev_over_std"]
        print(f"| {row['variant']} | {row['seconds']:.2f} | {rate}/s | {row['clips_per_min']:.1f} | "
              f"{row['first_call_seconds']:.0f} | {deviation:.1e} |")  # fmt: skip
    for row in rows:
        if "ops" in row:
            total = sum(op["seconds"] for op in row["ops"])
            print(f"\n{row['variant']}, one clip under torch.profiler: the operators that launched its kernels, by "
                  f"their kernels' time ({total:.3f} s in all)\n")  # fmt: skip
            print("| operator | calls | kernel s | share |\n|---|---|---|---|")
            for op in row["ops"][: args.profile_rows]:
                print(f"| {op['name']} | {op['calls']} | {op['seconds']:.4f} | {op['seconds'] / total:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"flops": flops, "rows": rows}, indent=2))


def profile_ops(fn) -> list[dict]:
    """Run ``fn`` once under torch.profiler; the operators that launched device kernels, by those kernels' time.

    Each kernel counts once, for the innermost operator that launched it (its self device time), so the rows add up to
    the device's busy time.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    ops = [
        {"name": event.key, "calls": event.count, "seconds": event.self_device_time_total / 1e6}
        for event in prof.key_averages()
        if event.device_type == torch.autograd.DeviceType.CPU and event.self_device_time_total > 0
    ]
    return sorted(ops, key=lambda op: -op["seconds"])


def main(args: argparse.Namespace) -> None:
    """Synthesize, warm up, time one build, print the table."""
    device = device_of(args.device)
    dtype = dtype_of(args.dtype, device)
    vision_dtype = ENCODER_DTYPES[args.encoder_dtype]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_dataset_"))
    cond_frames = min(49, args.num_frames)

    start = time.perf_counter()
    data_dir = work / "data"
    if not (data_dir / "caption").is_dir():
        write_tree(work, args.num_clips, args.num_frames, args.height, args.width, seed=args.seed)
    synth_s = time.perf_counter() - start

    start = time.perf_counter()
    pipe = load_pipe(args, dtype, vision_dtype)
    encoders = TimedEncoders(pipe, device)
    _sync(device)
    load_s = time.perf_counter() - start

    def config(out: Path, limit: int | None) -> BuildConfig:
        return BuildConfig(
            data_dir=str(data_dir),
            out=str(out),
            model_path="random-real-size" if args.real_size else str(args.model_path),
            num_frames=args.num_frames,
            resolution_h=args.height,
            resolution_w=args.width,
            device=args.device,
            dtype=args.dtype,
            encoder_dtype=args.encoder_dtype,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            limit=limit,
        )

    # Warm up on the first clip (in a cache of its own), so that the timed run measures the steady state.
    tic = time.perf_counter()
    warm = build(config(work / f"warmup-{time.time_ns()}", 1), encoders, show_progress=False)
    warm_s = time.perf_counter() - tic
    for key in encoders.seconds:
        encoders.seconds[key], encoders.calls[key] = 0.0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    out = work / f"cache-{time.time_ns()}"
    cpu = cpu_seconds()
    start = time.perf_counter()
    summary = build(config(out, args.num_clips), encoders, show_progress=not args.quiet)
    total_s = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
    clips = summary.processed
    if summary.failed_now:  # e.g. random weights giving non-finite latents: the work was done, so it still counts
        reasons = [json.loads(p.read_text())["reason"] for p in sorted((out / "failures").rglob("*.json"))]
        print(f"warning: {summary.failed_now} clips failed (first reason: {reasons[0] if reasons else '?'})")
        clips += summary.failed_now

    flops = vae_flops(dict(pipe.vae.config), args.num_frames, args.height, args.width, cond_frames)
    flops.update({f"{k}_encoder": v for k, v in encoder_flops(pipe).items()})
    rate = matmul_rate(device, vision_dtype)  # the VAE's and CLIP's dtype; the floor is theirs
    floor_s = flops["clip"] / rate
    all_floor_s = (flops["clip"] + flops["umt5_encoder"] + flops["clip_encoder"]) / rate
    per_clip = {k: v / clips for k, v in encoders.seconds.items()}
    model = "real-size (random) Wan2.1 VAE + UMT5-XXL + CLIP ViT-H/14" if args.real_size else str(args.model_path)
    vision = str(vision_dtype).removeprefix("torch.")
    rows = [
        (
            "device",
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        ),
        ("model / dtype", f"{model} / UMT5 {str(dtype).removeprefix('torch.')}, VAE + CLIP {vision}"),
        (
            "clip",
            f"{args.num_frames} x {args.height} x {args.width}, condition {cond_frames} frames, "
            f"batch {args.batch_size}, {args.num_workers} worker processes",
        ),
        (
            "clips timed",
            f"{clips} (after {warm.processed + warm.failed_now} warm-up clip, {warm_s:.0f} s), "
            f"{summary.failed_now} failed",
        ),
        ("**throughput**", f"**{clips / total_s * 60:.2f} clips/min** ({total_s / clips:.2f} s/clip)"),
        ("CPU time per clip (all processes)", f"{cpu / clips:.2f} s"),
        (
            "VAE encode per clip (RGB+XYZ, conditions)",
            f"{per_clip['vae']:.2f} s ({_tflop(flops['clip'] / per_clip['vae'])}/s)",
        ),
        (
            "UMT5 per prompt",
            f"{encoders.seconds['umt5'] / max(encoders.calls['umt5'], 1):.2f} s x {encoders.calls['umt5']}",
        ),
        ("CLIP per clip", f"{per_clip['clip']:.3f} s"),
        (
            "not in the encoders (reading, cropping, media in the workers; the main loop)",
            f"{total_s / clips - sum(per_clip.values()):.2f} s/clip not hidden",
        ),
        (
            "VAE encoder FLOPs per clip",
            f"{_tflop(flops['clip'])} (video {_tflop(flops['video'])} x 2, fused condition {_tflop(flops['cond'])}, "
            f"RGB condition {_tflop(flops['cond_rgb'])})",
        ),
        (f"matmul rate measured ({vision})", f"{_tflop(rate)}/s"),
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
        numbers = {
            "rows": rows,
            "flops": flops,
            "rate": rate,
            "seconds": total_s,
            "clips": clips,
            "clips_per_min": clips / total_s * 60,
            "cpu_seconds": cpu,
            "encoder_seconds": encoders.seconds,
            "floor_clips_per_min": 60 / floor_s,
        }
        Path(args.json).write_text(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    field_flag(parser, BuildConfig, "device", help="auto (default: cuda when available), cuda, cuda:N or cpu")
    parser.add_argument("--real-size", "--real_size", dest="real_size", action="store_true")
    parser.add_argument("--model_path", default=str(TINY), help="a Wan2.1-I2V folder (default: the tiny model)")
    parser.add_argument("--num_clips", type=int, default=5, help="clips timed (the first also warms up, beforehand)")
    parser.add_argument("--num_frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    field_flag(parser, BuildConfig, "batch_size", type=int)
    field_flag(parser, BuildConfig, "num_workers", type=int, help="the build's worker processes")
    dtype_flag(
        parser,
        BuildConfig,
        "dtype",
        help="UMT5's dtype (default auto: bfloat16 on GPU, float32 on CPU)",
    )
    dtype_flag(parser, BuildConfig, "encoder_dtype", tuple(ENCODER_DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for the synthetic clips and caches (kept; reused)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--clipping", action="store_true", help="measure the pointmap clipping instead (CPU)")
    parser.add_argument(
        "--encoder_precision", action="store_true", help="measure bfloat16 against float32 VAE latents instead"
    )
    parser.add_argument("--stages", action="store_true", help="time each step of the build, one clip at a time")
    parser.add_argument("--vae_variants", action="store_true", help="time one clip's VAE work per --variants")
    parser.add_argument(
        "--variants",
        default="bf16,bf16+cudnn_benchmark+channels_last,bf16+cudnn_benchmark+channels_last+zero_tail,"
        "bf16+cudnn_benchmark+channels_last+compiled,fp32,fp32+cudnn_benchmark+channels_last+zero_tail",
        help="for --vae_variants: comma-separated dtype[+compiled][+channels_last][+cudnn_benchmark][+whole_clip]"
        "[+zero_tail][+fused_norm][+conv_pad]",
    )
    parser.add_argument("--repeats", type=int, default=2, help="for --vae_variants: timed clips per variant")
    parser.add_argument(
        "--profile", action="store_true", help="for --vae_variants on a GPU: one more clip per variant, profiled"
    )
    parser.add_argument("--profile_rows", type=int, default=25, help="for --profile: the operators printed per variant")
    arguments = parser.parse_args()
    if arguments.clipping:
        print_clipping(arguments)
    elif arguments.encoder_precision:
        print_encoder_precision(arguments)
    elif arguments.stages:
        print_stages(arguments)
    elif arguments.vae_variants:
        print_vae_variants(arguments)
    else:
        main(arguments)
