"""The `ckpt` command: builds the Typer app and registers the commands; nothing else lives here."""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from typing import Annotated

from ckpt_cli.cli.startup import interrupts_exit

with interrupts_exit():     # Ctrl-C while the CLI's modules load: one line and exit 130
    import typer

    from ckpt_cli import __version__
    from ckpt_cli.cli import convert, demo, inspect, models, plan, verify
    from ckpt_cli.cli.errors import usage_error
    from ckpt_cli.cli.options import HelpOpt

app = typer.Typer(
    name="ckpt", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=True,
    help="Convert LLM checkpoints between Hugging Face safetensors and MaxText (Orbax), streaming, and prove "
         "each conversion right.")
app.add_typer(convert.app, name="convert")
app.command("demo")(demo.demo)
app.command("verify-logits")(verify.verify_logits)
app.command("inspect")(inspect.inspect)
app.add_typer(plan.app, name="plan")
app.command("models")(models.models)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckpt {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="",
                                          help="Print the version and exit.")] = False,
    help_: HelpOpt = False,
) -> None:
    """ckpt: HF <-> MaxText checkpoint conversion."""


def run(args: Sequence[str] | None = None) -> int:
    """Run `ckpt ARGS` (default: sys.argv) and return its exit status. Typer's standalone mode is off so that its
    usage errors (bad choice, unknown option, missing argument) come here and print as one `error:` line, as every
    other error does, instead of its usage line and framed box."""
    try:
        status = app(args, prog_name="ckpt", standalone_mode=False)
    except typer.TyperException as exc:
        return usage_error(exc)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        return 1
    # A command returns None; typer.Exit(code) comes back as its code.
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def main() -> None:
    # Everything imported so far lives until exit: keep the cycle collector off it while converting, and
    # off everything at exit (interpreter teardown would otherwise traverse every object, ~0.2 s).
    with interrupts_exit():
        gc.freeze()
        try:
            status = run()
        finally:
            gc.freeze()
    sys.exit(status)
