"""What a fine-tuning run trains on: the samples each optimizer step draws, and its micro-batches, read from the
cache's files or from the cache held on the training device.

Randomness is a function of (seed, optimizer step): step ``n`` draws its whole global batch (``train_batch_size x
processes x gradient_accumulation_steps`` samples) from generators seeded with ``(seed, n)``, and each process takes
its rows of it. A resumed run, or the same global batch split over another number of processes, therefore sees
exactly the same clips, noise levels, given frames and noise. Clips are visited in a fresh permutation every epoch.
A run that trains while its clips are still being made (``--synthetic_clips_per_step``) draws the clips of its first
steps uniformly from those its schedule says are made by then (:meth:`SampleStream.available`), so its draws too are a
function of (seed, step), whenever the clips come.
The noise is drawn on the training device (one call per step), so a run on a CPU and one on a GPU see different noise.

Two ways to read the samples, one result: :func:`read_batch` reads the files of each sample (threads; any cache size);
:class:`HeldCache` reads every file once into stacked tensors on the training device (``--cache_in_memory``), after
which a micro-batch is a few gathers with no host work; a test holds the two equal.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fourdnex import files
from fourdnex.config import video_frames
from fourdnex.data.cache import CachedSample, LatentCache, read_cached_frames
from fourdnex.model.fusion import condition_frames, condition_mask, encode_latents, mode_latents, video_pixels
from fourdnex.model.loading import channels_last_convolutions
from fourdnex.model.whole_clip import encode_moments, runs_whole_clip, whole_clip_vae
from fourdnex.runtime import worker_processes
from fourdnex.train.config import TrainConfig, TrainingError
from fourdnex.train.loss import Batch, sample_sigmas

#: Threads reading the samples of a batch (file reads release the GIL; decoding a video holds it for much of the
#: clip, so for held videos they stop at 1.6-2.7x one reader: BENCHMARKS.md, "Reading videos").
READ_THREADS = 8
#: Worker processes decoding the videos :class:`HeldCache` holds where their frames are small (fewer pixels than
#: :data:`fourdnex.files.THREADED_DECODE_PIXELS`): on 16 CPUs 8 processes decoded the demo's 96 x 144 clips at 100
#: clips/s against 52 for 8 threads, and 480 x 720 ones at 5 against 19, their frames' way back costing more than
#: the lock (BENCHMARKS.md, "Reading videos"); larger frames are decoded in :data:`READ_THREADS` threads.
DECODE_PROCESSES = 8
#: Clips whose held conditions one VAE call encodes.
PATTERN_BATCH = 32


def _first_and_last(num_frames: int) -> torch.Tensor:
    given = torch.zeros(num_frames, dtype=torch.bool)
    given[[0, -1]] = True
    return given


#: The given-frame patterns whose conditions :class:`HeldCache` holds per clip: ``(F,)`` bool of a frame count.
HELD_PATTERNS = {"first_last": _first_and_last, "video": lambda num_frames: torch.ones(num_frames, dtype=torch.bool)}


def pattern_rows(given: torch.Tensor, name: str) -> torch.Tensor:
    """``(B,)`` bool: the rows of ``given`` ``(B, F)`` that are pattern ``name`` of :data:`HELD_PATTERNS`."""
    return (given == HELD_PATTERNS[name](given.shape[1])).all(dim=1)


def step_seed(seed: int, step: int) -> int:
    """The seed of every generator of optimizer step ``step`` of a run seeded with ``seed``."""
    return (seed << 40) + step


@dataclass
class Draws:
    """The random choices of ``G`` samples: which clip, which RGB frames are given, which noise level."""

    clips: torch.Tensor  # (G,) int64 clip indices
    given: torch.Tensor  # (G, F) bool: the given RGB pixel frames (frame 0 always)
    sigmas: torch.Tensor  # (G,) float32 noise levels in (0, 1)

    def rows(self, start: int, stop: int) -> Draws:
        """The draws of samples ``start .. stop - 1``."""
        return Draws(self.clips[start:stop], self.given[start:stop], self.sigmas[start:stop])

    def to(self, device: torch.device) -> Draws:
        """The draws on ``device`` (see :func:`to_device`)."""
        return Draws(*(to_device(t, device) for t in (self.clips, self.given, self.sigmas)))

    @property
    def image_only(self) -> bool:
        """Whether every sample is given frame 0 alone (image-to-4D)."""
        return not bool(self.given[:, 1:].any())


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU through page-locked memory, so that the copy does not wait for the work
    queued on the device (a copy from pageable memory waits for it)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def draw_given(tasks: dict[str, float], num_frames: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """The given RGB pixel frames ``(count, F)`` bool of ``count`` samples: a task per sample drawn with the shares
    ``tasks`` (nothing is drawn when there is one task), then its frames: ``image`` frame 0; ``first_last`` frames 0
    and F-1; ``keyframes`` frame 0 and 2-4 other random frames; ``video`` every frame."""
    names = list(tasks)
    given = torch.zeros(count, num_frames, dtype=torch.bool)
    given[:, 0] = True
    if len(names) == 1 and names[0] == "image":
        return given
    shares = torch.tensor(list(tasks.values()), dtype=torch.float64)
    task = torch.multinomial(shares, count, replacement=True, generator=generator)  # (count,)
    is_task = {name: task == i for i, name in enumerate(names)}
    extra = torch.randint(2, 5, (count,), generator=generator).clamp(max=num_frames - 1)  # keyframes besides frame 0
    rank = torch.rand(count, num_frames - 1, generator=generator).argsort(dim=1).argsort(dim=1)  # a random order
    keyframes = torch.cat([torch.ones(count, 1, dtype=torch.bool), rank < extra[:, None]], dim=1)
    last = torch.zeros(num_frames, dtype=torch.bool)
    last[-1] = True
    if "first_last" in is_task:
        given |= is_task["first_last"][:, None] & last
    if "keyframes" in is_task:
        given |= is_task["keyframes"][:, None] & keyframes
    if "video" in is_task:
        given |= is_task["video"][:, None]
    return given


class SampleStream:
    """The draws of every optimizer step of a run: see the module docstring."""

    def __init__(self, cfg: TrainConfig, num_clips: int, world: int, first_clips: int | None = None) -> None:
        from fourdnex.train.config import CONDITION_TASKS

        self.cfg = cfg
        self.num_clips = num_clips
        #: the clips held before the first step (None: all of them)
        self.first_clips = num_clips if first_clips is None else first_clips
        self.tasks = CONDITION_TASKS[cfg.condition_tasks]
        self.world = world
        #: samples per optimizer step over all processes and micro-steps
        self.global_batch = cfg.train_batch_size * world * cfg.gradient_accumulation_steps

    @functools.lru_cache(maxsize=8)  # noqa: B019 - one stream per run, whose steps visit the epochs in order
    def order(self, epoch: int) -> torch.Tensor:
        """The clips in the order epoch ``epoch`` visits them, ``(num_clips,)`` int64."""
        return torch.randperm(self.num_clips, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))

    def available(self, step: int) -> int:
        """How many clips, the first ones, step ``step`` draws from: every clip, or in a run that trains while its
        clips are made (``synthetic_clips_per_step`` R), the first ``first_clips`` and R more a step."""
        per_step = self.cfg.synthetic_clips_per_step
        if not per_step:
            return self.num_clips
        return min(self.num_clips, self.first_clips + math.floor(per_step * step))

    def draws(self, step: int) -> Draws:
        """The draws of the global batch of optimizer step ``step`` (CPU tensors)."""
        generator = torch.Generator().manual_seed(step_seed(self.cfg.seed, step))
        sigmas = sample_sigmas(self.global_batch, self.cfg.timestep_sampling, generator, self.cfg.shift)
        given = draw_given(self.tasks, self.cfg.num_frames, self.global_batch, generator)
        available = self.available(step)
        if available < self.num_clips:  # the clips made so far, each row uniformly
            return Draws(torch.randint(available, (self.global_batch,), generator=generator), given, sigmas)
        positions = step * self.global_batch + torch.arange(self.global_batch)
        epochs, offsets = positions // self.num_clips, positions % self.num_clips
        clips = torch.empty(self.global_batch, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            here = epochs == epoch
            clips[here] = self.order(epoch)[offsets[here]]
        return Draws(clips, given, sigmas)

    def rows(self, micro: int, rank: int) -> tuple[int, int]:
        """The rows of the global batch that process ``rank`` trains on in micro-step ``micro``: consecutive blocks
        of ``train_batch_size``, micro-step by micro-step, process by process."""
        first = (micro * self.world + rank) * self.cfg.train_batch_size
        return first, first + self.cfg.train_batch_size

    def noise(self, step: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The noise of the global batch of step ``step``, ``(G, *shape)`` float32 on ``device``."""
        generator = torch.Generator(device).manual_seed(step_seed(self.cfg.seed, step))
        return torch.randn((self.global_batch, *shape), generator=generator, device=device)


