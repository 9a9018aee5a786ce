"""The cache build's VAE convolutions alone: cuDNN against the Triton convolutions torch's compiler generates.

    python -m bench.bench_conv3d --json conv3d.json     # one GPU: the real-size encoder's six largest convolutions
    python -m bench.bench_conv3d --tiny                 # the same code on small shapes, CPU

The Wan VAE's encoder spends 96 % of an 81 x 480 x 720 video's 141.6 TFLOP in six 3 x 3 x 3 convolutions (channels
96-384, at full, half, quarter and eighth resolution); each call sees one chunk of 4 frames and the 2 frames before it,
padded by the layer itself (``WanCausalConv3d``), so the convolution runs unpadded on ``(1, C, 6, H + 2, W + 2)``.
Per shape, bfloat16 on channels-last 3D tensors, the median of ``--repeats`` synchronized calls after warm-up:
  cudnn        ``F.conv3d`` with cuDNN's timed algorithm choice (``cudnn.benchmark`` on before the first call), as the
               build runs it
  autotune     ``torch.compile(mode="max-autotune-no-cudagraphs")``: the compiler times cuDNN and its own Triton
               convolution templates and keeps the faster
  triton       the same with the Triton templates alone
TFLOP/s counts 2 x C_in x C_out x 27 per output voxel; the deviation is the largest difference from cuDNN's output
over that output's standard deviation. Last, one video's encode time in these six convolutions at each variant's
rates, against the floor at ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import timed
from fourdnex.files import write_json

#: (C_in, C_out, H, W) of the encoder's six largest 3 x 3 x 3 convolutions at 480 x 720, and their TFLOP in one
#: 81-frame video's encode (torch.utils.flop_counter on the meta device, the real-size AutoencoderKLWan).
REAL_SHAPES = (
    ((96, 96, 480, 720), 55.73),
    ((192, 192, 240, 360), 41.79),
    ((384, 384, 120, 180), 21.16),
    ((384, 384, 60, 90), 7.22),
    ((96, 192, 240, 360), 6.97),
    ((192, 384, 120, 180), 3.53),
)
TINY_SHAPES = (((8, 8, 16, 24), 1.0), ((8, 16, 8, 12), 1.0))
VARIANTS = ("cudnn", "autotune", "triton")
CHUNK = 4  # output frames per call (the encoder's chunk); the input has the 2 cached frames before them


def conv_flops(c_in: int, c_out: int, frames: int, height: int, width: int) -> int:
    """Multiply-adds x 2 of one 3 x 3 x 3 convolution producing ``frames x height x width`` voxels."""
    return 2 * c_in * c_out * 27 * frames * height * width


def variant_fn(name: str):
    """The convolution ``(x, w) -> y`` of variant ``name``."""
    if name == "cudnn":
        return F.conv3d
    # each shape and variant compiles afresh: otherwise the compiler's cache of F.conv3d fills at its recompile limit
    # (8) and the later shapes run eagerly, on cuDNN, under the compiled variants' names
    torch._dynamo.reset()
    options = {"max_autotune": True}
    if name == "triton":
        options["max_autotune_conv_backends"] = "TRITON"
    return torch.compile(F.conv3d, dynamic=False, options=options)


def main(args: argparse.Namespace) -> dict:
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # before the first convolution: see BENCHMARKS.md, the VAE's variants
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; {dtype}, channels-last 3D, {CHUNK} output frames a call")
    head = ("C_in -> C_out", "H x W", "variant", "ms", "TFLOP/s", "max dev / std")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    generator = torch.Generator(device).manual_seed(0)
    rows, video = [], {v: 0.0 for v in args.variants}
    for (c_in, c_out, height, width), tflop in TINY_SHAPES if args.tiny else REAL_SHAPES:
        shape = (1, c_in, CHUNK + 2, height + 2, width + 2)
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        w = torch.randn(c_out, c_in, 3, 3, 3, generator=generator, device=device, dtype=dtype) / (27 * c_in) ** 0.5
        w = w.contiguous(memory_format=torch.channels_last_3d)
        flops = conv_flops(c_in, c_out, CHUNK, height, width)
        reference = None
        with torch.no_grad():
            for variant in args.variants:
                try:
                    call = partial(variant_fn(variant), x, w)
                    for _ in range(2):  # warm-up: the compiled variants compile and tune on their first call
                        call()
                    seconds, out = timed(call, device, args.repeats)
                except Exception as err:  # a variant this machine cannot build is a row; the others still run
                    print(f"| {c_in} -> {c_out} | {height} x {width} | {variant} | failed: {str(err)[:80]} |||")
                    video[variant] = float("nan")
                    continue
                reference = out.float() if reference is None else reference
                deviation = float((out.float() - reference).abs().max() / reference.std())
                rate = flops / seconds / 1e12
                video[variant] += tflop / rate
                rows.append({"c_in": c_in, "c_out": c_out, "height": height, "width": width, "variant": variant,
                             "seconds": seconds, "tflops": rate, "max_dev_over_std": deviation})  # fmt: skip
                print(f"| {c_in} -> {c_out} | {height} x {width} | {variant} | {seconds * 1e3:.2f} | {rate:.3g} | "
                      f"{deviation:.1e} |", flush=True)  # fmt: skip
    total = sum(t for _, t in (TINY_SHAPES if args.tiny else REAL_SHAPES))
    print(f"\none video's {total:.1f} TFLOP in these convolutions: floor {total / args.peak_tflops:.3f} s at "
          f"{args.peak_tflops:.0f} TFLOP/s; " + ", ".join(f"{v} {s:.3f} s" for v, s in video.items()))  # fmt: skip
    result = {"device": name, "torch": torch.__version__, "rows": rows, "video_seconds": video,
              "video_tflop": total, "peak_tflops": args.peak_tflops}  # fmt: skip
    if args.json:
        write_json(Path(args.json), result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=798.0, help="measured bf16 matmul peak (H100: 798)")
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (a check of the script)")
    parser.add_argument("--json", help="write every number here")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
