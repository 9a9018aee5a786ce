"""What every script does around its ``main``: one line and a non-zero exit for a user error, a clean teardown."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fourdnex.errors import FourDNeXError, UsageError

if TYPE_CHECKING:
    import torch


def run(
    main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> None:
    """Parse ``argv`` (default: the command line) and call ``main``; a :class:`FourDNeXError` exits with
    ``<parser.prog>: <message>``.

    A process group this process joined (torchrun launches with ``--cp``) is left before returning: after a barrier
    on success, at once on failure.
    """
    args = parser.parse_args(argv)
    try:
        main(args)
        _leave_process_group(wait_for_others=True)
    except FourDNeXError as err:
        sys.exit(f"{parser.prog}: {err}")
    finally:
        _leave_process_group(wait_for_others=False)


def _leave_process_group(wait_for_others: bool) -> None:
    """Destroy the process group this process joined, if any; with ``wait_for_others``, first wait until every
    process got here, so none exits while a message to or from it is still in flight (gloo aborts the process
    that is torn down under a pending transfer)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """The torch device of a ``--device`` flag: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...;
    UsageError for a name torch does not know or a CUDA device this machine lacks."""
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
