"""Many lines at once: seconds per line of inference.py's sampling at batch 1 against ``--batch_size N``.

Writes held-out-like inputs (synthetic scenes from the demo recipe's held-out seed range, prepared by
``fourdnex.evaluation.inputs`` at the sample size), loads the model once as inference.py does, and samples every
line at batch 1 and in batches of N, interleaved (a batch, then its lines one by one, so that other work on a shared
machine weighs on both alike), after one untimed 1-step batch of each size (on a GPU: compiling that shape). Prints
a markdown table: seconds per line of sampling (wall, and the pipeline's stages), CPU seconds per line (all
threads), the speedup over batch 1, the largest difference of any line's final latents, XYZ video and RGB video from
its batch-1 result, and the seconds one line's files take to write (the same at any batch size).

Example (the BENCHMARKS.md run; the defaults are the demo model at the quick start's settings):
    python -m bench.bench_batch --lines 8 --batch_size 8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.data.synthetic import write_tree
from fourdnex.evaluation.inputs import write_inputs
from fourdnex.generate.config import RunConfig, SampleConfig
from fourdnex.generate.parallel import tokens_of
from fourdnex.generate.run import batches, job_meta, load_model, sample_batch, select_jobs
from fourdnex.geometry.results import write_sample

ROOT = Path(__file__).resolve().parents[1]
#: The pipeline's stages (FourDNeXOutput.timings): encoders and the condition, the denoising loop, the VAE decode.
STAGES = ["encode", "denoise", "decode"]
#: The demo recipe's held-out scenes are seed range 2 (scripts/train_demo.sh): scenes the demo model never saw.
HELD_OUT_SEED = 2


def row(cells) -> str:
    """A markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def cpu_seconds() -> float:
    """CPU seconds of this process, all its threads."""
    times = os.times()
    return times.user + times.system


@dataclass
class Timed:
    """The outputs of one batch size (one per batch, with its jobs) and the seconds they took."""

    outputs: list = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0

    def add(self, model, group, sample: SampleConfig) -> None:
        """Sample one batch and add its outputs and seconds."""
        start, cpu = time.perf_counter(), cpu_seconds()
        self.outputs.append((group, sample_batch(model, group, sample)))
        self.wall += time.perf_counter() - start
        self.cpu += cpu_seconds() - cpu


def sample_both(model, jobs, sample: SampleConfig, batch_size: int) -> tuple[Timed, Timed]:
    """Every job at batch 1 and in batches of ``batch_size``, interleaved (a batch, then its lines one by one), so
    that other work on a shared machine weighs on both alike."""
    from tqdm.auto import tqdm

    groups = batches(jobs, batch_size)
    for size in (1, batch_size):  # warm-up: each batch shape once, untimed
        sample_batch(model, groups[0][:size], dataclasses.replace(sample, steps=1))
    single, batched = Timed(), Timed()
    with tqdm(total=2 * len(jobs), desc="lines sampled", unit="line") as progress:
        for group in groups:
            batched.add(model, group, sample)
            progress.update(len(group))
            for job in group:
                single.add(model, [job], sample)
                progress.update()
    return single, batched


def per_line(outputs) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Line index -> its (latents, XYZ video, RGB video)."""
    return {
        job.index: (result.latents[row].float().cpu(), result.xyz[row], result.rgb[row])
        for group, result in outputs
        for row, job in enumerate(group)
    }


def main(args: argparse.Namespace) -> None:
    """Write the inputs, sample them at both batch sizes, print the table."""
    sample = SampleConfig(
        num_frames=args.num_frames, height=args.height, width=args.width, steps=args.steps,
        guidance_scale=args.guidance_scale,
    )  # fmt: skip
    print(f"`python -m bench.bench_batch {' '.join(sys.argv[1:])}`\n")
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        data = write_tree(work / "scenes", args.lines, args.num_frames, args.height, args.width, seed=HELD_OUT_SEED)
        write_inputs(data, work / "inputs", args.num_frames, args.height, args.width)
        config = RunConfig(
            prompt=str(work / "inputs" / "prompts.txt"), image=str(work / "inputs" / "images.txt"),
            out=str(work / "results"), model_path=args.model_path, lora_path=args.lora_path, device=args.device,
            batch_size=args.batch_size, sample=sample,
        )  # fmt: skip
        jobs = select_jobs(config)
        tokens = tokens_of(args.num_frames, args.height, args.width, fused=True)
        model = load_model(config, tokens, args.num_frames * args.height * args.width, batch=args.batch_size)
        model.pipe.set_progress_bar_config(disable=True)
        name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor()
        print(
            f"device: {model.device} ({name or platform.machine()}, {os.cpu_count()} CPUs), {model.dtype}, torch "
            f"{torch.__version__} with {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} at "
            f"start; {args.lines} lines of {args.num_frames} x {args.height} x {args.width}, {args.steps} steps, "
            f"guidance {args.guidance_scale}\n"
        )
        single, batched = sample_both(model, jobs, sample, args.batch_size)
        start = time.perf_counter()
        Path(config.out).mkdir()
        for group, result in batched.outputs:
            share = {stage: seconds / len(group) for stage, seconds in result.timings.items()}
            for i, job in enumerate(group):
                meta = job_meta(model, config, job, sample, share, batch_size=len(group))
                write_sample(Path(config.out), job.index, result.rgb[i].numpy(), result.xyz[i].numpy(), meta)
        write_seconds = (time.perf_counter() - start) / len(jobs)
        load = os.getloadavg()[0]

    one, many = per_line(single.outputs), per_line(batched.outputs)
    largest = [f"{max((one[i][k] - many[i][k]).abs().max().item() for i in one):.1e}" for k in range(3)]
    header = ["batch size", "lines", "sampling s / line", "encode", "denoise", "decode", "CPU s / line", "speedup"]
    header += ["max abs diff: latents", "XYZ", "RGB (0..1)", "writing s / line"]
    table = [row(header), row(["---"] * len(header))]
    for batch_size, timed, differences in ((1, single, ["", "", ""]), (args.batch_size, batched, largest)):
        stages = [sum(result.timings[stage] for _, result in timed.outputs) / len(jobs) for stage in STAGES]
        table.append(row([
            batch_size, len(jobs), f"{timed.wall / len(jobs):.2f}", *(f"{seconds:.2f}" for seconds in stages),
            f"{timed.cpu / len(jobs):.2f}", f"{single.wall / timed.wall:.2f}x", *differences, f"{write_seconds:.2f}",
        ]))  # fmt: skip
    print("\n".join(table))
    print(f"\nload average {load:.1f} at the end")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=8, help="held-out-like lines to sample (default 8)")
    p.add_argument("--batch_size", type=int, default=8, help="the batch size set against batch 1 (default 8)")
    p.add_argument("--model_path", default=str(ROOT / "example" / "demo" / "model"))
    p.add_argument("--lora_path", default=None, help="an adapter (default: none; the demo model needs none)")
    p.add_argument("--num_frames", type=int, default=25)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=144)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--device", default="auto", help="as inference.py's (default: CUDA when available)")
    p.add_argument("--work", default=None, help="folder for the temporary inputs and results (default: the system's)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
