"""`ebslab export`'s arguments, without torch: the CLI builds every command's parser on each call (`ebslab --help`
and a mistyped option included), so this module stays light; the export is `serving.export`."""

from __future__ import annotations

import argparse

MARKER = "ebslab_export.json"
"""What makes a folder an ebslab export (--overwrite replaces only such a folder; a checkpoint has config.json too)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (out.dir/out.name)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the export folder (must not exist; missing parent folders are created; never inside a "
                        "run folder)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which weights (default best)")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing export folder (one holding {MARKER})")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (torch.onnx), checked with ONNX Runtime")
