"""The one table from our error types to exit codes, and the guard every command runs under.

Only `CkptError`s (things a user can cause) become one-line messages. Any other exception is a bug:
it keeps its traceback. CKPT_DEBUG=1 shows tracebacks for user errors too. Typer's usage errors (a value not
among an option's choices, an unknown option, a missing argument) are printed in the same one-line style
(`usage_error`), with exit status 2.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable

import typer

from ckpt_cli import errors as E

EXIT_CODES: dict[type[E.CkptError], int] = {
    E.VerificationFailed: 1,
    E.SourceError: 2,
    E.UnknownModelError: 2,
    E.ConfigMismatchError: 2,
    E.ShapeMismatchError: 2,
    E.UnsupportedError: 2,
    E.OutputError: 3,
    E.RemoteError: 4,
    E.CkptError: 2,
}
INTERRUPTED = 130


def exit_code(exc: E.CkptError) -> int:
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 2


def _print_error(message: str) -> None:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, highlight=False).print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def usage_error(exc: typer.TyperException) -> int:
    """A usage error Typer raised (its standalone mode off): one `error:` line, as ckpt's own; returns its exit
    status. An empty message is `no_args_is_help`'s, whose help is printed already."""
    message = " ".join(exc.format_message().split())
    if message:
        # Typer words a value its type rejects "Value error, 'f16' is not one of 'bf16', 'f32'."
        _print_error(message.replace(": Value error, ", ": "))
    return exc.exit_code


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def guarded(fn: Callable) -> Callable:
    """Run a command: user errors -> one line on stderr + exit code; Ctrl-C/SIGTERM -> exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rich.console import Console
        from rich.text import Text

        err = Console(stderr=True, highlight=False)
        previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, _raise_interrupt)
        except ValueError:  # not the main thread (e.g. some test runners)
            previous = None
        try:
            return fn(*args, **kwargs)
        except E.CkptError as exc:
            if os.environ.get("CKPT_DEBUG"):
                raise
            _print_error(str(exc))
            raise typer.Exit(exit_code(exc)) from None
        except KeyboardInterrupt as exc:
            kept = str(exc) if isinstance(exc, E.Interrupted) else "partial output removed"
            err.print(Text.assemble(("interrupted: ", "bold red"), f"nothing was published; {kept}"),
                      soft_wrap=True)
            raise typer.Exit(INTERRUPTED) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper
