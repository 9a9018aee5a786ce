"""The one error base of fourdnex: every problem a user can fix is a :class:`FourDNeXError`.

The scripts catch it and print its message as one line (``fourdnex.cli.run``); anything else is a bug and keeps
its traceback. Each subsystem names its own subclass (``AdapterError``, ``ClipError``, ...) beside the module that
raises it; a subclass also derives from the built-in error it stands for, so ``except ValueError`` still catches it.
"""

from __future__ import annotations


class FourDNeXError(Exception):
    """A problem with an input or a setting; the message is one line that names it."""


class UsageError(FourDNeXError, ValueError):
    """A command-line setting or input that cannot be used."""
