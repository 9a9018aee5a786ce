"""Context parallelism over the processes of a torchrun launch: diffusers' Ulysses and ring attention.

Every process runs the whole pipeline with the same seed; inside the transformer, diffusers' context-parallel plan
(``WanTransformer3DModel._cp_plan``) splits the token sequence across processes: the outputs of ``rope`` (our shared
RoPE, computed for the full fused sequence first) and the input of ``blocks.0`` are split along the sequence, and
``proj_out``'s output is gathered back. The 769 text + image tokens are not split. Ulysses exchanges heads for
sequence (the process count must divide the 40 heads); ring passes key/value chunks around (any count that divides
the sequence). Every process ends with the same latents. The VAE is not split, but the two halves of the width are
decoded on two processes at once (``FourDNeXPipeline.enable_split_decoding``): the first decodes the RGB video, the
second the XYZ video and sends it to the first, which alone returns both videos and writes the results.

    torchrun --nproc_per_node 4 inference.py --cp ulysses --prompt ... --image ... --out ...
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fourdnex.config import latent_frames
from fourdnex.generate.acceleration import AccelerationError


@dataclass(frozen=True)
class Process:
    """Where this process sits in the launch."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Launch:
    """Where torchrun (or accelerate) put this process; one process alone is rank 0 of 1."""

    rank: int
    world_size: int
    local_rank: int


def launch_of_this_process() -> Launch:
    """This process's place in its launch, from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK)."""
    if not all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return Launch(0, 1, 0)
    return Launch(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def launch_command(script: str = "inference.py") -> str:
    """How to start ``script`` on N processes with the running interpreter's own torch (no ``torchrun`` on PATH is
    needed, e.g. in a virtual environment that is not activated)."""
    return f"{shlex.quote(sys.executable)} -m torch.distributed.run --nproc_per_node N {script} ..."


def device_of_local_rank(device: torch.device, local_rank: int) -> torch.device:
    """Process ``local_rank``'s device: GPU ``local_rank`` on a CUDA machine, else ``device`` itself."""
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise AccelerationError(
            f"process {local_rank} of this node has no GPU: only {torch.cuda.device_count()} GPUs are visible"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def init_processes(mode: str, device_type: str) -> Process:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs); each process takes GPU ``LOCAL_RANK``."""
    launch = launch_of_this_process()
    if launch.world_size < 2:
        raise AccelerationError(f"--cp {mode} needs several processes: launch with {launch_command()}")
    if device_type == "cuda":
        device = device_of_local_rank(torch.device("cuda"), launch.local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Process(rank=dist.get_rank(), world_size=launch.world_size, device=device)


def check_split(mode: str, world_size: int, tokens: int, heads: int) -> None:
    """Raise AccelerationError unless ``world_size`` processes can share ``tokens`` (and, for Ulysses, ``heads``)."""
    if tokens % world_size:
        raise AccelerationError(
            f"--cp {mode}: the {tokens} tokens of this video size do not split evenly over {world_size} processes; "
            "choose a process count that divides them or another --height/--width/--num_frames"
        )
    if mode == "ulysses" and heads % world_size:
        raise AccelerationError(
            f"--cp ulysses: the {heads} attention heads do not split over {world_size} processes; use --cp ring"
        )


@contextlib.contextmanager
def _cpu_counts_as_one_device() -> Iterator[None]:
    """On a machine without accelerators, let diffusers place each process on the CPU.

    diffusers 0.42.1 assigns ``rank % torch.accelerator.device_count()`` as the device index, which divides by zero
    when there is no accelerator; the CPU is one device for this purpose.
    """
    if torch.accelerator.is_available():
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def enable_context_parallel(transformer: torch.nn.Module, mode: str, world_size: int) -> None:
    """Shard the transformer's sequence over the process group with diffusers' context-parallel plan."""
    from diffusers import ContextParallelConfig

    if mode == "ulysses":
        config = ContextParallelConfig(ulysses_degree=world_size)
    elif mode == "ring":
        config = ContextParallelConfig(ring_degree=world_size)
    else:
        raise AccelerationError(f"--cp must be ulysses or ring, got {mode!r}")
    with _cpu_counts_as_one_device():
        transformer.enable_parallelism(config=config)


def tokens_of(num_frames: int, height: int, width: int, fused: bool, patch=(1, 2, 2), scale: int = 8) -> int:
    """Transformer sequence length of a sample: latent frames x patches (the width doubled when fused)."""
    frames = latent_frames(num_frames) // patch[0]
    return frames * (height // scale // patch[1]) * (width * (2 if fused else 1) // scale // patch[2])
