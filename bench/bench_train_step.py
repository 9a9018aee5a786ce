"""Seconds per optimizer step and peak memory of 4DNeX fine-tuning, through the trainer's own step function.

The transformer is built with random bf16 weights directly on the GPU (``--real-size``: Wan2.1-I2V-14B, 40 layers,
5120 wide; default: the tiny test model) and fed random tensors at the 4DNeX shape (latent 16x13x60x180 fused,
35,100 tokens; text 512x4096; CLIP 257x1280). The inputs of global sample position p come from a generator seeded
with p, so one process with ``--gradient_accumulation_steps 2`` and two processes with 1 see the same samples.

    # the trainer (DeepSpeed ZeRO-2, bf16 LoRA, gradient checkpointing), one GPU; --profile: where the GPU time goes
    python -m bench.bench_train_step --real-size --steps 3 --profile
    # compiled blocks, every block's attention output and feed-forward pre-activation kept, all parked in host memory
    python -m bench.bench_train_step --real-size --compile --warmup 2 --save_attention_blocks 40 --save_ffn_blocks 40 \
        --offload_checkpoints --offload_attention --offload_ffn
    # plain diffusers + peft + gradient checkpointing + torch AdamW (fp32 LoRA under bf16 autocast), no DeepSpeed
    python -m bench.bench_train_step --real-size --mode baseline
    # two processes, ZeRO-2 (or ZeRO-3), one sample each; compare with --gradient_accumulation_steps 2 on one
    torchrun --nproc_per_node 2 -m bench.bench_train_step --real-size [--deepspeed_config configs/deepspeed_zero3.json]
    # one batch's gradients: plain checkpointing twice (the run-to-run floor), then the settings given
    python -m bench.bench_train_step --real-size --mode gradients --compile --save_attention_blocks 40 \
        --save_ffn_blocks 40 --offload_checkpoints --offload_attention --offload_ffn

The attention kernels alone are timed by ``bench/bench_attention.py``.

What gradient checkpointing keeps (``fourdnex.train.activation_memory``), at the 4DNeX shape: each block's
input, 35,100 x 5120 bf16 = 0.36 GB, 14.4 GB for 40 blocks; ``--save_attention_blocks N`` also keeps the
self-attention output + log-sum-exp of the first N blocks (0.37 GB each, 14.6 GB for 40), so their backward skips the attention kernel's forward recompute
(~25 TFLOP per block, ~2 s per step for 40); ``--save_ffn_blocks N`` keeps the feed-forward's pre-activation
(35,100 x 13,824, 0.97 GB each, 38.8 GB for 40), so their recompute skips the feed-forward (~10 TFLOP per block).
``--offload_checkpoints`` parks the block inputs in page-locked host memory, ``--offload_attention`` and
``--offload_ffn`` the kept tensors too; they are copied to the host on a side stream as they are written and back one
block ahead of the backward. Host memory: one slab per kind, exactly its size (40 x 0.36 GB = 14.4 GB for the inputs,
as much again for 40 attention outputs, 38.8 GB for 40 pre-activations; the H100 machine has 128 GiB). The row's
``copy s`` is the side stream's copy time per step and ``wait s`` the time the backward stalled for a block's tensors
to come back; ``host GB`` the page-locked memory the slabs hold.

Measured results and their commands: BENCHMARKS.md, section "Training".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from bench.common import REAL_TRANSFORMER as REAL
from bench.common import TINY_TRANSFORMER as TINY
from bench.common import building_on
from fourdnex.model.transformer import FourDNeXTransformer
from fourdnex.train.activation_memory import block_checkpoint
from fourdnex.train.loop import (
    BLOCK_CHECKPOINTING_FIELDS,
    Batch,
    LossWeights,
    TrainConfig,
    Trainer,
    TrainingError,
    batch_loss,
    build_transformer,
    make_accelerator,
    stream_positions,
    trainable_parameters,
)

#: (latent frames, latent height, latent width per modality, text tokens) of a 49 x 480 x 720 sample, and a tiny one.
REAL_SHAPE = (13, 60, 90, 512)
TINY_SHAPE = (3, 4, 4, 16)


def build_model(config: dict, device: torch.device) -> FourDNeXTransformer:
    """Random weights in bf16, created on ``device`` (no fp32 host copy of 16B parameters)."""
    torch.manual_seed(0)
    with building_on(device, torch.bfloat16):
        return FourDNeXTransformer(**config)


def random_batch(position: int, shape: tuple[int, int, int, int], text_dim: int, image_dim: int) -> Batch:
    """The random sample at a global stream position (batch of 1), float32 on the CPU."""
    frames, h, w, tokens = shape
    g = torch.Generator().manual_seed(position)
    latent = (1, 16, frames, h, 2 * w)
    return Batch(
        x0=torch.randn(latent, generator=g),
        condition=torch.cat([torch.rand(1, 4, frames, h, 2 * w, generator=g), torch.randn(latent, generator=g)], 1),
        prompt_embeds=torch.randn(1, tokens, text_dim, generator=g),
        image_embeds=torch.randn(1, 257, image_dim, generator=g),
        noise=torch.randn(latent, generator=g),
        sigmas=torch.rand(1, generator=g),
    )


def peak_gib(device: torch.device) -> tuple[float, float]:
    """Peak allocated and reserved GPU memory (GiB) since the process started; NaN on CPU."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


