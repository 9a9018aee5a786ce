"""A tiny latent cache in the layout of ``fourdnex.train_data``, encoded with the tiny model's VAE (tests only)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from fourdnex.fusion import condition_video, vae_normalize

TINY_MODEL = Path(__file__).resolve().parent.parent / "example" / "tiny-wan-i2v"


def smooth_video(generator: torch.Generator, frames: int, height: int, width: int) -> torch.Tensor:
    """A random low-frequency video ``(1, 3, F, H, W)`` in [-1, 1]."""
    coarse = torch.rand(1, 3, frames, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(frames, height, width), mode="trilinear")


@torch.no_grad()
def write_tiny_cache(
    root: Path,
    num_clips: int = 2,
    height: int = 32,
    width: int = 32,
    num_frames: int = 9,
    text_dim: int = 32,
    image_dim: int = 32,
    tokens: int = 16,
    seed: int = 0,
) -> Path:
    """Write ``num_clips`` clips of random smooth RGB and XYZ videos, encoded by the tiny VAE, to ``root``."""
    vae = AutoencoderKLWan.from_pretrained(TINY_MODEL, subfolder="vae", dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    for sub in ("latents", "clip", "prompt"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_clips):
        clip_id = f"clip{i:03d}"
        rgb = smooth_video(generator, num_frames, height, width)
        xyz = smooth_video(generator, num_frames, height, width)
        cond = condition_video(rgb[:, :, 0], num_frames, "rgbxyz")
        latents = {
            name: vae_normalize(vae, vae.encode(video).latent_dist.mode())[0].contiguous()
            for name, video in (("rgb", rgb), ("xyz", xyz), ("cond", cond))
        }
        save_file(latents, root / "latents" / f"{clip_id}.safetensors")
        save_file({"clip": torch.randn(257, image_dim, generator=generator)}, root / "clip" / f"{clip_id}.safetensors")
        caption = f"caption {i}"
        digest = hashlib.sha256(caption.encode()).hexdigest()
        save_file(
            {"prompt": torch.randn(tokens, text_dim, generator=generator)}, root / "prompt" / f"{digest}.safetensors"
        )
        lines.append(
            {
                "id": clip_id,
                "caption": caption,
                "latents": f"latents/{clip_id}.safetensors",
                "clip": f"clip/{clip_id}.safetensors",
                "prompt": f"prompt/{digest}.safetensors",
            }
        )
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    stats = {
        "xyz_latent_mean": -0.1,
        "xyz_latent_std": 1.5,
        "height": height,
        "width": width,
        "num_frames": num_frames,
        "model_path": str(TINY_MODEL),
    }
    (root / "stats.json").write_text(json.dumps(stats, indent=2))
    return root
