"""Samples per second of training the small demo model: the trainers users run beside a plain PyTorch step of the same
model, shapes and batch, on one GPU, in one run.

    python bench/bench_train_throughput.py --out throughput.json                       # transformer, both stages
    python bench/bench_train_throughput.py --batch 256 --profile --out throughput.json  # + where the time goes
    python bench/bench_train_throughput.py --stages full --transformer grown --out fine.json  # a given transformer
    python bench/bench_train_throughput.py --vae --batch 8 32 --out vae.json            # the VAE trainer
    python bench/bench_train_throughput.py --vae --batch 32 --profile --out vae.json    # + where its time goes

**Transformer.** The stages of ``scripts/train_demo.sh``: ``adapter`` (LoRA r16 + domain embedding on the fused
RGB | XYZ latent, 756 tokens a sample at 25 x 96 x 144), ``base`` (every weight, the RGB latent alone, 378 tokens)
and ``full`` (every weight on the fused latent: the full fine-tuning runs). ``--transformer`` times a given
transformer folder (a trained one, or one grown by :mod:`fourdnex.model.grow`, whose ``--patch 1`` reads 4x the
tokens) instead of the preset's random one; a batch the GPU cannot hold is reported as an error row.
``plain``: fp32 weights under bf16 autocast, fused AdamW, gradient clipping, the whole model under ``torch.compile``,
the batches already on the GPU (four random ones in turn). ``trainer``: :class:`fourdnex.train.loop.Run`, what
``finetune.py`` runs, with the recipe's flags (``--cache_in_memory --compile_blocks --no_gradient_checkpointing``,
bf16 under DeepSpeed ZeRO-2) on a cache of random latents written by :mod:`fourdnex.testing.random_cache`; each
trainer configuration runs in a process of its own (one DeepSpeed engine a process). Both are timed over ``--steps``
steps after ``--warmup`` steps (compilation), synchronized before and after. ``--profile`` records
``--profile_steps`` more trainer steps with torch.profiler and prints the GPU's busy share and the top operators.

**VAE.** ``python -m fourdnex.train.vae``'s step (:class:`fourdnex.train.vae.VaeTrainer`) beside a plain step of
the same VAE (fp32 weights, bf16 autocast, fused AdamW; eager, channels-last, whole-clip and compiled:
``VAE_VARIANTS``), batches of random clips held on the GPU; ``--profile`` profiles ``--profile_steps`` more trainer
steps as for the transformer.

Floor: the FLOPs of one step (counted by ``torch.utils.flop_counter`` on the eager model) over the bf16 matrix rate
measured here on an 8192^3 product. Results and commands: BENCHMARKS.md, "Training the demo model".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fourdnex.model.presets import PRESETS, save_model
from fourdnex.train.config import TrainConfig
from fourdnex.train.loss import Batch, LossWeights, batch_loss

#: The demo recipe's sample: 25 frames of 96 x 144 per modality.
FRAMES, HEIGHT, WIDTH = 25, 96, 144
#: The flags of each transformer stage of scripts/train_demo.sh.
STAGES = {
    "adapter": {"train_mode": "lora", "modalities": "rgbxyz", "model_type": "i2vwbw-demb-samerope", "lora_rank": 16,
                "lora_alpha": 16.0, "learning_rate": 1e-3},
    "base": {"train_mode": "full", "modalities": "rgb", "model_type": "i2vwbw", "learning_rate": 5e-4},
    "full": {"train_mode": "full", "modalities": "rgbxyz", "model_type": "i2vwbw-demb-samerope", "learning_rate": 5e-4},
}  # fmt: skip


def stage_config(stage: str, batch: int, cache_dir: str, model_path: str, out: str, steps: int) -> TrainConfig:
    """The TrainConfig of a recipe stage at ``batch`` samples a step."""
    return TrainConfig(
        cache_dir=cache_dir, output_dir=out, model_path=model_path, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
        train_batch_size=batch, gradient_checkpointing=False, cache_in_memory=True, compile_blocks=True,
        timestep_sampling="shifted", max_steps=steps, checkpointing_steps=10**9, lr_warmup_steps=0, **STAGES[stage],
    )  # fmt: skip


def matmul_rate(device: torch.device) -> float:
    """Measured bf16 FLOP/s of an 8192^3 matrix product (median of 20)."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times[5:])


