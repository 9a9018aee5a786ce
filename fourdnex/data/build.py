"""Building the training cache: find the clips, load the encoders once, read and prepare clips ahead in worker
processes, batch the VAE work, write through :mod:`fourdnex.data.cache` (where the layout is specified), merge the
shards.

Where the time goes (BENCHMARKS.md, "Dataset building", "Where the time goes, and the build now"): the Wan VAE,
then the CPU side of a clip (decoding its video, cropping, normalizing the pointmap, H.264-encoding the cropped video
and the pointmap preview), which reader threads did not hide behind the encoders on the GPU machine. The CPU side
runs in ``num_workers`` processes forked before the encoders load, each on one thread, so it shares no lock with the
encoders' loop; a worker writes the clip's media and hands the VAE's input to the main process in shared memory,
so the main process only encodes and writes the small files. The VAE encodes a batch's RGB and XYZ videos in one
call and its conditions in others (:func:`encode_batch`).

``build_wan_dataset.py`` is the command line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fourdnex.config import DEFAULT_MODEL_PATH, check_video_shape
from fourdnex.data import cache
from fourdnex.data.prepare import CENTER_MODES, PreparedClip, prepare_clip
from fourdnex.data.sources import Captions, ClipError, ClipSource, find_clips, read_clip
from fourdnex.errors import UsageError
from fourdnex.files import write_text
from fourdnex.model.fusion import condition_video, encode_image_conditions, encode_latents, video_pixels
from fourdnex.model.loading import ENCODER_DTYPE, TEXT_TOKENS, channels_last_convolutions, load_components
from fourdnex.runtime import DTYPES, device_of, dtype_of, worker_processes

#: ``--encoder_dtype`` choices: the VAE's and CLIP's dtype. float32 (the default) is the dtype inference decodes and
#: training encodes conditions in, so the cache holds the latents they compute; bfloat16 moves the latents by 0.3-0.4 %
#: of their spread (RMS, BENCHMARKS.md "Encoder precision") for a faster VAE on a GPU.
ENCODER_DTYPES = {"float32": ENCODER_DTYPE, "bfloat16": torch.bfloat16}


@dataclass
class BuildConfig:
    """Settings of one build run (the command-line flags)."""

    data_dir: str
    out: str
    model_path: str = DEFAULT_MODEL_PATH
    num_frames: int = 81
    cond_num_frames: int | None = None  # None: min(49, num_frames), the training length
    resolution_h: int = 480
    resolution_w: int = 720
    num_tasks: int = 1
    task_idx: int = 0
    limit: int | None = None
    device: str = "auto"  # a fourdnex.runtime.device_of name
    dtype: str = "auto"  # the text encoder's: a fourdnex.runtime.DTYPES name, or auto (bfloat16 on GPU, else float32)
    encoder_dtype: str = "float32"  # the VAE's and CLIP's: an ENCODER_DTYPES key
    center: str = "clip"  # pointmap centring: one of prepare.CENTER_MODES
    batch_size: int = 1  # clips per VAE call
    num_workers: int = 2  # processes that read, prepare and write media ahead of the encoders; 0: in this process
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
        if self.batch_size < 1 or self.num_workers < 0:
            raise UsageError(
                f"batch_size must be positive and num_workers at least 0, got {self.batch_size}, {self.num_workers}"
            )
        device_of(self.device)  # a UsageError for a device this machine lacks
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UsageError(f"dtype must be auto or one of {list(DTYPES)}, got {self.dtype!r}")
        if self.encoder_dtype not in ENCODER_DTYPES:
            raise UsageError(f"encoder_dtype must be one of {list(ENCODER_DTYPES)}, got {self.encoder_dtype!r}")
        if self.center not in CENTER_MODES:
            raise UsageError(f"center must be one of {list(CENTER_MODES)}, got {self.center!r}")

    @property
    def text_encoder_dtype(self) -> torch.dtype:
        """The UMT5 text encoder's dtype."""
        return dtype_of(self.dtype, device_of(self.device))

    @property
    def vision_dtype(self) -> torch.dtype:
        """The VAE's and CLIP's dtype."""
        return ENCODER_DTYPES[self.encoder_dtype]

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
            "encoder_dtype": str(self.vision_dtype).removeprefix("torch."),
            "center": self.center,
            "clipping": self.center,
        }


