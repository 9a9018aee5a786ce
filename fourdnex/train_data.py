"""The training view of a latent cache (what ``build_wan_dataset.py`` writes): fused samples for the loss.

Cache layout (one folder):
    stats.json                  xyz_latent_mean / xyz_latent_std, height / width (per modality), num_frames, model_path
    manifest.jsonl              one clip per line: {"id", "latents", "clip", "prompt", ...} paths relative to the cache
    latents/<id>.safetensors    rgb, xyz (16, T, h, w) VAE-normalized (XYZ not yet XYZ-normalized);
                                cond (16, T, h, 2w): the VAE-normalized encoding of [first frame | sloped plane] + zeros
    clip/<id>.safetensors       clip (257, image_dim): CLIP's penultimate hidden state of the first frame
    prompt/<sha256>.safetensors prompt (512, text_dim): UMT5 embedding of caption + PROMPT_SUFFIX

A training sample keeps the first ``num_latent_frames`` latent frames. The Wan VAE is causal in time, so the first
frames of a longer encoding equal the encoding of the shorter clip, and the cached condition can be cut the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .fusion import fuse_width, normalize_xyz, soft_mask

STATS_FILE = "stats.json"
MANIFEST_FILE = "manifest.jsonl"


class CacheError(ValueError):
    """A cache that cannot be trained on; the message names the file and what is wrong with it."""


@dataclass
class CacheStats:
    """What ``stats.json`` says about the whole cache."""

    xyz_latent_mean: float
    xyz_latent_std: float
    height: int  # per modality, pixels
    width: int
    num_frames: int  # video frames each clip was encoded with
    model_path: str | None = None


@dataclass
class Sample:
    """One fused training sample (``T`` latent frames, ``h x 2w`` fused latent grid)."""

    x0: torch.Tensor  # (16, T, h, 2w) clean latent: RGB | XYZ-normalized XYZ
    condition: torch.Tensor  # (20, T, h, 2w) soft mask (4) + condition latent (16)
    prompt_embeds: torch.Tensor  # (L, text_dim)
    image_embeds: torch.Tensor  # (257, image_dim)
    clip_id: str


def _load(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read the named tensors of one safetensors file; a missing or unreadable file or key is a CacheError."""
    if not path.is_file():
        raise CacheError(f"{path}: missing")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CacheError(f"{path}: unreadable ({err})") from err
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise CacheError(f"{path}: has no tensor {missing[0]!r} (holds {sorted(tensors)})")
    return {key: tensors[key] for key in keys}


def read_stats(cache_dir: str | Path) -> CacheStats:
    """Read ``stats.json`` of a cache; raise CacheError naming the file if it is missing or incomplete."""
    path = Path(cache_dir) / STATS_FILE
    if not Path(cache_dir).is_dir():
        raise CacheError(f"cache folder {cache_dir} does not exist (build it with build_wan_dataset.py)")
    if not path.is_file():
        raise CacheError(f"{path}: missing (the XYZ latent statistics and sizes of the cache)")
    try:
        raw = json.loads(path.read_text())
        return CacheStats(
            xyz_latent_mean=float(raw["xyz_latent_mean"]),
            xyz_latent_std=float(raw["xyz_latent_std"]),
            height=int(raw["height"]),
            width=int(raw["width"]),
            num_frames=int(raw["num_frames"]),
            model_path=raw.get("model_path"),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CacheError(f"{path}: unreadable ({type(err).__name__}: {err})") from err


class LatentCache:
    """The clips of a cache as fused training samples of ``num_latent_frames`` latent frames.

    Construction checks the cache against the training settings (sizes, frame count) and reads the manifest;
    :meth:`sample` reads one clip and raises CacheError with the file's path if anything about it is wrong.
    """

    def __init__(self, cache_dir: str | Path, num_latent_frames: int, height: int, width: int) -> None:
        self.root = Path(cache_dir)
        self.stats = read_stats(self.root)
        if (self.stats.height, self.stats.width) != (height, width):
            raise CacheError(
                f"{self.root / STATS_FILE}: the cache was built at {self.stats.height}x{self.stats.width} per modality,"
                f" training asks for {height}x{width}"
            )
        cached_latent_frames = (self.stats.num_frames - 1) // 4 + 1
        if num_latent_frames > cached_latent_frames:
            raise CacheError(
                f"{self.root / STATS_FILE}: the cache holds {self.stats.num_frames} frames ({cached_latent_frames}"
                f" latent), training asks for {(num_latent_frames - 1) * 4 + 1}"
            )
        if self.stats.xyz_latent_std <= 0:
            raise CacheError(
                f"{self.root / STATS_FILE}: xyz_latent_std must be positive, got {self.stats.xyz_latent_std}"
            )
        self.num_latent_frames = num_latent_frames
        self.latent_shape = (num_latent_frames, height // 8, width // 8)  # per modality
        self.items = self._read_manifest()

    def _read_manifest(self) -> list[dict]:
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            raise CacheError(f"{path}: missing (the list of cached clips)")
        items = []
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                missing = [key for key in ("id", "latents", "clip", "prompt") if key not in item]
            except json.JSONDecodeError as err:
                raise CacheError(f"{path}:{line_no}: not JSON ({err})") from err
            if missing:
                raise CacheError(f"{path}:{line_no}: no {missing[0]!r} field")
            items.append(item)
        if not items:
            raise CacheError(f"{path}: lists no clips")
        return items

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, index: int) -> Sample:
        """Read clip ``index`` as a fused :class:`Sample` (float32)."""
        item = self.items[index]
        latents_path = self.root / item["latents"]
        latents = _load(latents_path, ("rgb", "xyz", "cond"))
        frames, h, w = self.latent_shape
        expected = {"rgb": (16, h, w), "xyz": (16, h, w), "cond": (16, h, 2 * w)}
        for key, (channels, hh, ww) in expected.items():
            shape = tuple(latents[key].shape)
            if len(shape) != 4 or shape[0] != channels or shape[2:] != (hh, ww) or shape[1] < frames:
                raise CacheError(
                    f"{latents_path}: {key} has shape {shape}, expected ({channels}, >={frames}, {hh}, {ww})"
                )
        rgb = latents["rgb"][:, :frames].float()
        xyz = normalize_xyz(latents["xyz"][:, :frames].float(), self.stats.xyz_latent_mean, self.stats.xyz_latent_std)
        x0 = fuse_width(rgb, xyz)  # (16, T, h, 2w)
        mask = soft_mask(1, frames, h, 2 * w, "rgbxyz")[0]  # (4, T, h, 2w)
        condition = torch.cat([mask, latents["cond"][:, :frames].float()])  # (20, T, h, 2w)
        prompt = _load(self.root / item["prompt"], ("prompt",))["prompt"].float()
        image = _load(self.root / item["clip"], ("clip",))["clip"].float()
        for name, tensor, path in (("prompt", prompt, item["prompt"]), ("clip", image, item["clip"])):
            if tensor.ndim != 2:
                raise CacheError(f"{self.root / path}: {name} has shape {tuple(tensor.shape)}, expected (tokens, dim)")
        if not (torch.isfinite(x0).all() and torch.isfinite(condition).all()):
            raise CacheError(f"{latents_path}: holds NaN or infinite values")
        return Sample(x0=x0, condition=condition, prompt_embeds=prompt, image_embeds=image, clip_id=str(item["id"]))
