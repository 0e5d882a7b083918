"""What every command line shares: a user's mistake (a bad path, config, number or audio file) ends in
one line ``error: ...`` and exit code 2, not a traceback; a warning is one line ``warning: ...``;
Ctrl-C or SIGTERM (``kill``) ends in one line ``interrupted`` and exit code 130, after the command's
clean-ups ran (temporary files and folders removed; outputs are whole or absent).
``DFN4LAB_DEBUG=1`` shows the traceback."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
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
        term = None  # SIGTERM raises like Ctrl-C, so `finally` clean-ups run (killed outright, they did not)
        if threading.current_thread() is threading.main_thread():
            term = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("DFN4LAB_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if os.environ.get("DFN4LAB_DEBUG"):
                raise
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if term is not None:
                signal.signal(signal.SIGTERM, term)

    return run


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
