"""Registration benchmark: accuracy against known cameras and speed, ours vs the reference's procedure.

Renders the toy scene (fourdnex/testing/scenes.py: a moving camera, focal lengths given in image widths, fy = 1.02 fx,
principal point off center), normalizes its pointmap as inference does, optionally corrupts it (Gaussian noise plus a
smooth warp, each of the given percentage of the pointmap's extent), then

1. fits it with ours (fourdnex.geometry.registration.register) for every focal length and corruption;
2. fits the same inputs with a re-implementation of the reference's procedure (REFERENCE.md section 5: per-pixel
   depth, one shared K, per-frame 6D rotation + translation, MSE between unprojected pixels and the pointmap mapped
   to [0, 1], Adam lr 5e-3 for 1500 iterations from identity poses and fx = fy = 1.2 W). Run for fewer
   iterations (``--baseline_iters``), its time is extrapolated to 1500 and its errors are those it had reached.

Prints markdown tables: errors, wall-clock and CPU seconds, and the memory-traffic floor of each method (its least
bytes over the copy bandwidth measured on the device).

Example (the GPU run):
    python bench/bench_registration.py --device cuda --frames 49 --height 480 --width 720
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.geometry.cameras import pixel_grid
from fourdnex.geometry.registration import register
from fourdnex.runtime import device_of
from fourdnex.testing import scenes as toy_scene

REFERENCE_ITERS = 1500
#: Least bytes each method must move per pixel: ours reads the pointmap (12) and writes depth, points and residual
#: (4 + 12 + 4); one reference iteration reads the pointmap (12) and, for the depth parameter, reads param, grad
#: and two Adam moments and writes param and moments (7 x 4), with everything else fused away.
OURS_BYTES_PER_PIXEL = 32
REFERENCE_BYTES_PER_PIXEL_ITER = 40


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device: torch.device, mbytes: int = 512) -> float:
    """Measured copy bandwidth in GB/s (read + write bytes over time), best of 5."""
    x = torch.empty(mbytes * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() * 4 / best / 1e9


def rotation_6d(r6: torch.Tensor) -> torch.Tensor:
    """Rotations ``(F, 3, 3)`` from the 6D representation ``(F, 6)`` (two columns, Gram-Schmidt)."""
    a, b = r6[:, :3], r6[:, 3:]
    x = torch.nn.functional.normalize(a, dim=-1)
    y = torch.nn.functional.normalize(b - (x * b).sum(-1, keepdim=True) * x, dim=-1)
    return torch.stack([x, y, torch.linalg.cross(x, y)], dim=-1)


def reference_procedure(pcd: torch.Tensor, iters: int = REFERENCE_ITERS, lr: float = 5e-3):
    """The reference's fit on ``pcd (F, H, W, 3)`` in [0, 1]; returns K, cam2world, depth (in ``pcd``'s units),
    wall-clock and CPU seconds per iteration (after one warm-up iteration) and the final loss.

    Unknowns: depth per pixel (initialized to the points' z), a shared K (log focal lengths from 1.2 W, principal
    point offset in image sizes from the center, so that Adam's step can move them), per-frame 6D rotations (identity)
    and translations (zero).
    """
    frames, height, width, _ = pcd.shape
    device = pcd.device
    uv = pixel_grid(height, width, device=device)
    depth = pcd[..., 2].clone().clamp_min(1e-3).requires_grad_()
    log_focal = torch.full((2,), float(torch.log(torch.tensor(1.2 * width))), device=device, requires_grad=True)
    pp = torch.zeros(2, device=device, requires_grad=True)
    r6 = torch.tensor([1.0, 0, 0, 0, 1, 0], device=device).repeat(frames, 1).requires_grad_()
    trans = torch.zeros(frames, 3, device=device, requires_grad=True)
    optim = torch.optim.Adam([depth, log_focal, pp, r6, trans], lr=lr)
    size = torch.tensor([width, height], device=device, dtype=torch.float32)

    def intrinsics():
        return log_focal.exp(), size / 2 + pp * size

    def step() -> torch.Tensor:
        optim.zero_grad(set_to_none=True)
        focal, center = intrinsics()
        rays = torch.cat([(uv - center) / focal, torch.ones_like(uv[..., :1])], -1)  # (H, W, 3)
        R = rotation_6d(r6)
        world = torch.einsum("fij,fhwj->fhwi", R, depth[..., None] * rays) + trans[:, None, None]
        loss = (world - pcd).square().mean()
        loss.backward()
        optim.step()
        return loss

    step()
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters - 1):
        loss = step()
    sync(device)
    per_iter = (time.perf_counter() - start) / max(iters - 1, 1)
    cpu_per_iter = (time.process_time() - cpu) / max(iters - 1, 1)
    with torch.no_grad():
        focal, center = intrinsics()
        K = torch.zeros(frames, 3, 3, device=device)
        K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = focal[0], focal[1], center[0], center[1], 1
        cam2world = torch.eye(4, device=device).repeat(frames, 1, 1)
        cam2world[:, :3, :3], cam2world[:, :3, 3] = rotation_6d(r6), trans
    return K, cam2world, depth.detach(), per_iter, cpu_per_iter, float(loss.detach())


def ours(xyz: torch.Tensor):
    """Our fit; returns the registration, its wall-clock seconds and the process's CPU seconds."""
    sync(xyz.device)
    start, cpu = time.perf_counter(), time.process_time()
    reg = register(xyz)
    sync(xyz.device)
    return reg, time.perf_counter() - start, time.process_time() - cpu


ERROR_HEADER = ["focal err %", "pp err px", "rot err deg", "center err % extent", "depth err %"]


def corrupt(truth: toy_scene.ToyTruth, corruption: str) -> torch.Tensor:
    """The truth's pointmap with Gaussian noise and a smooth warp of ``"NOISE/WARP"`` % of the extent (2) each."""
    noise, warp = (float(x) for x in corruption.split("/"))
    return toy_scene.perturb(truth.xyz.double(), noise / 50, warp / 50, seed=1).float()


def row(cells) -> str:
    """A markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def error_cells(errs: dict) -> list[str]:
    """Errors as printed: focal %, principal point px, rotation deg, center % of extent, depth %."""
    return [f"{100 * errs['focal']:.3g}", f"{errs['principal']:.3g}", f"{errs['rotation']:.3g}",
            f"{100 * errs['center']:.3g}", f"{100 * errs['depth']:.3g}"]  # fmt: skip


def main(args: argparse.Namespace) -> None:
    """Run everything and print the tables."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(args.device)
    F, H, W = args.frames, args.height, args.width
    pixels = F * H * W
    gbps = bandwidth(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"`python {' '.join(sys.argv)}`\n")
    print(
        f"device: {name}; torch {torch.__version__}; {torch.get_num_threads()} threads; copy bandwidth {gbps:.1f} GB/s;"
        f" load average {os.getloadavg()[0]:.1f} at start; {F} frames x {H} x {W}\n"
    )
    ours_floor = pixels * OURS_BYTES_PER_PIXEL / (gbps * 1e9)
    ref_floor = pixels * REFERENCE_BYTES_PER_PIXEL_ITER / (gbps * 1e9) * REFERENCE_ITERS

    register(toy_scene.make_truth(3, 32, 48).xyz.to(device))  # warm-up: kernels, threads, allocator
    header = ["focal (W)", "noise / warp (% extent)", *ERROR_HEADER, "mean residual", "wall s", "CPU s", "floor s"]
    table = [row(header), row(["---"] * len(header))]
    truths = {}
    for focal in args.focals:
        truths[focal] = toy_scene.make_truth(F, H, W, focal)
        for noise in args.corruptions:
            xyz = corrupt(truths[focal], noise).to(device)
            reg, seconds, cpu = ours(xyz)
            errs = toy_scene.registration_errors(truths[focal], reg.K, reg.cam2world, reg.depth)
            residual = float(reg.residual.mean())
            table.append(row([focal, noise, *error_cells(errs), f"{residual:.3g}", f"{seconds:.2f}", f"{cpu:.2f}",
                              f"{ours_floor:.3g}"]))  # fmt: skip
            print(table[-1], file=sys.stderr)
    print("Ours, accuracy against the ground truth (worst frame; depth: mean over pixels):\n")
    print("\n".join(table) + "\n")

    header = ["input", "method", "iterations", *ERROR_HEADER, "wall s", "CPU s", "floor s", "ours faster by"]
    table = [row(header), row(["---"] * len(header))]
    truth = truths[args.focals[0]]
    for noise in args.baseline_corruptions:
        xyz = corrupt(truth, noise).to(device)
        reg, seconds, cpu = ours(xyz)
        errs = toy_scene.registration_errors(truth, reg.K, reg.cam2world, reg.depth)
        K, cam2world, depth, per_iter, cpu_per_iter, _ = reference_procedure((xyz + 1) / 2, args.baseline_iters)
        cam2world[:, :3, 3] = 2 * cam2world[:, :3, 3] - 1  # [0, 1] -> the pointmap's [-1, 1]
        ref_errs = toy_scene.registration_errors(truth, K, cam2world, 2 * depth)
        ref_seconds, ref_cpu = per_iter * REFERENCE_ITERS, cpu_per_iter * REFERENCE_ITERS
        mark = " (extrapolated)" if args.baseline_iters < REFERENCE_ITERS else ""
        label = f"focal {args.focals[0]} W, noise / warp {noise} %"
        table.append(row([label, "ours", "closed form + LM", *error_cells(errs), f"{seconds:.2f}", f"{cpu:.2f}",
                          f"{ours_floor:.3g}", ""]))  # fmt: skip
        table.append(row([label, "reference procedure", f"{args.baseline_iters} of {REFERENCE_ITERS}",
                          *error_cells(ref_errs), f"{ref_seconds:.1f}{mark}", f"{ref_cpu:.1f}{mark}",
                          f"{ref_floor:.3g}", f"{ref_seconds / seconds:.0f}x"]))  # fmt: skip
        print(*table[-2:], sep="\n", file=sys.stderr)
    print(f"Side by side on the same inputs (reference: {1e3 * per_iter:.1f} ms per iteration, wall):\n")
    print("\n".join(table))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--focals", type=float, nargs="+", default=[1.0, 0.7, 1.4], help="fx in image widths")
    p.add_argument(
        "--corruptions",
        nargs="+",
        default=["0/0", "0.5/0.5", "1/1", "2/2", "1/0", "0/1"],
        help="NOISE/WARP in % of the extent",
    )
    p.add_argument("--baseline_corruptions", nargs="+", default=["0/0", "1/1"], help="inputs of the side by side")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--baseline_iters", type=int, default=REFERENCE_ITERS, help="fewer: time extrapolated to 1500")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
