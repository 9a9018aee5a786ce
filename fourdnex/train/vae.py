"""Training a small Wan VAE on RGB and XYZ videos: the one component a small fourdnex model needs that no one ships.

The VAE keeps Wan's latent interface (``AutoencoderKLWan``: 16 channels, 8x8 pixels and 4 frames per latent pixel and
frame, a causal first frame), so everything else (fusion, cache, training, sampling) runs on it unchanged. It learns
both modalities at once, as 4DNeX's frozen Wan VAE encodes both: each batch holds RGB videos and normalized
pointmap videos of the same clips, all in [-1, 1].

Data: clips of a 4DNeX-10M tree, read and prepared exactly as the cache build prepares them
(:func:`fourdnex.data.prepare.prepare_clip`: cover crop, one centre per clip), held in memory. Loss: mean squared
error of the reconstruction plus a small KL term that keeps the posterior's scale in check. After training, the
per-channel mean and standard deviation of the posterior means over the training clips are written into the VAE's
``latents_mean`` / ``latents_std``, which every fourdnex pipeline normalizes latents with; held-out clips give the
reconstruction PSNR of each modality (peak-to-peak 2, the range of both).

    python -m fourdnex.train.vae --data_dir synthetic/data --model_path demo-model --out runs/vae \\
        --eval_data_dir heldout/data --num_frames 25 --height 96 --width 144 --max_steps 3000

Writes ``OUT/vae`` (a diffusers folder), ``OUT/metrics.json`` and, every ``--checkpointing_steps``,
``OUT/checkpoint/`` (weights as safetensors, optimizer state read back with ``weights_only=True``), from which a
re-run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fourdnex.cli import run
from fourdnex.config import check_video_shape
from fourdnex.errors import UsageError
from fourdnex.files import atomic_path, write_json, write_safetensors

CHECKPOINT_DIR = "checkpoint"


@dataclass
class VaeTrainConfig:
    """Settings of one VAE training run (the command line's flags)."""

    data_dir: str
    model_path: str  # a Wan2.1-I2V folder whose vae/ (config and initial weights) is trained
    out: str
    eval_data_dir: str | None = None
    num_frames: int = 25
    height: int = 96
    width: int = 144
    limit: int | None = None  # first N clips of data_dir
    eval_limit: int = 100
    max_steps: int = 3000
    batch_size: int = 8  # clips per step; each gives its RGB and its XYZ video
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    kl_weight: float = 1e-6
    checkpointing_steps: int = 500
    seed: int = 0
    device: str = "cuda"
    workers: int = 8

    def validate(self) -> None:
        """Raise UsageError naming the first setting that cannot be trained with."""
        check_video_shape(self.num_frames, self.height, self.width)
        for name in ("max_steps", "batch_size", "checkpointing_steps", "workers", "eval_limit"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.kl_weight < 0:
            raise UsageError(
                f"learning_rate must be > 0 and kl_weight >= 0, got {self.learning_rate}, {self.kl_weight}"
            )


@dataclass
class Clips:
    """Prepared clips in memory: ``rgb (N, F, H, W, 3)`` uint8 and ``xyz (N, F, H, W, 3)`` float16 in [-1, 1]."""

    rgb: np.ndarray
    xyz: np.ndarray

    def __len__(self) -> int:
        return len(self.rgb)

    def videos(self, index: np.ndarray, device: torch.device) -> torch.Tensor:
        """RGB videos of clips ``index`` then their XYZ videos, ``(2B, 3, F, H, W)`` float32 in [-1, 1]."""
        rgb = torch.from_numpy(self.rgb[index]).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        xyz = torch.from_numpy(self.xyz[index]).to(device).permute(0, 4, 1, 2, 3).float()
        return torch.cat([rgb, xyz])


def load_clips(
    data_dir: str | Path, num_frames: int, height: int, width: int, limit: int | None, workers: int
) -> Clips:
    """Read and prepare the clips of a 4DNeX-10M tree as the cache build does; a clip that cannot be read is named
    in one line (the VAE's data is expected to be complete)."""
    from tqdm.auto import tqdm

    from fourdnex.data.prepare import prepare_clip
    from fourdnex.data.sources import Captions, ClipError, find_clips, read_clip

    sources = find_clips(data_dir).clips[:limit]
    captions = Captions(data_dir)

    def prepare(source):
        if source.problem:
            raise ClipError(f"{source.path}: {source.problem}")
        clip = prepare_clip(source, read_clip(source, captions), num_frames, height, width)
        return clip.rgb, clip.pointmap.astype(np.float16)

    rgb = np.empty((len(sources), num_frames, height, width, 3), np.uint8)
    xyz = np.empty((len(sources), num_frames, height, width, 3), np.float16)
    with ThreadPoolExecutor(workers) as pool:
        for i, (r, x) in enumerate(tqdm(pool.map(prepare, sources), total=len(sources), desc="clips", unit="clip")):
            rgb[i], xyz[i] = r, x
    return Clips(rgb, xyz)


def vae_loss(vae, videos: torch.Tensor, kl_weight: float, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Reconstruction MSE of ``videos (B, 3, F, H, W)`` through a sampled latent, plus ``kl_weight`` times the mean
    KL divergence of the posterior from N(0, 1); returns the loss and its parts (detached)."""
    posterior = vae.encode(videos).latent_dist
    recon = vae.decode(posterior.sample(generator), return_dict=False)[0]
    mse = (recon.float() - videos).square().mean()
    kl = 0.5 * (posterior.mean.square() + posterior.var - 1 - posterior.logvar).mean()
    return mse + kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}


def psnr(mse: float) -> float:
    """PSNR in dB of a mean squared error on values in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-20))


@torch.no_grad()
def reconstruction_psnr(vae, clips: Clips, device: torch.device, batch: int = 4) -> dict[str, float]:
    """PSNR of the posterior-mode reconstruction of every clip, per modality: ``{"rgb": dB, "xyz": dB}``."""
    sums = {"rgb": 0.0, "xyz": 0.0}
    for start in range(0, len(clips), batch):
        index = np.arange(start, min(start + batch, len(clips)))
        videos = clips.videos(index, device)
        recon = vae.decode(vae.encode(videos).latent_dist.mode(), return_dict=False)[0].float().clamp(-1, 1)
        error = (recon - videos).square().flatten(1).mean(1)  # (2B,)
        sums["rgb"] += float(error[: len(index)].sum())
        sums["xyz"] += float(error[len(index) :].sum())
    return {name: psnr(total / len(clips)) for name, total in sums.items()}


@torch.no_grad()
def latent_statistics(vae, clips: Clips, device: torch.device, batch: int = 4) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the posterior means of every clip's RGB and XYZ videos."""
    total = total_sq = count = 0
    for start in range(0, len(clips), batch):
        index = np.arange(start, min(start + batch, len(clips)))
        z = vae.encode(clips.videos(index, device)).latent_dist.mode().double()  # (2B, 16, T, h, w)
        total = total + z.sum(dim=(0, 2, 3, 4))
        total_sq = total_sq + z.square().sum(dim=(0, 2, 3, 4))
        count += z[:, 0].numel()
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def _save_checkpoint(folder: Path, vae, optimizer, step: int) -> None:
    """Weights (safetensors), optimizer state and step, each written atomically; the step file last."""
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "vae.safetensors", vae.state_dict())
    with atomic_path(folder / "optimizer.pt") as tmp:
        torch.save(optimizer.state_dict(), tmp)
    write_json(folder / "step.json", {"step": step})


