"""What every script does around its ``main``: one line and a non-zero exit for a user error, a clean teardown."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fourdnex.errors import FourDNeXError


def run(main: Callable[[argparse.Namespace], None], args: argparse.Namespace, prog: str) -> None:
    """Call ``main(args)``; a :class:`FourDNeXError` exits with ``prog: message``.

    A process group this process joined (torchrun launches) is destroyed before the process exits, on success and on
    failure alike, so no collective thread outlives the interpreter.
    """
    try:
        main(args)
    except FourDNeXError as err:
        sys.exit(f"{prog}: {err}")
    finally:
        if "torch" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
