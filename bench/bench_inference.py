"""Inference speed and memory at the real Wan2.1-I2V-14B size (random weights), on one GPU, as a markdown table.

    python -m bench.bench_inference --budget-seconds 500            # one H100: every section that fits
    python -m bench.bench_inference --tiny                           # the same code on the tiny sizes, CPU

Sections (``--sections``, in this order):
  forward  one transformer forward at the 4DNeX shape (49 frames, 480x720 per modality, 35,100 tokens): diffusers'
           stock WanTransformer3DModel eager vs ours eager, each attention backend, regional compile; the FLOP
           floor beside them
  profile  (not in the default list) one forward of ours with the settings above under torch.profiler: GPU time
           in attention kernels, matmuls and everything else, each beside its FLOP floor, then the top kernels
  cross    (not in the default list) the compiled forward with another kernel for the two cross-attentions only
           (35,100 queries against 512 text / 257 image keys), per ``--cross-backends``
  sample   a few real steps of the whole pipeline (encoders, 2 guided calls per step, VAE decode) for diffusers'
           WanImageToVideoPipeline (stock, eager) and ours (defaults), extrapolated to 50 steps
  approx   First Block Cache on ours, and fewer steps: estimated sample time and deviation from the exact sample
  vae      decode of a fused sample: both halves at once, one after the other (slicing), tiled
  memory   each memory mode in its own process, capped with torch.cuda.set_per_process_memory_fraction: peak
           memory and estimated sample time (eager, so compare with the eager row)
  batch    (not in the default list) guidance as one forward of batch 2, per sample
The budget skips what would not finish in time and says so in the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from bench import common
from fourdnex.config import FLASH_4_BACKEND
from fourdnex.generate.acceleration import apply_acceleration, resolve
from fourdnex.generate.config import AccelerationConfig
from fourdnex.model import attention
from fourdnex.runtime import device_of, dtype_of

SECTIONS = ("forward", "profile", "cross", "sample", "approx", "vae", "memory", "batch")
DEFAULT_SECTIONS = "forward,sample,approx,vae,memory"
BACKENDS = ("flash_4", "_native_cudnn", "_native_flash", "flash", "_flash_3", "sage")
#: (memory mode, fp8, cap in GiB) measured in child processes, most wanted first.
MEMORY_RUNS = (
    ("group", False, 24),
    ("model", False, 48),
    ("model", True, 24),
    ("sequential", False, 24),
    ("group", False, 48),
)
CHILD_TAG = "BENCH_CHILD "


@dataclass
class Table:
    """Rows of the result table and the running clock that decides what still fits in the budget."""

    budget: float
    tiny: bool
    start: float = field(default_factory=time.perf_counter)
    rows: list[tuple[str, ...]] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, what: str, real_seconds: float) -> bool:
        """True if a step estimated to take ``real_seconds`` (real size) still fits; else records the skip."""
        cost = 2.0 if self.tiny else real_seconds
        if self.elapsed() + cost <= self.budget:
            return True
        self.add(what, "skipped", note=f"over --budget-seconds ({self.elapsed():.0f} s used, ~{cost:.0f} s needed)")
        return False

    def add(
        self,
        what: str,
        setting: str,
        seconds: float | None = None,
        base: float | None = None,
        peak: float | None = None,
        deviation: float | None = None,
        note: str = "",
    ) -> None:
        speedup = f"{base / seconds:.2f}x" if seconds and base else ""
        self.rows.append(
            (
                what,
                setting,
                "" if seconds is None else f"{seconds:.3f}",
                speedup,
                "" if peak is None or peak != peak else f"{peak:.1f}",
                "" if deviation is None else f"{deviation:.2e}",
                note,
            )
        )
        print(f"  {what} | {setting} | {self.rows[-1][2]} s {speedup} {note}", flush=True)

    def markdown(self) -> str:
        head = ("section", "setting", "seconds", "speedup", "peak GiB", "max abs dev", "note")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / common.GiB:.0f} GiB, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def bench_forward(model, inputs, device, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of a transformer forward after one warm-up, and its output."""
    with torch.no_grad():
        model(*inputs, return_dict=False)  # warm-up
        seconds, out = common.timed(lambda: model(*inputs, return_dict=False)[0], device, repeats)
    return seconds, out