def _load_checkpoint(folder: Path, vae, optimizer) -> int:
    """Restore a checkpoint written by :func:`_save_checkpoint`; returns its step (0 when there is none)."""
    from safetensors.torch import load_file

    if not (folder / "step.json").is_file():
        return 0
    vae.load_state_dict(load_file(folder / "vae.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((folder / "step.json").read_text())["step"]


def _vae_folder(cfg: VaeTrainConfig) -> Path:
    """The VAE folder of ``cfg.model_path``; UsageError if it has no config."""
    folder = Path(cfg.model_path) / "vae"
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: no VAE config (build the model first: python -m fourdnex.model.presets)")
    return folder


#: Steps between two reads of the logged losses from the device (each read waits for the queued steps to finish).
METRICS_READ_STEPS = 50


class VaeTrainer:
    """The VAE of ``cfg.model_path``, its AdamW and the training clips held on the training device (in host memory
    where they would take more than half of a GPU's free memory); :meth:`train_until` steps it.

    Step ``n`` trains on the clips ``numpy.random.default_rng([seed, n])`` picks and the latent sample of a generator
    seeded from ``(seed, n)``, so a resumed run trains exactly as an uninterrupted one. Nothing in a step waits for
    the device; the losses are read back every :data:`METRICS_READ_STEPS` steps.
    """

    def __init__(self, cfg: VaeTrainConfig, clips: Clips) -> None:
        from diffusers import AutoencoderKLWan
        from tqdm.auto import tqdm

        from fourdnex.train.data import holding_device

        self.cfg = cfg
        self.device = device = torch.device(cfg.device)
        vae_folder = _vae_folder(cfg)
        if len(clips) < cfg.batch_size:
            raise UsageError(f"{cfg.data_dir} holds {len(clips)} clips, fewer than --batch_size {cfg.batch_size}")
        torch.manual_seed(cfg.seed)
        self.vae = AutoencoderKLWan.from_pretrained(vae_folder, dtype=torch.float32).to(device).train()
        self.optimizer = torch.optim.AdamW(
            self.vae.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.99), weight_decay=1e-4,
            fused=device.type == "cuda",
        )  # fmt: skip
        self.step = _load_checkpoint(Path(cfg.out) / CHECKPOINT_DIR, self.vae, self.optimizer)
        self.clips = clips
        held = holding_device(device, clips.rgb.nbytes + clips.xyz.nbytes)
        self.rgb = torch.from_numpy(clips.rgb).to(held)  # (N, F, H, W, 3) uint8
        self.xyz = torch.from_numpy(clips.xyz).to(held)  # (N, F, H, W, 3) float16
        self.bar = tqdm(total=cfg.max_steps, initial=self.step, desc="vae", unit="step")
        self.pending: list[torch.Tensor] = []  # (2,) mse, kl of the steps since the last read

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to a tenth."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.learning_rate * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def videos(self, step: int) -> torch.Tensor:
        """Step ``step``'s RGB videos then their XYZ videos, ``(2B, 3, F, H, W)`` float32 in [-1, 1] on the device."""
        from fourdnex.train.data import to_device

        rng = np.random.default_rng([self.cfg.seed, step])
        index = torch.from_numpy(rng.choice(len(self.clips), self.cfg.batch_size, replace=False))
        index = index if self.rgb.device.type == "cpu" else to_device(index, self.rgb.device)
        rgb = to_device(self.rgb[index], self.device) if self.rgb.is_cpu else self.rgb[index]
        xyz = to_device(self.xyz[index], self.device) if self.xyz.is_cpu else self.xyz[index]
        rgb = rgb.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        return torch.cat([rgb, xyz.permute(0, 4, 1, 2, 3).float()])

    def train_until(self, stop: int) -> None:
        """Train until step ``stop``, writing a checkpoint every ``checkpointing_steps`` and at ``max_steps``."""
        cfg, device = self.cfg, self.device
        while self.step < stop:
            generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, parts = vae_loss(self.vae, self.videos(self.step), cfg.kl_weight, generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.optimizer.step()
            self.step += 1
            self.bar.update()
            self.pending.append(torch.stack([parts["mse"], parts["kl"]]))
            checkpoint = self.step % cfg.checkpointing_steps == 0 or self.step == cfg.max_steps
            if checkpoint or self.step % METRICS_READ_STEPS == 0:
                mse, kl = torch.stack(self.pending)[-1].tolist()
                self.bar.set_postfix(mse=f"{mse:.5f}", kl=f"{kl:.3f}")
                self.pending = []
            if checkpoint:
                _save_checkpoint(Path(cfg.out) / CHECKPOINT_DIR, self.vae, self.optimizer, self.step)


def plain_vae_seconds(cfg: VaeTrainConfig, clips: Clips, steps: int, warmup: int, compiled: bool = False) -> float:
    """Seconds per step of a plain PyTorch step of the same VAE, batch and loss (fp32 weights, bf16 autocast, fused
    AdamW, gradient clipping; ``compiled``: the loss under ``torch.compile``), random clips already on the GPU."""
    from diffusers import AutoencoderKLWan

    device = torch.device(cfg.device)
    vae = AutoencoderKLWan.from_pretrained(Path(cfg.model_path) / "vae", dtype=torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4, fused=True)
    index = np.arange(cfg.batch_size)
    rgb = torch.from_numpy(clips.rgb[index]).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    videos = torch.cat([rgb, torch.from_numpy(clips.xyz[index]).to(device).permute(0, 4, 1, 2, 3).float()])
    generator = torch.Generator(device).manual_seed(0)
    loss_fn = torch.compile(vae_loss) if compiled else vae_loss

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = loss_fn(vae, videos, cfg.kl_weight, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - tic) / steps


def train_vae(cfg: VaeTrainConfig) -> dict:
    """Train the VAE of ``cfg.model_path`` on ``cfg.data_dir``; returns the metrics written to ``OUT/metrics.json``."""
    cfg.validate()
    out = Path(cfg.out)
    _vae_folder(cfg)  # before the clips are read
    clips = load_clips(cfg.data_dir, cfg.num_frames, cfg.height, cfg.width, cfg.limit, cfg.workers)
    trainer = VaeTrainer(cfg, clips)
    start = time.perf_counter()
    trainer.train_until(cfg.max_steps)
    trainer.bar.close()

    vae, device = trainer.vae, trainer.device
    vae.eval()
    mean, std = latent_statistics(vae, Clips(clips.rgb[:256], clips.xyz[:256]), device)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    metrics = {
        "config": asdict(cfg),
        "steps": trainer.step,
        "seconds": time.perf_counter() - start,
        "train_clips": len(clips),
    }
    metrics["train_psnr"] = reconstruction_psnr(
        vae, Clips(clips.rgb[: cfg.eval_limit], clips.xyz[: cfg.eval_limit]), device
    )
    if cfg.eval_data_dir:
        held_out = load_clips(cfg.eval_data_dir, cfg.num_frames, cfg.height, cfg.width, cfg.eval_limit, cfg.workers)
        metrics["held_out_psnr"] = reconstruction_psnr(vae, held_out, device)
        metrics["held_out_clips"] = len(held_out)
    vae.save_pretrained(out / "vae")
    write_json(out / "metrics.json", metrics)
    return metrics


def main(args: argparse.Namespace) -> None:
    """Train as the flags say and print the reconstruction PSNRs."""
    metrics = train_vae(VaeTrainConfig(**vars(args)))
    print(json.dumps({k: metrics[k] for k in ("train_psnr", "held_out_psnr") if k in metrics}))


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.train.vae``; every default comes from VaeTrainConfig."""
    d = VaeTrainConfig("", "", "")
    p = argparse.ArgumentParser(
        prog="fourdnex.train.vae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data_dir", required=True, help="4DNeX-10M tree of training clips")
    p.add_argument("--model_path", required=True, help="the model whose vae/ is trained (its config and start)")
    p.add_argument("--out", required=True, help="where the trained vae/, metrics.json and the checkpoint go")
    p.add_argument("--eval_data_dir", default=None, help="4DNeX-10M tree of held-out clips for the PSNR")
    for name in ("num_frames", "height", "width", "eval_limit", "max_steps", "batch_size", "warmup_steps",
                 "checkpointing_steps", "seed", "workers"):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=getattr(d, name))
    p.add_argument("--limit", type=int, default=None, help="only the first N training clips")
    p.add_argument("--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--kl_weight", type=float, default=d.kl_weight)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


if __name__ == "__main__":
    run(main, build_parser())
