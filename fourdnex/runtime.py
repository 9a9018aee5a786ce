"""Where and how fourdnex runs: the device a ``--device`` flag names, the one vocabulary of dtype names, the CPU
threads a piece of work may use, and the worker processes work is shared out to. Every script and subsystem decides
these here.

Devices: ``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:1``, ...

Dtypes: ``bfloat16``, ``float16``, ``float32``, and ``auto`` (bfloat16 on a GPU, float32 on a CPU). Command lines
also take the reference's spellings ``bf16``, ``fp16``, ``fp32`` and accelerate's ``no`` ("no mixed precision":
float32); settings hold the names only (:func:`fourdnex.cli.field_flag` turns an alias into its name).

Light to import (torch loads on the first call), so that the scripts' parsers answer ``--help`` at once.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fourdnex.errors import UsageError

if TYPE_CHECKING:
    import torch

#: The dtype names: torch's own (``torch.bfloat16``, ...).
DTYPES = ("bfloat16", "float16", "float32")
#: Other spellings command lines accept, by the name they stand for.
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "no": "float32"}


def dtype_choices(*names: str) -> tuple[str, ...]:
    """What a flag taking the dtypes ``names`` (and ``auto``, if named) accepts: the names, then their aliases."""
    return (*names, *(alias for alias, name in DTYPE_ALIASES.items() if name in names))


#: What a ``--dtype`` flag accepts.
DTYPE_CHOICES = dtype_choices("auto", *DTYPES)


def device_of(name: str = "auto") -> torch.device:
    """The torch device a ``--device`` flag names; UsageError for a name torch does not know or a CUDA device this
    machine lacks."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name}: not a device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here")
    return device


def dtype_name(name: str, device: torch.device | None = None) -> str:
    """The name (one of :data:`DTYPES`) of a dtype name or alias; ``auto`` is bfloat16 on a GPU, float32 on a CPU,
    and needs the ``device``."""
    if name == "auto":
        if device is None:
            raise ValueError("dtype 'auto' depends on the device")
        return "bfloat16" if device.type == "cuda" else "float32"
    if DTYPE_ALIASES.get(name, name) not in DTYPES:
        raise UsageError(f"dtype {name!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return DTYPE_ALIASES.get(name, name)


def dtype_of(name: str, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype of a dtype name or alias (``auto``: bfloat16 on a GPU, float32 on a CPU)."""
    import torch

    return getattr(torch, dtype_name(name, device))


@contextmanager
def cpu_threads(count: int | None, device: torch.device | str = "cpu", blas: bool = True) -> Iterator[None]:
    """Run the body with torch's CPU threads (and, with ``blas``, the BLAS libraries' threads that numpy and scipy
    use) limited to ``count``, when ``device`` is the CPU; restored after. ``count`` None leaves them as they are.

    Work made of many small or memory-bound tensor operations runs faster on one thread than on a machine's cores
    (BENCHMARKS.md: Registration, Novel views, Synthetic scenes, Evaluation); ``blas`` is off where only torch's
    threads were measured (registration and rendering)."""
    import torch

    if count is None or torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        if blas:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(count):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def worker_processes(
    count: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()
) -> Iterator[ProcessPoolExecutor | None]:
    """``count`` worker processes forked from this one (at the first task), each computing on one CPU thread (torch's
    and the BLAS libraries': a worker shares the cores with the others), then running ``initializer(*initargs)``;
    None for ``count`` 0 or where processes cannot be forked: the caller then does the work itself. On leaving, the
    tasks not yet started are dropped (an error ends the work without waiting for them)."""
    if count < 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield None
        return
    pool = ProcessPoolExecutor(
        count, multiprocessing.get_context("fork"), initializer=_start_worker, initargs=(initializer, initargs)
    )
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """A worker process's start: one CPU thread for good (the process ends with its pool), then ``initializer``."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)
    if initializer is not None:
        initializer(*initargs)