def table(rows: list[dict]) -> str:
    """Rows of equal keys as an aligned text table."""
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    lines = [" | ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def run_trainer(args, cfg: TrainConfig, config: dict, shape) -> None:
    """Steps of :class:`fourdnex.train.loop.Trainer` under DeepSpeed; one table row per process."""
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    model = build_transformer(cfg, transformer=build_model(config, device))
    tic = time.perf_counter()
    trainer = Trainer(cfg, model, accelerator, meta=None)
    setup = time.perf_counter() - tic
    world, rank = accelerator.num_processes, accelerator.process_index
    checkpointing = block_checkpoint(trainer.module)
    if checkpointing is not None:
        checkpointing.measure()
    rows, copies = [], []
    for step in range(args.warmup + args.steps):
        batches = [
            random_batch(stream_positions(cfg, step, m, rank, world)[0], shape, config["text_dim"], config["image_dim"])
            for m in range(cfg.gradient_accumulation_steps)
        ]
        metrics = trainer.train_step(batches, sync_timings=True)
        rows.append(metrics)
        if checkpointing is not None:
            copies.append(checkpointing.pop_stats())
    timed = rows[args.warmup :]
    timed_copies = copies[args.warmup :] or [dict.fromkeys(("parked_gb", "copy_s", "wait_s", "host_gb"), 0.0)]
    allocated, reserved = peak_gib(device)
    if args.profile and accelerator.is_main_process:
        profile_step(trainer, cfg, config, shape, args.warmup + args.steps, rank, world)
    seconds = statistics.mean(m.seconds for m in timed)
    parked = (("inputs", cfg.offload_checkpoints), ("attn", cfg.offload_attention), ("ffn", cfg.offload_ffn))
    result = {
        "mode": f"trainer ZeRO-{trainer.zero_stage}",
        "rank": f"{rank}/{world}",
        "attention": cfg.attention_backend or "default",
        "saved_attn": cfg.save_attention_blocks,
        "saved_ffn": cfg.save_ffn_blocks,
        "offload": "+".join(k for k, on in parked if on) or "no",
        "compile": cfg.compile_blocks,
        "gas": cfg.gradient_accumulation_steps,
        "s/step": f"{seconds:.2f}",
        "fwd": f"{statistics.mean(m.timings['forward'] for m in timed):.2f}",
        "bwd": f"{statistics.mean(m.timings['backward'] for m in timed):.2f}",
        "opt": f"{statistics.mean(m.timings['optimizer'] for m in timed):.3f}",
        "parked GB": f"{statistics.mean(c['parked_gb'] for c in timed_copies):.1f}",
        "copy s": f"{statistics.mean(c['copy_s'] for c in timed_copies):.2f}",
        "wait s": f"{statistics.mean(c['wait_s'] for c in timed_copies):.3f}",
        "host GB": f"{timed_copies[-1]['host_gb']:.1f}",
        "samples/s": f"{cfg.gradient_accumulation_steps * world / seconds:.3f}",
        "peak GiB": f"{allocated:.1f}",
        "reserved GiB": f"{reserved:.1f}",
        "setup s": f"{setup:.1f}",
        "losses": " ".join(f"{m.loss:.5f}" for m in rows),
    }
    gathered = [None] * world if world > 1 else [result]
    if world > 1:
        torch.distributed.all_gather_object(gathered, result)
    if accelerator.is_main_process:
        print(table(gathered))
        print(json.dumps({"trainable": sum(p.numel() for p in trainable_parameters(trainer.module).values())}))


def profile_step(trainer: Trainer, cfg: TrainConfig, config: dict, shape, step: int, rank: int, world: int) -> None:
    """One more step under torch.profiler: GPU time by kind of kernel, then the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    batches = [
        random_batch(stream_positions(cfg, step, m, rank, world)[0], shape, config["text_dim"], config["image_dim"])
        for m in range(cfg.gradient_accumulation_steps)
    ]
    on_gpu = trainer.accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        trainer.train_step(batches, sync_timings=True)
    totals = common.kernel_split(prof, on_gpu)
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    total = sum(totals.values()) or float("nan")
    unit = "GPU s" if on_gpu else "CPU s"
    print(table([{"kind": k, unit: f"{v:.2f}", "share": f"{v / total:.0%}"} for k, v in sorted(totals.items())]))
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def run_baseline(args, cfg: TrainConfig, config: dict, shape) -> None:
    """Plain diffusers + peft + gradient checkpointing + torch AdamW on fp32 LoRA weights under bf16 autocast."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config, device)
    model.set_layout("rgbxyz")
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets)))
    model.domain_embedding.requires_grad_(True)
    cast_training_params(model, dtype=torch.float32)
    if cfg.attention_backend:
        model.set_attention_backend(cfg.attention_backend)
    model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=1e-4)
    times, losses = [], []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in range(args.warmup + args.steps):
        batch = random_batch(step, shape, config["text_dim"], config["image_dim"]).to(device)
        sync()
        tic = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = batch_loss(model, batch, LossWeights(), torch.bfloat16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - tic)
        losses.append(loss.item())
    allocated, reserved = peak_gib(device)
    seconds = statistics.mean(times[args.warmup :])
    row = {
        "mode": "baseline (diffusers+peft)",
        "attention": cfg.attention_backend or "default",
        "s/step": f"{seconds:.2f}",
        "samples/s": f"{1 / seconds:.3f}",
        "peak GiB": f"{allocated:.1f}",
        "reserved GiB": f"{reserved:.1f}",
        "losses": " ".join(f"{v:.5f}" for v in losses),
    }
    print(table([row]))