class VaeConditionEncoder:
    """Encodes condition videos with the VAE on the training device, a batch at a time: on a GPU each layer once over
    the whole clip on channels-last convolutions (:func:`fourdnex.model.whole_clip.runs_whole_clip`; the latents of
    diffusers' chunks to rounding, 1.35-1.40x as fast on an H100: BENCHMARKS.md, "Each layer over the whole clip"), on a
    CPU in diffusers' chunks (:func:`fourdnex.model.fusion.encode_latents`)."""

    def __init__(self, vae, device: torch.device) -> None:
        self.vae = vae.to(device).eval()
        self.device = device
        self.whole_clip = runs_whole_clip(device)
        if self.whole_clip:
            whole_clip_vae(channels_last_convolutions(self.vae))

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        """``(B, 3, F, H, W')`` in [-1, 1] -> the VAE-normalized condition latents ``(B, 16, T, h, w')`` on the
        training device."""
        if not self.whole_clip:
            return encode_latents(self.vae, videos.to(self.device))
        videos = videos.to(self.device, self.vae.dtype).contiguous(memory_format=torch.channels_last_3d)
        return mode_latents(self.vae, encode_moments(self.vae, videos))


def read_batch(cache: LatentCache, draws: Draws) -> list[CachedSample]:
    """The samples of ``draws`` read from the cache's files (threads), in order."""
    with ThreadPoolExecutor(min(READ_THREADS, len(draws.clips))) as pool:
        return list(pool.map(cache.sample, draws.clips.tolist(), draws.given))


