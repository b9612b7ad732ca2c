"""`ebslab predict`'s arguments, without torch or pandas: the CLI builds every command's parser on each call
(`ebslab --help` and a mistyped option included), so this module stays light; prediction is `serving.predict`."""

from __future__ import annotations

import argparse

# only these may differ from the run's config at prediction time: they move the work, never its numbers
PREDICT_OVERRIDES = ("train.device", "train.precision", "eval.batch_size")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (out.dir/out.name)")
    p.add_argument("input", metavar="INPUT", help="csv/parquet/jsonl file, a folder of them, a .txt file "
                                                  "(one text per line) or - for stdin")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"only {', '.join(PREDICT_OVERRIDES)}, e.g. train.device=cpu")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which weights (default best)")
    p.add_argument("--out", metavar="FILE", help="output .csv, .parquet or .jsonl (default: csv on stdout); never "
                                                 "inside a run folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--text-column", metavar="C", help="the input's text column (default: the run's data.text_column)")
