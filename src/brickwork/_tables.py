"""Terminal tables that fit the console's width (``bench``, ``inspect``, ``methods``).

Columns are offered in priority order and kept while the table still fits; no cell
wraps or is cut, so every row is one line and every value appears verbatim. What does
not fit is dropped (the caller says where to find it) or, when even the key column
does not fit, each key goes on a line of its own with its values below it
(:func:`print_folded`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rich import box
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

GAP = 2  # blank cells between two columns
INDENT = 4  # folded layout: values under their key


@dataclass(frozen=True)
class Column:
    header: str
    cells: Sequence[str]
    justify: Literal["left", "right"] = "right"
    priority: int = 0  # lower is kept first; ties keep the order given

    @property
    def width(self) -> int:
        return max([cell_len(self.header), *(cell_len(c) for c in self.cells)])


def width_of(columns: Sequence[Column]) -> int:
    """Cells one row of :func:`table` takes."""
    return sum(c.width for c in columns) + GAP * max(len(columns) - 1, 0)


def fit(
    columns: Sequence[Column], width: int, *, keep: int = 1
) -> tuple[list[Column], list[Column]]:
    """(kept, dropped), both in the order given. The ``keep`` columns of highest priority
    stay whatever their width; the others are added by priority while the table still
    fits in ``width``: the first that does not fit is dropped with all after it, so a
    narrow column of low priority never displaces a wider one of higher priority."""
    order = sorted(range(len(columns)), key=lambda i: columns[i].priority)
    kept = set(order[:keep])
    used = width_of([columns[i] for i in sorted(kept)])
    for i in order[keep:]:
        if used + GAP + columns[i].width > width:
            break
        kept.add(i)
        used += GAP + columns[i].width
    return (
        [c for i, c in enumerate(columns) if i in kept],
        [c for i, c in enumerate(columns) if i not in kept],
    )


def table(columns: Sequence[Column]) -> Table:
    """A borderless table (a rule under the header) whose rows are never wrapped."""
    t = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        padding=(0, GAP // 2),
    )
    for c in columns:
        t.add_column(Text(c.header), justify=c.justify, no_wrap=True)
    for row in zip(*(c.cells for c in columns)):
        t.add_row(*(Text(x) for x in row))
    return t


def print_folded(
    console: Any, key_header: str, keys: Sequence[str], columns: Sequence[Column]
) -> None:
    """Each key on a line of its own, printed in full even when wider than the terminal
    (the terminal wraps it, nothing cuts it); its values on the next line, indented,
    in aligned ``columns`` (which the caller has fitted to ``width - INDENT``)."""
    widths = [c.width for c in columns]

    def line(cells: Sequence[str]) -> Text:
        parts = [_pad(cell, w, c.justify) for c, cell, w in zip(columns, cells, widths)]
        return Text(" " * INDENT + (" " * GAP).join(parts).rstrip())

    console.print(Text(key_header, style="bold"))
    console.print(line([c.header for c in columns]), style="bold")
    console.print(Text("─" * min(console.width, INDENT + width_of(columns))))
    for i, key in enumerate(keys):
        console.print(Text(key), soft_wrap=True)
        console.print(line([c.cells[i] for c in columns]), soft_wrap=True)


def _pad(s: str, width: int, justify: str) -> str:
    fill = " " * max(width - cell_len(s), 0)
    return s + fill if justify == "left" else fill + s
