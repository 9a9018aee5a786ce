"""What every script does around its ``main``: flags declared from a settings dataclass and turned back into it,
one line and a non-zero exit for a user error, a clean teardown.

A subsystem's settings are one dataclass whose field defaults are the only defaults: :func:`field_flag` declares
a field's flag with the field's default, and :func:`settings` builds the dataclass from the parsed flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fourdnex.errors import FourDNeXError
from fourdnex.runtime import DTYPE_ALIASES, DTYPE_CHOICES, dtype_choices

Settings = TypeVar("Settings")


def field_default(config: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``config`` (a ``default_factory``'s value); KeyError for a name
    that is no field, dataclasses.MISSING for a field without a default."""
    field = {f.name: f for f in dataclasses.fields(config)}[name]
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def field_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config: type,
    name: str,
    *spellings: str,
    aliases: dict[str, str] | None = None,
    **kwargs,
) -> argparse.Action:
    """Declare the flag of field ``name`` of the dataclass ``config``: ``--name`` (or ``spellings``, the first the
    one the help names), stored under the field's name, with the field's default (``%(default)s`` in ``help``
    shows it); ``kwargs`` as ``add_argument``'s. ``aliases`` maps other spellings of values, listed in ``choices``,
    to the names they stand for, which the settings then hold."""
    default = field_default(config, name)
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if aliases:
        choices = kwargs["choices"]
        kwargs["type"] = lambda value: aliases[value] if value in aliases and value in choices else value
    return parser.add_argument(*(spellings or [f"--{name}"]), dest=name, **kwargs)


def dtype_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config: type,
    name: str,
    dtypes: tuple[str, ...] | None = None,
    **kwargs,
) -> argparse.Action:
    """:func:`field_flag` of a dtype field: the values are ``dtypes`` (default: every dtype name and ``auto``) and
    their other spellings (:data:`fourdnex.runtime.DTYPE_ALIASES`), which the settings hold by their full name."""
    choices = dtype_choices(*dtypes) if dtypes else DTYPE_CHOICES
    return field_flag(parser, config, name, aliases=DTYPE_ALIASES, choices=choices, **kwargs)


def settings(config: type[Settings], args: argparse.Namespace, **values) -> Settings:
    """The dataclass ``config`` with every field the parsed ``args`` hold (a flag stored under the field's name);
    ``values`` set more fields, or others than the flags say (settings nested in it, a value the script decided)."""
    fields = {f.name for f in dataclasses.fields(config) if f.init}
    return config(**{**{name: value for name, value in vars(args).items() if name in fields}, **values})


def switch(value: str) -> bool | None:
    """argparse's ``type`` of an ``auto``/``on``/``off`` flag: None (decided for the machine at hand), True, False."""
    choices = {"auto": None, "on": True, "off": False}
    if value not in choices:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of auto, on, off")
    return choices[value]


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