def random_batches(cfg: TrainConfig, model, batch: int, device: torch.device, count: int = 4) -> list[Batch]:
    """``count`` random micro-batches of the stage's shapes on ``device``."""
    config = model.config
    t, h = (FRAMES - 1) // 4 + 1, HEIGHT // 8
    w = 2 * WIDTH // 8 if cfg.modalities == "rgbxyz" else WIDTH // 8
    text_len = 512
    image_len = PRESETS["demo"].image_encoder["image_size"] // PRESETS["demo"].image_encoder["patch_size"]
    g = torch.Generator(device).manual_seed(0)
    return [
        Batch(
            x0=torch.randn(batch, 16, t, h, w, generator=g, device=device),
            condition=torch.randn(batch, 20, t, h, w, generator=g, device=device),
            prompt_embeds=torch.randn(batch, text_len, config.text_dim, generator=g, device=device),
            image_embeds=torch.randn(batch, image_len**2 + 1, config.image_dim, generator=g, device=device),
            noise=torch.randn(batch, 16, t, h, w, generator=g, device=device),
            sigmas=torch.rand(batch, generator=g, device=device),
        )
        for _ in range(count)
    ]


def step_flops(cfg: TrainConfig, model_path: str, batch: int, device: torch.device) -> float:
    """FLOPs of one forward and backward of the stage's model at ``batch`` samples (counted, eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fourdnex.model.loading import load_transformer
    from fourdnex.train.loop import build_transformer

    plain = TrainConfig(**{**vars(cfg), "mixed_precision": "float32", "compile_blocks": False})
    model = build_transformer(plain, transformer=load_transformer(model_path, torch.float32).to(device))
    sample = random_batches(cfg, model, batch, device, count=1)[0]
    with FlopCounterMode(display=False) as counter, torch.autocast(device.type, dtype=torch.bfloat16):
        loss, _ = batch_loss(model, sample, LossWeights(fused=cfg.modalities == "rgbxyz"), torch.float32)
        loss.backward()
    return float(counter.get_total_flops())


def plain_seconds(cfg: TrainConfig, model_path: str, batch: int, steps: int, warmup: int, device) -> float:
    """Seconds per step of the plain PyTorch step (see the module docstring)."""
    from fourdnex.model.loading import load_transformer
    from fourdnex.train.loop import build_transformer

    torch.manual_seed(0)
    plain = TrainConfig(**{**vars(cfg), "mixed_precision": "float32", "compile_blocks": False})
    model = build_transformer(plain, transformer=load_transformer(model_path, torch.float32).to(device))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    compiled = torch.compile(model)
    weights = LossWeights(fused=cfg.modalities == "rgbxyz")
    batches = random_batches(cfg, model, batch, device)

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = batch_loss(compiled, batches[i % len(batches)], weights, torch.float32)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - tic) / steps


def trainer_worker(args: argparse.Namespace) -> None:
    """One trainer configuration in this process: prints one JSON line with its seconds per step (and profile)."""
    from fourdnex.train.loop import Run

    cfg = stage_config(args.stage, args.batch[0], args.cache_dir, args.model_path, args.run_dir,
                       args.warmup + args.steps + args.profile_steps)  # fmt: skip
    run = Run(cfg)
    run.loop(args.warmup)
    torch.cuda.synchronize()
    tic = time.perf_counter()
    run.loop(args.warmup + args.steps)
    torch.cuda.synchronize()
    result = {"seconds": (time.perf_counter() - tic) / args.steps, "held_gib": run.held.nbytes / 2**30}
    if args.profile:
        result["profile"] = profile_steps(run.loop, run.trainer.step, args.warmup + args.steps + args.profile_steps)
    print("RESULT " + json.dumps(result), flush=True)


def profile_steps(train_until, start: int, stop: int) -> dict:
    """Where a trainer's time goes over its steps ``start`` to ``stop`` (``train_until(stop)`` runs them): wall time,
    the GPU's busy time (the union of its kernels' intervals) and the operators with the most CPU and GPU time."""
    from torch.profiler import ProfilerActivity, profile

    steps = stop - start
    torch.cuda.synchronize()
    tic = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_until(stop)
        torch.cuda.synchronize()
    wall = time.perf_counter() - tic
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
    busy, end = 0.0, float("-inf")
    for start, stop_ in kernels:  # union of intervals, microseconds
        if stop_ > end:
            busy += stop_ - max(start, end)
            end = stop_
    averages = prof.key_averages()
    top_gpu = sorted(averages, key=lambda e: e.device_time_total, reverse=True)[:12]
    top_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "gpu_busy_ms_per_step": busy / 1e3 / steps,
        "kernels_per_step": len(kernels) / steps,
        "top_gpu": [(e.key, e.device_time_total / 1e3 / steps) for e in top_gpu],
        "top_cpu_self": [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in top_cpu],
    }


def trainer_seconds(args, stage: str, batch: int, cache_dir: str, model_path: str, profile: bool) -> dict:
    """Run :func:`trainer_worker` in a new process and return its result."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, __file__, "--worker", "--stage", stage, "--batch", str(batch),
                   "--cache_dir", cache_dir, "--model_path", model_path, "--run_dir", run_dir,
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--profile_steps", str(args.profile_steps if profile else 0)]  # fmt: skip
        if profile:
            command.append("--profile")
        done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"trainer {stage} batch {batch} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def transformer_table(args: argparse.Namespace) -> list[dict]:
    """Plain and trainer rows of every stage and batch size."""
    from fourdnex.testing.random_cache import write_random_cache

    device = torch.device("cuda")
    rate = matmul_rate(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trained = {"transformer": Path(args.transformer)} if args.transformer else None
        model_path = str(save_model(Path(tmp) / "model", "demo", trained=trained))
        config = PRESETS["demo"]
        image_len = (config.image_encoder["image_size"] // config.image_encoder["patch_size"]) ** 2 + 1
        cache_dir = str(write_random_cache(Path(tmp) / "cache", args.clips, FRAMES, HEIGHT, WIDTH,
                                           (512, config.transformer["text_dim"]),
                                           (image_len, config.transformer["image_dim"])))  # fmt: skip
        for stage in args.stages:
            for batch in args.batch:
                cfg = stage_config(stage, batch, cache_dir, model_path, tmp, 0)
                row, phase = {"stage": stage, "batch": batch}, "the FLOP count (eager)"
                try:  # a batch too large for the GPU is one of the results, not the end of the run
                    flops = step_flops(cfg, model_path, batch, device)
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()  # the peak below is the plain step's alone
                    phase = "the plain step"
                    plain = plain_seconds(cfg, model_path, batch, args.steps, args.warmup, device)
                    row |= {
                        "plain_samples_s": batch / plain,
                        "floor_samples_s": batch / (flops / rate),
                        "step_tflop": flops / 1e12,
                        "plain_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                    }
                    if batch in args.trainer_batch:
                        torch.cuda.empty_cache()  # the trainer's process needs the memory the plain step held
                        phase = "the trainer"
                        trained = trainer_seconds(args, stage, batch, cache_dir, model_path, args.profile)
                        row["trainer_samples_s"] = batch / trained["seconds"]
                        row["trainer_share_of_plain"] = plain / trained["seconds"]
                        row["held_gib"] = trained["held_gib"]
                        if "profile" in trained:
                            row["profile"] = trained["profile"]
                except RuntimeError as err:  # out of memory among them
                    row["error"] = f"in {phase}: {type(err).__name__}: {err}"[:500]
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                rows.append(row)
                print(json.dumps(row), flush=True)
    for row in rows:
        row["matmul_tflops"] = rate / 1e12
    return rows


#: The plain VAE steps measured beside the trainer's: as the trainer runs it, with the weights and the videos in
#: channels-last 3D memory (cuDNN's layout for bf16 tensor-core convolutions), each layer called once over all frames
#: (``fourdnex.model.whole_clip``: the same numbers in fewer, larger kernels), that in channels-last memory, and the
#: encoder and decoder under ``torch.compile`` (each is called once per chunk of frames, with the chunk's cache).
VAE_VARIANTS = ("eager", "channels_last", "whole_clip", "whole_clip+channels_last", "compiled")


def plain_vae_seconds(cfg, clips, steps: int, warmup: int, variant: str = "eager") -> float:
    """Seconds per step of a plain PyTorch step of the same VAE, batch and loss as the VAE trainer's (fp32 weights,
    bf16 autocast, fused AdamW, gradient clipping), the batch already on the GPU, as ``variant`` (VAE_VARIANTS)."""
    from fourdnex.model.loading import channels_last_convolutions, load_vae
    from fourdnex.model.whole_clip import whole_clip_vae
    from fourdnex.runtime import device_of
    from fourdnex.train.vae import vae_loss

    device = device_of(cfg.device)
    options = variant.split("+")
    vae = load_vae(cfg.model_path, torch.float32).to(device).train()
    videos = clips.videos(np.arange(cfg.batch_size), device)
    if "channels_last" in options:
        channels_last_convolutions(vae)
        videos = videos.contiguous(memory_format=torch.channels_last_3d)
    if "whole_clip" in options:
        whole_clip_vae(vae)
    if "compiled" in options:
        vae.encoder.compile()
        vae.decoder.compile()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator(device).manual_seed(0)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = vae_loss(vae, videos, cfg.kl_weight, generator, whole_clip="whole_clip" in options)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - tic) / steps


def vae_table(args: argparse.Namespace) -> list[dict]:
    """The VAE trainer's step beside a plain step of the same VAE, per batch size."""
    from fourdnex.train.vae import Clips, VaeTrainConfig, VaeTrainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_path = save_model(Path(tmp) / "model", "demo")
        g = torch.Generator().manual_seed(0)
        count = args.clips
        clips = Clips(
            torch.randint(0, 256, (count, FRAMES, HEIGHT, WIDTH, 3), generator=g, dtype=torch.uint8).numpy(),
            (torch.rand(count, FRAMES, HEIGHT, WIDTH, 3, generator=g) * 2 - 1).half().numpy(),
        )
        for batch in args.batch:
            steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
            cfg = VaeTrainConfig(data_dir="", model_path=str(model_path), out=str(Path(tmp) / f"vae-{batch}"),
                                 batch_size=batch, max_steps=steps, device="cuda")  # fmt: skip
            trainer = VaeTrainer(cfg, clips)
            trainer.train_until(args.warmup)
            torch.cuda.synchronize()
            tic = time.perf_counter()
            trainer.train_until(args.warmup + args.steps)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - tic) / args.steps
            print(f"VAE trainer, batch {batch}: {batch / seconds:.1f} clips/s", flush=True)
            plain = plain_vae_seconds(cfg, clips, args.steps, args.warmup)
            row = {"batch": batch, "videos_per_step": 2 * batch, "plain_clips_s": batch / plain,
                   "trainer_clips_s": batch / seconds, "trainer_share_of_plain": plain / seconds}  # fmt: skip
            if args.profile:
                row["profile"] = profile_steps(trainer.train_until, trainer.step, trainer.step + args.profile_steps)
            print(json.dumps(row), flush=True)
            for variant in VAE_VARIANTS[1:]:  # candidates for a faster step; a failure is one of the results
                try:
                    seconds = plain_vae_seconds(cfg, clips, args.steps, args.warmup, variant)
                    row[f"plain_{variant}_clips_s"] = batch / seconds
                except Exception as err:
                    row[f"plain_{variant}_error"] = f"{type(err).__name__}: {err}"[:500]
                print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--trainer_batch", type=int, nargs="+", default=[128, 256], help="batches the trainer runs")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--clips", type=int, default=2048, help="clips of the random cache")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile_steps", type=int, default=20)
    parser.add_argument("--vae", action="store_true", help="the VAE trainer instead of the transformer's")
    parser.add_argument("--transformer", help="a transformer folder to time instead of the demo preset's random one")
    parser.add_argument("--out", default=None, help="write every row as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", default="adapter", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    parser.add_argument("--model_path", help=argparse.SUPPRESS)
    parser.add_argument("--run_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trainer_worker(args)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_train_throughput.py measures on a GPU; none is visible")
    rows = vae_table(args) if args.vae else transformer_table(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "profile"))
    print(" | ".join(keys))
    for row in rows:
        cells = (row.get(k, "-") for k in keys)
        print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells))
    for row in rows:
        if "profile" in row:
            print(json.dumps({k: row[k] for k in ("stage", "batch")} | row["profile"], indent=1))


if __name__ == "__main__":
    main()
