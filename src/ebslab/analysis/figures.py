"""One style for every figure ebslab writes (reports, EBS study, tune): size, title case, axis labels with units,
a legend that says what the markers are, log axes with plain numbers, and a caveat line where a figure says less
than it seems to.

A plot function draws on `new_figure()`'s axes, calls `style(...)`, and `save(...)`s. `style_problems(fig)` lists
what breaks the standard (the tests run it on every figure).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

FIGSIZE = (8.0, 5.0)
DPI = 110
FONT = 9  # legend and caveat size; titles and labels use matplotlib's defaults

# Words kept lower-case inside a title (not first): articles, short prepositions and conjunctions.
SMALL_WORDS = {"a", "an", "the", "and", "or", "nor", "but", "of", "per", "vs", "vs.", "to", "in", "on", "at", "by",
               "for", "from", "with", "as", "over", "into", "than"}

# y-axis words for a metric: what it is and its unit
METRIC_LABELS = {
    "acc": "accuracy (fraction correct)", "loss": "loss (cross-entropy, nats)", "ece": "ECE (fraction)",
    "f1": "macro F1 (0-1)", "mcc": "MCC (-1 to 1)", "auroc": "AUROC (0-1)", "brier": "Brier score (0-2)",
}


def metric_label(metric: str, split: str = "") -> str:
    """`val/acc` or `acc` -> `Validation accuracy (fraction correct)`."""
    if "/" in metric and not split:
        split, metric = metric.split("/", 1)
    words = METRIC_LABELS.get(metric, metric)
    prefix = {"val": "Validation", "test": "Test", "train": "Training"}.get(split, split.capitalize())
    return f"{prefix} {words}" if prefix else words[:1].upper() + words[1:]


def title_case(text: str) -> str:
    """Headline capitalisation that leaves names alone: `val/acc`, `batch.effective=16`, `B_simple`, `EBS` and
    words with digits keep their spelling; small words stay lower-case unless first."""
    out = []
    for i, word in enumerate(text.split(" ")):
        core = word.lstrip("([\"'")
        lead = word[: len(word) - len(core)]
        if not core or re.search(r"[/_=.\d]|[A-Z]", core[1:]) or core[0].isupper() or not core[0].isalpha():
            out.append(word)  # a name, a number, an acronym, or already capitalised
        elif i > 0 and core.lower() in SMALL_WORDS:
            out.append(word)
        else:
            out.append(lead + core[0].upper() + core[1:])
    return " ".join(out)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure():
    """(fig, ax) at the standard size."""
    fig, ax = pyplot().subplots(figsize=FIGSIZE)
    return fig, ax


def plain_log_axis(ax, axis: str = "x", base: float = 10, ticks: Sequence[float] | None = None) -> None:
    """A log axis whose ticks read as plain numbers (`8`, `64`, `1,000`, `0.001`), never `6x10^0`; `ticks` puts
    them exactly at the values that ran (e.g. each effective batch)."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def plain(value: float, _pos: Any = None) -> str:
        if value == 0:
            return "0"
        if abs(value) >= 1 and float(value).is_integer():
            return f"{value:,.0f}"
        return np.format_float_positional(value, precision=3, unique=False, fractional=False, trim="-")

    getattr(ax, f"set_{axis}scale")("log", base=base)
    target = ax.xaxis if axis == "x" else ax.yaxis
    if ticks is not None:
        getattr(ax, f"set_{axis}ticks")(list(ticks))
        target.set_minor_formatter(NullFormatter())
    target.set_major_formatter(FuncFormatter(plain))
    if ticks is None:  # minor ticks labelled only where a decade holds too few major ones to read a value
        lo, hi = (ax.get_xlim() if axis == "x" else ax.get_ylim())
        if hi / max(lo, 1e-300) < base ** 2:
            target.set_minor_formatter(FuncFormatter(plain))


def style(ax, *, title: str, xlabel: str, ylabel: str, legend_title: str | None = None,
          caveat: str | None = None, legend: bool = True) -> None:
    """Title (title case), axis labels (with units), grid, and a legend whose title explains the markers; a
    caveat is printed under the plot (saved with the figure)."""
    for loc in ("left", "right"):  # Optuna titles on the left: one title per plot
        ax.set_title("", loc=loc)
    ax.set_title(title_case(title))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="major")
    handles, labels = ax.get_legend_handles_labels()
    if legend and handles:
        ax.legend(handles, labels, title=legend_title, fontsize=FONT, title_fontsize=FONT, loc="best")
    elif ax.get_legend() is not None:
        ax.get_legend().remove()
    if caveat:
        ax.figure._ebslab_caveat = caveat  # drawn by save(), below the axes
        ax.figure.text(0.01, 0.01, caveat, fontsize=FONT, style="italic", ha="left", va="bottom", wrap=True)


def save(fig, path: Path, dpi: int = DPI) -> Path:
    """Lay out at the standard size, write (atomically and durably, as every report file) and close."""
    from ebslab.core.files import atomic_write_with

    fig.set_size_inches(*FIGSIZE)
    try:
        fig.tight_layout(rect=(0, 0.06, 1, 1) if getattr(fig, "_ebslab_caveat", None) else (0, 0, 1, 1))
        # the temporary sibling keeps the suffix, from which matplotlib picks the format
        atomic_write_with(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi))
    finally:
        pyplot().close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# What a figure shows, and what breaks the standard (for tests)


def describe(fig) -> dict[str, Any]:
    """The words a reader sees on each axes of a drawn figure: title, axis labels, legend, tick labels."""
    fig.canvas.draw()
    out = {"size": tuple(round(float(v), 2) for v in fig.get_size_inches()), "caveat": getattr(fig, "_ebslab_caveat", None),
           "axes": []}
    for ax in fig.axes:
        if not ax.get_visible() or ax.get_label() == "<colorbar>":
            continue
        leg = ax.get_legend()
        out["axes"].append({
            "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
            "other_titles": [t for t in (ax.get_title(loc="left"), ax.get_title(loc="right")) if t],
            "legend": [t.get_text() for t in leg.get_texts()] if leg else [],
            "legend_title": leg.get_title().get_text() if leg else "",
            "xticks": [t.get_text() for t in ax.get_xticklabels(which="both") if t.get_text()],
            "yticks": [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()],
        })
    return out


def style_problems(fig) -> list[str]:
    """What in this figure breaks the standard: size, a title not in title case, an axis without a label, a
    legend entry that explains nothing (`all`), a tick printed in scientific notation (`6x10^0`)."""
    seen = describe(fig)
    problems = []
    if seen["size"] != FIGSIZE:
        problems.append(f"size {seen['size']} is not {FIGSIZE}")
    for ax in seen["axes"]:
        if not ax["title"] or ax["title"] != title_case(ax["title"]):
            problems.append(f"title {ax['title']!r} is not in title case")
        if ax["other_titles"]:
            problems.append(f"more than one title: {[ax['title'], *ax['other_titles']]}")
        for which in ("xlabel", "ylabel"):
            if not ax[which] or not ax[which][0].isupper():
                problems.append(f"{which} {ax[which]!r} is missing or not capitalised")
        if any(entry.strip().lower() in ("all", "all runs") for entry in ax["legend"]):
            problems.append(f"legend entry 'all' explains nothing: {ax['legend']}")
        for tick in ax["xticks"] + ax["yticks"]:
            if re.search(r"\\times|\^|mathdefault|e[+-]\d", tick):
                problems.append(f"tick {tick!r} in scientific notation")
    return problems
