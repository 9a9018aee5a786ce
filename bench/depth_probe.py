"""A supervised monocular-depth probe: how well can a network read frame 0's depth off the RGB image alone?

A small U-Net is trained directly RGB -> log depth on frame 0 of the training clips of a 4DNeX-10M tree (as
``python -m fourdnex.data.synthetic`` writes), with the scale-invariant log loss of Eigen et al. (2014, lambda 0.85),
and scored on frame 0 of the clips of one or more held-out trees (each on its own: in distribution, a held-out
texture family) as evaluate.py scores ``depth0.median.absrel``: each frame's predicted depth
scaled onto its truth by the median ratio (``metrics.align_depth``, rule ``median``) over evaluate.py's grid pixels
where both are defined, then AbsRel = mean |d - g| / g and delta < 1.25 = the share with max(d / g, g / d) < 1.25.
The frames are read by the evaluation's own reader (``fourdnex.evaluation.truth.load_truth``: cropped as training
crops them). A fixed set of training frames (the first 100 in clip-id order) is scored too, to show fit against
generalization, at every ``--eval_every`` steps and at the end: a learning curve.

With ``--vae_from MODEL``, the network reads the image as a model's transformer does: frame 0 encoded by that
model folder's VAE (the posterior's mode; the first latent frame of a video depends on frame 0 alone, so it is the
condition's), upsampled back to the image's size by repeating each latent pixel, in place of the RGB pixels (the
flipped images are encoded too, so a flip shows the network the latent of the flipped image). The same network on
the pixels and on the latents tells whether the latent still holds what depth is read from. With ``--pool N`` it
reads the pixels averaged over blocks of N x N (each frame and its mirror image), repeated back the same way: at
``--pool 8`` an RGB grid of the latent's size, which tells how much of what the latent loses its grid alone loses.

For reference, the mean-depth floor: one map for every image, the per-pixel mean over the training frames of depth
divided by each frame's median (over the frames where the pixel is defined; 1 where none defines it), scored the same
way: a depth map that knows nothing of the scene.

The network, fixed: an encoder of five levels (32, 64, 128, 256, 256 channels; two 3x3 convolutions + GroupNorm +
ReLU each, the first of levels 1-4 of stride 2), one residual self-attention layer over the 1/16 grid (6 x 9 at 96 x
144: global context), a decoder upsampling bilinearly with skip connections, a 1x1 convolution to log depth. Input RGB
in [-1, 1]; AdamW with cosine decay; bf16 autocast on CUDA; random horizontal flips. The frames are held on the device.

Prints the learning curve and the floor as a Markdown table; ``--json`` writes every number, again at every
evaluation (``finished`` is false until the last), so a run cut short keeps its curve so far.

    python bench/depth_probe.py --train /root/demo/train/data --held_out /root/demo/held-out/data \\
        /root/demo/held-out-family/data --device cuda --json /root/demo/depth_probe.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.data.sources import ClipSource
from fourdnex.evaluation.metrics import align_depth, depth_errors, grid_stride, on_grid
from fourdnex.evaluation.truth import EvaluationError, clip_sources, load_truth
from fourdnex.files import write_json
from fourdnex.runtime import worker_processes

SI_LAMBDA = 0.85  # the scale-invariant log loss's weight on the squared mean log error (Eigen et al. 2014)
CHANNELS = (32, 64, 128, 256, 256)  # the encoder's levels, full resolution down to 1/16
GROUPS = 8  # GroupNorm groups of every normalization
HEADS = 4  # heads of the self-attention layer at the bottom
TRAIN_SCORED = 100  # the training frames scored along the curve: the first ones in clip-id order
DOWN = 2 ** (len(CHANNELS) - 1)  # height and width must be multiples of this


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Frames:
    """Frame 0 of the clips of one tree that loaded, in clip-id order, and the clips that did not."""

    ids: list[str]
    rgb: np.ndarray  # (N, H, W, 3) uint8
    depth: np.ndarray  # (N, H, W) float32, 0 where undefined
    failed: list[tuple[str, str]] = field(default_factory=list)  # (clip id, why)


def _load_one(job: tuple[Path, ClipSource, int, int]) -> tuple[str, np.ndarray | None, np.ndarray | None, str]:
    """Frame 0 of one clip at ``height x width``: ``(id, rgb (H, W, 3), depth (H, W), "")``, or ``(id, None, None,
    why)`` where it cannot be read."""
    data_dir, source, height, width = job
    try:
        truth = load_truth(data_dir, source, 1, height, width)
    except Exception as err:  # any clip that cannot be read is counted and named, not fatal
        return source.id, None, None, f"{type(err).__name__}: {err}"
    return source.id, truth.rgb[0], truth.depth[0], ""


def load_frames(data_dir: Path, flag: str, limit: int | None, height: int, width: int, workers: int) -> Frames:
    """Frame 0 of the first ``limit`` clips (all if None) of the tree ``data_dir`` in clip-id order, read by
    ``workers`` processes; exits with one line naming the problem where there is no clip or none loads."""
    if not data_dir.is_dir():
        sys.exit(f"{flag} {data_dir}: no such folder")
    try:
        clips = clip_sources(data_dir)
    except EvaluationError as err:
        sys.exit(f"{flag} {data_dir}: {err.__cause__ or err}")
    ids = sorted(clips)[:limit]
    jobs = [(data_dir, clips[i], height, width) for i in ids]
    loaded, failed = [], []
    with worker_processes(workers) as pool:
        results = pool.map(_load_one, jobs, chunksize=8) if pool else map(_load_one, jobs)
        for clip_id, rgb, depth, why in tqdm(results, total=len(jobs), desc=f"reading {flag}", unit="clip"):
            if rgb is None:
                failed.append((clip_id, why))
            else:
                loaded.append((clip_id, rgb, depth))
    first = f" (first: {failed[0][0]}: {failed[0][1]})" if failed else ""
    print(f"{flag} {data_dir}: {len(loaded)} of {len(ids)} clips loaded, {len(failed)} failed{first}")
    if not loaded:
        sys.exit(f"{flag} {data_dir}: none of its {len(ids)} clips could be read{first}")
    return Frames(
        [c for c, _, _ in loaded], np.stack([r for _, r, _ in loaded]), np.stack([d for _, _, d in loaded]), failed
    )


# ---------------------------------------------------------------------------------------------------------------
# The network and its loss


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """A 3x3 convolution, GroupNorm, ReLU."""
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(GROUPS, cout), nn.ReLU(inplace=True)]


def _level(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Two 3x3 convolutions (+ GroupNorm + ReLU), the first of stride ``stride``."""
    return nn.Sequential(*_conv(cin, cout, stride), *_conv(cout, cout))


