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
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from collections.abc import Iterator
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
from fourdnex.train.config import TrainConfig, TrainingError
from fourdnex.train.data import HeldCache, VaeConditionEncoder, holding_device

#: Clips per encoder call (the demo recipe's cache build batch).
ENCODE_BATCH = 16
#: The pointmap centring of the clips (the cache build's default).
CENTER = "clip"
#: The way out where a worker cannot hand a clip over in shared memory.
SHM_REMEDY = " (docker: --shm-size)"


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
    """Renders a run's clips in worker processes, from construction on (so that they fork before the model and the
    encoders load), and encodes and holds them in :meth:`hold`."""

    def __init__(self, cfg: TrainConfig, workers: int | None = None) -> None:
        self.cfg = cfg
        self.video = cfg.condition_tasks != "image"
        # this process's share (the launcher's environment: the process group starts later, with the model)
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.synthetic_clips < self.world:
            raise TrainingError(
                f"--synthetic_clips {cfg.synthetic_clips} is fewer than the run's {self.world} processes"
            )
        self._ids = range(self.rank, cfg.synthetic_clips, self.world)
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

    def _fill(self) -> None:
        cfg = self.cfg
        while self._next < len(self._ids) and len(self._queue) < self._window:
            self._queue.append(self._pool.submit(
                prepare_rendered_clip, self._ids[self._next], cfg.synthetic_seed, cfg.num_frames, cfg.height, cfg.width,
                tuple(cfg.texture_families), self.video, self._shared,
            ))  # fmt: skip
            self._next += 1

    def _clips(self) -> Iterator[tuple[LoadedClip, torch.Tensor | None]]:
        while self._queue:
            item = self._queue.popleft()
            self._fill()
            yield item.result()

    def _batches(self) -> Iterator[list[tuple[LoadedClip, torch.Tensor | None]]]:
        batch = []
        for clip in self._clips():
            batch.append(clip)
            if len(batch) == ENCODE_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def hold(
        self, model_path: str, device: torch.device, encoder: VaeConditionEncoder | None = None
    ) -> tuple[RenderedClips, HeldCache]:
        """Encode every clip with the encoders of ``model_path`` on ``device`` as the rendering goes, and hold the
        samples there (or in host memory where :func:`fourdnex.train.data.holding_device` says so); ``encoder``
        encodes the held given-frame patterns' conditions (runs given other frames than the first)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        try:
            encoders = Encoders.load(model_path, device, dtype_of("auto", device), ENCODER_DTYPE)
            parts: dict[str, list[torch.Tensor]] = {"rgb": [], "xyz": [], "cond": [], "image": [], "frames": []}
            prompts: dict[str, int] = {}
            prompt_rows: list[torch.Tensor] = []
            prompt_of: list[int] = []
            sums: list[dict] = []  # the XYZ latents' sums, a batch at a time, for the build's merge_stats
            share = f" (share {self.rank + 1} of {self.world})" if self.world > 1 else ""
            bar = tqdm(total=len(self._ids), desc=f"synthetic clips{share}", unit="clip")
            for batch in self._batches():
                latents = encoders.encode_videos([clip.videos for clip, _ in batch])  # (2B, 16, T, h, w)
                first = torch.stack([clip.videos[0, :, 0] for clip, _ in batch])  # (B, 3, H, W)
                xyz = latents[1::2]
                sums.append({"xyz_latent_sums": xyz_sums(xyz.transpose(0, 1).flatten(1, 2))})  # as one (16, BT, h, w)
                parts["rgb"].append(latents[0::2])
                parts["xyz"].append(xyz)
                parts["cond"].append(encoders.encode_condition(first, cfg.num_frames, cfg.modalities))
                parts["image"].append(encoders.encode_images([clip.clip.rgb[0] for clip, _ in batch]))
                new = list(dict.fromkeys(clip.clip.prompt for clip, _ in batch if clip.clip.prompt not in prompts))
                if new:  # each distinct prompt encoded once, those of a batch in one call
                    prompts.update((prompt, len(prompt_rows) + i) for i, prompt in enumerate(new))
                    prompt_rows.extend(encoders.encode_prompts(new).float())
                prompt_of.extend(prompts[clip.clip.prompt] for clip, _ in batch)
                parts["frames"].extend(frames for _, frames in batch if frames is not None)
                bar.update(len(batch))
            bar.close()
        finally:
            self._stack.close()
        del encoders
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the encoders' memory, for the training that follows
        joined = {
            name: torch.stack(rows) if name == "frames" else torch.cat(rows) for name, rows in parts.items() if rows
        }
        if self.world > 1:  # every process's clips, in clip order
            joined = {name: _gather_clips(rows, cfg.synthetic_clips, self.world) for name, rows in joined.items()}
            sums, prompt_rows, prompt_of = self._gather_rest(sums, prompt_rows, [*prompts], prompt_of)
        merged = merge_stats(sums, {})
        stats = CacheStats(
            xyz_latent_mean=merged["xyz_latent_mean"],
            xyz_latent_std=merged["xyz_latent_std"],
            height=cfg.height,
            width=cfg.width,
            num_frames=cfg.num_frames,
            cond_num_frames=cfg.num_frames,
            model_path=str(model_path),
            center=CENTER,
        )
        rgb = x0 = joined["rgb"]
        if cfg.modalities == "rgbxyz":
            x0 = fuse_width(rgb, normalize_xyz(joined["xyz"], stats.xyz_latent_mean, stats.xyz_latent_std))
        held = {"x0": x0, "cond": joined["cond"], "image": joined["image"]}
        if "frames" in joined:
            held["frames"] = joined["frames"]
        place = holding_device(device, sum(t.numel() * t.element_size() for t in held.values()))
        held = {name: tensor.to(place) for name, tensor in held.items()}
        latent_shape = (rgb.shape[2], rgb.shape[3], rgb.shape[4])  # (T, h, w) of one modality
        facts = RenderedClips(stats, cfg.modalities, latent_shape, len(x0))
        prompt_index = torch.tensor(prompt_of, dtype=torch.long)
        return facts, HeldCache(
            held["x0"], held["image"], torch.stack(prompt_rows), prompt_index, cfg.modalities, held["cond"],
            frames=held.get("frames"), encoder=encoder,
        )  # fmt: skip

    def _gather_rest(
        self, sums: list[dict], rows: list[torch.Tensor], prompts: list[str], prompt_of: list[int]
    ) -> tuple[list[dict], list[torch.Tensor], list[int]]:
        """Every process's statistics sums and prompt embeddings (``rows[j]`` embeds ``prompts[j]``; clip ``k`` of
        this process's share has ``prompts[prompt_of[k]]``): each distinct prompt's row once, in the order of first
        use in clip order, and each clip's index into them, as one process would hold them."""
        shares = [None] * self.world
        dist.all_gather_object(shares, (sums, prompts, prompt_of))
        tables = _all_gather_padded(torch.stack(rows), max(len(share[1]) for share in shares))
        index: dict[str, int] = {}
        all_rows, all_of = [], []
        for i in range(self.cfg.synthetic_clips):
            r, k = i % self.world, i // self.world
            _, their_prompts, their_of = shares[r]
            prompt = their_prompts[their_of[k]]
            if prompt not in index:
                index[prompt] = len(all_rows)
                all_rows.append(tables[r][their_of[k]])
            all_of.append(index[prompt])
        return [s for share in shares for s in share[0]], all_rows, all_of


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
