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

from fourdnex.cli import field_flag, run, settings
from fourdnex.config import check_video_shape
from fourdnex.data.prepare import as_videos
from fourdnex.data.raycast import TEXTURE_FAMILIES
from fourdnex.errors import UsageError
from fourdnex.files import atomic_path, write_json, write_safetensors
from fourdnex.model.fusion import vae_round_trip
from fourdnex.model.whole_clip import runs_whole_clip
from fourdnex.runtime import device_of, worker_processes
from fourdnex.train.config import METRICS_READ_STEPS

CHECKPOINT_DIR = "checkpoint"


@dataclass
class VaeTrainConfig:
    """Settings of one VAE training run (the command line's flags)."""

    data_dir: str | None  # a 4DNeX-10M tree of training clips, or None with synthetic_clips
    model_path: str  # a Wan2.1-I2V folder whose vae/ (config and initial weights) is trained
    out: str
    eval_data_dir: str | None = None
    synthetic_clips: int = 0  # train on this many generator clips rendered in memory instead of data_dir
    synthetic_seed: int = 3  # clip i renders scene synthetic_seed * 100003 + i (fourdnex.data.synthetic)
    texture_families: tuple[str, ...] = TEXTURE_FAMILIES  # of the synthetic training clips
    eval_synthetic_clips: int = 0  # held-out generator clips: of the training families and of the others
    eval_synthetic_seed: int = 2
    eval_steps: int = 0  # held-out PSNR every N steps into curve.json (0: at the end only)
    stop_after_minutes: float = 0.0  # checkpoint and stop after this long (0: run to max_steps); rerun to resume
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
    device: str = "auto"  # a fourdnex.runtime.device_of name
    workers: int = 8  # threads reading clips, processes rendering generator clips

    def validate(self) -> None:
        """Raise UsageError naming the first setting that cannot be trained with."""
        check_video_shape(self.num_frames, self.height, self.width)
        device_of(self.device)  # a UsageError for a device this machine lacks
        if bool(self.data_dir) == bool(self.synthetic_clips):
            raise UsageError("give the training clips as --data_dir or as --synthetic_clips N, one of the two")
        unknown = sorted(set(self.texture_families) - set(TEXTURE_FAMILIES))
        if unknown or not self.texture_families:
            raise UsageError(f"texture families must be among {', '.join(TEXTURE_FAMILIES)}, got {unknown or 'none'}")
        for name in ("max_steps", "batch_size", "checkpointing_steps", "workers", "eval_limit"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("synthetic_clips", "eval_synthetic_clips", "eval_steps", "stop_after_minutes"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be at least 0, got {getattr(self, name)}")
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
        return as_videos(torch.from_numpy(self.rgb[index]).to(device), torch.from_numpy(self.xyz[index]).to(device))


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


def _render_clip(i: int, seed: int, num_frames: int, height: int, width: int, families: tuple[str, ...]):
    """Clip ``i`` of a synthetic set as the cache build would prepare it: RGB and normalized pointmap (float16)."""
    from fourdnex.data.prepare import fit_normalization, normalize_pointmap
    from fourdnex.data.synthetic import SUBSETS, clip_scene, render_scene

    scene_seed, subset = clip_scene(seed, i)
    static = SUBSETS[subset] == "static_npz"  # the share write_tree renders static
    scene = render_scene(scene_seed, num_frames, height, width, dynamic=not static, families=families)
    world_to_cam0 = np.linalg.inv(scene.cam2world[0].astype(np.float64))
    cam0 = scene.points @ world_to_cam0[:3, :3].T + world_to_cam0[:3, 3]  # (F, H, W, 3) first camera's frame
    return scene.rgb, normalize_pointmap(cam0, fit_normalization(cam0)).astype(np.float16)


def synthetic_clips(
    count: int, seed: int, num_frames: int, height: int, width: int, families: tuple[str, ...], workers: int
) -> Clips:
    """``count`` clips of the synthetic generator rendered in memory (processes), prepared as the cache build
    prepares clips (one centre per clip); clip ``i`` is the scene ``seed * 100003 + i`` at ``height x width``."""
    import functools

    from tqdm.auto import tqdm

    job = functools.partial(_render_clip, seed=seed, num_frames=num_frames, height=height, width=width,
                            families=tuple(families))  # fmt: skip
    rgb = np.empty((count, num_frames, height, width, 3), np.uint8)
    xyz = np.empty((count, num_frames, height, width, 3), np.float16)
    with worker_processes(workers) as pool:
        done = pool.map(job, range(count), chunksize=8) if pool else map(job, range(count))
        for i, (r, x) in enumerate(tqdm(done, total=count, desc=f"synthetic clips (seed {seed})", unit="clip")):
            rgb[i], xyz[i] = r, x
    return Clips(rgb, xyz)


def vae_loss(
    vae, videos: torch.Tensor, kl_weight: float, generator: torch.Generator, whole_clip: bool = False
) -> tuple[torch.Tensor, dict]:
    """Reconstruction MSE of ``videos (B, 3, F, H, W)`` through a sampled latent, plus ``kl_weight`` times the mean
    KL divergence of the posterior from N(0, 1); returns the loss and its parts (detached). ``whole_clip``: the VAE
    (prepared by :func:`fourdnex.model.whole_clip.whole_clip_vae`) runs each layer once over all frames, the same
    numbers as diffusers' chunks (:class:`VaeTrainer` takes it on a GPU)."""
    if whole_clip:
        from fourdnex.model.whole_clip import decode_whole, encode_whole

        posterior = encode_whole(vae, videos)
        recon = decode_whole(vae, posterior.sample(generator))
    else:
        posterior = vae.encode(videos).latent_dist
        recon = vae.decode(posterior.sample(generator), return_dict=False)[0]
    mse = (recon.float() - videos).square().mean()
    kl = 0.5 * (posterior.mean.square() + posterior.var - 1 - posterior.logvar).mean()
    return mse + kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error on values in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-20))


