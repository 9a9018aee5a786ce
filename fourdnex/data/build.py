"""Building the training cache: find the clips, load the encoders once, read and prepare clips ahead in threads,
batch the VAE work, write through :mod:`fourdnex.data.cache` (where the layout is specified), merge the shards.

``build_wan_dataset.py`` is the command line.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fourdnex.config import check_video_shape
from fourdnex.data import cache
from fourdnex.data.prepare import CENTER_MODES, PreparedClip, prepare_clip
from fourdnex.data.sources import Captions, ClipError, ClipSource, find_clips, read_clip
from fourdnex.errors import UsageError
from fourdnex.model.fusion import condition_video, encode_latents
from fourdnex.model.loading import ENCODER_DTYPE, load_components

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BuildConfig:
    """Settings of one build run (the command-line flags)."""

    data_dir: str
    out: str
    model_path: str
    num_frames: int = 81
    cond_num_frames: int | None = None  # None: min(49, num_frames), the training length
    resolution_h: int = 480
    resolution_w: int = 720
    num_tasks: int = 1
    task_idx: int = 0
    limit: int | None = None
    device: str = "cpu"
    dtype: str = "auto"  # the text encoder's; "auto": bf16 on GPU, fp32 on CPU (VAE and CLIP: ENCODER_DTYPE)
    center: str = "clip"  # pointmap centring: one of prepare.CENTER_MODES
    batch_size: int = 1
    num_workers: int = 2
    retry_failed: bool = False

    def __post_init__(self) -> None:
        if self.cond_num_frames is None:
            self.cond_num_frames = min(49, self.num_frames)

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        check_video_shape(
            self.num_frames,
            cond_num_frames=self.cond_num_frames,
            resolution_h=self.resolution_h,
            resolution_w=self.resolution_w,
        )
        if self.num_tasks < 1 or not 0 <= self.task_idx < self.num_tasks:
            raise UsageError(f"task_idx must be in [0, num_tasks), got {self.task_idx} with num_tasks {self.num_tasks}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"limit must be positive, got {self.limit}")
        if self.batch_size < 1 or self.num_workers < 1:
            raise UsageError(f"batch_size and num_workers must be positive, got {self.batch_size}, {self.num_workers}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UsageError(f"dtype must be auto or one of {list(DTYPES)}, got {self.dtype!r}")
        if self.center not in CENTER_MODES:
            raise UsageError(f"center must be one of {list(CENTER_MODES)}, got {self.center!r}")

    @property
    def text_encoder_dtype(self) -> torch.dtype:
        """The UMT5 text encoder's dtype (the VAE and CLIP always run in ENCODER_DTYPE)."""
        if self.dtype == "auto":
            return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def cache_config(self) -> dict:
        """What a cache depends on (build_config.json, keys :data:`cache.BUILD_CONFIG_KEYS`); a cache built with
        other values is refused."""
        return {
            "model_path": self.model_path,
            "resolution_h": self.resolution_h,
            "resolution_w": self.resolution_w,
            "num_frames": self.num_frames,
            "cond_num_frames": self.cond_num_frames,
            "text_encoder_dtype": str(self.text_encoder_dtype).removeprefix("torch."),
            "encoder_dtype": str(ENCODER_DTYPE).removeprefix("torch."),
            "center": self.center,
            "clipping": self.center,
        }


class Encoders:
    """The frozen parts of a Wan2.1-I2V pipeline the cache needs: VAE, UMT5 text encoder, CLIP image encoder."""

    def __init__(self, pipe, device: str | torch.device):
        self.pipe = pipe.to(device)
        self.device = torch.device(device)
        self.vae = pipe.vae

    @classmethod
    def load(cls, model_path: str | Path, device: str, text_encoder_dtype: torch.dtype) -> Encoders:
        """Load every component but the transformer from a diffusers Wan2.1-I2V folder: the text encoder in
        ``text_encoder_dtype``, the VAE and image encoder in ENCODER_DTYPE (float32), as everywhere."""
        from diffusers import WanImageToVideoPipeline

        components = load_components(model_path, text_encoder_dtype, transformer=False)
        return cls(WanImageToVideoPipeline(**components), device)

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor) -> torch.Tensor:
        """``(B, 3, F, H, W)`` in [-1, 1] -> VAE-normalized posterior modes ``(B, 16, T, H/8, W/8)``."""
        return encode_latents(self.vae, videos)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """UMT5 embedding of ``prompt``, ``(512, D)``, zero after its tokens."""
        embeds, _ = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, max_sequence_length=512, device=self.device
        )
        return embeds[0]

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """CLIP embedding (penultimate hidden layer) of an ``(H, W, 3)`` uint8 image, ``(257, 1280)``."""
        from PIL import Image

        return self.pipe.encode_image(Image.fromarray(image), self.device)[0]


