"""FlashAttention-4 (the ``flash_4`` backend) against cuDNN at the 4DNeX shapes on one GPU: numerics, kernel times,
the compiled transformer forward and a short sample with each backend, peak memory.

    python -m bench.bench_fa4 --json fa4.json                 # one H100 / H200 with flash-attn-4 (BENCHMARKS.md)
    python -m bench.bench_fa4 --tiny --json /tmp/fa4.json     # the same code on the CPU, FlashAttention-4's stand-in

Sections (``--sections``, in this order):
  kernels  the self-attention (35,100 queries and keys) and the two cross-attentions (512 text / 257 image keys), 40
           heads x 128, bf16, in diffusers' layout: flash_4 (fourdnex's custom ops, as the backend calls them) against
           cuDNN (SDPA forced to it) and SDPA's own choice: forward and forward + backward ms and TFLOP/s; the largest
           and mean |flash_4 - cuDNN|; each kernel's largest deviation from float32 attention on the first 1,024
           queries, and flash_4's log-sum-exp's; the gradients' relative difference (||a - b|| / ||b||) flash_4 vs
           cuDNN beside cuDNN vs cuDNN again (its run-to-run floor)
  forward  one forward of the real-size transformer (random bf16 weights, 35,100 tokens) with native SDPA and with
           flash_4, eager and regionally compiled (``compile_repeated_blocks(fullgraph=True)``, our default): seconds,
           peak GiB, largest deviation from native eager
  sample   two steps of the whole pipeline (real-size random components, compiled transformer) with native SDPA, again,
           eager (the compiled blocks run as plain PyTorch: ``torch.compiler.set_stance("force_eager")``) and with
           flash_4: seconds per transformer call, the 50-step estimate, the largest deviation of the latents and of
           the XYZ video from the first native run (the second native run's is the run-to-run floor, the eager run's
           what compiling changes)
The one-sample and training goals are measured by bench_inference and bench_train_step (BENCHMARKS.md has the
commands); the table is printed last, every number goes to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.bench_attention import measure
from fourdnex.model import attention
from fourdnex.runtime import device_of, dtype_of

SECTIONS = ("kernels", "forward", "sample")
REFERENCE_QUERIES = 1024


class Report:
    """Rows for the table and every number for the JSON file."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.numbers: dict[str, dict] = {}

    def add(self, section: str, what: str, value: str, note: str = "", **numbers) -> None:
        self.rows.append((section, what, value, note))
        self.numbers.setdefault(section, {})[what] = numbers
        print(f"  {section} | {what} | {value} {note}", flush=True)

    def markdown(self) -> str:
        lines = ["| section | what | value | note |", "|---|---|---|---|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def flash4(q, k, v):
    """flash_4 as the backend calls it: (B, N, H, D) in and out."""
    return torch.ops.fourdnex.flash4_forward(q, k, v, q.shape[-1] ** -0.5, False)[0]


def sdpa_as(kernel: SDPBackend | None):
    """SDPA on diffusers' layout, forced to ``kernel`` (None: its own choice)."""

    def run(q, k, v):
        with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    return run


def float32_reference(q, k, v, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in float32 for the first ``queries`` queries: out (B, n, H, D) and log-sum-exp (B, H, n)."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q[:, :queries].float(), k.float()) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", (scores - lse[..., None]).exp(), v.float()), lse


def gradients(fn, q, k, v, grad) -> list[torch.Tensor]:
    """dq, dk, dv of ``fn`` for the output gradient ``grad``."""
    return [g.detach() for g in torch.autograd.grad(fn(q, k, v), (q, k, v), grad)]


def bench_kernels(args, report: Report, device: torch.device, dtype: torch.dtype) -> None:
    heads, dim = (4, 16) if args.tiny else (40, 128)
    queries = 300 if args.tiny else 35_100
    keys = {"self": queries, "text": 64 if args.tiny else 512, "image": 33 if args.tiny else 257}
    cuda = device.type == "cuda"
    baseline = "cudnn" if cuda else "sdpa (cpu)"
    kernels = {"flash_4": flash4, baseline: sdpa_as(SDPBackend.CUDNN_ATTENTION if cuda else None)}
    if cuda:
        kernels["sdpa"] = sdpa_as(None)
    generator = torch.Generator(device).manual_seed(0)
    for what, count in keys.items():

        def tensor(n: int) -> torch.Tensor:
            return torch.randn(1, n, heads, dim, generator=generator, device=device, dtype=dtype).requires_grad_()

        q, k, v = tensor(queries), tensor(count), tensor(count)
        flops = 4 * queries * count * heads * dim
        with torch.no_grad():
            ref_out, ref_lse = float32_reference(q, k, v, REFERENCE_QUERIES)
            outs = {name: fn(q, k, v) for name, fn in kernels.items()}
        for name, fn in kernels.items():
            forward = measure(fn, q, k, v, args.repeats, backward=False)
            both = measure(fn, q, k, v, args.repeats, backward=True)
            dev = (outs[name][:, :REFERENCE_QUERIES].float() - ref_out).abs().max().item()
            report.add(
                "kernels",
                f"{what} ({count} keys), {name}",
                f"fwd {forward * 1e3:.2f} ms ({flops / forward / 1e12:.0f} TFLOP/s), fwd+bwd {both * 1e3:.2f} ms "
                f"(bwd {2.5 * flops / (both - forward) / 1e12:.0f} TFLOP/s)",
                f"max abs dev from float32 {dev:.2e}",
                forward_s=forward,
                forward_backward_s=both,
                forward_tflops=flops / forward / 1e12,
                backward_tflops=2.5 * flops / (both - forward) / 1e12,
                max_abs_dev_float32=dev,
            )
        diff = (outs["flash_4"].float() - outs[baseline].float()).abs()
        with torch.no_grad():
            _, lse = torch.ops.fourdnex.flash4_forward(q, k, v, dim**-0.5, False)
        lse_dev = (lse[:, :, :REFERENCE_QUERIES] - ref_lse).abs().max().item()
        grad = torch.randn(q.shape, generator=generator, device=device, dtype=dtype)
        base, again = gradients(kernels[baseline], q, k, v, grad), gradients(kernels[baseline], q, k, v, grad)
        ours = gradients(flash4, q, k, v, grad)
        grad_rel = [rel(a, b) for a, b in zip(ours, base, strict=True)]
        floor = [rel(a, b) for a, b in zip(again, base, strict=True)]
        # Both kernels' gradients against float32 attention's (SDPA's memory-efficient kernel on float32 copies):
        # what of their difference is each one's bf16 rounding.
        exact = sdpa_as(SDPBackend.EFFICIENT_ATTENTION if cuda else None)
        inputs32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
        reference = gradients(exact, *inputs32, grad.float())
        from_float32 = {
            name: [rel(a, b) for a, b in zip(grads, reference, strict=True)]
            for name, grads in (("flash_4", ours), (baseline, base))
        }

        def triple(values: list[float]) -> str:
            return "/".join(f"{x:.1e}" for x in values)

        report.add(
            "kernels",
            f"{what}: flash_4 vs {baseline}",
            f"max {diff.max().item():.2e}, mean {diff.mean().item():.2e}",
            f"lse max abs dev from float32 {lse_dev:.2e}; grad rel diff dq/dk/dv {triple(grad_rel)} (floor "
            f"{triple(floor)}); from float32: flash_4 {triple(from_float32['flash_4'])}, {baseline} "
            f"{triple(from_float32[baseline])}",
            max_abs=diff.max().item(),
            mean_abs=diff.mean().item(),
            lse_max_abs_dev_float32=lse_dev,
            grad_rel_diff=grad_rel,
            grad_rel_diff_floor=floor,
            grad_rel_dev_float32=from_float32,
        )


def forward_once(model, inputs, device, repeats: int) -> tuple[float, float, torch.Tensor, float]:
    """Seconds of the first forward (compiling, if compiled), median seconds of the next ones, the output and the
    peak GiB."""
    common.reset_peak(device)
    with torch.no_grad():
        first, _ = common.timed(lambda: model(*inputs, return_dict=False), device)
        seconds, out = common.timed(lambda: model(*inputs, return_dict=False)[0], device, repeats)
    return first, seconds, out, common.peak_gib(device)


def bench_forward(args, report: Report, device, model, inputs) -> None:
    reference = None
    for compiled in (False, True):
        if compiled:
            model.compile_repeated_blocks(fullgraph=True)
        for backend in ("native", "flash_4"):
            model.set_attention_backend(backend)
            first, seconds, out, peak = forward_once(model, inputs, device, args.repeats)
            reference = out if reference is None else reference
            deviation = common.max_abs(out, reference)
            report.add(
                "forward",
                f"{backend}, {'compiled' if compiled else 'eager'}",
                f"{seconds:.3f} s, {peak:.1f} GiB",
                f"max abs dev from native eager {deviation:.2e}; first call {first:.1f} s",
                seconds=seconds,
                first_call_seconds=first,
                peak_gib=peak,
                max_abs_dev_native_eager=deviation,
            )


def bench_sample(args, report: Report, device, dtype, model) -> None:
    tiny = args.tiny
    shape = common.TINY_SHAPE if tiny else common.REAL_SHAPE
    pipe = common.ours_pipeline(common.build_components(tiny, device, dtype), model)
    pipe.vae.enable_slicing()
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (shape.height, shape.width, 3), np.uint8))

    def sample(steps: int):
        settings = {"height": shape.height, "width": shape.width, "num_frames": shape.frames, "guidance_scale": 5.0}
        generator = torch.Generator("cpu").manual_seed(42)
        return pipe(image, "a cat", num_inference_steps=steps, generator=generator, **settings)

    for backend in ("native", "flash_4"):  # compiled graphs for the pipeline's calls, outside the timing
        model.set_attention_backend(backend)
        sample(1)
    first = None
    runs = (("native", "native", False), ("native, again", "native", False), ("native, eager", "native", True),
            ("flash_4", "flash_4", False))  # fmt: skip
    for label, backend, eager in runs:
        model.set_attention_backend(backend)
        timer = common.CallTimer(model, device)
        common.reset_peak(device)
        stance = torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()
        try:
            with stance:
                seconds, out = common.timed(lambda: sample(args.steps), device)
        finally:
            timer.remove()
        first = out if first is None else first
        call = statistics.median(timer.seconds)
        estimate = common.extrapolate(seconds, timer.seconds, 2 * args.full_steps)
        report.add(
            "sample",
            label,
            f"{call:.3f} s per call, {args.full_steps} steps ~{estimate:.1f} s",
            f"{args.steps} steps measured ({seconds:.1f} s); max abs dev from the first native run: latents "
            f"{common.max_abs(out.latents, first.latents):.2e}, XYZ {common.max_abs(out.xyz, first.xyz):.2e}",
            seconds=seconds,
            call_seconds=timer.seconds,
            estimate_seconds=estimate,
            peak_gib=common.peak_gib(device),
            max_abs_dev_latents=common.max_abs(out.latents, first.latents),
            max_abs_dev_xyz=common.max_abs(out.xyz, first.xyz),
        )