def profile_forward(model, inputs, device, table: Table, peak_tflops: float, tokens: int, tiny: bool) -> None:
    """One forward under torch.profiler: kernel time by kind, each with its FLOPs' floor at ``peak_tflops``."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with torch.no_grad():
        model(*inputs, return_dict=False)
        common.synchronize(device)
        with profile(activities=activities) as prof:
            model(*inputs, return_dict=False)
            common.synchronize(device)
    totals = common.kernel_split(prof, on_gpu)
    config = common.TINY_TRANSFORMER if tiny else common.REAL_TRANSFORMER
    width = config["num_attention_heads"] * config["attention_head_dim"]
    cores = config["num_layers"] * (4 * tokens * tokens * width + 4 * tokens * 769 * width)  # QK^T and PV
    flops = {"attention": cores, "matmul": common.forward_flops(tiny, tokens) - cores}
    for kind, seconds in totals.items():
        note = ""
        if kind in flops and seconds > 0:
            floor = flops[kind] / (peak_tflops * 1e12)
            note = f"{flops[kind] / 1e12:.0f} TFLOP: {flops[kind] / seconds / 1e12:.0f} TFLOP/s, floor {floor:.3f} s"
        table.add("profile", f"{kind} kernels, one forward", seconds, note=note)
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20), flush=True)


def run_sample(pipe, image, shape: common.Shape, steps: int, device, stock: bool = False, **kwargs):
    """One pipeline run; returns (seconds, per-call seconds, output, peak GiB)."""
    generator = torch.Generator("cpu").manual_seed(42)
    settings = {"num_frames": shape.frames, "num_inference_steps": steps, "guidance_scale": 5.0, "generator": generator}

    def call():
        if stock:  # diffusers' own pipeline generates the fused frame as one wide video
            return pipe(
                image=image, prompt="a cat", height=shape.height, width=2 * shape.width, output_type="np", **settings
            ).frames
        return pipe(image, "a cat", height=shape.height, width=shape.width, **settings, **kwargs)

    timer = common.CallTimer(pipe.transformer, device)
    common.reset_peak(device)
    try:
        seconds, out = common.timed(call, device)
    finally:
        timer.remove()
    return seconds, timer.seconds, out, common.peak_gib(device)


def main(args: argparse.Namespace) -> None:
    if args.child:
        run_child(args)
        return
    sections = common.chosen_sections(args.sections, SECTIONS, "bench_inference")
    device = device_of("cpu" if args.cpu else "auto")
    dtype = dtype_of("auto", device)
    tiny = args.tiny
    shape = common.TINY_SHAPE if tiny else common.REAL_SHAPE
    table = Table(budget=args.budget_seconds, tiny=tiny)
    flops = common.forward_flops(tiny, shape.tokens)
    floor = flops / (args.peak_tflops * 1e12)
    results: dict[str, float] = {}
    try:
        run_sections(args, sections, table, device, dtype, floor, results)
    except Exception as err:  # keep what was measured before the failure
        traceback.print_exc()
        table.add("error", type(err).__name__, note=(str(err).splitlines() or [""])[0][:150])
    finally:
        summary = (
            f"Machine: {describe_machine(device)}. Shape: {shape.frames} frames, {shape.height}x{shape.width} per "
            f"modality ({shape.tokens} tokens), guidance 5.0. Forward = {flops / 1e15:.3f} PFLOP; floor "
            f"{floor:.3f} s at {args.peak_tflops:.0f} TFLOP/s. Total bench time {table.elapsed():.0f} s."
        )
        print()
        print(summary)
        print()
        print(table.markdown())
        if args.json:
            head = ("section", "setting", "seconds", "speedup", "peak_gib", "max_abs_dev", "note")
            rows = [dict(zip(head, row, strict=True)) for row in table.rows]
            numbers = {"machine": summary, "floor_seconds": floor, "results": results, "rows": rows}
            Path(args.json).write_text(json.dumps(numbers, indent=2))


def run_sections(
    args: argparse.Namespace,
    sections: list[str],
    table: Table,
    device: torch.device,
    dtype: torch.dtype,
    floor: float,
    results: dict[str, float],
) -> None:
    """Every selected section in order, adding rows to ``table`` and the headline numbers to ``results``."""
    tiny = args.tiny
    shape = common.TINY_SHAPE if tiny else common.REAL_SHAPE
    calls = 2 * args.full_steps
    flops = common.forward_flops(tiny, shape.tokens)
    print(f"{describe_machine(device)}; {shape.tokens} tokens; {flops / 1e15:.3f} PFLOP per forward", flush=True)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (shape.height, shape.width, 3), np.uint8))
    needs_pipeline = {"sample", "approx", "vae"} & set(sections)
    components = common.build_components(tiny, device, dtype) if needs_pipeline else None
    inputs = common.transformer_inputs(tiny, shape, device, dtype)

    # 1. Diffusers' stock transformer and pipeline, eager, native attention: the baseline.
    if ({"forward", "sample"} & set(sections)) and table.fits("stock", 60):
        stock = common.build_transformer(tiny, device, dtype, stock=True)
        if "forward" in sections:
            seconds, _ = bench_forward(stock, inputs, device, args.repeats)
            results["stock_forward"] = seconds
            table.add(
                "forward",
                "diffusers WanTransformer3DModel, eager, native SDPA",
                seconds,
                note=f"floor {floor:.2f} s at {args.peak_tflops:.0f} TFLOP/s",
            )
        if "sample" in sections and table.fits("sample: diffusers", 60):
            from diffusers import WanImageToVideoPipeline

            pipe = WanImageToVideoPipeline(transformer=stock, **components)
            pipe.set_progress_bar_config(disable=True)
            seconds, call_seconds, _, peak = run_sample(pipe, image, shape, args.steps, device, stock=True)
            results["stock_sample"] = common.extrapolate(seconds, call_seconds, calls)
            table.add(
                "sample",
                f"diffusers WanImageToVideoPipeline eager, {args.steps} steps measured",
                seconds,
                peak=peak,
                note=f"{args.full_steps} steps: {results['stock_sample']:.1f} s "
                f"(measured + {calls - len(call_seconds)} x median call {np.median(call_seconds):.3f} s)",
            )
            del pipe
        stock_alive = weakref.ref(stock)
        del stock
        gc.collect()  # the pipeline and its hooks form reference cycles: free the stock weights before ours
        if stock_alive() is not None:
            raise RuntimeError("the stock transformer is still referenced; ours would not fit beside it")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 2. Ours: eager, each attention backend, regional compile, guidance batching.
    if set(sections) == {"memory"}:  # no model in this process: the children get the whole GPU
        run_memory_modes(args, table, results)
        return
    ours = common.build_transformer(tiny, device, dtype)
    reference = None
    if "forward" in sections and table.fits("forward: ours eager", 15):
        seconds, reference = bench_forward(ours, inputs, device, args.repeats)
        results["ours_eager"] = seconds
        table.add(
            "forward", "ours (domain embedding, shared RoPE), eager, native", seconds, base=results.get("stock_forward")
        )
    best, best_seconds = "native", results.get("ours_eager", float("inf"))
    if "forward" in sections and device.type == "cuda":
        for backend in BACKENDS:
            if not table.fits(f"forward: {backend}", 12):
                break
            problem = attention.flash4_problem(device) if backend == FLASH_4_BACKEND else None
            if problem is not None:
                table.add("forward", f"ours eager, {backend}", note=f"unavailable: {problem[:150]}")
                continue
            try:
                ours.set_attention_backend(backend)
                seconds, out = bench_forward(ours, inputs, device, args.repeats)
            except Exception as err:  # an unavailable backend or a failing mode is a row, not a stop
                table.add("forward", f"ours eager, {backend}", note=f"unavailable: {str(err).splitlines()[0][:90]}")
                continue
            table.add(
                "forward",
                f"ours eager, {backend}",
                seconds,
                base=results.get("stock_forward"),
                deviation=common.max_abs(out, reference) if reference is not None else None,
            )
            if seconds < best_seconds:
                best, best_seconds = backend, seconds
    ours.set_attention_backend(best)
    compiled = False
    if device.type == "cuda" and {"forward", "sample", "approx"} & set(sections) and table.fits("compile", 150):
        tic = time.perf_counter()
        ours.compile_repeated_blocks(fullgraph=False)  # the cache hooks of the approx section break graphs
        seconds, out = bench_forward(ours, inputs, device, args.repeats)
        compiled = True
        results["ours_compiled"] = seconds
        table.add(
            "forward",
            f"ours, {best}, regional compile (our default)",
            seconds,
            base=results.get("stock_forward"),
            deviation=None if reference is None else common.max_abs(out, reference),
            note=f"compile + warm-up {time.perf_counter() - tic - seconds * args.repeats:.0f} s",
        )
    if "profile" in sections and table.fits("profile", 30):
        profile_forward(ours, inputs, device, table, args.peak_tflops, shape.tokens, tiny)
    if "cross" in sections and compiled:
        for backend in args.cross_backends:
            if not table.fits(f"cross: {backend}", 40):
                break
            for block in ours.blocks:
                block.attn2.processor._attention_backend = backend
            try:
                seconds, out = bench_forward(ours, inputs, device, args.repeats)
            except Exception as err:  # a kernel that fails here is a row, not a stop
                table.add("cross", backend, note=f"failed: {str(err).splitlines()[0][:90]}")
            else:
                table.add(
                    "cross",
                    f"ours, compiled, cross-attention on {backend}",
                    seconds,
                    base=results.get("ours_compiled"),
                    deviation=None if reference is None else common.max_abs(out, reference),
                    note="speedup vs the compiled row",
                )
        for block in ours.blocks:
            block.attn2.processor._attention_backend = block.attn1.processor._attention_backend
    if "batch" in sections and table.fits("forward: batch 2", 90):
        batched = common.transformer_inputs(tiny, shape, device, dtype, batch=2)
        seconds, _ = bench_forward(ours, batched, device, args.repeats)
        single = results.get("ours_compiled", results.get("ours_eager"))
        table.add(
            "forward",
            f"ours, {best}{', compiled' if compiled else ''}, guidance as batch 2, per sample",
            seconds / 2,
            base=single,
            note="speedup vs batch 1 of the same settings",
        )

    # 3. The whole pipeline with our defaults (the transformer above: its backend and compile already applied).
    if needs_pipeline:
        pipe = common.ours_pipeline(components, ours)
        pipe.vae.enable_slicing()
    if "sample" in sections and table.fits("sample: ours", 60):
        seconds, call_seconds, out, peak = run_sample(pipe, image, shape, args.steps, device)
        results["ours_sample"] = common.extrapolate(seconds, call_seconds, calls)
        table.add(
            "sample",
            f"ours ({best}{', compiled' if compiled else ''}), {args.steps} steps measured",
            seconds,
            peak=peak,
            note=f"{args.full_steps} steps: {results['ours_sample']:.1f} s; "
            f"stages {', '.join(f'{k} {v:.1f} s' for k, v in out.timings.items())}",
        )
        if "stock_sample" in results:
            table.add(
                "sample",
                f"estimate for {args.full_steps} steps, ours vs diffusers",
                results["ours_sample"],
                base=results["stock_sample"],
                note=f"diffusers {results['stock_sample']:.1f} s",
            )
        if "ours_eager" in results:
            other = seconds - sum(call_seconds)
            results["eager_sample"] = other + calls * results["ours_eager"]
            table.add(
                "sample",
                f"estimate for {args.full_steps} steps, ours eager (memory rows compare to this)",
                results["eager_sample"],
                peak=peak,
            )

    # 4. Approximate: First Block Cache and fewer steps, against the exact sample of the same steps.
    if "approx" in sections and table.fits("approx: exact reference", 60):
        from diffusers import FirstBlockCacheConfig

        steps = args.approx_steps
        seconds, exact_calls, exact, _ = run_sample(pipe, image, shape, steps, device)
        other = seconds - sum(exact_calls)
        per_call = float(np.median(exact_calls))
        within = int((args.target_seconds - other) / (2 * per_call))
        table.add("approx", f"exact model: most steps within {args.target_seconds:.0f} s", note=f"{within} steps")
        for count in (args.full_steps, args.fast_steps):
            table.add(
                "approx",
                f"exact model, {count} steps (estimate)",
                other + 2 * count * per_call,
                base=results.get("ours_sample"),
                note="fewer UniPC steps: their deviation needs trained weights",
            )
        for threshold in args.fbc_thresholds:
            if not table.fits(f"approx: First Block Cache {threshold}", 60):
                break
            try:
                pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
                seconds, call_seconds, out, peak = run_sample(pipe, image, shape, steps, device)
            except Exception as err:  # an unavailable backend or a failing mode is a row, not a stop
                table.add("approx", f"First Block Cache {threshold}", note=f"failed: {str(err).splitlines()[0][:90]}")
                continue
            finally:
                if pipe.transformer.is_cache_enabled:
                    pipe.transformer.disable_cache()
            ratio = sum(call_seconds) / sum(exact_calls)  # transformer time left by the cache
            within = int((args.target_seconds - other) / (2 * per_call * ratio))
            table.add("approx", f"First Block Cache {threshold}: most steps within {args.target_seconds:.0f} s",
                      note=f"{within} steps")  # fmt: skip
            for count in (args.full_steps, args.fast_steps):
                table.add(
                    "approx",
                    f"First Block Cache {threshold}, {count} steps (estimate)",
                    other + 2 * count * per_call * ratio,
                    base=results.get("ours_sample"),
                    peak=peak,
                    deviation=common.max_abs(out.xyz, exact.xyz),
                    note=f"{ratio:.0%} of the transformer time over {steps} measured steps; deviation: XYZ "
                    f"in [-1, 1] after {steps} steps vs exact; random weights skip unlike trained ones",
                )

    # 5. VAE decode of both halves of a fused sample.
    if "vae" in sections and table.fits("vae", 40):
        vae = components["vae"]
        t, h, w = shape.latent
        latents = torch.randn(2, 16, t, h, w // 2, device=device, dtype=vae.dtype)
        settings = (
            ("both halves at once", False, False),
            ("slicing: one half at a time (default)", True, False),
            ("slicing + tiling", True, True),
        )
        full = None
        for name, slicing, tiling in settings:
            vae.use_slicing, vae.use_tiling = slicing, tiling
            with torch.no_grad():
                vae.decode(latents[:, :, :2])  # warm-up
                common.reset_peak(device)
                seconds, video = common.timed(lambda: vae.decode(latents, return_dict=False)[0], device)
            full = video if full is None else full
            table.add(
                "vae",
                f"decode {shape.frames}x{shape.height}x{2 * shape.width}: {name}",
                seconds,
                peak=common.peak_gib(device),
                deviation=common.max_abs(video, full),
            )
        vae.use_slicing, vae.use_tiling = True, False

    # 6. Memory modes, each in a fresh process capped at the card size it stands for.
    if "memory" in sections:
        del ours
        if needs_pipeline:
            del pipe, components
        gc.collect()
        torch._dynamo.reset()  # compiled graphs must not keep the transformer alive while the children run
        if device.type == "cuda":
            torch.cuda.empty_cache()
            print(f"  parent process keeps {torch.cuda.memory_reserved(device) / common.GiB:.1f} GiB", flush=True)
        run_memory_modes(args, table, results)


def memory_run_name(mode: str, fp8: bool, cap: int) -> str:
    """How ``--memory-runs`` names a run: mode, ``+fp8`` if so, ``@`` the cap in GiB (e.g. ``model+fp8@24``)."""
    return f"{mode}{'+fp8' if fp8 else ''}@{cap}"


def run_memory_modes(args: argparse.Namespace, table: Table, results: dict[str, float]) -> None:
    """Each memory mode in a fresh process capped at the card size it stands for (this process holds no model)."""
    wanted = MEMORY_RUNS
    if args.memory_runs:
        wanted = tuple(run for run in MEMORY_RUNS if memory_run_name(*run) in args.memory_runs.split(","))
    runs = wanted if "eager_sample" in results else (("none", False, 80), *wanted)
    for mode, fp8, cap in runs:
        label = f"--memory {mode}{' --fp8' if fp8 else ''}, capped at {cap} GiB"
        if not table.fits(f"memory: {label}", 150):
            continue
        command = [
            sys.executable,
            "-m",
            "bench.bench_inference",
            "--child",
            mode,
            "--cap-gib",
            str(cap),
            "--steps",
            str(args.steps),
            "--full-steps",
            str(args.full_steps),
        ]
        command += ["--tiny"] * args.tiny + ["--fp8"] * fp8 + ["--cpu"] * args.cpu
        try:
            proc = subprocess.run(
                command, capture_output=True, text=True, timeout=max(10.0, table.budget - table.elapsed())
            )
        except subprocess.TimeoutExpired:
            table.add("memory", label, note="stopped at the budget")
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_TAG)]
        if proc.returncode or not lines:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            table.add("memory", label, note=f"failed: {last[:120]}")
            continue
        child = json.loads(lines[-1][len(CHILD_TAG) :])
        results.setdefault("eager_sample", child["estimate"])  # the uncapped "none" run, when it came first
        table.add(
            "memory",
            label,
            child["estimate"],
            peak=child["peak_gib"],
            note=f"{args.full_steps}-step estimate (eager); x{child['estimate'] / results['eager_sample']:.2f} "
            "of the unconstrained eager run",
        )


def run_child(args: argparse.Namespace) -> None:
    """One memory mode in this process: build on the GPU, move to the CPU, cap, offload, sample, report JSON."""
    device = device_of("cpu" if args.cpu else "auto")
    dtype = dtype_of("auto", device)
    shape = common.TINY_SHAPE if args.tiny else common.REAL_SHAPE
    pipe = common.ours_pipeline(
        common.build_components(args.tiny, device, dtype), common.build_transformer(args.tiny, device, dtype)
    )
    pipe.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, args.cap_gib * common.GiB / total)
        torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device())
    config = AccelerationConfig(memory=args.child, fp8=args.fp8, compile=False, attention_backend="native")
    apply_acceleration(
        pipe, resolve(config, device, pipe, shape.tokens, shape.frames * shape.height * shape.width), device
    )
    image = PIL.Image.fromarray(np.zeros((shape.height, shape.width, 3), np.uint8))
    seconds, call_seconds, _, peak = run_sample(pipe, image, shape, args.steps, device)
    estimate = common.extrapolate(seconds, call_seconds, 2 * args.full_steps)
    print(CHILD_TAG + json.dumps({"seconds": seconds, "estimate": estimate, "peak_gib": peak}), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=DEFAULT_SECTIONS, help="comma-separated, from: " + ", ".join(SECTIONS))
    parser.add_argument("--budget-seconds", type=float, default=500.0, help="skip what would not end in time")
    parser.add_argument("--tiny", action="store_true", help="tiny model sizes (a quick check of the script)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    parser.add_argument("--steps", type=int, default=2, help="pipeline steps actually run per sample measurement")
    parser.add_argument("--full-steps", type=int, default=50, help="steps of the sample the estimates are for")
    parser.add_argument("--fast-steps", type=int, default=20, help="step count of the approximate estimate")
    parser.add_argument("--target-seconds", type=float, default=120.0, help="time goal of the approximate mode")
    parser.add_argument("--approx-steps", type=int, default=4, help="steps run for the approximate comparisons")
    parser.add_argument("--fbc-thresholds", type=float, nargs="+", default=[0.1], help="First Block Cache")
    parser.add_argument(
        "--cross-backends", nargs="+", default=["flex", "_native_efficient", "_native_flash"], help="cross section"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per setting, after one warm-up")
    parser.add_argument("--peak-tflops", type=float, default=798.0, help="measured bf16 matmul peak (H100: 798)")
    parser.add_argument(
        "--memory-runs",
        default="",
        help="comma-separated subset of the memory section: " + ",".join(memory_run_name(*run) for run in MEMORY_RUNS),
    )
    parser.add_argument("--json", default=None, help="also write every row and the headline numbers to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cap-gib", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--fp8", action="store_true", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
