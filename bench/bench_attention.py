"""Attention kernels alone at the 4DNeX shapes: forward and forward + backward, per kernel, with TFLOP/s.

    python -m bench.bench_attention              # one GPU: self-attention (35,100 keys) and both cross-attentions
    python -m bench.bench_attention --tiny       # the same code on small shapes, CPU

A Wan2.1 block runs three attentions over the 35,100 video tokens (40 heads of 128): self-attention, and
cross-attention to the 512 text tokens and to the 257 CLIP image tokens. Queries, keys and values are laid out as
diffusers hands them to the kernel, (batch, tokens, heads, dim) viewed as (batch, heads, tokens, dim). Kernels:
  sdpa          torch's scaled_dot_product_attention with its own kernel choice
  cudnn, flash, efficient
                the same, forced to one kernel
  flex          torch.compile'd flex_attention (a generated Triton kernel)
  matmul        scores by a batched matmul, softmax in float32, then the value matmul, compiled as one function
                (short key sequences only: it materializes the scores)
"max abs dev" is against float32 math on the same inputs; the floor is the FLOPs at ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fourdnex.runtime import device_of, dtype_of

SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
KERNELS = ("sdpa", *SDPA_KERNELS, "flex", "matmul")


def sdpa(kernel: str):
    def run(q, k, v):
        if kernel == "sdpa":
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(SDPA_KERNELS[kernel]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def matmul_attention(q, k, v):
    """Softmax attention through explicit matmuls; the scores of one call are heads x queries x keys."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def kernel_fn(kernel: str):
    if kernel == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        return torch.compile(flex_attention, dynamic=False)
    if kernel == "matmul":
        return torch.compile(matmul_attention, dynamic=False)
    return sdpa(kernel)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, q, k, v, repeats: int, backward: bool) -> float:
    """Median seconds of a forward (and backward with a fixed output gradient) after two warm-up calls."""
    grad = torch.ones_like(q)
    times = []
    for i in range(repeats + 2):
        synchronize(q.device)
        tic = time.perf_counter()
        if backward:
            fn(q, k, v).backward(grad)
        else:
            with torch.no_grad():
                fn(q, k, v)
        synchronize(q.device)
        if i >= 2:
            times.append(time.perf_counter() - tic)
        q.grad = k.grad = v.grad = None
    return statistics.median(times)


def main(args: argparse.Namespace) -> None:
    device = device_of("cpu" if args.tiny else "auto")
    dtype = dtype_of("auto", device)
    heads, dim = (4, 16) if args.tiny else (40, 128)
    queries = 300 if args.tiny else 35_100
    shapes = {"self": queries, "text": 64 if args.tiny else 512, "image": 33 if args.tiny else 257}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; {queries} queries, {heads} heads x {dim}; {dtype}")
    head = ("attention", "keys", "kernel", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "bwd TFLOP/s", "max abs dev", "floor")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    generator = torch.Generator(device).manual_seed(0)
    for what, keys in shapes.items():
        if what not in args.attentions:
            continue

        def tensor(n: int) -> torch.Tensor:
            x = torch.randn(1, n, heads, dim, generator=generator, device=device, dtype=dtype)
            return x.transpose(1, 2).requires_grad_(True)

        q, k, v = tensor(queries), tensor(keys), tensor(keys)
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float()) if keys <= 1024 else None
        flops = 4 * queries * keys * heads * dim
        floor = flops / (args.peak_tflops * 1e12)
        for kernel in args.kernels:
            if kernel == "matmul" and keys > 1024:
                continue
            try:
                fn = kernel_fn(kernel)
                fwd = measure(fn, q, k, v, args.repeats, backward=False)
                both = measure(fn, q, k, v, args.repeats, backward=True)
                with torch.no_grad():
                    out = fn(q, k, v)
            except Exception as err:  # a kernel this machine lacks is a row; the others still run
                print(f"| {what} | {keys} | {kernel} | unavailable: {str(err).splitlines()[0][:80]} |||||||")
                continue
            dev = "" if reference is None else f"{(out.float() - reference).abs().max().item():.2e}"
            bwd = both - fwd
            print(
                f"| {what} | {keys} | {kernel} | {fwd * 1e3:.2f} | {flops / fwd / 1e12:.0f} | {both * 1e3:.2f} | "
                f"{2.5 * flops / bwd / 1e12:.0f} | {dev} | {floor * 1e3:.2f} |",
                flush=True,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--attentions", nargs="+", default=["self", "text", "image"], choices=["self", "text", "image"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=798.0, help="measured bf16 matmul peak (H100: 798)")
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (a check of the script)")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