def main(args: argparse.Namespace) -> None:
    sections = common.chosen_sections(args.sections, SECTIONS, "bench_fa4")
    device = device_of("cpu" if args.tiny else "auto")
    dtype = dtype_of("auto", device)
    report = Report()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    with installed_stand_in(args.tiny):
        problem = attention.flash4_problem(device) if not args.tiny else attention.package_problem()
        if problem is not None:
            sys.exit(f"bench_fa4: {problem}")
        version = attention.flash4_version()
        print(f"{machine}, torch {torch.__version__}, flash-attn-4 {version}", flush=True)
        start = time.perf_counter()
        try:
            if "kernels" in sections:
                bench_kernels(args, report, device, dtype)
            if {"forward", "sample"} & set(sections):
                shape = common.TINY_SHAPE if args.tiny else common.REAL_SHAPE
                model = common.build_transformer(args.tiny, device, dtype)
                if "forward" in sections:
                    bench_forward(
                        args, report, device, model, common.transformer_inputs(args.tiny, shape, device, dtype)
                    )
                if "sample" in sections:
                    if "forward" not in sections:
                        model.compile_repeated_blocks(fullgraph=True)
                    bench_sample(args, report, device, dtype, model)
        finally:
            seconds = time.perf_counter() - start
            print(f"\n{machine}, torch {torch.__version__}, flash-attn-4 {version}; {seconds:.0f} s\n")
            print(report.markdown())
            if args.json:
                machine_numbers = {"device": machine, "torch": torch.__version__, "flash_attn_4": version}
                Path(args.json).write_text(
                    json.dumps({**machine_numbers, "seconds": seconds, **report.numbers}, indent=2)
                )


def installed_stand_in(tiny: bool):
    """FlashAttention-4's CPU stand-in for ``--tiny`` (a check of this script), nothing otherwise."""
    from fourdnex.testing.flash4 import installed

    return installed() if tiny else contextlib.nullcontext()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, from: " + ", ".join(SECTIONS))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per kernel or forward, after warm-up")
    parser.add_argument("--steps", type=int, default=2, help="pipeline steps run per sample")
    parser.add_argument("--full-steps", type=int, default=50, help="steps of the sample the estimate is for")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU with the stand-in (a script check)")
    parser.add_argument("--json", default=None, help="write every number to this file")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