def batch_of_samples(
    samples: list[CachedSample], draws: Draws, noise: torch.Tensor, encoder: VaeConditionEncoder | None, device
) -> Batch:
    """A micro-batch on ``device`` from samples read by :func:`read_batch`, their draws and their noise."""
    pending = [i for i, s in enumerate(samples) if s.cond is None]
    conds = [to_device(s.cond, device) if s.cond is not None else None for s in samples]
    if pending:
        if encoder is None:
            raise TrainingError("these samples' conditions are not in the cache and no VAE encodes them")
        encoded = encoder(torch.stack([samples[i].cond_video for i in pending]))  # (P, 16, T, h, w')
        for i, cond in zip(pending, encoded, strict=True):
            conds[i] = cond
    return Batch(
        x0=to_device(torch.stack([s.x0 for s in samples]), device),
        condition=torch.cat([to_device(torch.stack([s.mask for s in samples]), device), torch.stack(conds)], dim=1),
        prompt_embeds=to_device(torch.stack([s.prompt_embeds for s in samples]), device),
        image_embeds=to_device(torch.stack([s.image_embeds for s in samples]), device),
        noise=noise,
        sigmas=to_device(draws.sigmas, device),
    )


#: The share of a GPU's free memory a held cache may take; a larger one is held in host memory and gathered there.
HOLD_SHARE = 0.5


def holding_device(device: torch.device, nbytes: int) -> torch.device:
    """Where a held cache of ``nbytes`` goes: ``device``, or the CPU where it would take more than
    :data:`HOLD_SHARE` of a GPU's free memory."""
    if device.type == "cuda" and nbytes > HOLD_SHARE * torch.cuda.mem_get_info(device)[0]:
        return torch.device("cpu")
    return device


@contextlib.contextmanager
def cached_videos(cache: LatentCache) -> Iterator[Iterator[np.ndarray]]:
    """Every clip's cached video ``(F, H, W, 3)`` uint8 (its first ``video_frames(num_latent_frames)`` frames), in
    clip order, decoded ahead of the reader: in :data:`DECODE_PROCESSES` worker processes for small frames, else in
    :data:`READ_THREADS` threads."""
    paths = [cache.video_path(i) for i in range(len(cache))]
    indices = [list(range(video_frames(cache.num_latent_frames)))] * len(paths)
    small = cache.stats.height * cache.stats.width < files.THREADED_DECODE_PIXELS
    with worker_processes(DECODE_PROCESSES if small else 0) as processes:
        if processes is not None:
            yield processes.map(read_cached_frames, paths, indices, chunksize=16)
            return
        with ThreadPoolExecutor(READ_THREADS) as threads:
            yield threads.map(read_cached_frames, paths, indices)


