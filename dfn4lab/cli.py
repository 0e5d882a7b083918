"""What every command line shares: a user's mistake (a bad path, config, number or audio file) ends in
one line ``error: ...`` and exit code 2, not a traceback; a warning is one line ``warning: ...``.
``DFN4LAB_DEBUG=1`` shows the traceback."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable

# OSError: missing, unreadable or unwritable paths; ValueError: bad values, configs, JSON, audio;
# RuntimeError: the package's own "cannot do this here" errors (NoUsableFiles, ...)
USER_ERRORS = (OSError, ValueError, RuntimeError)


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a ``main(argv) -> exit code``: user errors become one line on stderr and exit 2."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        if not os.environ.get("DFN4LAB_DEBUG"):
            warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("DFN4LAB_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run