@dataclass
class BuildSummary:
    """What a run did; ``pending`` clips belong to shards that have not finished."""

    total: int
    assigned: int
    processed: int
    skipped: int
    failed_now: int
    done: int
    failed: int
    pending: int
    merged: bool
    ignored: list[str]
    seconds: float

    def line(self) -> str:
        """A one-line report for people."""
        rate = self.processed / self.seconds * 60.0 if self.seconds > 0 else 0.0
        text = (
            f"{self.done}/{self.total} clips done, {self.failed} failed, {self.pending} pending "
            f"(this run: {self.processed} encoded, {self.failed_now} failed, {self.skipped} skipped as already done; "
            f"{rate:.1f} clips/min)"
        )
        if self.ignored:
            text += f"; ignored {len(self.ignored)} entries that are not clips (e.g. {self.ignored[0]})"
        if self.failed:
            text += "; reasons in failures.jsonl" if self.merged else "; reasons in failures/"
        return text


def _to_video(frames: np.ndarray) -> torch.Tensor:
    """``(F, H, W, 3)`` uint8 -> ``(3, F, H, W)`` float in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def encode_batch(encoders: Encoders, clips: list[PreparedClip], cond_num_frames: int) -> list[dict[str, torch.Tensor]]:
    """Latents of a batch of clips: RGB and XYZ in one VAE call, each condition in another.

    Returns per clip ``rgb``/``xyz`` ``(16, T, h, w)``, ``cond`` ``(16, Tc, h, 2w)`` and ``cond_rgb``
    ``(16, Tc, h, w)``, VAE-normalized.
    """
    videos = []
    for clip in clips:
        videos += [_to_video(clip.rgb), torch.from_numpy(clip.pointmap).permute(3, 0, 1, 2)]
    latents = encoders.encode_videos(torch.stack(videos))  # (2B, 16, T, h, w): rgb, xyz, rgb, xyz, ...
    first = torch.stack([_to_video(clip.rgb[:1])[:, 0] for clip in clips])  # (B, 3, H, W)
    conds = encoders.encode_videos(condition_video(first, cond_num_frames, "rgbxyz"))  # (B, 16, Tc, h, 2w)
    conds_rgb = encoders.encode_videos(condition_video(first, cond_num_frames, "rgb"))  # (B, 16, Tc, h, w)
    return [
        {"rgb": latents[2 * i], "xyz": latents[2 * i + 1], "cond": conds[i], "cond_rgb": conds_rgb[i]}
        for i in range(len(clips))
    ]


def build(cfg: BuildConfig, encoders: Encoders | None = None, show_progress: bool = True) -> BuildSummary:
    """Run one shard of the cache build, then merge if every clip of the run is accounted for.

    ``encoders`` is loaded from ``cfg.model_path`` when not given (and only if there is work to do).
    """
    from tqdm import tqdm

    cfg.validate()
    start = time.perf_counter()
    out = Path(cfg.out)
    found = find_clips(cfg.data_dir, show_progress)
    clips = found.clips[: cfg.limit] if cfg.limit is not None else found.clips
    out.mkdir(parents=True, exist_ok=True)
    config = cfg.cache_config()
    cache.check_build_config(out, config)

    mine = clips[cfg.task_idx :: cfg.num_tasks]
    todo = [c for c in mine if not cache.is_done(out, c.id) and (cfg.retry_failed or not cache.has_failed(out, c.id))]
    captions = Captions(cfg.data_dir)

    def load(source: ClipSource) -> PreparedClip:
        raw = read_clip(source, captions)
        clip = prepare_clip(source, raw, cfg.num_frames, cfg.resolution_h, cfg.resolution_w, cfg.center)
        cache.write_clip_media(out, clip, cache.clip_files(source.id, clip.prompt))  # video encoding, off the GPU
        return clip

    processed = failed_now = 0
    bar = tqdm(total=len(todo), unit="clip", desc=f"shard {cfg.task_idx}/{cfg.num_tasks}", disable=not show_progress)
    if todo:
        if encoders is None:
            encoders = Encoders.load(cfg.model_path, cfg.device, cfg.text_encoder_dtype)
        seen_prompts: set[str] = set()
        with ThreadPoolExecutor(cfg.num_workers) as pool:
            queue: deque[tuple[ClipSource, Future]] = deque()
            pending_sources = iter(todo)
            batch: list[PreparedClip] = []

            def fill() -> None:
                for source in pending_sources:
                    queue.append((source, pool.submit(load, source)))
                    if len(queue) >= cfg.num_workers + cfg.batch_size:
                        break

            def flush() -> None:
                nonlocal processed, failed_now
                if not batch:
                    return
                for clip, latents in zip(batch, encode_batch(encoders, batch, cfg.cond_num_frames), strict=True):
                    try:
                        _write_clip(out, clip, latents, encoders, config, seen_prompts)
                        processed += 1
                    except ClipError as err:
                        cache.write_failure(out, clip.source, str(err))
                        failed_now += 1
                    bar.update()
                batch.clear()

            fill()
            while queue:
                source, future = queue.popleft()
                fill()
                try:
                    batch.append(future.result())
                except ClipError as err:
                    cache.write_failure(out, source, str(err))
                    failed_now += 1
                    bar.update()
                    continue
                if len(batch) == cfg.batch_size:
                    flush()
            flush()
    bar.close()

    result = cache.merge(out, clips, config, show_progress)
    return BuildSummary(
        total=len(clips),
        assigned=len(mine),
        processed=processed,
        skipped=len(mine) - len(todo),
        failed_now=failed_now,
        done=result.done,
        failed=result.failed,
        pending=result.pending,
        merged=result.written,
        ignored=found.ignored,
        seconds=time.perf_counter() - start,
    )


def merge_shards(
    data_dir: str | Path, out: str | Path, limit: int | None = None, show_progress: bool = True
) -> cache.MergeResult:
    """Combine the shards' records into the lists, manifest and statistics, with the cache's recorded config.

    Raises UsageError if the cache has no build_config.json or some clip has neither a record nor a failure.
    """
    config = cache.read_build_config(out)
    clips = find_clips(data_dir, show_progress).clips
    result = cache.merge(out, clips[:limit] if limit is not None else clips, config, show_progress)
    if not result.written:
        raise UsageError(f"{result.pending} clips have neither a record nor a failure yet (other shards running?)")
    return result


def _write_clip(
    out: Path,
    clip: PreparedClip,
    latents: dict[str, torch.Tensor],
    encoders: Encoders,
    config: dict,
    seen_prompts: set[str],
) -> None:
    """Write the latents and embeddings of a clip (its media are written by the reader), its record last.

    Raises ClipError (the clip becomes a failure) when a latent is not finite.
    """
    source = clip.source
    for key, value in latents.items():
        if not torch.isfinite(value).all():
            raise ClipError(f"{source.id}: the {key} latent is not finite")
    files = cache.clip_files(source.id, clip.prompt)
    cache.write_latents(out, files, latents, config)
    cache.write_clip_embeds(out, files, encoders.encode_image(clip.rgb[0]))
    if clip.prompt not in seen_prompts and not (out / files["prompt"]).is_file():
        cache.write_prompt_embeds(out, files, clip.prompt, encoders.encode_prompt(clip.prompt))
    seen_prompts.add(clip.prompt)
    cache.write_record(out, cache.clip_record(clip, files, latents, config))