class HeldCache:
    """Every sample of a training set as stacked tensors on one device, so that a micro-batch is a few gathers:
    exactly what :func:`read_batch` and :func:`batch_of_samples` give for the same draws.

    Holds the clean latents ``x0 (N, 16, T, h, w')``, the CLIP embeddings ``image (N, 257, D)``, each distinct prompt
    embedding once ``prompts (P, L, D)`` with ``prompt_of (N,)``, and the image condition ``cond (N, 16, T, h, w')``
    where the set holds it (else the first frames ``first (N, 1, H, W, 3)`` uint8 it is encoded from). For runs that
    give other frames than the first, also every clip's video ``frames (N, F, H, W, 3)`` uint8, the frames those
    conditions are encoded from; given an ``encoder`` too, the conditions of the given-frame patterns that do not vary
    from draw to draw (:data:`HELD_PATTERNS`: the first and last frames, every frame) are encoded once per clip and
    held (``patterns``), so that a step encodes only the samples given random key frames.

    :meth:`read` holds a cache's files; :mod:`fourdnex.train.rendered` holds the synthetic generator's clips encoded
    in memory, and where a run trains while they are made, fills the rows as they come (:meth:`add_prompts` and
    :meth:`encode_patterns` hold their prompts and conditions).
    """

    def __init__(
        self, x0: torch.Tensor, image: torch.Tensor, prompts: torch.Tensor, prompt_of: torch.Tensor, modalities: str,
        cond: torch.Tensor | None = None, first: torch.Tensor | None = None, frames: torch.Tensor | None = None,
        encoder: VaeConditionEncoder | None = None,
    ) -> None:  # fmt: skip
        if (cond is None) == (first is None):
            raise ValueError("a held set holds either the image conditions or the first frames they are encoded from")
        self.device = x0.device
        self.modalities = modalities
        self.x0, self.image, self.cond, self.first, self.frames = x0, image, cond, first, frames
        self.prompts = prompts.to(self.device)
        self.prompt_of = prompt_of.to(self.device)
        self.patterns: dict[str, torch.Tensor] = {}
        if frames is not None and encoder is not None:
            self.encode_patterns(0, len(x0), encoder)

    @classmethod
    def read(
        cls, cache: LatentCache, device: torch.device, frames: bool = False, encoder: VaeConditionEncoder | None = None
    ) -> HeldCache:
        """Every sample of ``cache`` read once from its files (``frames``: the clips' videos too), held on ``device``
        (or in host memory where :func:`holding_device` says so)."""
        from tqdm.auto import tqdm

        first = torch.zeros(video_frames(cache.num_latent_frames), dtype=torch.bool)
        first[0] = True
        prompts: dict[str, int] = {}
        prompt_rows: list[torch.Tensor] = []
        prompt_of = torch.empty(len(cache), dtype=torch.long)
        held: dict[str, torch.Tensor] = {}

        def read(index: int) -> dict[str, torch.Tensor]:
            sample = cache.sample(index, first)
            row = {"x0": sample.x0, "image": sample.image_embeds, "prompt": sample.prompt_embeds}
            if sample.cond is not None:
                row["cond"] = sample.cond
            else:
                row["first"] = torch.from_numpy(cache.first_frame(index))
            return row

        videos_read = cached_videos(cache) if frames else contextlib.nullcontext()  # videos only where held
        with ThreadPoolExecutor(READ_THREADS) as pool, videos_read as videos:
            rows = pool.map(read, range(len(cache)))
            for i, row in enumerate(tqdm(rows, total=len(cache), desc="cache into memory", unit="clip")):
                if frames:
                    row["frames"] = torch.from_numpy(next(videos))
                key = cache.items[i]["files"]["prompt"]
                if key not in prompts:
                    prompts[key] = len(prompt_rows)
                    prompt_rows.append(row["prompt"])
                prompt_of[i] = prompts[key]
                del row["prompt"]
                if i == 0:  # the first clip fixes the shapes and the place
                    per_clip = sum(t.numel() * t.element_size() for t in row.values())
                    device = holding_device(device, per_clip * len(cache))
                    for name, tensor in row.items():
                        held[name] = torch.empty((len(cache), *tensor.shape), dtype=tensor.dtype, device=device)
                for name, tensor in row.items():
                    held[name][i] = tensor
        return cls(
            held["x0"], held["image"], torch.stack(prompt_rows), prompt_of, cache.modalities, held.get("cond"),
            held.get("first"), held.get("frames"), encoder,
        )  # fmt: skip

    def encode_patterns(self, start: int, stop: int, encoder: VaeConditionEncoder) -> None:
        """Encode and hold the condition latents of clips ``start .. stop - 1`` given the frames of each pattern of
        :data:`HELD_PATTERNS`, from their held videos."""
        from tqdm.auto import tqdm

        count, num_frames = self.frames.shape[:2]
        for name, pattern in HELD_PATTERNS.items():
            given = pattern(num_frames).to(self.device)
            batches = range(start, stop, PATTERN_BATCH)
            for first in tqdm(batches, desc=f"conditions ({name})", unit="batch", disable=len(batches) < 2):
                pixels = video_pixels(self.frames[first : min(first + PATTERN_BATCH, stop)])
                latents = encoder(condition_frames(pixels, given.expand(len(pixels), -1), self.modalities))
                if name not in self.patterns:
                    self.patterns[name] = latents.new_empty((count, *latents.shape[1:]))
                self.patterns[name][first : first + len(latents)] = latents

    def add_prompts(self, rows: torch.Tensor) -> None:
        """Hold more distinct prompt embeddings ``(P', L, D)``, after those held (``prompt_of`` indexes them all)."""
        self.prompts = torch.cat([self.prompts, rows.to(self.device, self.prompts.dtype)])

    @property
    def nbytes(self) -> int:
        """Bytes the held tensors take on the device."""
        held = (self.x0, self.image, self.cond, self.first, self.frames, self.prompts, self.prompt_of)
        return sum(t.numel() * t.element_size() for t in (*held, *self.patterns.values()) if t is not None)

    def batch(self, draws: Draws, noise: torch.Tensor, encoder: VaeConditionEncoder | None) -> Batch:
        """The micro-batch of ``draws`` (on the CPU) with ``noise`` ``(B, 16, T, h, w')``, on the held device."""
        on_device = draws.to(self.device)
        clips = on_device.clips
        h, w = self.x0.shape[-2:]
        mask = condition_mask(on_device.given, h, w, self.modalities)  # (B, 4, T, h, w')
        held = draws.image_only and self.cond is not None
        cond = self.cond[clips] if held else self._conditions(draws, encoder)  # (B, 16, T, h, w')
        return Batch(
            x0=self.x0[clips],
            condition=torch.cat([mask, cond], dim=1),
            prompt_embeds=self.prompts[self.prompt_of[clips]],
            image_embeds=self.image[clips],
            noise=noise,
            sigmas=on_device.sigmas,
        )

    def _conditions(self, draws: Draws, encoder: VaeConditionEncoder | None) -> torch.Tensor:
        """The condition latents ``(B, 16, T, h, w')`` of ``draws`` where some are not held: image samples take the
        held condition (or are encoded from the held first frame), samples given a held pattern take its held
        condition, the others are encoded from the given frames of the held videos. The rows are split on the CPU,
        so the split costs no device sync."""
        image_rows = ~draws.given[:, 1:].any(dim=1)  # (B,)
        held = [(image_rows, self.cond)] if self.cond is not None else []
        held += [(pattern_rows(draws.given, name), tensor) for name, tensor in self.patterns.items()]
        covered = torch.zeros_like(image_rows)
        for rows, _ in held:
            covered |= rows
        encoded_rows = (~covered).nonzero()[:, 0]  # (P,)
        parts = [(rows.nonzero()[:, 0], tensor[to_device(draws.clips[rows], self.device)]) for rows, tensor in held]
        if len(encoded_rows):
            parts.append((encoded_rows, self._encode(draws, encoded_rows, image_rows, encoder)))
        parts = [(rows, latents) for rows, latents in parts if len(rows)]
        cond = parts[0][1].new_empty((len(draws.clips), *parts[0][1].shape[1:]))
        for rows, latents in parts:
            cond[to_device(rows, self.device)] = latents
        return cond

    def _encode(
        self, draws: Draws, encoded_rows: torch.Tensor, image_rows: torch.Tensor, encoder: VaeConditionEncoder | None
    ) -> torch.Tensor:
        """The condition latents ``(P, 16, T, h, w')`` of rows ``encoded_rows`` of ``draws``, encoded from the held
        frames they are given."""
        if encoder is None:
            raise TrainingError("these samples' conditions are not in the cache and no VAE encodes them")
        if not image_rows[encoded_rows].all() and self.frames is None:
            raise TrainingError("frames other than the first are given: hold the cache with its videos")
        from_video = (~image_rows[encoded_rows]).nonzero()[:, 0]  # rows of the P encoded ones
        from_first = image_rows[encoded_rows].nonzero()[:, 0]
        clips = to_device(draws.clips[encoded_rows], self.device)
        source = self.frames if self.frames is not None else self.first
        frames = torch.zeros(
            (len(encoded_rows), draws.given.shape[1], *source.shape[2:]), dtype=torch.uint8, device=self.device
        )  # (P, F, H, W, 3)
        if len(from_video):
            rows = to_device(from_video, self.device)
            frames[rows] = self.frames[clips[rows]]
        if len(from_first):
            rows = to_device(from_first, self.device)
            frames[rows, :1] = self.first[clips[rows]]
        pixels = video_pixels(frames)  # (P, 3, F, H, W)
        given = to_device(draws.given[encoded_rows], self.device)
        return encoder(condition_frames(pixels, given, self.modalities))  # (P, 16, T, h, w')
