"""Markdown tables for reports, study pages, model cards and checks: drawn by tabulate, one rule for all of them."""

from __future__ import annotations

from typing import Any, Sequence

from tabulate import tabulate


def md_cell(text: Any) -> str:
    """A cell's text kept in its cell: a `|` escaped, a newline a space."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A pipe table, every cell as given (no number parsing: "0.9000" stays "0.9000"); align: "l" or "r" a
    column. A `|` in a cell is escaped so that it stays in its cell."""
    align = align or ["l"] * len(header)
    return tabulate([[md_cell(c) for c in row] for row in rows], [md_cell(h) for h in header], tablefmt="pipe",
                    disable_numparse=True, colalign=["right" if a == "r" else "left" for a in align])
