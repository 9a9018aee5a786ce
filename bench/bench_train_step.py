"""Seconds per optimizer step and peak memory of 4DNeX fine-tuning, through the trainer's own step function.

The transformer is built with random bf16 weights directly on the GPU (``--real-size``: Wan2.1-I2V-14B, 40 layers,
5120 wide; default: the tiny test model) and fed random tensors at the 4DNeX shape (latent 16x13x60x180 fused,
35,100 tokens; text 512x4096; CLIP 257x1280). The inputs of global sample position p come from a generator seeded
with p, so one process with ``--gradient_accumulation_steps 2`` and two processes with 1 see the same samples.

    # the trainer (DeepSpeed ZeRO-2, bf16 LoRA, gradient checkpointing), one GPU; --profile: where the GPU time goes
    python -m bench.bench_train_step --real-size --steps 3 --profile
    # compiled blocks, every block's attention output and feed-forward pre-activation kept, all parked in host memory
    python -m bench.bench_train_step --real-size --compile --warmup 2 --activation_memory attention+ffn
    # plain diffusers + peft + gradient checkpointing + torch AdamW (fp32 LoRA under bf16 autocast), no DeepSpeed
    python -m bench.bench_train_step --real-size --mode baseline
    # two processes, ZeRO-2 (or ZeRO-3), one sample each; compare with --gradient_accumulation_steps 2 on one
    torchrun --nproc_per_node 2 -m bench.bench_train_step --real-size [--deepspeed_config configs/deepspeed_zero3.json]
    # one batch's gradients: plain checkpointing twice (the run-to-run floor), then the settings given
    python -m bench.bench_train_step --real-size --mode gradients --compile --activation_memory attention+ffn

The attention kernels alone are timed by ``bench/bench_attention.py``.

What gradient checkpointing keeps (``--activation_memory``, as finetune.py's; here the default is ``recompute``),
at the 4DNeX shape: each block's input, 35,100 x 5120 bf16 = 0.36 GB, 14.4 GB for 40 blocks; ``attention`` also
keeps every block's self-attention output + log-sum-exp (0.37 GB each, 14.6 GB for 40), so their backward skips the
attention kernel's forward recompute (~25 TFLOP per block; its time: BENCHMARKS.md, "GPU results");
``attention+ffn`` also keeps the feed-forward's pre-activation (35,100 x 13,824, 0.97 GB each, 38.8 GB for 40), so
the recompute skips the
feed-forward (~10 TFLOP per block). On CUDA both park the block inputs and the kept tensors in page-locked host
memory: copied to the host on a side stream as they are written and back one block ahead of the backward. Host
memory: one slab per kind, exactly its size (40 x 0.36 GB = 14.4 GB for the inputs, as much again for 40 attention
outputs, 38.8 GB for 40 pre-activations; the H100 machine has 128 GiB). The row's ``copy s`` is the side stream's
copy time per step and ``wait s`` the time the backward stalled for a block's tensors to come back (both timed with
CUDA events by :class:`TimedCopier`); ``host GB`` the page-locked memory the slabs hold. ``fwd``, ``bwd`` and
``opt`` are the DeepSpeed engine's forward, backward and step calls, CUDA synchronized around each
(:class:`PhaseTimer`).

Measured results and their commands: BENCHMARKS.md, section "Training".
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from bench.common import REAL_TRANSFORMER as REAL
from bench.common import TINY_TRANSFORMER as TINY
from bench.common import building_on
from fourdnex.model.transformer import FourDNeXTransformer
from fourdnex.runtime import device_of
from fourdnex.train.block_recompute import BlockRecompute, HostCopier, block_recompute
from fourdnex.train.config import ACTIVATION_MEMORY_CHOICES, TrainConfig, TrainingError
from fourdnex.train.data import SampleStream
from fourdnex.train.engine import Trainer, deepspeed_config, make_accelerator, trainable_parameters, zero_stage
from fourdnex.train.loop import build_transformer
from fourdnex.train.loss import Batch, LossWeights, batch_loss
from fourdnex.train.memory_policy import RecomputePlan, choose_activation_memory

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


def position(cfg: TrainConfig, step: int, micro: int, rank: int, world: int) -> int:
    """The global stream position of the one sample that process ``rank`` trains on in micro-step ``micro`` of step
    ``step`` (batch 1 per process): the trainer's own split of a step's global batch."""
    stream = SampleStream(cfg, 1, world)
    return step * stream.global_batch + stream.rows(micro, rank)[0]


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


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: The DeepSpeed engine's method behind each phase of a step that :class:`PhaseTimer` times.
PHASE_METHODS = {"forward": "forward", "backward": "backward", "optimizer": "step"}


class PhaseTimer:
    """Seconds spent in a DeepSpeed engine's forward, backward and optimizer step, CUDA synchronized around each call
    (it wraps the engine's methods; the trainer's step calls them once per micro-batch)."""

    def __init__(self, engine, device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys(PHASE_METHODS, 0.0)
        for phase, method in PHASE_METHODS.items():
            setattr(engine, method, self._timed(phase, getattr(engine, method)))

    def _timed(self, phase: str, call: Callable) -> Callable:
        def timed(*args, **kwargs):
            synchronize(self.device)
            tic = time.perf_counter()
            out = call(*args, **kwargs)
            synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - tic
            return out

        return timed

    def pop(self) -> dict[str, float]:
        """The seconds per phase since the last call."""
        seconds, self.seconds = self.seconds, dict.fromkeys(PHASE_METHODS, 0.0)
        return seconds


class TimedCopier(HostCopier):
    """A :class:`HostCopier` that counts the bytes it parks and, on CUDA, times its copies on the side stream and the
    compute stream's waits for copies back with CUDA events."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.parked_bytes = 0
        self.copies: list[tuple] = []  # (start, end) events around copies on the side stream
        self.waits: list[tuple] = []  # (start, end) events around the compute stream's waits

    @classmethod
    def install(cls, recompute: BlockRecompute, device: torch.device) -> TimedCopier:
        """Make ``recompute`` park through a new TimedCopier on ``device``; returns it."""
        recompute.copier = cls(device)
        return recompute.copier

    @staticmethod
    def _span(stream, spans: list) -> Callable[[], None]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        spans.append((start, end))
        return lambda: end.record(stream)

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.parked_bytes += src.nbytes
        if self.stream is None:
            super().to_host(src, dst)
            return
        self.stream.wait_stream(torch.cuda.current_stream(src.device))  # as the copy will: the span starts at it
        done = self._span(self.stream, self.copies)
        super().to_host(src, dst)
        done()

    def to_device(self, src: torch.Tensor, device: torch.device):
        if self.stream is None:
            return super().to_device(src, device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        done = self._span(self.stream, self.copies)
        copied = super().to_device(src, device)
        done()
        return copied

    def wait(self, ready, device: torch.device) -> None:
        if ready is None:
            return
        stream = torch.cuda.current_stream(device)
        done = self._span(stream, self.waits)
        super().wait(ready, device)
        done()

    def pop_stats(self, recompute: BlockRecompute) -> dict[str, float]:
        """Since the last call: GB parked, seconds of copies on the side stream, seconds the compute stream waited
        for copies back (NaN without CUDA), and the host memory ``recompute``'s buffers hold (GB)."""
        copy = wait = float("nan")
        if self.stream is not None:
            torch.cuda.synchronize(self.stream.device)
            copy = sum(start.elapsed_time(end) for start, end in self.copies) / 1e3
            wait = sum(start.elapsed_time(end) for start, end in self.waits) / 1e3
        host = sum(slab.nbytes for slab in recompute.host_buffers.slabs)
        stats = {"parked_gb": self.parked_bytes / 1e9, "copy_s": copy, "wait_s": wait, "host_gb": host / 1e9}
        self.parked_bytes, self.copies, self.waits = 0, [], []
        return stats


def run_trainer(args, cfg: TrainConfig, setting: str, config: dict, shape) -> None:
    """Steps of :class:`fourdnex.train.engine.Trainer` under DeepSpeed; one table row per process."""
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    plan = RecomputePlan.for_setting(setting, park=device.type == "cuda")
    model = build_transformer(cfg, transformer=build_model(config, device), plan=plan)
    tic = time.perf_counter()
    trainer = Trainer(cfg, model, accelerator, meta=None)
    setup = time.perf_counter() - tic
    world, rank = accelerator.num_processes, accelerator.process_index
    recompute = block_recompute(trainer.module)
    copier = TimedCopier.install(recompute, device) if recompute is not None else None
    phases = PhaseTimer(trainer.engine, device)
    rows, timings, copies = [], [], []
    for step in range(args.warmup + args.steps):
        batches = [
            random_batch(position(cfg, step, m, rank, world), shape, config["text_dim"], config["image_dim"])
            for m in range(cfg.gradient_accumulation_steps)
        ]
        synchronize(device)
        tic = time.perf_counter()
        metrics = trainer.train_step(batches)
        synchronize(device)
        rows.append((metrics, time.perf_counter() - tic))
        timings.append(phases.pop())
        if copier is not None:
            copies.append(copier.pop_stats(recompute))
    timed, timed_phases = rows[args.warmup :], timings[args.warmup :]
    timed_copies = copies[args.warmup :] or [dict.fromkeys(("parked_gb", "copy_s", "wait_s", "host_gb"), 0.0)]
    allocated, reserved = peak_gib(device)
    if args.profile and accelerator.is_main_process:
        profile_step(trainer, cfg, config, shape, args.warmup + args.steps, rank, world)
    seconds = statistics.mean(s for _, s in timed)
    result = {
        "mode": f"trainer ZeRO-{trainer.engine.zero_optimization_stage()}",
        "rank": f"{rank}/{world}",
        "attention": cfg.attention_backend or "default",
        "activation memory": setting,
        "parked": "yes" if plan is not None and plan.park_inputs else "no",
        "compile": cfg.compile_blocks,
        "gas": cfg.gradient_accumulation_steps,
        "s/step": f"{seconds:.2f}",
        "fwd": f"{statistics.mean(t['forward'] for t in timed_phases):.2f}",
        "bwd": f"{statistics.mean(t['backward'] for t in timed_phases):.2f}",
        "opt": f"{statistics.mean(t['optimizer'] for t in timed_phases):.3f}",
        "parked GB": f"{statistics.mean(c['parked_gb'] for c in timed_copies):.1f}",
        "copy s": f"{statistics.mean(c['copy_s'] for c in timed_copies):.2f}",
        "wait s": f"{statistics.mean(c['wait_s'] for c in timed_copies):.3f}",
        "host GB": f"{timed_copies[-1]['host_gb']:.1f}",
        "samples/s": f"{cfg.gradient_accumulation_steps * world / seconds:.3f}",
        "peak GiB": f"{allocated:.1f}",
        "reserved GiB": f"{reserved:.1f}",
        "setup s": f"{setup:.1f}",
        "losses": " ".join(f"{m.values[0].item():.5f}" for m, _ in rows),
    }
    gathered = [None] * world if world > 1 else [result]
    if world > 1:
        torch.distributed.all_gather_object(gathered, result)
    if accelerator.is_main_process:
        print(table(gathered))
        trainable = sum(p.numel() for p in trainable_parameters(trainer.module).values())
        print(json.dumps({"trainable": trainable}))
        write_json(args, {"rows": gathered, "trainable": trainable})


def profile_step(trainer: Trainer, cfg: TrainConfig, config: dict, shape, step: int, rank: int, world: int) -> None:
    """One more step under torch.profiler: GPU time by kind of kernel, then the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    batches = [
        random_batch(position(cfg, step, m, rank, world), shape, config["text_dim"], config["image_dim"])
        for m in range(cfg.gradient_accumulation_steps)
    ]
    on_gpu = trainer.accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        trainer.train_step(batches)
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

    device = device_of()
    model = build_model(config, device)
    model.set_modalities("rgbxyz")
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
    for step in range(args.warmup + args.steps):
        batch = random_batch(step, shape, config["text_dim"], config["image_dim"]).to(device)
        synchronize(device)
        tic = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = batch_loss(model, batch, LossWeights(), torch.bfloat16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
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
    write_json(args, {"rows": [row]})


def run_gradients(args, cfg: TrainConfig, setting: str, config: dict, shape) -> None:
    """The gradients of one batch with plain checkpointing on the default attention kernel (twice: the run-to-run
    floor) and with the settings given (``--activation_memory``, ``--compile``, ``--attention_backend``; with
    ``--compile`` also plain compiled and the settings without it): relative difference and cosine against the first.

    LoRA B starts from small seeded values instead of zero, so that the A matrices get gradients too.
    """
    device = device_of()
    plan = RecomputePlan.for_setting(setting, park=device.type == "cuda")
    plain = dataclasses.replace(cfg, compile_blocks=False, attention_backend=None)  # the reference: the default kernel
    runs = [("plain checkpointing", plain, None), ("plain checkpointing, again", plain, None)]
    if cfg.compile_blocks:
        runs.append(("plain checkpointing, compiled", dataclasses.replace(plain, compile_blocks=True), None))
        runs.append(("the settings given, not compiled", dataclasses.replace(cfg, compile_blocks=False), plan))
    runs.append(("the settings given", cfg, plan))
    batch = random_batch(0, shape, config["text_dim"], config["image_dim"]).to(device)
    grads, rows = {}, []
    for label, settings, settings_plan in runs:
        model = build_transformer(settings, transformer=build_model(config, device), plan=settings_plan)
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
    write_json(args, {"rows": rows})


def write_json(args, numbers: dict) -> None:
    """Every number of the run to ``--json`` (when given)."""
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2))


def main(args: argparse.Namespace) -> None:
    """Run the chosen mode at the chosen size."""
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("fourdnex").setLevel(logging.INFO)  # the activation-memory line
    config, shape = (REAL, REAL_SHAPE) if args.real_size else (TINY, TINY_SHAPE)
    cfg = TrainConfig(
        lora_rank=64,
        lora_alpha=32,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        attention_backend=args.attention_backend,
        activation_memory=args.activation_memory,
        compile_blocks=args.compile,
        deepspeed_config=args.deepspeed_config,
        lr_warmup_steps=0,
    )
    try:
        cfg.validate()
        setting = choose_activation_memory(cfg, zero_stage(deepspeed_config(cfg)))
    except TrainingError as err:
        sys.exit(f"bench_train_step: {err}")
    if args.mode == "trainer":
        run_trainer(args, cfg, setting, config, shape)
    elif args.mode == "baseline":
        run_baseline(args, cfg, config, shape)
    else:
        run_gradients(args, cfg, setting, config, shape)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="trainer", choices=["trainer", "baseline", "gradients"])
    parser.add_argument("--real-size", action="store_true", help="Wan2.1-I2V-14B at 49x480x1440 (else tiny, for CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument(
        "--attention_backend", default=None, help="diffusers backend, e.g. _native_cudnn or flash_4 (FlashAttention-4)"
    )
    parser.add_argument(
        "--activation_memory",
        default="recompute",
        choices=ACTIVATION_MEMORY_CHOICES,
        help="what gradient checkpointing keeps, as finetune.py's (default here: recompute)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--deepspeed_config", default=None, help="default: configs/deepspeed_zero2.json")
    parser.add_argument("--profile", action="store_true", help="profile one more step: GPU time by kernel kind")
    parser.add_argument("--json", default=None, help="also write the table's numbers to this file")
    main(parser.parse_args())