def run_gradients(args, cfg: TrainConfig, config: dict, shape) -> None:
    """The gradients of one batch with plain checkpointing (twice: the run-to-run floor) and with the settings given
    (``--save_*_blocks``, ``--offload_*``, ``--compile``; with ``--compile`` also plain compiled and the
    settings without it): relative difference and cosine against the first.

    LoRA B starts from small seeded values instead of zero, so that the A matrices get gradients too.
    """
    import dataclasses
    import gc

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plain = dataclasses.replace(cfg.plain_checkpointing(), compile_blocks=False)
    runs = [("plain checkpointing", plain), ("plain checkpointing, again", plain)]
    if cfg.compile_blocks:
        runs.append(("plain checkpointing, compiled", dataclasses.replace(plain, compile_blocks=True)))
        runs.append(("the settings given, not compiled", dataclasses.replace(cfg, compile_blocks=False)))
    runs.append(("the settings given", cfg))
    batch = random_batch(0, shape, config["text_dim"], config["image_dim"]).to(device)
    grads, rows = {}, []
    for label, settings in runs:
        model = build_transformer(settings, transformer=build_model(config, device))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(1e-3 * torch.randn(param.shape, generator=generator))
        loss, _ = batch_loss(model, batch, LossWeights(), torch.bfloat16)
        loss.backward()
        grads[label] = {n: p.grad.float().cpu() for n, p in trainable_parameters(model).items()}
        del model, loss
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        reference = grads[runs[0][0]]
        flat = torch.cat([g.flatten() for g in grads[label].values()]).double()
        ref = torch.cat([g.flatten() for g in reference.values()]).double()
        worst = max(
            ((grads[label][n] - reference[n]).norm() / reference[n].norm().clamp_min(1e-30)).item() for n in reference
        )
        rows.append(
            {
                "gradients of": label,
                "tensors": len(reference),
                "norm": f"{flat.norm().item():.4e}",
                "rel. diff (all)": f"{((flat - ref).norm() / ref.norm()).item():.2e}",
                "rel. diff (worst tensor)": f"{worst:.2e}",
                "cosine": f"{torch.nn.functional.cosine_similarity(flat, ref, dim=0).item():.6f}",
            }
        )
    print(table(rows))


def main(args: argparse.Namespace) -> None:
    """Run the chosen mode at the chosen size."""
    config, shape = (REAL, REAL_SHAPE) if args.real_size else (TINY, TINY_SHAPE)
    cfg = TrainConfig(
        lora_rank=64,
        lora_alpha=32,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        attention_backend=args.attention_backend,
        **{name: getattr(args, name) for name in BLOCK_CHECKPOINTING_FIELDS},
        compile_blocks=args.compile,
        deepspeed_config=args.deepspeed_config,
        lr_warmup_steps=0,
    )
    try:
        cfg.validate_checkpointing()
    except TrainingError as err:
        sys.exit(f"bench_train_step: {err}")
    if args.mode == "trainer":
        run_trainer(args, cfg, config, shape)
    elif args.mode == "baseline":
        run_baseline(args, cfg, config, shape)
    else:
        run_gradients(args, cfg, config, shape)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="trainer", choices=["trainer", "baseline", "gradients"])
    parser.add_argument("--real-size", action="store_true", help="Wan2.1-I2V-14B at 49x480x1440 (else tiny, for CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--attention_backend", default=None, help="diffusers backend, e.g. _native_cudnn")
    parser.add_argument("--save_attention_blocks", type=int, default=0, help="keep the first N attention outputs")
    parser.add_argument("--offload_checkpoints", action="store_true", help="park the block inputs in host memory")
    parser.add_argument("--offload_attention", action="store_true", help="park the kept attention outputs too")
    parser.add_argument("--save_ffn_blocks", type=int, default=0, help="keep the first N feed-forward pre-activations")
    parser.add_argument("--offload_ffn", action="store_true", help="park the kept pre-activations too")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--deepspeed_config", default=None, help="default: configs/deepspeed_zero2.json")
    parser.add_argument("--profile", action="store_true", help="profile one more step: GPU time by kernel kind")
    main(parser.parse_args())
