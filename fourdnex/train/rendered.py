"""Training on the synthetic generator's clips with no tree and no cache: ``finetune.py --synthetic_clips N``.

Clip ``i`` of ``python -m fourdnex.data.synthetic --seed S`` (flat layout), for ``i < N``, becomes exactly the
training sample that writing that tree, building its cache with ``build_wan_dataset.py`` and training with
``--cache_in_memory`` gives (``tests/test_rendered.py`` holds the two equal), through the same code: a worker
process writes the clip's files in a temporary folder, reads and prepares them as the build does, and hands the
VAE's input to the training process in shared memory; the training process encodes batches of clips with the model
folder's VAE, UMT5 and CLIP encoders (the build's :class:`fourdnex.data.build.Encoders`, in their default dtypes) and
keeps only the latents and embeddings, held on the training device (:class:`fourdnex.train.data.HeldCache`). For
runs given other frames than the first, each clip's video is held too, H.264-coded and decoded as the cache's video
is. Nothing is written, so nothing outlives the run: a resumed run renders its clips again.

The XYZ latents' mean and standard deviation (the cache's ``stats.json``) are computed over the N clips as the build's
merge computes them. In a run of W processes, process r renders and encodes the clips i with i mod W = r (with its
share of the CPUs), and the processes then gather every clip's samples, so that each holds all N in clip order, as
one process would.

Rendering takes the CPUs for minutes while the GPU waits (8 of a 19-minute run's minutes at 5,000 clips of
25 x 192 x 288 on one H100: BENCHMARKS.md, "The fifteenth run"). With ``--synthetic_clips_per_step R`` the run trains
while the rest render: it starts once the first :data:`fourdnex.train.config.STATS_CLIPS` clips are held, whose
statistics normalize every clip, and step n draws from the first ``min(N, STATS_CLIPS + floor(R n))``
(:meth:`fourdnex.train.data.SampleStream.available`); before each step the training process encodes the clips its
workers have rendered and waits for those the step needs. Clips are encoded in the same batches whenever they come,
and the processes gather them at the same steps, so a paced run too is a function of its settings, however fast the
clips render.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
from collections import deque
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fourdnex.data.build import Encoders, InProcess, LoadedClip, loaded_clip, merge_stats, shared_tensor
from fourdnex.data.cache import CacheStats, xyz_sums
from fourdnex.data.prepare import prepare_clip
from fourdnex.data.sources import Captions, find_clips, read_clip
from fourdnex.data.synthetic import write_captions, write_tree_clip
from fourdnex.files import read_video, write_video
from fourdnex.model.fusion import fuse_width, normalize_xyz
from fourdnex.model.loading import ENCODER_DTYPE
from fourdnex.runtime import dtype_of, worker_processes
from fourdnex.train.config import STATS_CLIPS, TrainConfig, TrainingError
from fourdnex.train.data import HeldCache, VaeConditionEncoder, holding_device

logger = logging.getLogger(__name__)

#: Clips per encoder call (the demo recipe's cache build batch).
ENCODE_BATCH = 16
#: The pointmap centring of the clips (the cache build's default).
CENTER = "clip"
#: The way out where a worker cannot hand a clip over in shared memory.
SHM_REMEDY = " (docker: --shm-size)"
#: What this process keeps of each clip it encoded until every process's clips up to it are held.
LOCAL_ROWS = ("rgb", "xyz", "cond", "image", "frames", "sums", "prompt")


@dataclass
class RenderedClips:
    """What the trainer reads of a cache (:class:`fourdnex.data.cache.LatentCache`), for clips encoded in memory."""

    stats: CacheStats
    modalities: str
    latent_shape: tuple[int, int, int]  # latent frames, height, width, per modality
    count: int
    cached_condition: bool = True  # the image condition is held for every clip

    def __len__(self) -> int:
        return self.count


def prepare_rendered_clip(
    i: int, seed: int, num_frames: int, height: int, width: int, families: tuple[str, ...], video: bool, shared: bool
) -> tuple[LoadedClip, torch.Tensor | None]:
    """Clip ``i`` of the flat tree of ``seed``, written in a temporary folder, read and prepared as the cache build
    prepares it; with ``video``, also its RGB frames ``(F, H, W, 3)`` uint8 as the cache's video gives them back.
    ``shared``: the tensors in shared memory (a worker process's)."""
    with tempfile.TemporaryDirectory(prefix="fourdnex-clip-") as folder:
        root = Path(folder)
        (root / "clips").mkdir()
        write_tree_clip(root, i, num_frames, height, width, seed, "flat", families)
        record = json.loads((root / "clips" / f"{i}.json").read_text())
        data = root / "data"
        write_captions(data / "caption" / f"{record['subset']}_with_caption_upload.csv",
                       {record["number"]: record["caption"]})  # fmt: skip
        (source,) = find_clips(data).clips
        clip = prepare_clip(source, read_clip(source, Captions(data)), num_frames, height, width, CENTER)
        frames = None
        if video:
            write_video(root / "video.mp4", clip.rgb)
            decoded = torch.from_numpy(read_video(root / "video.mp4", list(range(num_frames))))
            frames = shared_tensor(decoded.shape, torch.uint8, SHM_REMEDY) if shared else torch.empty_like(decoded)
            frames.copy_(decoded)
        return loaded_clip(clip, shared, SHM_REMEDY), frames


class ClipRenderer:
    """Renders a run's clips in worker processes from construction on (so that they fork before the model and the
    encoders load); :meth:`hold` loads the encoders and holds the clips the first step needs, encoded, and
    :meth:`advance` the clips each later step needs, while the rest render."""

    def __init__(self, cfg: TrainConfig, workers: int | None = None) -> None:
        self.cfg = cfg
        self.video = cfg.condition_tasks != "image"
        # this process's share (the launcher's environment: the process group starts later, with the model)
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.count = cfg.synthetic_clips
        if self.count < self.world:
            raise TrainingError(f"--synthetic_clips {self.count} is fewer than the run's {self.world} processes")
        #: the clips held before the first step: every one, or in a run that trains while they are made, the first
        #: :data:`STATS_CLIPS`, whose XYZ statistics normalize them all
        self.first_clips = min(self.count, STATS_CLIPS) if cfg.synthetic_clips_per_step else self.count
        self.facts: RenderedClips | None = None
        self.held: HeldCache | None = None
        self._ids = range(self.rank, self.count, self.world)
        if workers is None:  # this process's share of the CPUs
            workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self._stack = ExitStack()
        pool = self._stack.enter_context(worker_processes(workers))
        self._pool = pool or InProcess()  # without worker processes, each clip is made when it is submitted
        self._shared = pool is not None
        self._window = max(workers, 1) + ENCODE_BATCH  # clips rendered ahead of the encoders
        self._next = 0  # into self._ids
        self._queue: deque[Future] = deque()
        self._fill()
        self._local: dict[str, list] = {name: [] for name in LOCAL_ROWS}  # this process's clips encoded, not held
        self._shapes: dict[str, torch.Tensor] = {}  # no rows of each (its shape and dtype), for a share with no clips
        self._encoded = 0  # of this process's clips
        self._held = 0  # clips 0 .. self._held - 1 of every process are held
        self._prompt_index: dict[str, int] = {}  # each held prompt's row of the held prompts
        self._local_prompts: dict[str, torch.Tensor] = {}  # this process's prompts' embeddings
        self._encoders: Encoders | None = None
        self._started = time.perf_counter()
        self._waited = 0.0  # seconds this process waited for its workers' clips
        self._bar = None

    @property
    def done(self) -> bool:
        """Whether every clip is held (the workers and the encoders are then gone)."""
        return self._held == self.count

    def hold(
        self, model_path: str, device: torch.device, encoder: VaeConditionEncoder | None = None
    ) -> tuple[RenderedClips, HeldCache]:
        """Load the encoders of ``model_path`` on ``device``, encode the first :attr:`first_clips` clips as they
        render, and hold the samples there (or in host memory where :func:`fourdnex.train.data.holding_device` says
        so); ``encoder`` encodes the held given-frame patterns' conditions (runs given other frames than the first)."""
        from tqdm.auto import tqdm

        self._device, self._pattern_encoder = device, encoder
        try:
            self._encoders = Encoders.load(model_path, device, dtype_of("auto", device), ENCODER_DTYPE)
            self._model_path = str(model_path)
            share = f" (share {self.rank + 1} of {self.world})" if self.world > 1 else ""
            self._bar = tqdm(total=len(self._ids), desc=f"synthetic clips{share}", unit="clip")
            self._hold_until(self.first_clips)
        except BaseException:
            self.close()
            raise
        return self.facts, self.held

    def advance(self, count: int) -> bool:
        """Hold at least the first ``count`` clips, waiting for them where they are not rendered yet, and encode the
        clips already rendered; every process calls it with the same ``count`` (the processes gather what they
        encoded). Whether every clip is now held."""
        if not self.done:
            try:
                self._encode_ready()
                if count > self._held:
                    self._hold_until(count)
            except BaseException:
                self.close()
                raise
        return self.done

    def close(self) -> None:
        """Stop the workers and let the encoders go."""
        self._stack.close()
        self._encoders = None
        if self._bar is not None:
            self._bar.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the encoders' memory, for the training

    def _fill(self) -> None:
        cfg = self.cfg
        while self._next < len(self._ids) and len(self._queue) < self._window:
            self._queue.append(self._pool.submit(
                prepare_rendered_clip, self._ids[self._next], cfg.synthetic_seed, cfg.num_frames, cfg.height, cfg.width,
                tuple(cfg.texture_families), self.video, self._shared,
            ))  # fmt: skip
            self._next += 1

    def _take(self, count: int) -> list[tuple[LoadedClip, torch.Tensor | None]]:
        """This process's next ``count`` clips, waiting for them to render."""
        batch = []
        for _ in range(count):
            item = self._queue.popleft()
            self._fill()
            waiting = time.perf_counter()
            batch.append(item.result())
            self._waited += time.perf_counter() - waiting
        return batch

    def _next_batch(self) -> int:
        """How many clips this process's next encoder batch takes (batches of :data:`ENCODE_BATCH` of its share in
        order, whenever they are encoded, so that a clip's latents do not depend on when it rendered)."""
        return min(ENCODE_BATCH, len(self._ids) - self._encoded)

    def _encode_ready(self) -> None:
        """Encode this process's next batches whose clips are all rendered."""
        while (
            (size := self._next_batch())
            and len(self._queue) >= size
            and all(item.done() for item in itertools.islice(self._queue, size))
        ):
            self._encode(self._take(size))

    @torch.no_grad()
    def _encode(self, batch: list[tuple[LoadedClip, torch.Tensor | None]]) -> None:
        """Encode a batch of this process's clips and keep the rows until they are held."""
        cfg, encoders = self.cfg, self._encoders
        latents = encoders.encode_videos([clip.videos for clip, _ in batch])  # (2B, 16, T, h, w)
        first = torch.stack([clip.videos[0, :, 0] for clip, _ in batch])  # (B, 3, H, W)
        rows = {
            "rgb": latents[0::2],
            "xyz": latents[1::2],
            "cond": encoders.encode_condition(first, cfg.num_frames, cfg.modalities),
            "image": encoders.encode_images([clip.clip.rgb[0] for clip, _ in batch]),
        }
        if self.video:
            rows["frames"] = torch.stack([frames for _, frames in batch])
        new = list(dict.fromkeys(clip.clip.prompt for clip, _ in batch if clip.clip.prompt not in self._local_prompts))
        if new:  # each distinct prompt encoded once, those of a batch in one call
            self._local_prompts.update(zip(new, encoders.encode_prompts(new).float(), strict=True))
        for name, tensor in rows.items():
            self._local[name].extend(tensor)
            self._shapes.setdefault(name, tensor.new_empty((0, *tensor.shape[1:])))
        self._local["sums"].extend(xyz_sums(xyz) for xyz in rows["xyz"])  # for the build's merge_stats
        self._local["prompt"].extend(clip.clip.prompt for clip, _ in batch)
        self._encoded += len(batch)
        self._bar.update(len(batch))

    def _hold_until(self, count: int) -> None:
        """Hold the clips of every process from the first not held to at least ``count`` (whole batches of each
        process's share), encoding this process's share of them."""
        unit = ENCODE_BATCH * self.world
        start, stop = self._held, min(self.count, -(-count // unit) * unit)
        mine = len(range(self.rank, stop, self.world))
        while self._encoded < mine:
            self._encode(self._take(self._next_batch()))
        take = mine - len(range(self.rank, start, self.world))
        local = {name: rows[:take] for name, rows in self._local.items()}
        for rows in self._local.values():
            del rows[:take]
        self._put(start, stop, *self._gathered(local, start, stop))
        self._held = stop
        if self.done:
            self.close()
            logger.info(
                "every synthetic clip held: this process's %d in %.0f s, %.0f s of it waiting for the workers",
                len(self._ids), time.perf_counter() - self._started, self._waited,
            )  # fmt: skip

    def _gathered(
        self, local: dict[str, list], start: int, stop: int
    ) -> tuple[dict[str, torch.Tensor], list[dict], list[int], list[torch.Tensor]]:
        """Every process's rows of clips ``start .. stop - 1`` (this process's are ``local``) in clip order: the
        tensors, the XYZ sums (where ``start`` is 0), each clip's row of the held prompts, and the embeddings of the
        prompts first used there, in the order of first use."""
        tensors = {name: torch.stack(local[name]) if local[name] else empty for name, empty in self._shapes.items()}
        new = list(dict.fromkeys(p for p in local["prompt"] if p not in self._prompt_index))
        rows = [self._local_prompts[p] for p in new]
        sums = local["sums"] if start == 0 else []
        if self.world == 1:
            shares, tables = [(sums, local["prompt"], new)], [torch.stack(rows) if rows else None]
        else:
            # on the training device, where the process group's backend gathers (the videos are in host memory)
            tensors = {
                name: _gather_clips(rows.to(self._device), stop - start, self.world) for name, rows in tensors.items()
            }
            shares = [None] * self.world
            dist.all_gather_object(shares, (sums, local["prompt"], new))
            most = max(len(share[2]) for share in shares)
            tables = [None] * self.world
            if most:
                template = next(iter(self._local_prompts.values()))
                mine = torch.stack(rows) if rows else template.new_empty((0, *template.shape))
                tables = _all_gather_padded(mine.to(self._device), most)
        all_sums, prompt_of, new_rows = [], [], []
        for i in range(stop - start):  # clip start + i, of process i mod W (start is a multiple of W)
            (their_sums, their_prompts, their_new), table = shares[i % self.world], tables[i % self.world]
            k = i // self.world
            if their_sums:
                all_sums.append(their_sums[k])
            prompt = their_prompts[k]
            if prompt not in self._prompt_index:
                self._prompt_index[prompt] = len(self._prompt_index)
                new_rows.append(table[their_new.index(prompt)])
            prompt_of.append(self._prompt_index[prompt])
        return tensors, all_sums, prompt_of, new_rows

    def _put(
        self, start: int, stop: int, rows: dict[str, torch.Tensor], sums: list[dict], prompt_of: list[int],
        new_prompts: list[torch.Tensor],
    ) -> None:  # fmt: skip
        """Hold clips ``start .. stop - 1``: the first hold makes the held set, empty, and its XYZ statistics (those
        of the first :attr:`first_clips` clips); every hold fills its clips' rows."""
        cfg = self.cfg
        if self.held is None:
            merged = merge_stats([{"xyz_latent_sums": s} for s in sums[: self.first_clips]], {})
            stats = CacheStats(
                xyz_latent_mean=merged["xyz_latent_mean"],
                xyz_latent_std=merged["xyz_latent_std"],
                height=cfg.height,
                width=cfg.width,
                num_frames=cfg.num_frames,
                cond_num_frames=cfg.num_frames,
                model_path=self._model_path,
                center=CENTER,
            )
            latent_shape = tuple(rows["rgb"].shape[2:5])  # (T, h, w) of one modality
            self.facts = RenderedClips(stats, cfg.modalities, latent_shape, self.count)
        rgb = x0 = rows.pop("rgb")
        xyz = rows.pop("xyz")
        if cfg.modalities == "rgbxyz":
            stats = self.facts.stats
            x0 = fuse_width(rgb, normalize_xyz(xyz, stats.xyz_latent_mean, stats.xyz_latent_std))
        rows["x0"] = x0
        if self.held is None:  # every clip's rows, filled as they are held
            per_clip = sum(t[0].numel() * t.element_size() for t in rows.values())
            place = holding_device(self._device, per_clip * self.count)
            empty = {name: t.new_empty((self.count, *t.shape[1:]), device=place) for name, t in rows.items()}
            no_prompts = new_prompts[0].new_empty((0, *new_prompts[0].shape))
            self.held = HeldCache(
                empty["x0"], empty["image"], no_prompts, torch.zeros(self.count, dtype=torch.long), cfg.modalities,
                empty["cond"], frames=empty.get("frames"),
            )  # fmt: skip
        held = self.held
        held.x0[start:stop], held.image[start:stop], held.cond[start:stop] = rows["x0"], rows["image"], rows["cond"]
        held.prompt_of[start:stop] = torch.tensor(prompt_of, dtype=torch.long, device=held.device)
        if new_prompts:
            held.add_prompts(torch.stack(new_prompts))
        if held.frames is not None:
            held.frames[start:stop] = rows["frames"]
            if self._pattern_encoder is not None:
                held.encode_patterns(start, stop, self._pattern_encoder)


def _gather_clips(local: torch.Tensor, count: int, world: int) -> torch.Tensor:
    """Every process's per-clip rows gathered in clip order: process r holds clips r, r + W, r + 2W, ... of
    ``count``."""
    gathered = _all_gather_padded(local, -(-count // world))
    return torch.stack(gathered, 1).flatten(0, 1)[:count]  # (per, W, ...) -> row k * W + r


def _all_gather_padded(local: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """Every process's ``local`` (at most ``rows`` rows), each padded with zero rows to ``rows``, by process."""
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, padded)
    return gathered