class Encoders:
    """The frozen parts of a Wan2.1-I2V pipeline the cache needs: VAE, UMT5 text encoder, CLIP image encoder."""

    def __init__(self, pipe, device: str | torch.device):
        self.pipe = pipe.to(device)
        self.device = torch.device(device)
        self.vae = pipe.vae
        if self.device.type == "cuda":
            # cuDNN's fastest algorithm for the build's few shapes, timed at their first call, on channels-last 3D
            # weights: the VAE's work 1.27x faster in bfloat16 on an H100 (BENCHMARKS.md, "Dataset building").
            # Set before the first call: the timing is kept per shape.
            torch.backends.cudnn.benchmark = True
            channels_last_convolutions(self.vae)

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        device: str,
        text_encoder_dtype: torch.dtype,
        vision_dtype: torch.dtype = ENCODER_DTYPE,
    ) -> Encoders:
        """Load every component but the transformer from a diffusers Wan2.1-I2V folder: the text encoder in
        ``text_encoder_dtype``, the VAE and image encoder in ``vision_dtype`` (float32 as everywhere, by default)."""
        from diffusers import WanImageToVideoPipeline

        components = load_components(model_path, text_encoder_dtype, transformer=False, encoder_dtype=vision_dtype)
        return cls(WanImageToVideoPipeline(**components), device)

    @torch.no_grad()
    def encode_videos(self, videos: list[torch.Tensor]) -> torch.Tensor:
        """Videos ``(B_i, 3, F, H, W)`` in [-1, 1], joined on the device into one batch -> VAE-normalized posterior
        modes ``(sum B_i, 16, T, H/8, W/8)``."""
        return encode_latents(self.vae, torch.cat([video.to(self.device) for video in videos]))

    @torch.no_grad()
    def encode_condition(self, first: torch.Tensor, num_frames: int, modalities: str) -> torch.Tensor:
        """The latents of the conditions of first frames ``(B, 3, H, W)`` in [-1, 1] (:func:`condition_video`),
        ``(B, 16, T, h, w)``, as :meth:`encode_videos` gives them; where it spends fewer FLOPs, computing only what
        depends on the first frame (:func:`fourdnex.model.fusion.encode_image_conditions`)."""
        video = condition_video(first.to(self.device, self.vae.dtype), num_frames, modalities)
        return encode_image_conditions(self.vae, video)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 embeddings of ``prompts`` in one call, ``(B, 512, D)``, each zero after its tokens."""
        embeds, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS, device=self.device
        )
        return embeds

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """UMT5 embedding of ``prompt``, ``(512, D)``, zero after its tokens."""
        return self.encode_prompts([prompt])[0]

    @torch.no_grad()
    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """CLIP embeddings (penultimate hidden layer) of ``(H, W, 3)`` uint8 images in one call, ``(B, 257, 1280)``
        float32."""
        from PIL import Image

        return self.pipe.encode_image([Image.fromarray(image) for image in images], self.device).float()

    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """CLIP embedding of one image, ``(257, 1280)`` float32 (:meth:`encode_images`)."""
        return self.encode_images([image])[0]


@dataclass
class BuildSummary:
    """What a run did; ``pending`` clips belong to shards that have not finished."""

    total: int
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


def merge_stats(records: list[dict], config: dict) -> dict:
    """Dataset statistics of the xyz latents from the clips' sums (population mean and std), with the build config
    (keys: :data:`fourdnex.data.cache.STATS_KEYS`)."""
    note = "over every element of the cached xyz latents, after the VAE's own normalization"
    if not records:
        empty = dict.fromkeys(
            ("xyz_latent_mean", "xyz_latent_std", "xyz_latent_channel_mean", "xyz_latent_channel_std")
        )
        return {**empty, "count": 0, "num_clips": 0, "note": note, **config}
    count = sum(r["xyz_latent_sums"]["count"] for r in records)
    total = math.fsum(r["xyz_latent_sums"]["sum"] for r in records)
    total_sq = math.fsum(r["xyz_latent_sums"]["sumsq"] for r in records)
    mean = total / count
    ch_count = sum(r["xyz_latent_sums"]["channel_count"] for r in records)
    ch_sum = np.sum([r["xyz_latent_sums"]["channel_sum"] for r in records], 0)
    ch_sumsq = np.sum([r["xyz_latent_sums"]["channel_sumsq"] for r in records], 0)
    ch_mean = ch_sum / ch_count
    return {
        "xyz_latent_mean": mean,
        "xyz_latent_std": math.sqrt(max(total_sq / count - mean * mean, 0.0)),
        "xyz_latent_channel_mean": ch_mean.tolist(),
        "xyz_latent_channel_std": np.sqrt(np.maximum(ch_sumsq / ch_count - ch_mean**2, 0.0)).tolist(),
        "count": count,
        "num_clips": len(records),
        "note": note,
        **config,
    }


@dataclass
class MergeResult:
    """What a merge found: clips done, failed and not yet processed (by any shard)."""

    done: int
    failed: int
    pending: int
    written: bool


def merge(out: str | Path, clips: list[ClipSource], config: dict, show_progress: bool = False) -> MergeResult:
    """Write manifest.jsonl, prompts.txt, videos.txt, failures.jsonl and stats.json once no clip is pending."""
    from tqdm import tqdm

    out = Path(out)
    records, failures, pending = [], [], 0
    for clip in tqdm(clips, desc="merging", unit="clip", disable=not show_progress):
        record_path, failure_path = cache.record_path(out, clip.id), cache.failure_path(out, clip.id)
        if record_path.is_file():
            records.append(json.loads(record_path.read_text()))
        elif failure_path.is_file():
            failures.append(json.loads(failure_path.read_text()))
        else:
            pending += 1
    if pending:
        return MergeResult(len(records), len(failures), pending, False)
    lines = {
        cache.MANIFEST_FILE: [json.dumps(r, sort_keys=True) for r in records],
        cache.PROMPTS_FILE: [r["caption"] for r in records],
        cache.VIDEOS_FILE: [r["files"]["video"] for r in records],
        cache.FAILURES_FILE: [json.dumps(f, sort_keys=True) for f in failures],
    }
    texts = {name: "".join(line + "\n" for line in content) for name, content in lines.items()}
    texts[cache.STATS_FILE] = json.dumps(merge_stats(records, config), indent=2) + "\n"
    for name, text in texts.items():
        path = out / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:  # a re-run with nothing new touches nothing
            write_text(path, text)
    return MergeResult(len(records), len(failures), 0, True)


def _to_video(frames: np.ndarray) -> torch.Tensor:
    """``(F, H, W, 3)`` uint8 -> ``(3, F, H, W)`` float in [-1, 1]."""
    return video_pixels(torch.from_numpy(frames))


@dataclass
class LoadedClip:
    """A prepared clip as the encoders take it, its media written: the clip itself with its RGB cut to the first frame
    and its pointmap dropped (the files hold them), and the VAE's input, its RGB and XYZ videos ``(2, 3, F, H, W)``
    float32 in [-1, 1] (in shared memory when a worker process made it)."""

    clip: PreparedClip
    videos: torch.Tensor


def load_clip(cfg: BuildConfig, captions: Captions, out: Path, source: ClipSource, shared: bool) -> LoadedClip:
    """Read, prepare and write the media of one clip (ClipError where it cannot be used); ``shared``: its videos in
    shared memory, for a worker process to hand them over without a copy."""
    raw = read_clip(source, captions)
    clip = prepare_clip(source, raw, cfg.num_frames, cfg.resolution_h, cfg.resolution_w, cfg.center)
    cache.write_clip_media(out, clip, cache.clip_files(source.id, clip.prompt))
    return loaded_clip(clip, shared)


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, remedy: str = "") -> torch.Tensor:
    """An empty tensor in shared memory, which a worker process hands to the main process without a copy; where
    there is no room, a UsageError saying so (and ``remedy``, another way out)."""
    tensor = torch.empty(shape, dtype=dtype)
    try:
        return tensor.share_memory_()
    except RuntimeError as err:
        raise UsageError(
            f"cannot hand a clip to the encoders in shared memory ({err}): give /dev/shm more room{remedy}"
        ) from err


def loaded_clip(clip: PreparedClip, shared: bool, remedy: str = " or build with --num_workers 0") -> LoadedClip:
    """A prepared clip as the encoders take it (``shared``: its videos in shared memory; :func:`shared_tensor`)."""
    shape = (2, 3, *clip.rgb.shape[:3])
    videos = shared_tensor(shape, remedy=remedy) if shared else torch.empty(shape)
    videos[0] = _to_video(clip.rgb)
    videos[1] = torch.from_numpy(clip.pointmap).permute(3, 0, 1, 2)
    return LoadedClip(dataclasses.replace(clip, rgb=clip.rgb[:1], pointmap=clip.pointmap[:0]), videos)


#: What a worker process needs besides its clip: the settings, the captions and the cache folder (set once per worker).
_WORKER_STATE: tuple[BuildConfig, Captions, Path] | None = None


def _start_worker(cfg: BuildConfig, captions: Captions, out: Path) -> None:
    """A worker process keeps what every clip it loads needs."""
    global _WORKER_STATE
    _WORKER_STATE = (cfg, captions, out)


def _load_in_worker(source: ClipSource) -> LoadedClip:
    return load_clip(*_WORKER_STATE, source, shared=True)


class InProcess(Executor):
    """``num_workers=0``: each task runs in the calling process when it is submitted."""

    def submit(self, fn, /, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # raised again by future.result(), where a worker's exception would be
            future.set_exception(err)
        return future


def encode_batch(encoders: Encoders, loaded: list[LoadedClip], cond_num_frames: int) -> list[dict[str, torch.Tensor]]:
    """Latents of a batch of clips: the RGB and XYZ videos in one VAE call, the fused and the RGB conditions each in
    one call (:meth:`Encoders.encode_condition`: at the real size only what depends on their first frame, 0.77 of a
    clip's VAE FLOPs; BENCHMARKS.md, "Where the time goes, and the build now").

    Returns per clip ``rgb``/``xyz`` ``(16, T, h, w)``, ``cond`` ``(16, Tc, h, 2w)`` and ``cond_rgb``
    ``(16, Tc, h, w)``, VAE-normalized float32.
    """
    first = torch.stack([item.videos[0, :, 0] for item in loaded])  # (B, 3, H, W): frame 0 of each RGB video
    latents = encoders.encode_videos([item.videos for item in loaded])  # (2B, 16, T, h, w): rgb, xyz, rgb, xyz, ...
    conds = encoders.encode_condition(first, cond_num_frames, "rgbxyz")  # (B, 16, Tc, h, 2w)
    conds_rgb = encoders.encode_condition(first, cond_num_frames, "rgb")  # (B, 16, Tc, h, w)
    return [
        {"rgb": latents[2 * i], "xyz": latents[2 * i + 1], "cond": conds[i], "cond_rgb": conds_rgb[i]}
        for i in range(len(loaded))
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

    processed = failed_now = 0
    bar = tqdm(total=len(todo), unit="clip", desc=f"shard {cfg.task_idx}/{cfg.num_tasks}", disable=not show_progress)
    if todo:
        # where clips load: worker processes forked from this one (at the first submit, before the encoders load
        # where they are not given; each on one thread, the cores being the encoders' and the other workers'), or
        # this process
        with worker_processes(cfg.num_workers, _start_worker, (cfg, captions, out)) as workers:
            pool = workers or InProcess()
            load = _load_in_worker if workers else functools.partial(load_clip, cfg, captions, out, shared=False)
            queue: deque[tuple[ClipSource, Future]] = deque()
            pending_sources = iter(todo)
            batch: list[LoadedClip] = []
            seen_prompts: set[str] = set()

            def fill() -> None:
                for source in pending_sources:
                    queue.append((source, pool.submit(load, source)))
                    if len(queue) >= max(cfg.num_workers, 1) + cfg.batch_size:
                        break

            def flush() -> None:
                nonlocal processed, failed_now
                if not batch:
                    return
                for item, latents in zip(batch, encode_batch(encoders, batch, cfg.cond_num_frames), strict=True):
                    try:
                        _write_cache_clip(out, item.clip, latents, encoders, config, seen_prompts)
                        processed += 1
                    except ClipError as err:
                        cache.write_failure(out, item.clip.source, str(err))
                        failed_now += 1
                    bar.update()
                batch.clear()

            fill()  # the workers fork here, before the encoders take memory (and CUDA) in this process
            if encoders is None:
                encoders = Encoders.load(
                    cfg.model_path, device_of(cfg.device), cfg.text_encoder_dtype, cfg.vision_dtype
                )
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

    result = merge(out, clips, config, show_progress)
    return BuildSummary(
        total=len(clips),
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
) -> MergeResult:
    """Combine the shards' records into the lists, manifest and statistics, with the cache's recorded config.

    Raises UsageError if the cache has no build_config.json or some clip has neither a record nor a failure.
    """
    config = cache.read_build_config(out)
    clips = find_clips(data_dir, show_progress).clips
    result = merge(out, clips[:limit] if limit is not None else clips, config, show_progress)
    if not result.written:
        raise UsageError(f"{result.pending} clips have neither a record nor a failure yet (other shards running?)")
    return result


def _write_cache_clip(
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
