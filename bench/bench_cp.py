"""Context parallelism at the real size: one sample's transformer split over N GPUs vs one GPU of the same kind.

    torchrun --nproc_per_node 4 -m bench.bench_cp --compile --sample-steps 2    # 4 GPUs, Ulysses
    torchrun --nproc_per_node 2 -m bench.bench_cp --tiny                        # the same code on 2 CPU processes

Every process builds the same random transformer (rank 0's weights are broadcast). Rank 0 first times one forward
alone (the 1-GPU baseline); then the sequence is split over all processes with diffusers' context parallelism and
the same forward is timed again, also with guidance as batch 2 and, with ``--compile``, regionally compiled. The
largest difference from the 1-GPU output is reported. ``--sample-steps k`` also runs k steps of the whole pipeline
on every process, as inference.py does (rank 0 decodes the RGB half while rank 1 decodes the XYZ half and sends it
to rank 0), and extrapolates to 50; rank 0 times it, from a barrier until it holds both videos. Rank 0 prints a
markdown table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist

from bench import common
from fourdnex.generate import parallel
from fourdnex.runtime import device_of, dtype_of


def forward_seconds(model, inputs, device, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of one forward after a warm-up, every process in step."""
    with torch.no_grad():
        model(*inputs, return_dict=False)
        dist.barrier()
        return common.timed(lambda: model(*inputs, return_dict=False)[0], device, repeats)


def main(args: argparse.Namespace) -> None:
    device_type = device_of("cpu" if args.tiny else "auto").type
    process = parallel.init_processes(args.cp, device_type)
    device, world = process.device, process.world_size
    dtype = dtype_of("auto", device)
    shape = common.TINY_SHAPE if args.tiny else common.REAL_SHAPE
    config = common.TINY_TRANSFORMER if args.tiny else common.REAL_TRANSFORMER
    parallel.check_split(args.cp, world, shape.tokens, config["num_attention_heads"])
    rows: list[tuple[str, ...]] = []

    def add(setting: str, seconds: float | None, per_step: float | None, deviation: float | None, note: str = ""):
        """One table row; speedup and efficiency against the 1-GPU step (efficiency per GPU used)."""
        gpus = 1 if setting.startswith("1 GPU") else world
        speedup = baseline / per_step if per_step else None
        rows.append((
            setting,
            "" if seconds is None else f"{seconds:.3f}",
            "" if per_step is None else f"{per_step:.3f}",
            "" if speedup is None else f"{speedup:.2f}x",
            "" if speedup is None else f"{speedup / gpus:.0%}",
            "" if per_step is None else f"{args.full_steps * per_step:.1f}",
            "" if deviation is None else f"{deviation:.2e}",
            note,
        ))  # fmt: skip
        if process.is_main:
            print("  " + " | ".join(rows[-1]), flush=True)

    # 1. The same random weights and inputs on every process.
    model = common.build_transformer(args.tiny, device, dtype)
    for tensor in (*model.parameters(), *model.buffers()):
        dist.broadcast(tensor.data, src=0)
    inputs = common.transformer_inputs(args.tiny, shape, device, dtype)
    both = common.transformer_inputs(args.tiny, shape, device, dtype, batch=2)
    both = (torch.cat([inputs[0], inputs[0]]), *both[1:])  # guidance: the same latents, two text conditions
    for tensor in (*inputs, *both):
        dist.broadcast(tensor, src=0)
    backend = args.attention_backend or ("_native_cudnn" if args.cp == "ring" else "native")
    model.set_attention_backend(backend)

    # 2. One GPU: rank 0 alone.
    reference = None
    baseline = float("nan")
    if process.is_main:
        with torch.no_grad():
            model(*inputs, return_dict=False)
            baseline_forward, reference = common.timed(
                lambda: model(*inputs, return_dict=False)[0], device, args.repeats
            )
        baseline = 2 * baseline_forward
    dist.barrier()
    add("1 GPU, eager, two calls per step", baseline / 2, baseline, None, f"{backend} attention")

    # 3. Split over all processes.
    parallel.enable_context_parallel(model, args.cp, world)
    seconds, out = forward_seconds(model, inputs, device, args.repeats)
    deviation = common.max_abs(out, reference) if process.is_main else None
    add(f"{args.cp} x{world}, eager, two calls per step", seconds, 2 * seconds, deviation, "deviation vs 1 GPU")
    seconds, _ = forward_seconds(model, both, device, args.repeats)
    add(f"{args.cp} x{world}, eager, guidance as batch 2", seconds, seconds, None)
    if args.compile:
        tic = time.perf_counter()
        try:
            model.compile_repeated_blocks(fullgraph=False)
            seconds, out = forward_seconds(model, inputs, device, args.repeats)
        except Exception as err:  # a compile failure is a row; the eager model is still there for the sample
            add(f"{args.cp} x{world}, compiled", None, None, None, f"failed: {str(err).splitlines()[0][:100]}")
        else:
            deviation = common.max_abs(out, reference) if process.is_main else None
            warm = time.perf_counter() - tic - seconds * args.repeats
            note = f"compile + warm-up {warm:.0f} s"
            add(f"{args.cp} x{world}, compiled, two calls per step", seconds, 2 * seconds, deviation, note)
            seconds, _ = forward_seconds(model, both, device, args.repeats)
            add(f"{args.cp} x{world}, compiled, guidance as batch 2", seconds, seconds, None)

    # 4. The whole pipeline on every process (encoders not split; RGB decoded on rank 0, XYZ on rank 1), k steps
    #    extrapolated.
    if args.sample_steps:
        pipe = common.ours_pipeline(common.build_components(args.tiny, device, dtype), model)
        pipe.vae.enable_slicing()
        pipe.enable_split_decoding()
        image = PIL.Image.fromarray(np.zeros((shape.height, shape.width, 3), np.uint8))

        def sample(steps: int):
            return pipe(
                image, "a cat", height=shape.height, width=shape.width, num_frames=shape.frames,
                num_inference_steps=steps, generator=torch.Generator().manual_seed(42),
            )  # fmt: skip

        sample(1)  # warm-up: compiled graphs for the pipeline's own inputs
        timer = common.CallTimer(model, device)
        dist.barrier()
        seconds, result = common.timed(lambda: sample(args.sample_steps), device)
        timer.remove()
        estimate = common.extrapolate(seconds, timer.seconds, 2 * args.full_steps)
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
        note = f"{args.sample_steps} steps measured ({stages}); {args.full_steps} steps: {estimate:.1f} s"
        add(f"{args.cp} x{world}, whole sample", seconds, None, None, note)

    if process.is_main:
        head = ("setting", "s per forward", "s per step", "speedup", "efficiency", f"{args.full_steps} steps, s",
                "max abs dev", "note")  # fmt: skip
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n{world} x {name}, torch {torch.__version__}; {shape.tokens} tokens; bf16 forward "
              f"{common.forward_flops(args.tiny, shape.tokens) / 1e15:.3f} PFLOP\n")  # fmt: skip
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cp", default="ulysses", choices=["ulysses", "ring"])
    parser.add_argument("--attention_backend", default=None, help="default: native (ulysses), _native_cudnn (ring)")
    parser.add_argument("--compile", action="store_true", help="also time regional torch.compile")
    parser.add_argument("--sample-steps", type=int, default=0, help="also run k steps of the whole pipeline")
    parser.add_argument("--full-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU processes (gloo)")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
