"""Tables that fit the terminal.

A table is described (columns, rows) and laid out here for a width: numbers and other short values are never cut;
text columns wrap at spaces, and a word too long for its column (a tensor path, a file name) breaks only after a
`/` or a `.`; when even that cannot fit, the least useful columns are left out (`Col.drop`, highest first) and the
title says how to see them (`--wide`, or `--json`, which always keeps everything).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rich.table import Table

MIN_TEXT = 12          # narrowest a wrapping column is made before columns are dropped instead


@dataclass(frozen=True)
class Col:
    header: str
    right: bool = False      # right-justified (numbers)
    drop: int = 0            # 0: always shown; else left out when narrow, highest first
    wrap: bool = False       # may wrap (at spaces, else after '/' or '.'); other columns are never cut
    bold: bool = False


@dataclass
class Grid:
    """A table before layout."""

    cols: list[Col]
    rows: list[list[str]] = field(default_factory=list)
    title: str | None = None
    caption: str | None = None
    show_header: bool = True

    def add_row(self, *cells: str) -> None:
        self.rows.append(list(cells))


_ATOM = re.compile(r"[^/.]*[/.]|[^/.]+")


def wrap(text: str, width: int) -> str:
    """Lines of at most `width`: break at spaces, and inside a longer word only after '/' or '.'."""
    out: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            if not line:
                candidate = word
            else:
                candidate = f"{line} {word}"
            if len(candidate) <= width:
                line = candidate
                continue
            if len(word) <= width:
                out.append(line)
                line = word
                continue
            if line:                       # the word goes on its own lines, atom by atom
                line += " "
            for atom in _ATOM.findall(word):
                while len(atom) > width:   # one atom wider than the column: nothing else to do but cut it
                    if line:
                        out.append(line)
                        line = ""
                    out.append(atom[:width])
                    atom = atom[width:]
                if len(line) + len(atom) > width:
                    out.append(line.rstrip())
                    line = ""
                line += atom
        out.append(line)
    return "\n".join(out)


def _natural(col: Col, cells: list[str]) -> int:
    lines = [ln for c in cells for ln in c.split("\n")]
    return max([len(col.header), *map(len, lines)]) if lines else len(col.header)


def _overhead(n: int) -> int:
    return 3 * n + 1                       # borders and one space of padding each side


def layout(grid: Grid, width: int | None) -> tuple[list[int], list[int]]:
    """(indexes of the columns shown, their widths) for a console `width` (None: unlimited)."""
    shown = list(range(len(grid.cols)))
    natural = [_natural(c, [r[i] for r in grid.rows]) for i, c in enumerate(grid.cols)]
    if width is None:
        return shown, [natural[i] for i in shown]
    while True:
        fixed = sum(natural[i] for i in shown if not grid.cols[i].wrap)
        wrapping = [i for i in shown if grid.cols[i].wrap]
        room = width - _overhead(len(shown)) - fixed
        need = sum(min(natural[i], MIN_TEXT) for i in wrapping)
        droppable = [i for i in shown if grid.cols[i].drop]
        if room >= need or not droppable:
            break
        shown.remove(max(droppable, key=lambda i: (grid.cols[i].drop, i)))
    widths = {i: natural[i] for i in shown}
    if wrapping and sum(natural[i] for i in wrapping) > room:
        # share the room out: narrow columns keep their width, the rest split what is left evenly
        left, todo = max(room, 0), sorted(wrapping, key=lambda i: natural[i])
        while todo:
            share = left // len(todo)
            i = todo.pop(0)
            widths[i] = max(min(natural[i], share), min(natural[i], MIN_TEXT))
            left -= widths[i]
    return shown, [widths[i] for i in shown]


def render(grid: Grid, width: int | None, wide: bool = False) -> tuple[Table, int | None]:
    """A rich Table laid out for `width` (all columns and no wrapping when `wide`), and the width to print it at."""
    shown, widths = layout(grid, None if wide else width)
    title = grid.title
    hidden = [grid.cols[i].header for i in range(len(grid.cols)) if i not in shown]
    if hidden:
        title = f"{title or ''}{' ' if title else ''}(not shown at this width: {', '.join(hidden)}; --wide or --json)"
    table = Table(title=title, caption=grid.caption, show_header=grid.show_header, header_style="bold",
                  title_justify="left", caption_justify="left")
    for i, w in zip(shown, widths, strict=True):
        c = grid.cols[i]
        table.add_column(c.header, justify="right" if c.right else "left", width=w, no_wrap=True,
                         style="bold" if c.bold else None)
    for row in grid.rows:
        table.add_row(*(wrap(row[i], w) if grid.cols[i].wrap else row[i] for i, w in zip(shown, widths,
                                                                                         strict=True)))
    total = sum(widths) + _overhead(len(shown))
    return table, (max(total, width or 0) if wide else width)
