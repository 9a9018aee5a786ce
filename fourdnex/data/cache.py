"""The training view of a latent cache (what ``build_wan_dataset.py`` writes): fused samples for the loss.

The cache layout is documented in :mod:`fourdnex.data.sources`; what training reads of it:
    stats.json                  xyz_latent_mean / xyz_latent_std, resolution_h / resolution_w (per modality),
                                num_frames, cond_num_frames, model_path
    manifest.jsonl              one clip per line: {"id", "files": {"latents", "clip", "prompt", "first_frame"}, ...}
                                paths relative to the cache
    latents/<id>.safetensors    rgb, xyz (16, T, h, w) VAE-normalized (XYZ not yet XYZ-normalized);
                                cond (16, Tc, h, 2w): VAE-normalized encoding of [first frame | sloped plane] + zeros
    clip/<id>.safetensors       clip_embeds (257, image_dim): CLIP's penultimate hidden state of the first frame
    prompt/<sha256>.safetensors prompt_embeds (512, text_dim): UMT5 embedding of caption + PROMPT_SUFFIX

A training sample keeps the first ``num_latent_frames`` latent frames. The Wan VAE is causal in time, so the first
frames of a longer encoding equal the encoding of the shorter clip, and the cached condition is cut the same way.
A cache whose condition is shorter than the training length has its condition encoded from the cached first frame
by a ``condition_encoder`` (the VAE), once per sample read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fourdnex.config import latent_frames, video_frames
from fourdnex.errors import FourDNeXError
from fourdnex.model.fusion import fuse_width, normalize_xyz, soft_mask

STATS_FILE = "stats.json"
MANIFEST_FILE = "manifest.jsonl"


class CacheError(FourDNeXError, ValueError):
    """A cache that cannot be trained on; the message names the file and what is wrong with it."""


@dataclass
class CacheStats:
    """What ``stats.json`` says about the whole cache."""

    xyz_latent_mean: float
    xyz_latent_std: float
    height: int  # per modality, pixels
    width: int
    num_frames: int  # video frames of the cached RGB / XYZ latents
    cond_num_frames: int  # video frames the cached condition covers
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
        if raw.get("xyz_latent_mean") is None:
            raise CacheError(f"{path}: holds no XYZ latent statistics (a cache without clips?)")
        return CacheStats(
            xyz_latent_mean=float(raw["xyz_latent_mean"]),
            xyz_latent_std=float(raw["xyz_latent_std"]),
            height=int(raw["resolution_h"]),
            width=int(raw["resolution_w"]),
            num_frames=int(raw["num_frames"]),
            cond_num_frames=int(raw.get("cond_num_frames") or raw["num_frames"]),
            model_path=raw.get("model_path"),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, CacheError):
            raise
        raise CacheError(f"{path}: unreadable ({type(err).__name__}: {err})") from err



ConditionEncoder = Callable[[Path, int], torch.Tensor]  # (first frame png, num_frames) -> (16, T, h, 2w)


class LatentCache:
    """The clips of a cache as fused training samples of ``num_latent_frames`` latent frames.

    Construction checks the cache against the training settings (sizes, frame count) and reads the manifest;
    :meth:`sample` reads one clip and raises CacheError with the file's path if anything about it is wrong.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        num_latent_frames: int,
        height: int,
        width: int,
        condition_encoder: ConditionEncoder | None = None,
    ) -> None:
        self.root = Path(cache_dir)
        self.stats = read_stats(self.root)
        if (self.stats.height, self.stats.width) != (height, width):
            raise CacheError(
                f"{self.root / STATS_FILE}: the cache was built at {self.stats.height}x{self.stats.width} per modality,"
                f" training asks for {height}x{width}"
            )
        cached_latent_frames = latent_frames(self.stats.num_frames)
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
        self.condition_encoder = condition_encoder
        #: the cached condition is shorter than the training length: it is encoded from the first frame instead
        self.encodes_condition = latent_frames(self.stats.cond_num_frames) < num_latent_frames
        self.latent_shape = (num_latent_frames, height // 8, width // 8)  # per modality
        self.items = self._read_manifest()

    def _read_manifest(self) -> list[dict]:
        """The manifest's clips (id and the files training reads); a bad line is named."""
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            raise CacheError(f"{path}: missing (the list of cached clips)")
        items = []
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                missing = [key for key in ("latents", "clip", "prompt", "first_frame") if key not in item["files"]]
            except json.JSONDecodeError as err:
                raise CacheError(f"{path}:{line_no}: not JSON ({err})") from err
            except (KeyError, TypeError):
                raise CacheError(f"{path}:{line_no}: no 'files' object") from None
            if missing:
                raise CacheError(f"{path}:{line_no}: no {missing[0]!r} in 'files'")
            keep = ("latents", "clip", "prompt", "first_frame")  # a large manifest: hold only what is read
            items.append({"id": item.get("id", line_no), "files": {k: item["files"][k] for k in keep}})
        if not items:
            raise CacheError(f"{path}: lists no clips")
        return items

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, index: int) -> Sample:
        """Read clip ``index`` as a fused :class:`Sample` (float32)."""
        item = self.items[index]
        files = item["files"]
        latents_path = self.root / files["latents"]
        keys = ("rgb", "xyz") if self.encodes_condition else ("rgb", "xyz", "cond")
        latents = _load(latents_path, keys)
        frames, h, w = self.latent_shape
        if self.encodes_condition:
            if self.condition_encoder is None:
                raise CacheError(f"{latents_path}: the cached condition is shorter than training needs, no encoder")
            latents["cond"] = self.condition_encoder(self.root / files["first_frame"], video_frames(frames))
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
        prompt = _load(self.root / files["prompt"], ("prompt_embeds",))["prompt_embeds"].float()
        image = _load(self.root / files["clip"], ("clip_embeds",))["clip_embeds"].float()
        for name, tensor, path in (("prompt_embeds", prompt, files["prompt"]), ("clip_embeds", image, files["clip"])):
            if tensor.ndim != 2:
                raise CacheError(f"{self.root / path}: {name} has shape {tuple(tensor.shape)}, expected (tokens, dim)")
        if not (torch.isfinite(x0).all() and torch.isfinite(condition).all()):
            raise CacheError(f"{latents_path}: holds NaN or infinite values")
        return Sample(x0=x0, condition=condition, prompt_embeds=prompt, image_embeds=image, clip_id=str(item["id"]))



class VaeConditionEncoder:
    """Encodes a clip's condition from its cached first frame, as the cache builder does (for short caches)."""

    def __init__(self, vae, device: torch.device) -> None:
        self.vae = vae.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, first_frame: Path, num_frames: int) -> torch.Tensor:
        """``first_frame`` (an H x W RGB image) -> the VAE-normalized condition latent ``(16, T, h, 2w)`` on CPU."""
        import numpy as np
        from PIL import Image

        from fourdnex.model.fusion import condition_video, encode_latents

        if not first_frame.is_file():
            raise CacheError(f"{first_frame}: missing (needed to encode the condition)")
        with Image.open(first_frame) as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1.0
        video = condition_video(pixels[None], num_frames, "rgbxyz")  # (1, 3, F, H, 2W)
        return encode_latents(self.vae, video)[0].cpu()
