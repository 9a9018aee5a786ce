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

    A process group this process joined (torchrun launches) is destroyed before returning, on success and on failure
    alike, so no collective's thread outlives the interpreter.
    """
    args = parser.parse_args(argv)
    try:
        main(args)
    except FourDNeXError as err:
        sys.exit(f"{parser.prog}: {err}")
    finally:
        if "torch.distributed" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
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