@torch.no_grad()
def reconstruction_psnr(vae, clips: Clips, device: torch.device, batch: int = 4) -> dict[str, float]:
    """PSNR of the posterior-mode reconstruction of every clip, per modality: ``{"rgb": dB, "xyz": dB}``."""
    sums = {"rgb": 0.0, "xyz": 0.0}
    for start in range(0, len(clips), batch):
        index = np.arange(start, min(start + batch, len(clips)))
        videos = clips.videos(index, device)
        recon = vae_round_trip(vae, videos)
        error = (recon - videos).square().flatten(1).mean(1)  # (2B,)
        sums["rgb"] += float(error[: len(index)].sum())
        sums["xyz"] += float(error[len(index) :].sum())
    return {name: psnr_of_mse(total / len(clips)) for name, total in sums.items()}


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


def _check_vae_folder(cfg: VaeTrainConfig) -> None:
    """ModelFolderError unless ``cfg.model_path`` has a VAE to start from."""
    from fourdnex.model.loading import check_model_folder

    check_model_folder(cfg.model_path, ("vae",), how="build the model first: python -m fourdnex.model.presets")


class VaeTrainer:
    """The VAE of ``cfg.model_path``, its AdamW and the training clips held on the training device (in host memory
    where they would take more than half of a GPU's free memory); :meth:`train_until` steps it.

    Step ``n`` trains on the clips ``numpy.random.default_rng([seed, n])`` picks and the latent sample of a generator
    seeded from ``(seed, n)``, so a resumed run trains exactly as an uninterrupted one. Nothing in a step waits for
    the device; the losses are read back every :data:`METRICS_READ_STEPS` steps.
    """

    def __init__(self, cfg: VaeTrainConfig, clips: Clips) -> None:
        from tqdm.auto import tqdm

        from fourdnex.model.loading import channels_last_convolutions, load_vae
        from fourdnex.model.whole_clip import whole_clip_vae
        from fourdnex.train.data import holding_device

        self.cfg = cfg
        self.device = device = device_of(cfg.device)
        _check_vae_folder(cfg)
        if len(clips) < cfg.batch_size:
            raise UsageError(f"{cfg.data_dir} holds {len(clips)} clips, fewer than --batch_size {cfg.batch_size}")
        torch.manual_seed(cfg.seed)
        self.vae = load_vae(cfg.model_path, torch.float32).to(device).train()
        self.whole_clip = runs_whole_clip(device)
        if self.whole_clip:
            whole_clip_vae(channels_last_convolutions(self.vae))
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
        videos = as_videos(rgb, xyz)
        return videos.contiguous(memory_format=torch.channels_last_3d) if self.whole_clip else videos

    def train_until(self, stop: int) -> None:
        """Train until step ``stop``, writing a checkpoint every ``checkpointing_steps`` and at ``max_steps``."""
        cfg, device = self.cfg, self.device
        while self.step < stop:
            generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, parts = vae_loss(self.vae, self.videos(self.step), cfg.kl_weight, generator, self.whole_clip)
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
                self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """Write the weights, optimizer state and step to ``OUT/checkpoint`` (a re-run resumes from it)."""
        _save_checkpoint(Path(self.cfg.out) / CHECKPOINT_DIR, self.vae, self.optimizer, self.step)


