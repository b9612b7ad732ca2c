"""`ebslab report`'s arguments, without numpy's statistics or scipy: the CLI builds every command's parser on each
call (`ebslab --help` and a mistyped option included), so this module stays light. The CLI decides which report a
folder gets (a tune study's, or the runs' of `analysis.report`); both take these options."""

from __future__ import annotations

import argparse
from pathlib import Path

from ebslab.core.metrics import METRICS

DETECT_PT = 1.0  # `--detect` default: the difference the power sentences size seeds for (1 point of accuracy)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="run folders, or folders (e.g. a sweep) holding run folders at any depth")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md and the plots go (default: the DIR when one is given, else ./report)")
    parser.add_argument("--target", type=float, default=None,
                        help="validation accuracy the effective-batch-size section measures steps to (default: the "
                             "hardest value every run reached within the first 75%% of its budget)")
    parser.add_argument("--metric", default="acc", choices=METRICS,
                        help="headline test metric for comparisons (selection uses its validation value)")
    parser.add_argument("--exclude-collapsed", action="store_true",
                        help="old view: leave collapsed runs out of means and tests (labelled in the report)")
    parser.add_argument("--detect", type=float, default=None, metavar="D",
                        help=f"the true difference the power sentences size seeds for: in points for acc (default "
                             f"{DETECT_PT:g} = {DETECT_PT:g} point of accuracy), in metric units otherwise "
                             f"(default 0.01)")
