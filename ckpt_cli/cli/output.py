"""One output sink: human (rich, to a terminal), --json (stdout, plain) or --quiet.

Results go to stdout; progress, notes and errors go to stderr. Progress bars exist only in human mode.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from ckpt_cli.resources import rss_bytes
from ckpt_cli.units import human_bytes


class RSSColumn(ProgressColumn):
    """Current resident memory of this process."""

    def render(self, task) -> Text:
        return Text(f"RSS {human_bytes(rss_bytes())}", style="magenta")


class Output:
    """Where everything a command prints goes."""

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        # Tables keep whole paths on one line when piped (no terminal width to respect).
        self.out = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
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

    def table(self, table: Table) -> None:
        if self.human:
            self.out.print(table)

    def line(self, text: str) -> None:
        if self.human:
            self.out.print(text, markup=True)

    @contextmanager
    def bytes_progress(self, label: str) -> Iterator:
        """A progress bar over bytes (done, total), with speed, RSS and ETA; a no-op outside human mode.

        The bar appears on the first update (so a run that fails validation prints only its error) and
        is hidden again if the run fails.
        """
        if not self.human:
            yield lambda done, total: None
            return
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                            DownloadColumn(binary_units=False), TransferSpeedColumn(), RSSColumn(),
                            TimeRemainingColumn(), console=self.err, transient=False)
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
