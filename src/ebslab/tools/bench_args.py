"""`ebslab bench`'s arguments and contestant names, without torch: the CLI builds every command's parser on each
call (`ebslab --help` and a mistyped option included), so this module stays light; the bench is `tools.bench`."""

from __future__ import annotations

import argparse

CONTESTANTS = ("ebslab-torch", "ebslab-accelerate", "ebslab-torch-auto", "ebslab-torch-grouped", "hf-trainer",
               "naive")
# on request only (--contestants): ebslab-torch with the gradient noise scale off, for its overhead
OPTIONAL_CONTESTANTS = ("ebslab-torch-nogns",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="lengths 128 and 256, 3 steps, 1 round, a 160-review experiment "
                             "(< 10 min on an idle 2-core CPU)")
    parser.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.log")
    parser.add_argument("--model", default=None, help="model.name for every contestant (default minilm)")
    parser.add_argument("--lengths", default=None, help="comma-separated max_length values, e.g. 128,512")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per step-scenario run (>= 2)")
    parser.add_argument("--contestants", default=None, help=f"comma-separated subset of {','.join(CONTESTANTS)}")
    parser.add_argument("--rounds", type=int, default=None, help="step scenario: runs per contestant and length")
    parser.add_argument("--no-startup", action="store_true", help="skip the token-cache start-up figure")
    parser.add_argument("--no-experiment", action="store_true", help="skip the experiment scenario")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown of a step")
    parser.add_argument("--experiment-limit", type=int, default=None,
                        help="reviews in the experiment scenario (8:1:1 split; quick 160, full 3000)")
