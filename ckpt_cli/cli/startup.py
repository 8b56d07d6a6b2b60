"""Ctrl-C before a command's own guard is in place (while Python imports the CLI): one line, exit 130.

Standard library only, so it is in place before anything slow is imported.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

INTERRUPTED = 130


@contextlib.contextmanager
def interrupts_exit() -> Iterator[None]:
    """A KeyboardInterrupt inside becomes one line on stderr and exit status 130, never a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was done (Ctrl-C during start-up)\n")
        raise SystemExit(INTERRUPTED) from None