def held_out_sets(cfg: VaeTrainConfig) -> dict[str, Clips]:
    """The held-out clips the PSNR is measured on: ``held_out`` (``--eval_data_dir``, or generator clips of the
    training families) and ``held_out_family`` (generator clips of the families left out of training, if any)."""
    sets = {}
    if cfg.eval_data_dir:
        sets["held_out"] = load_clips(cfg.eval_data_dir, cfg.num_frames, cfg.height, cfg.width, cfg.eval_limit,
                                      cfg.workers)  # fmt: skip
    if cfg.eval_synthetic_clips:
        others = tuple(f for f in TEXTURE_FAMILIES if f not in cfg.texture_families)
        named = {"held_out": tuple(cfg.texture_families), "held_out_family": others}
        for name, families in named.items():
            if families and name not in sets:
                sets[name] = synthetic_clips(cfg.eval_synthetic_clips, cfg.eval_synthetic_seed, cfg.num_frames,
                                             cfg.height, cfg.width, families, cfg.workers)  # fmt: skip
    return sets


def train_vae(cfg: VaeTrainConfig) -> dict:
    """Train the VAE of ``cfg.model_path`` on ``cfg.data_dir`` (or generator clips); returns the metrics written to
    ``OUT/metrics.json``. With ``stop_after_minutes`` it stops at a checkpoint once that time has passed, writes
    what it has (``finished`` false) and a re-run of the same command resumes."""
    cfg.validate()
    out = Path(cfg.out)
    _check_vae_folder(cfg)  # before the clips are read
    start = time.perf_counter()
    if cfg.synthetic_clips:
        clips = synthetic_clips(cfg.synthetic_clips, cfg.synthetic_seed, cfg.num_frames, cfg.height, cfg.width,
                                cfg.texture_families, cfg.workers)  # fmt: skip
    else:
        clips = load_clips(cfg.data_dir, cfg.num_frames, cfg.height, cfg.width, cfg.limit, cfg.workers)
    held_out = held_out_sets(cfg)
    trainer = VaeTrainer(cfg, clips)
    vae, device = trainer.vae, trainer.device
    out.mkdir(parents=True, exist_ok=True)
    curve_file = out / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.is_file() and trainer.step else []
    every = cfg.eval_steps or cfg.max_steps
    while trainer.step < cfg.max_steps:
        trainer.train_until(min(cfg.max_steps, (trainer.step // every + 1) * every))
        if cfg.eval_steps and held_out:
            vae.eval()
            point = {"step": trainer.step, "clips_seen": trainer.step * cfg.batch_size}
            for name, clipset in held_out.items():
                point.update({f"{name}_{k}": v for k, v in reconstruction_psnr(vae, clipset, device).items()})
            vae.train()
            curve.append(point)
            write_json(curve_file, curve)
        if cfg.stop_after_minutes and time.perf_counter() - start > 60 * cfg.stop_after_minutes:
            trainer.save_checkpoint()
            break
    trainer.bar.close()

    vae.eval()
    mean, std = latent_statistics(vae, Clips(clips.rgb[:256], clips.xyz[:256]), device)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    metrics = {
        "config": {**asdict(cfg), "device": str(device)},
        "steps": trainer.step,
        "finished": trainer.step >= cfg.max_steps,
        "seconds": time.perf_counter() - start,
        "train_clips": len(clips),
        "curve": curve,
    }
    metrics["train_psnr"] = reconstruction_psnr(
        vae, Clips(clips.rgb[: cfg.eval_limit], clips.xyz[: cfg.eval_limit]), device
    )
    for name, clipset in held_out.items():
        metrics[f"{name}_psnr"] = reconstruction_psnr(vae, clipset, device)
        metrics[f"{name}_clips"] = len(clipset)
    vae.save_pretrained(out / "vae")
    write_json(out / "metrics.json", metrics)
    return metrics


def main(args: argparse.Namespace) -> None:
    """Train as the flags say and print the reconstruction PSNRs."""
    metrics = train_vae(settings(VaeTrainConfig, args, texture_families=tuple(args.texture_families)))
    names = ("steps", "finished", "train_psnr", "held_out_psnr", "held_out_family_psnr")
    print(json.dumps({k: metrics[k] for k in names if k in metrics}))


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.train.vae``; every default is a VaeTrainConfig field's."""
    p = argparse.ArgumentParser(
        prog="fourdnex.train.vae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    field_flag(p, VaeTrainConfig, "data_dir", help="4DNeX-10M tree of training clips (or --synthetic_clips)")
    field_flag(
        p, VaeTrainConfig, "model_path", required=True, help="the model whose vae/ is trained (its config and start)"
    )
    field_flag(
        p, VaeTrainConfig, "out", required=True, help="where the trained vae/, metrics.json and the checkpoint go"
    )
    field_flag(p, VaeTrainConfig, "eval_data_dir", help="4DNeX-10M tree of held-out clips for the PSNR")
    field_flag(
        p,
        VaeTrainConfig,
        "synthetic_clips",
        type=int,
        help="train on N clips of the synthetic generator rendered in memory (no files) instead",
    )
    field_flag(p, VaeTrainConfig, "synthetic_seed", type=int, help="clip i renders seed * 100003 + i")
    field_flag(
        p,
        VaeTrainConfig,
        "texture_families",
        nargs="+",
        choices=TEXTURE_FAMILIES,
        help="the texture families of the synthetic training clips",
    )
    field_flag(
        p,
        VaeTrainConfig,
        "eval_synthetic_clips",
        type=int,
        help="held-out generator clips (seed --eval_synthetic_seed) of the training families, and as many "
        "of the families left out, for the PSNR",
    )
    field_flag(p, VaeTrainConfig, "eval_synthetic_seed", type=int)
    field_flag(
        p,
        VaeTrainConfig,
        "eval_steps",
        type=int,
        help="measure the held-out PSNR every N steps into OUT/curve.json (0: at the end only)",
    )
    field_flag(
        p,
        VaeTrainConfig,
        "stop_after_minutes",
        type=float,
        help="checkpoint and stop after this many minutes (0: never); the same command resumes",
    )
    for name in ("num_frames", "height", "width", "eval_limit", "max_steps", "batch_size", "warmup_steps",
                 "checkpointing_steps", "seed", "workers"):  # fmt: skip
        field_flag(p, VaeTrainConfig, name, type=int)
    field_flag(p, VaeTrainConfig, "limit", type=int, help="only the first N training clips")
    field_flag(p, VaeTrainConfig, "learning_rate", type=float)
    field_flag(p, VaeTrainConfig, "kl_weight", type=float)
    field_flag(p, VaeTrainConfig, "device", help="auto, cuda, cuda:N or cpu (default auto: cuda when available)")
    return p


if __name__ == "__main__":
    run(main, build_parser())
