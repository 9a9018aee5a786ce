"""``--activation_memory``: what gradient checkpointing keeps of each block, and where, for the machine at hand.

Gradient checkpointing keeps each block's input and runs the block again in the backward. The settings:

* ``recompute``: nothing more (diffusers' own gradient checkpointing);
* ``attention``: every block also keeps its self-attention output, so the backward does not run the attention
  kernel again (fourdnex.train.block_recompute);
* ``attention+ffn``: every block also keeps its feed-forward pre-activation (needs the feed-forward without LoRA);
* ``auto`` (the default): :func:`choose_activation_memory` picks one from the free host RAM.

On CUDA the block inputs and the kept tensors are parked in page-locked host memory (copied out as they are written,
back one block ahead of the backward): with ``attention+ffn`` a step at 49x480x720 is faster and takes less GPU
memory than plain diffusers + peft + checkpointing (BENCHMARKS.md, "Training (finetune.py)", "GPU results"). On a
machine without CUDA nothing is parked (host memory is the device's).

Keeping runs private attention ops of torch and internals of diffusers (:data:`PRIVATE_SYMBOLS`); outside the torch
versions they are tested with (:data:`TESTED_TORCH`), or where one is missing, the run recomputes instead, with one
warning line.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fourdnex.train.config import TrainConfig, TrainingError

logger = logging.getLogger("fourdnex.train.memory_policy")

#: Free host RAM per GPU process that ``auto`` asks for before keeping the attention outputs, and before keeping the
#: feed-forward pre-activations too, at 49x480x720 (35,100 tokens per sample), batch 1, bf16, on Wan2.1-I2V-14B
#: (40 blocks, 5120 wide, feed-forward 13,824 wide). What is parked per process: the 40 block inputs 14.4 GB, the
#: 40 self-attention outputs with their log-sum-exp 14.6 GB (30 GB in all), the 40 pre-activations 38.8 GB (68 GB
#: in all); the thresholds leave 4 GB and 8 GB for everything else. They scale with the tokens of a micro-batch
#: and the bytes per element, which the kept bytes are proportional to.
ATTENTION_HOST_BYTES = 34e9
ATTENTION_FFN_HOST_BYTES = 76e9
REFERENCE_TOKENS = 35_100
REFERENCE_DTYPE_BYTES = 2

#: The torch versions (lowest, first untested) whose private ops keeping the attention output is tested with.
TESTED_TORCH = ((2, 11), (2, 14))
#: The private torch ops and diffusers internals that fourdnex.train.block_recompute calls: (module, attribute).
PRIVATE_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("torch", "ops.aten._scaled_dot_product_flash_attention_for_cpu"),
    ("torch", "ops.aten._scaled_dot_product_flash_attention_for_cpu_backward"),
    ("torch", "ops.aten._scaled_dot_product_flash_attention"),
    ("torch", "ops.aten._scaled_dot_product_flash_attention_backward"),
    ("torch", "ops.aten._scaled_dot_product_cudnn_attention"),
    ("torch", "ops.aten._scaled_dot_product_cudnn_attention_backward"),
    ("torch", "ops.aten.gelu_backward"),
    ("torch", "_fused_sdp_choice"),
    ("torch", "cuda.cudart"),
    ("diffusers.models.attention_dispatch", "_AttentionBackendRegistry"),
    ("diffusers.models.attention_dispatch", "dispatch_attention_fn"),
    ("diffusers.models.transformers.transformer_wan", "_get_qkv_projections"),
)

MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")
OWN_CGROUP = Path("/proc/self/cgroup")
#: Per cgroup version: the limit file, the usage file and the memory.stat key of reclaimable file cache.
_CGROUP_FILES = {
    2: ("memory.max", "memory.current", "inactive_file"),
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}
_UNLIMITED = 2**62  # cgroup v1 says "no limit" with a page-aligned 2**63 - 1


@dataclass(frozen=True)
class RecomputePlan:
    """What the backward of each checkpointed block keeps instead of recomputing, and what is parked in host memory.

    ``attention``: the self-attention output (and its log-sum-exp); ``ffn``: the feed-forward pre-activation; both
    in the first ``blocks`` blocks (None: every block). ``park_inputs`` / ``park_attention`` / ``park_ffn``: the
    block inputs / the kept attention tensors / the kept pre-activations are copied to host memory as they are
    written and back one block ahead of the backward.
    """

    attention: bool = False
    ffn: bool = False
    blocks: int | None = None
    park_inputs: bool = False
    park_attention: bool = False
    park_ffn: bool = False

    @classmethod
    def for_setting(cls, setting: str, park: bool) -> RecomputePlan | None:
        """The plan of an ``--activation_memory`` setting other than auto (None for recompute: diffusers' own);
        ``park``: everything it keeps goes to host memory."""
        if setting == "recompute":
            return None
        ffn = setting == "attention+ffn"
        return cls(attention=True, ffn=ffn, park_inputs=park, park_attention=park, park_ffn=park and ffn)


@dataclass(frozen=True)
class Machine:
    """What ``auto`` reads of the machine: CUDA or not, the free host RAM, the processes sharing it."""

    cuda: bool
    free_host_bytes: int | None  # None where not read (no CUDA)
    processes: int  # training processes on this node

    @classmethod
    def read(cls) -> Machine:
        """This machine: ``torch.cuda.is_available()``, :func:`free_host_bytes`, ``LOCAL_WORLD_SIZE`` (set by torchrun
        and accelerate; 1 without a launcher)."""
        cuda = torch.cuda.is_available()
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return cls(cuda=cuda, free_host_bytes=free_host_bytes() if cuda else None, processes=processes)


def meminfo_available_bytes(meminfo: Path = MEMINFO) -> int:
    """``MemAvailable`` of /proc/meminfo, in bytes."""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{meminfo}: no MemAvailable line")
    return int(match.group(1)) * 1024


def _read_limit(file: Path) -> int | None:
    """A cgroup byte count; None where the file is missing or says ``max``."""
    if not file.is_file():
        return None
    text = file.read_text().strip()
    return None if text == "max" else int(text)


def _stat(file: Path, key: str) -> int:
    """One value of a cgroup memory.stat file (0 where missing)."""
    if file.is_file():
        for line in file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def _cgroup_path(lines: list[str], version: int) -> tuple[str, ...]:
    """The parts of this process's memory cgroup path in /proc/self/cgroup lines (v2 ``0::/path``, v1
    ``N:memory:/path``); () where there is none."""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (controllers == "") if version == 2 else ("memory" in controllers.split(",")):
            return Path(path).parts[1:]
    return ()


def cgroup_free_bytes(root: Path = CGROUP_ROOT, own_cgroup: Path = OWN_CGROUP) -> int | None:
    """The least memory a cgroup limit on this process leaves (limit - usage + reclaimable file cache), None where no
    limit is set.

    Reads the memory cgroup of ``own_cgroup`` (/proc/self/cgroup) and each of its ancestors under ``root``: v2
    (``memory.max``, ``memory.current``) and v1 (``memory/memory.limit_in_bytes``, ``memory.usage_in_bytes``); in a
    container the cgroup root it sees is its own cgroup.
    """
    lines = own_cgroup.read_text().splitlines() if own_cgroup.is_file() else []
    free = []
    for version, base in ((2, root), (1, root / "memory")):
        parts = _cgroup_path(lines, version)
        limit_file, usage_file, cache_key = _CGROUP_FILES[version]
        for depth in range(len(parts), -1, -1):
            folder = base.joinpath(*parts[:depth])
            limit = _read_limit(folder / limit_file)
            if limit is None or limit >= _UNLIMITED:
                continue
            usage = _read_limit(folder / usage_file) or 0
            free.append(limit - usage + _stat(folder / "memory.stat", cache_key))
    return min(free, default=None)


def free_host_bytes(meminfo: Path = MEMINFO, cgroup_root: Path = CGROUP_ROOT, own_cgroup: Path = OWN_CGROUP) -> int:
    """Free host RAM: the smaller of MemAvailable and what a cgroup memory limit leaves (:func:`cgroup_free_bytes`)."""
    available = meminfo_available_bytes(meminfo)
    limited = cgroup_free_bytes(cgroup_root, own_cgroup)
    return available if limited is None else min(available, limited)


def keeping_unsupported() -> str | None:
    """Why keeping activations cannot run with the installed torch / diffusers (a short reason), None if it can."""
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    version = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    low, high = TESTED_TORCH
    if not low <= version < high:
        tested = f"{low[0]}.{low[1]}-{high[0]}.{high[1] - 1}"
        return f"torch {torch.__version__} is outside the tested {tested}"
    for module, attribute in PRIVATE_SYMBOLS:
        try:
            found = importlib.import_module(module)
            for name in attribute.split("."):
                found = getattr(found, name)
        except (ImportError, AttributeError, RuntimeError):
            return f"{module}.{attribute} is missing"
    return None


def _log(level: int, message: str) -> None:
    """Log once per run: on the process of rank 0 (RANK unset: a single process)."""
    if os.environ.get("RANK", "0") == "0":
        logger.log(level, message)


def _auto(cfg: TrainConfig, zero_stage: int, machine: Machine) -> tuple[str, str]:
    """The setting ``auto`` picks and why (one line with the numbers)."""
    if not machine.cuda:
        return "recompute", "no CUDA device: host memory is the device's, nothing to park"
    if zero_stage == 3:
        return "recompute", "ZeRO-3 partitions the LoRA weights that the kept tensors' backward needs whole"
    if not cfg.replays_attention:
        return "recompute", f"attention backend {cfg.attention_backend!r} cannot be replayed"
    scale = cfg.tokens_per_sample * cfg.train_batch_size * cfg.dtype_bytes / (REFERENCE_TOKENS * REFERENCE_DTYPE_BYTES)
    need_attention, need_ffn = ATTENTION_HOST_BYTES * scale, ATTENTION_FFN_HOST_BYTES * scale
    per_process = machine.free_host_bytes / machine.processes
    ffn_lora = cfg.trains_feed_forward
    if per_process >= need_ffn and not ffn_lora:
        setting = "attention+ffn"
    elif per_process >= need_attention:
        setting = "attention"
    else:
        setting = "recompute"
    reason = (
        f"{per_process / 1e9:.1f} GB free host RAM per process ({machine.free_host_bytes / 1e9:.1f} GB / "
        f"{machine.processes}); attention+ffn needs {need_ffn / 1e9:.1f} GB, attention {need_attention / 1e9:.1f} GB "
        f"at {cfg.tokens_per_sample * cfg.train_batch_size:,} tokens per micro-batch"
    )
    return setting, reason + (" (the feed-forward is trained: it is recomputed)" if ffn_lora else "")


def choose_activation_memory(cfg: TrainConfig, zero_stage: int, machine: Machine | None = None) -> str:
    """The setting this run uses: ``recompute``, ``attention`` or ``attention+ffn``; logged once in one line.

    ``auto``: recompute without CUDA, under ZeRO-3 and with an attention backend that cannot be replayed; otherwise
    by the free host RAM per process of ``machine`` (default: :meth:`Machine.read`) against
    :data:`ATTENTION_FFN_HOST_BYTES` and :data:`ATTENTION_HOST_BYTES`, scaled to this run's tokens. An explicit
    setting that keeps tensors under ZeRO-3 raises TrainingError (the others are checked by
    :meth:`TrainConfig.validate_activation_memory`). A setting that keeps falls back to recompute, with a warning,
    where :func:`keeping_unsupported` says why it cannot run.
    """
    setting = cfg.activation_memory
    if not cfg.gradient_checkpointing:
        return "recompute"
    if setting == "auto":
        machine = machine or Machine.read()
        setting, reason = _auto(cfg, zero_stage, machine)
        message = f"activation memory: auto -> {setting}: {reason}"
    else:
        machine = machine or Machine(cuda=torch.cuda.is_available(), free_host_bytes=None, processes=1)
        if setting != "recompute" and zero_stage == 3:
            raise TrainingError(
                f"--activation_memory {setting} needs ZeRO-2: the DeepSpeed config is ZeRO-3, which partitions the "
                "LoRA weights that the kept tensors' backward differentiates block by block (use auto or recompute)"
            )
        message = f"activation memory: {setting}"
    if setting != "recompute":
        problem = keeping_unsupported()
        if problem is not None:
            _log(logging.WARNING, f"activation memory: {setting} falls back to recompute: {problem}")
            return "recompute"
        message += ", parked in page-locked host memory" if machine.cuda else ", kept on the device"
    _log(logging.INFO, message)
    return setting
