"""What every script does around its ``main``: one line and a non-zero exit for a user error, a clean teardown; the
``type`` of a flag that accepts other spellings of its values."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fourdnex.errors import FourDNeXError


def aliased(aliases: dict[str, str]) -> Callable[[str], str]:
    """argparse's ``type`` of a flag that accepts other spellings: the name an alias stands for, any other value as
    given (``choices`` then checks it), so that settings hold one spelling of each value."""

    def name(value: str) -> str:
        return aliases.get(value, value)

    return name


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

