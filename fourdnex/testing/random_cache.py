"""A training cache of random tensors in the cache's own layout, for benchmarks of the trainer: its speed does not
depend on the values, and writing random latents takes seconds where encoding clips takes minutes.

Only what training reads is written: the latents (``rgb``, ``xyz``, ``cond``, ``cond_rgb``), the CLIP and prompt
embeddings, the manifest and ``stats.json`` (:mod:`fourdnex.data.cache` specifies each).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fourdnex.config import latent_frames
from fourdnex.data.cache import (
    MANIFEST_FILE,
    STATS_FILE,
    clip_files,
    write_clip_embeds,
    write_latents,
    write_prompt_embeds,
)
from fourdnex.files import write_text


def write_random_cache(
    root: str | Path,
    num_clips: int,
    num_frames: int,
    height: int,
    width: int,
    text_shape: tuple[int, int],
    image_shape: tuple[int, int],
    seed: int = 0,
) -> Path:
    """Write ``num_clips`` clips of random latents of ``num_frames`` frames at ``height x width`` per modality, with
    prompt embeddings ``text_shape`` (tokens, dim) and CLIP embeddings ``image_shape``; returns the cache folder."""
    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    t, h, w = latent_frames(num_frames), height // 8, width // 8
    config = {"num_frames": num_frames, "cond_num_frames": num_frames}
    lines = []
    for i in range(num_clips):
        clip_id = f"random/{i:06d}"
        prompt = f"random clip {i}"
        files = clip_files(clip_id, prompt)
        for key in ("latents", "clip", "prompt"):
            (root / files[key]).parent.mkdir(parents=True, exist_ok=True)
        latents = {
            "rgb": torch.randn(16, t, h, w, generator=generator),
            "xyz": torch.randn(16, t, h, w, generator=generator),
            "cond": torch.randn(16, t, h, 2 * w, generator=generator),
            "cond_rgb": torch.randn(16, t, h, w, generator=generator),
        }
        write_latents(root, files, latents, config)
        write_clip_embeds(root, files, torch.randn(*image_shape, generator=generator))
        write_prompt_embeds(root, files, prompt, torch.randn(*text_shape, generator=generator))
        lines.append(json.dumps({"id": clip_id, "files": files}))
    write_text(root / MANIFEST_FILE, "\n".join(lines) + "\n")
    stats = {
        "xyz_latent_mean": 0.0,
        "xyz_latent_std": 1.0,
        "resolution_h": height,
        "resolution_w": width,
        "num_frames": num_frames,
        "cond_num_frames": num_frames,
        "model_path": None,
        "center": "clip",
    }
    write_text(root / STATS_FILE, json.dumps(stats, indent=1))
    return root
