"""fourdnex.runtime: the device a --device flag names, the one vocabulary of dtype names and its aliases, the CPU
threads work runs on and the worker processes it is shared out to, checked against torch's and threadpoolctl's own
state."""

import os

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from fourdnex.errors import UsageError
from fourdnex.runtime import (
    DTYPE_CHOICES,
    cpu_threads,
    device_of,
    dtype_choices,
    dtype_name,
    dtype_of,
    worker_processes,
)


def blas_threads() -> set[int]:
    """The thread counts of every BLAS and OpenMP library loaded in this process, as they report them."""
    assert np.__version__  # numpy (and with it its BLAS) is loaded
    return {library["num_threads"] for library in threadpool_info()}


def test_devices_are_torchs_and_auto_is_cuda_where_there_is_one():
    assert device_of() == device_of("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert device_of("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match=r"^--device gpu0: not a device"):
        device_of("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match=r"^--device cuda:1: CUDA is not available here$"):
            device_of("cuda:1")


def test_dtype_names_their_aliases_and_auto():
    torch_dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    aliases = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "no": torch.float32}
    assert {name: dtype_of(name) for name in [*torch_dtypes, *aliases]} == {**torch_dtypes, **aliases}
    assert {dtype_name(name) for name in aliases} == {"bfloat16", "float16", "float32"}
    assert dtype_of("auto", torch.device("cpu")) == torch.float32
    assert dtype_of("auto", torch.device("cuda")) == torch.bfloat16  # a device object needs no GPU
    assert sorted(DTYPE_CHOICES) == sorted(["auto", *torch_dtypes, *aliases])
    assert dtype_choices("bfloat16", "float32") == ("bfloat16", "float32", "bf16", "fp32", "no")
    with pytest.raises(ValueError, match="depends on the device"):
        dtype_name("auto")
    with pytest.raises(UsageError, match=r"^dtype 'fp8' is not one of auto, bfloat16, float16, float32, bf16"):
        dtype_of("fp8")


def test_cpu_threads_limit_torch_and_blas_inside_and_restore_them_after():
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with threadpool_limits(3):
            outside = blas_threads()
            assert outside == {3}
            with cpu_threads(1):
                assert torch.get_num_threads() == 1 and blas_threads() == {1}
            assert torch.get_num_threads() == 3 and blas_threads() == outside
            with cpu_threads(2, blas=False):
                assert torch.get_num_threads() == 2 and 3 in blas_threads()  # the BLAS libraries keep theirs
            assert torch.get_num_threads() == 3 and blas_threads() == outside
            with cpu_threads(1, torch.device("cuda")), cpu_threads(None):  # not the CPU, or no limit: untouched
                assert torch.get_num_threads() == 3 and blas_threads() == outside
            with pytest.raises(KeyError), cpu_threads(1):
                raise KeyError("a failure inside")
            assert torch.get_num_threads() == 3 and blas_threads() == outside
    finally:
        torch.set_num_threads(previous)


_STARTED = None


def _remember(value: str) -> None:
    global _STARTED
    _STARTED = value


def _where_and_how(_: int) -> tuple[int, int, set[int], str | None]:
    return os.getpid(), torch.get_num_threads(), blas_threads(), _STARTED


def test_worker_processes_run_on_one_thread_each_after_their_initializer():
    here = torch.get_num_threads(), blas_threads()
    with worker_processes(2, _remember, ("started",)) as pool:
        seen = list(pool.map(_where_and_how, range(6)))
    assert os.getpid() not in {pid for pid, *_ in seen}
    assert all((threads, blas, started) == (1, {1}, "started") for _, threads, blas, started in seen), seen
    assert (torch.get_num_threads(), blas_threads()) == here and _STARTED is None  # this process: untouched
    with worker_processes(0) as pool:
        assert pool is None
