"""The `ckpt` command: builds the Typer app and registers the commands; nothing else lives here."""

from __future__ import annotations

import gc
from typing import Annotated

from ckpt_cli.cli.startup import interrupts_exit

with interrupts_exit():     # Ctrl-C while the CLI's modules load: one line and exit 130
    import typer

    from ckpt_cli import __version__
    from ckpt_cli.cli import convert, demo, inspect, models, plan, verify
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


def main() -> None:
    # Everything imported so far lives until exit: keep the cycle collector off it while converting, and
    # off everything at exit (interpreter teardown would otherwise traverse every object, ~0.2 s).
    with interrupts_exit():
        gc.freeze()
        try:
            app()
        finally:
            gc.freeze()