class GlobalContext(nn.Module):
    """One residual multi-head self-attention layer over every position of a feature map (pre-norm)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(GROUPS, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2)
        y = F.scaled_dot_product_attention(*qkv.unbind(1))  # (B, heads, h * w, c / heads)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class DepthUNet(nn.Module):
    """Images ``(B, in_channels, H, W)`` (RGB in [-1, 1], or upsampled latents) -> log depth ``(B, H, W)``; H and W
    multiples of 16."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        ins = (in_channels, *CHANNELS[:-1])
        self.down = nn.ModuleList(
            _level(i, o, 1 if n == 0 else 2) for n, (i, o) in enumerate(zip(ins, CHANNELS, strict=True))
        )
        self.context = GlobalContext(CHANNELS[-1], HEADS)
        self.up = nn.ModuleList(
            _level(CHANNELS[n + 1] + CHANNELS[n], CHANNELS[n]) for n in reversed(range(len(CHANNELS) - 1))
        )
        self.head = nn.Conv2d(CHANNELS[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level in self.down:
            x = level(x)
            skips.append(x)
        x = self.context(skips.pop())
        for level, skip in zip(self.up, reversed(skips), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = level(torch.cat([x, skip], 1))
        return self.head(x)[:, 0]


def si_log_loss(pred_log: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """The scale-invariant log loss over the pixels where ``depth`` ``(B, H, W)`` > 0: per image, with d = pred_log -
    log depth, mean(d^2) - SI_LAMBDA * mean(d)^2; averaged over the batch."""
    valid = depth > 0
    d = torch.where(valid, pred_log.float() - torch.log(torch.where(valid, depth, 1.0)), 0.0).flatten(1)
    count = valid.flatten(1).sum(1).clamp(min=1)
    mean = d.sum(1) / count
    return ((d**2).sum(1) / count - SI_LAMBDA * mean**2).mean()


def flops_per_sample(model: nn.Module, channels: int, height: int, width: int, device: torch.device) -> int:
    """The forward FLOPs of one image (convolutions, matrix products, attention; as FlopCounterMode counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, height, width, device=device))
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def score(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame ``absrel`` and ``delta1`` ``(N,)`` of predicted depths ``(N, H, W)`` against true ones (0 where
    undefined), as evaluate.py's frame-0 depth metrics with median alignment: on its grid, over the pixels where both
    are defined, each frame scaled by the median ratio, by the evaluation's own ``metrics.depth_errors``."""
    stride = grid_stride(*true.shape[1:])
    pred, true = on_grid(pred, stride), on_grid(true, stride)
    absrel, delta1 = np.full(len(true), np.nan), np.full(len(true), np.nan)
    for n, (p, g) in enumerate(zip(pred, true, strict=True)):
        valid = (g > 0) & (p > 0)
        if not valid.any():
            continue
        p, g = p[valid].astype(np.float64), g[valid].astype(np.float64)
        scale, _ = align_depth(p, g, "median")
        _, frame = depth_errors(p, g, np.zeros(len(p), int), 1, scale)
        absrel[n], delta1[n] = frame["absrel"], frame["delta1"]
    return {"absrel": absrel, "delta1": delta1}


def summary(per_frame: dict[str, np.ndarray]) -> dict[str, float]:
    """The mean and median over the frames of :func:`score`'s numbers."""
    return {
        "absrel_mean": float(np.nanmean(per_frame["absrel"])),
        "absrel_median": float(np.nanmedian(per_frame["absrel"])),
        "delta1_mean": float(np.nanmean(per_frame["delta1"])),
    }


def mean_depth_map(depth: np.ndarray) -> np.ndarray:
    """The floor's one map ``(H, W)``: the per-pixel mean of the frames' depths ``(N, H, W)`` each divided by its
    median over its defined pixels, over the frames where the pixel is defined; 1 where no frame defines it."""
    valid = depth > 0
    medians = np.array([np.median(d[v]) for d, v in zip(depth, valid, strict=True)])
    normalized = np.where(valid, depth / medians[:, None, None], 0.0).sum(0)
    count = valid.sum(0)
    return np.where(count > 0, normalized / np.maximum(count, 1), 1.0).astype(np.float32)


def _images(rgb: torch.Tensor) -> torch.Tensor:
    """Frames ``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float in [-1, 1]."""
    return rgb.permute(0, 3, 1, 2).float() / 127.5 - 1


class Inputs:
    """What the network reads of a set of frames: their pixels, or with ``latents`` a coarser grid of them (their VAE
    latents or block means, the frames' and the flipped frames', ``(N, 2, C, h, w)``) upsampled to the frames' size."""

    def __init__(self, rgb: torch.Tensor, latents: torch.Tensor | None = None) -> None:
        self.rgb, self.latents = rgb, latents
        self.channels = 3 if latents is None else latents.shape[2]

    def __len__(self) -> int:
        return len(self.rgb)

    def subset(self, index: slice) -> Inputs:
        """The inputs of frames ``index`` alone."""
        return Inputs(self.rgb[index], None if self.latents is None else self.latents[index])

    def take(self, index: torch.Tensor | slice, flip: torch.Tensor | None = None) -> torch.Tensor:
        """The network's input ``(B, channels, H, W)`` for frames ``index``, mirrored where ``flip`` ``(B,)``."""
        if self.latents is None:
            x = _images(self.rgb[index])
            return x if flip is None else torch.where(flip[:, None, None, None], x.flip(-1), x)
        pair = self.latents[index]
        x = pair[:, 0] if flip is None else torch.where(flip[:, None, None, None], pair[:, 1], pair[:, 0])
        return F.interpolate(x, size=self.rgb.shape[1:3], mode="nearest")


def encode_frames(vae_from: Path, rgb: np.ndarray, device: torch.device, batch: int) -> torch.Tensor:
    """Frames ``(N, H, W, 3)`` uint8 and their mirror images through the VAE of the model folder ``vae_from``, one
    frame a video: the posterior's modes ``(N, 2, C, H / 8, W / 8)`` float32 on ``device``."""
    from fourdnex.model.fusion import video_pixels
    from fourdnex.model.loading import load_vae

    vae = load_vae(vae_from, torch.float32).to(device).eval()
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(rgb), batch), desc="encoding", unit="batch"):
            frames = torch.from_numpy(rgb[start : start + batch]).to(device)
            frames = torch.cat([frames, frames.flip(2)])  # (2B, H, W, 3): the frames, then mirrored
            modes = vae.encode(video_pixels(frames[:, None])).latent_dist.mode()[:, :, 0]  # (2B, C, h, w)
            out.append(torch.stack(modes.chunk(2), 1))
    return torch.cat(out)


def pool_frames(rgb: np.ndarray, block: int, device: torch.device) -> torch.Tensor:
    """Frames ``(N, H, W, 3)`` uint8 and their mirror images averaged over blocks of ``block`` x ``block`` pixels, in
    [-1, 1]: ``(N, 2, 3, H / block, W / block)`` float32 on ``device`` (the layout of :func:`encode_frames`)."""
    images = _images(torch.from_numpy(rgb).to(device))  # (N, 3, H, W)
    return torch.stack([F.avg_pool2d(images, block), F.avg_pool2d(images.flip(-1), block)], 1)


def predict(model: nn.Module, inputs: Inputs, batch: int) -> np.ndarray:
    """Depths ``(N, H, W)`` float32 the model gives the frames of ``inputs`` (on its device)."""
    model.eval()
    out = []
    with torch.no_grad(), _autocast(inputs.rgb.device):
        for start in range(0, len(inputs), batch):
            out.append(torch.exp(model(inputs.take(slice(start, start + batch))).float()).cpu())
    model.train()
    return torch.cat(out).numpy()


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA, none elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _batches(count: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of ``batch`` frames out of ``count`` on the generator's device, forever: epoch after epoch of
    random orders."""
    device = generator.device
    order = torch.empty(0, dtype=torch.long, device=device)
    while True:
        while len(order) < batch:
            order = torch.cat([order, torch.randperm(count, generator=generator, device=device)])
        yield order[:batch]
        order = order[batch:]


# ---------------------------------------------------------------------------------------------------------------
# The run


def _table(curve: list[dict], floor: dict, sets: list[str]) -> str:
    """The learning curve and the floor as a Markdown table: the training frames, then each held-out set."""
    head = "".join(f" {name}: AbsRel mean / median, δ<1.25 |" for name in sets)
    rule = "|---" * (len(sets) + 4) + "|"
    lines = [f"| step | samples seen | training frames: AbsRel mean |{head} elapsed s |", rule]

    def cells(row: dict) -> str:
        held = [row["held_out"][name] for name in sets]
        return "".join(f" {h['absrel_mean']:.4f} / {h['absrel_median']:.4f}, {h['delta1_mean']:.4f} |" for h in held)

    for row in curve:
        lines.append(
            f"| {row['step']} | {row['samples']} | {row['train']['absrel_mean']:.4f} |{cells(row)} "
            f"{row['elapsed_s']:.1f} |"
        )
    lines.append(f"| mean-depth floor | - | {floor['train']['absrel_mean']:.4f} |{cells(floor)} - |")
    return "\n".join(lines)


def _plain(value):
    """A command-line value as JSON holds it: paths (alone or in a list) as strings."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _set_name(path: Path) -> str:
    """A held-out set's name in the tables: its folder's (the folder above ``data/`` for a tree's data folder)."""
    path = path.resolve()
    return path.parent.name if path.name == "data" else path.name


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="the training clips: a 4DNeX-10M tree")
    parser.add_argument(
        "--held_out", type=Path, nargs="+", required=True,
        help="the held-out clips: one or more 4DNeX-10M trees, each scored on its own",
    )  # fmt: skip
    parser.add_argument("--train_clips", type=int, default=None, help="the first N training clips by id (all)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's peak learning rate, decayed by a cosine")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=144)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes reading clips")
    parser.add_argument("--eval_every", type=int, default=None, help="steps between evaluations (steps / 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vae_from", type=Path, default=None,
        help="a model folder: read frame 0 through its VAE (the transformer's view) instead of as pixels",
    )  # fmt: skip
    parser.add_argument(
        "--pool", type=int, default=None,
        help="read frame 0's pixels averaged over blocks of N x N instead (8: a grid of the latent's size)",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, default=None, help="write every number here, at every evaluation (atomically)"
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run the probe; returns what ``--json`` writes."""
    args = build_parser().parse_args(argv)
    if args.height % DOWN or args.width % DOWN or min(args.height, args.width) < DOWN:
        sys.exit(f"--height {args.height} --width {args.width}: both must be positive multiples of {DOWN}")
    if min(args.steps, args.batch, args.train_clips or 1, args.eval_every or 1, args.workers) < 1:
        sys.exit("--steps, --batch, --train_clips, --eval_every and --workers must be at least 1")
    if args.pool is not None and (args.vae_from is not None or args.pool < 1 or args.height % args.pool
                                  or args.width % args.pool):  # fmt: skip
        sys.exit(f"--pool {args.pool}: give it without --vae_from, dividing --height and --width")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available (use --device cpu)")
    eval_every = args.eval_every or max(1, args.steps // 5)
    size = (args.height, args.width)
    train = load_frames(args.train, "--train", args.train_clips, *size, args.workers)
    helds = {_set_name(path): load_frames(path, "--held_out", None, *size, args.workers) for path in args.held_out}
    if len(helds) < len(args.held_out):
        sys.exit(f"--held_out {' '.join(map(str, args.held_out))}: give each set once, in folders of distinct names")

    floor_map = mean_depth_map(train.depth)
    scored = slice(0, TRAIN_SCORED)
    floor = {
        "train": summary(score(np.broadcast_to(floor_map, train.depth[scored].shape), train.depth[scored])),
        "held_out": {
            name: summary(score(np.broadcast_to(floor_map, held.depth.shape), held.depth))
            for name, held in helds.items()
        },
    }

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def view(frames: Frames) -> Inputs:
        """What the network reads of ``frames``, on the device."""
        pixels = torch.from_numpy(frames.rgb).to(device)
        if args.pool is not None:
            return Inputs(pixels, pool_frames(frames.rgb, args.pool, device))
        if args.vae_from is None:
            return Inputs(pixels)
        return Inputs(pixels, encode_frames(args.vae_from, frames.rgb, device, args.batch))

    inputs, held_inputs = view(train), {name: view(held) for name, held in helds.items()}
    model = DepthUNet(inputs.channels)
    valid = train.depth > 0
    with torch.no_grad():  # start at the training frames' mean log depth: the loss weighs that offset only lightly
        model.head.bias.fill_(float(np.log(train.depth[valid]).mean()))
    model.to(device)
    flops = flops_per_sample(model, inputs.channels, *size, device)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {parameters / 1e6:.2f} M parameters, {flops / 1e9:.2f} GFLOP per image forward (about 3x to train)")
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    depth = torch.from_numpy(train.depth).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    generator = torch.Generator(device).manual_seed(args.seed)  # indices and flips drawn there: no synchronization
    batches = _batches(len(inputs), args.batch, generator)

    scored_count = len(train.depth[scored])

    def result(held_frames: dict, finished: bool) -> dict:
        """Every number so far (what ``--json`` holds); ``held_frames``: each held-out frame's scores at the last
        evaluation."""
        return {
            "args": {k: _plain(v) for k, v in vars(args).items()},
            "eval_every": eval_every,
            "train": {"clips": len(train.ids) + len(train.failed), "loaded": len(train.ids), "failed": train.failed},
            "held_out": {
                name: {"path": str(path), "clips": len(h.ids) + len(h.failed), "loaded": len(h.ids), "failed": h.failed}
                for (name, h), path in zip(helds.items(), args.held_out, strict=True)
            },
            "train_scored": scored_count,
            "model": {"parameters": parameters, "forward_flops_per_image": flops},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "floor": floor,
            "curve": curve,
            "finished": finished,
            "held_out_frames": {
                name: {
                    clip_id: {"absrel": float(a), "delta1": float(d)}
                    for clip_id, a, d in zip(
                        h.ids, held_frames[name]["absrel"], held_frames[name]["delta1"], strict=True
                    )
                }
                for name, h in helds.items()
            },
        }

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    curve, running, pending, start, train_s = [], float("nan"), [], time.perf_counter(), 0.0
    tick = start
    bar = tqdm(range(1, args.steps + 1), desc="training", unit="step")
    for step in bar:
        index = next(batches)
        flip = torch.rand(args.batch, generator=generator, device=device) < 0.5
        x, y = inputs.take(index, flip), depth[index]
        y = torch.where(flip[:, None, None], y.flip(-1), y)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            pred = model(x)
        loss = si_log_loss(pred, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        pending.append(loss.detach())
        if step % 25 == 0 or step % eval_every == 0 or step == args.steps:  # one synchronization every few steps
            losses = torch.stack(pending).float().cpu().numpy()
            for value in losses:
                running = value if math.isnan(running) else 0.95 * running + 0.05 * value
            pending = []
            if not np.isfinite(losses).all():
                sys.exit(f"step {step}: the loss is not finite ({losses[-1]}); try a lower --lr")
            bar.set_postfix(loss=f"{running:.4f}")
        if step % eval_every == 0 or step == args.steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_s += time.perf_counter() - tick
            held_frames = {
                name: score(predict(model, held_inputs[name], args.batch), held.depth) for name, held in helds.items()
            }
            row = {
                "step": step,
                "samples": step * args.batch,
                "running_loss": float(running),
                "lr": float(schedule.get_last_lr()[0]),
                "train": summary(score(predict(model, inputs.subset(scored), args.batch), train.depth[scored])),
                "held_out": {name: summary(frames) for name, frames in held_frames.items()},
                "elapsed_s": time.perf_counter() - start,
                "train_s": train_s,
            }
            curve.append(row)
            if args.json is not None:  # at every evaluation: a run cut short keeps its curve so far
                write_json(args.json, result(held_frames, finished=step == args.steps))
            tick = time.perf_counter()
            bar.write(
                f"step {step}: loss {running:.4f}, train-frame AbsRel {row['train']['absrel_mean']:.4f}, "
                + ", ".join(f"{name} AbsRel {h['absrel_mean']:.4f}" for name, h in row["held_out"].items())
            )
    bar.close()

    read = "as pixels"
    if args.pool is not None:
        read = f"as pixels averaged over {args.pool} x {args.pool} blocks"
    elif args.vae_from is not None:
        read = f"through the VAE of {args.vae_from}"
    print(
        f"\nsupervised depth probe, frame 0 at {args.height}x{args.width} read {read}: {len(train.ids)} training "
        f"clips, {' and '.join(f'{len(h.ids)} {name}' for name, h in helds.items())} clips; training-frame AbsRel "
        f"over the first {scored_count} training frames; "
        "AbsRel and δ<1.25 after median scaling per frame (as evaluate.py's depth0.median)\n"
    )
    print(_table(curve, floor, list(helds)))
    if args.json is not None:
        print(f"\nwrote {args.json}")
    return result(held_frames, finished=True)


if __name__ == "__main__":
    main()
