"""One output sink: human (rich, to a terminal), --json (stdout, plain) or --quiet.

Results go to stdout; progress, notes and errors go to stderr. Progress bars exist only in human mode.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from ckpt_cli.cli.tables import Grid, render
from ckpt_cli.resources import rss_bytes
from ckpt_cli.units import human_bytes


class RSSColumn(ProgressColumn):
    """Current resident memory of this process."""

    def render(self, task) -> Text:
        return Text(f"RSS {human_bytes(rss_bytes())}", style="magenta")


PIPED_WIDTH = 120


def output_width() -> int:
    """The width tables are laid out for: $COLUMNS, else the terminal's (stdout's, or when stdout is piped the
    terminal's that the user sees on stderr or stdin), else 120."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    for stream in (sys.stdout, sys.stderr, sys.stdin):
        try:
            return os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            continue
    return PIPED_WIDTH


class BytesColumn(ProgressColumn):
    """'1.23 GB / 3.40 GB', in the units every summary uses (units.human_bytes)."""

    def render(self, task) -> Text:
        total = human_bytes(task.total) if task.total is not None else "?"
        return Text(f"{human_bytes(task.completed)}/{total}", style="green")


class RateColumn(ProgressColumn):
    """Bytes a second, in the same units."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{human_bytes(speed)}/s", style="red")


class ETAColumn(ProgressColumn):
    """'ETA 0:01:05' while running, 'took 0:03:12' when done."""

    max_refresh = 0.5

    def render(self, task) -> Text:
        from datetime import timedelta

        if task.finished:
            return Text(f"took {timedelta(seconds=int(task.finished_time or task.elapsed or 0))}", style="cyan")
        left = task.time_remaining
        return Text("ETA -:--:--" if left is None else f"ETA {timedelta(seconds=int(left))}", style="cyan")


# The widest the number columns get ('999.99 MB/999.99 MB', '999.99 MB/s', 'RSS 999.99 MB', 'took 0:00:00') and the
# gaps before them: what a progress line needs besides its label, bar and percentage.
NUMBERS_WIDTH = 4 + 19 + 11 + 13 + 12
BAR_MAX, BAR_MIN, PERCENT_WIDTH = 30, 4, 5


def progress_layout(label: str, width: int) -> tuple[int, bool]:
    """The bar's width (0: no bar) and whether a percentage fits, so that a progress line of `label` fits `width`
    columns with its numbers whole (rich would otherwise wrap or cut them)."""
    room = width - len(label) - NUMBERS_WIDTH
    percent = room >= BAR_MAX + 1 + PERCENT_WIDTH
    bar = min(BAR_MAX, room - 1 - (PERCENT_WIDTH if percent else 0))
    return (bar if bar >= BAR_MIN else 0), percent


class Output:
    """Where everything a command prints goes."""

    def __init__(self, json_mode: bool = False, quiet: bool = False, wide: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.wide = wide
        self.width = output_width()
        self.tty = sys.stdout.isatty()
        self.out = Console(highlight=False, width=self.width)
        self.err = Console(stderr=True, highlight=False)

    @property
    def human(self) -> bool:
        return not (self.json_mode or self.quiet)

    def note(self, message: str) -> None:
        """A one-line remark on stderr (not in --quiet)."""
        if not self.quiet:
            self.err.print(Text.assemble(("note: ", "dim"), message), soft_wrap=True)

    def error(self, message: str) -> None:
        self.err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)

    def emit_json(self, data: dict) -> None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        sys.stdout.flush()

    def table(self, table: Table | Grid) -> None:
        """A table laid out for this width (see cli/tables.py); piped, its lines carry no trailing spaces."""
        if not self.human:
            return
        width = self.width
        if isinstance(table, Grid):
            table, width = render(table, self.width, self.wide)
        self._print(table, width)

    def line(self, text: str) -> None:
        if self.human:
            self._print(Text.from_markup(text), self.width)

    def _print(self, renderable, width: int | None) -> None:
        self.out.width = width or self.width     # --wide tables may be wider than the terminal
        if self.tty:
            self.out.print(renderable, width=width, crop=not self.wide)
            return
        with self.out.capture() as captured:
            self.out.print(renderable, width=width, crop=not self.wide, soft_wrap=isinstance(renderable, Text))
        text = "\n".join(line.rstrip() for line in captured.get().split("\n"))
        sys.stdout.write(text)
        sys.stdout.flush()

    @contextmanager
    def bytes_progress(self, label: str) -> Iterator:
        """A progress bar over bytes (done, total), with speed, RSS and ETA; a no-op outside human mode.

        The bar appears on the first update (so a run that fails validation prints only its error) and
        is hidden again if the run fails.
        """
        if not self.human:
            yield lambda done, total: None
            return
        bar, percent = progress_layout(label, self.err.width)
        progress = Progress(TextColumn("[bold]{task.description}"), *([BarColumn(bar)] if bar else []),
                            *([TaskProgressColumn()] if percent else []),
                            BytesColumn(), RateColumn(), RSSColumn(),
                            ETAColumn(), console=self.err, transient=False)
        state: dict = {}

        def update(done: int, total: int) -> None:
            if not state:
                progress.start()
                state["task"] = progress.add_task(label, total=total)
            progress.update(state["task"], completed=done, total=total)

        try:
            yield update
        except BaseException:
            if state:
                progress.update(state["task"], visible=False)
            raise
        finally:
            if state:
                progress.stop()
