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


_SLASH = re.compile(r"[^/]*/|[^/]+")
_DOT = re.compile(r"[^.]*\.|[^.]+")


def atoms(word: str, width: int | None = None) -> list[str]:
    """A word's unbreakable pieces: split after each '/', and a piece still wider than `width` after each '.'."""
    out = []
    for piece in _SLASH.findall(word):
        out += _DOT.findall(piece) if width is None or len(piece) > width else [piece]
    return out


def wrap(text: str, width: int) -> str:
    """Lines of at most `width`: break at spaces, and inside a longer word only after '/' (else after '.')."""
    out: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            candidate = f"{line} {word}" if line else word
            if len(candidate) <= width:
                line = candidate
                continue
            if len(word) <= width:
                out.append(line)
                line = word
                continue
            if line:                       # the word goes on its own lines, piece by piece
                out.append(line)
                line = ""
            for atom in atoms(word, width):
                while len(atom) > width:   # one piece wider than the column: nothing else to do but cut it
                    if line:
                        out.append(line)
                        line = ""
                    out.append(atom[:width])
                    atom = atom[width:]
                if len(line) + len(atom) > width:
                    out.append(line)
                    line = ""
                line += atom
        out.append(line)
    return "\n".join(out)


def _min_text(cells: list[str], natural: int) -> int:
    """The narrowest a wrapping column gets: its longest piece that cannot break, at least MIN_TEXT."""
    longest = max((len(a) for c in cells for w in c.split() for a in atoms(w)), default=0)
    return min(natural, max(MIN_TEXT, longest))


def _natural(col: Col, cells: list[str]) -> int:
    lines = [ln for c in cells for ln in c.split("\n")]
    return max([len(col.header), *map(len, lines)]) if lines else len(col.header)


def _overhead(n: int) -> int:
    return 3 * n + 1                       # borders and one space of padding each side


def layout(grid: Grid, width: int | None) -> tuple[list[int], list[int]]:
    """(indexes of the columns shown, their widths) for a console `width` (None: unlimited)."""
    shown = list(range(len(grid.cols)))
    cells = [[r[i] for r in grid.rows] for i in range(len(grid.cols))]
    natural = [_natural(c, cells[i]) for i, c in enumerate(grid.cols)]
    if width is None:
        return shown, [natural[i] for i in shown]
    least = [_min_text(cells[i], natural[i]) if c.wrap else natural[i] for i, c in enumerate(grid.cols)]
    while True:
        room = width - _overhead(len(shown))
        droppable = [i for i in shown if grid.cols[i].drop]
        if room >= sum(least[i] for i in shown) or not droppable:
            break
        shown.remove(max(droppable, key=lambda i: (grid.cols[i].drop, i)))
    widths = {i: least[i] for i in shown}
    spare = room - sum(widths.values())
    # what is left goes to the wrapping columns from the left (the first names the row), each up to its natural width
    for i in (i for i in shown if grid.cols[i].wrap):
        more = min(natural[i] - widths[i], spare)
        widths[i] += more
        spare -= more
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
