"""What the fine-tuning tests share: finetune.py's flags and environment at the tiny size, its logs, the batches a
step trains on, the loss of an adapter on held-fixed batches, a free port and the scripts as modules."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from train_cache import TINY_MODEL

from fourdnex.data.cache import LatentCache
from fourdnex.model.adapters import apply_adapter, load_adapter
from fourdnex.model.transformer import FourDNeXTransformer
from fourdnex.train.config import TrainConfig
from fourdnex.train.data import SampleStream, batch_of_samples, read_batch
from fourdnex.train.loss import LossWeights, batch_loss

ROOT = Path(__file__).resolve().parent.parent
SIZE = ["--height", "32", "--width", "32", "--num_frames", "9"]
#: finetune.py, as the tests run it
FINETUNE = (sys.executable, str(ROOT / "finetune.py"))
TINY = [*SIZE, "--lora_rank", "8", "--lora_alpha", "8"]


def finetune_env() -> dict[str, str]:
    """The environment of a one-process finetune.py run (it picks a free port itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def finetune(*args: str, command: tuple[str, ...] | None = None) -> subprocess.CompletedProcess:
    """finetune.py as one process (``command``: what runs it, by default this Python on the script)."""
    result = subprocess.run([*(command or FINETUNE), *args], env=finetune_env(), capture_output=True, text=True)
    if result.returncode:
        raise AssertionError(f"finetune.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def finetune_two_processes(*args: str, timeout: float = 300, command: tuple[str, ...] | None = None) -> list[str]:
    """finetune.py as two gloo processes on this machine (ranks 0 and 1); each one's stderr."""
    env = {**finetune_env(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [*(command or FINETUNE), *args]
    processes = [
        subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    errors = []
    for process in processes:
        _, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, err[-3000:]
        errors.append(err)
    return errors


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs that a run logged to TensorBoard under ``tag``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted((run / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return values


def overfit_args(cache_dir: Path, out: Path) -> list[str]:
    """30 steps of bf16 ZeRO-2 on two clips, a checkpoint every 10 steps (2 kept), a validation sample at the end."""
    return [
        "--cache_dir", str(cache_dir), "--output_dir", str(out), *TINY,
        "--learning_rate", "3e-3", "--lr_warmup_steps", "0", "--lr_schedule", "constant",
        "--max_steps", "30", "--checkpointing_steps", "10", "--validation_steps", "30",
        "--validation_image", str(ROOT / "example" / "scene.png"), "--validation_prompt", "a red ball",
        "--validation_inference_steps", "2",
    ]  # fmt: skip


def step_batch(cache: LatentCache, cfg: TrainConfig, step: int, world: int = 1, micro: int = 0, rank: int = 0):
    """The micro-batch ``micro`` of process ``rank`` at optimizer step ``step``, read from the cache's files."""
    stream = SampleStream(cfg, len(cache), world)
    draws = stream.draws(step).rows(*stream.rows(micro, rank))
    frames, h, w = cache.latent_shape
    noise = stream.noise(step, (16, frames, h, 2 * w if cfg.modalities == "rgbxyz" else w), torch.device("cpu"))
    first, stop = stream.rows(micro, rank)
    return batch_of_samples(read_batch(cache, draws), draws, noise[first:stop], None, torch.device("cpu"))


def fixed_batches(cache_dir: Path, n: int = 4):
    """Held-fixed noisy samples of the training clips (steps no training run of the tests reaches)."""
    cfg = TrainConfig(cache_dir=str(cache_dir), height=32, width=32, num_frames=9, train_batch_size=8)
    cache = LatentCache(cache_dir, cfg.num_latent_frames, 32, 32)
    return [step_batch(cache, cfg, 10_000 + i) for i in range(n)]


def eval_loss(batches, adapter: Path | None) -> float:
    transformer = FourDNeXTransformer.from_pretrained(TINY_MODEL, subfolder="transformer", dtype=torch.float32)
    transformer.set_modalities("rgbxyz")
    if adapter is not None:
        apply_adapter(transformer, load_adapter(adapter))
    with torch.no_grad():
        return sum(batch_loss(transformer, b, LossWeights(), torch.float32)[0].item() for b in batches) / len(batches)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_script(name: str):
    """A top-level script as a module (its ``if __name__ == "__main__"`` block does not run)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_script", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
