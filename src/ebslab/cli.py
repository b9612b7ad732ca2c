"""The `ebslab` command: train, sweep, report, bench, predict, export, tune. Errors in what the user gave: one
line, exit code 2."""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from ebslab.core.errors import UserError


def _train(args: argparse.Namespace) -> int:
    from ebslab.core.config import load_config
    from ebslab.core.runfolder import load_run_config
    from ebslab.loop.train import train

    extra: dict = {}
    if os.environ.get("EBSLAB_TUNE_STUDY"):  # a trial of `ebslab tune`: it reports to its Optuna trial
        from ebslab.experiments.tune import trial_callbacks_from_env

        extra["callbacks"] = trial_callbacks_from_env()
    if args.resume:
        if args.items:
            raise UserError("--resume RUN_DIR takes no config file or overrides: the run's config.yaml is used")
        cfg, _ = load_run_config(Path(args.resume))
        summary = train(cfg, resume_dir=Path(args.resume), **extra)
    else:
        items = list(args.items)
        first = items[0] if items else ""
        # a config path may contain "=" (sweep run folders are named key=value,...): decide by suffix
        config = items.pop(0) if first and ("=" not in first or first.endswith((".yaml", ".yml"))) else None
        overrides = items
        summary = train(load_config(config, overrides), overwrite=args.overwrite, **extra)
    if summary["exit_code"]:
        return summary["exit_code"]
    return 0 if summary["status"] in ("completed", "collapsed", "pruned") else 1


def _run_command(module: str, args: argparse.Namespace) -> int:
    return importlib.import_module(module).run(args)


def _report(args: argparse.Namespace) -> int:
    """`ebslab report`: a tune study's folder (study.json) gets the study's report (verdict, search, plots); run
    and sweep folders get the runs' report."""
    from ebslab.analysis import report
    from ebslab.core.files import check_folder_target

    dirs = [Path(d) for d in args.dirs]
    if len(dirs) == 1 and (dirs[0] / "study.json").is_file():
        from ebslab.experiments.tune import report_study

        out = args.out if getattr(args, "out", None) is not None else dirs[0]
        check_folder_target(out, "--out")
        print(report_study(dirs[0], Path(out)))
        return 0
    return report.run(args)


# every command after `train`: (name, the module with its add_arguments, one line for `ebslab --help`). Every call
# builds the whole parser (`ebslab --help` and a mistyped option too), so these modules are light: no torch,
# transformers, pandas, scipy, optuna (tests/test_cli.py)
COMMANDS = (("sweep", "ebslab.experiments.sweep_command", "a grid of runs from a sweep file, each run in its own folder"),
            ("report", "ebslab.analysis.report_args", "tables, plots and statistics from run, sweep or study folders"),
            ("bench", "ebslab.tools.bench_args", "training throughput against HF Trainer and a naive loop"),
            ("predict", "ebslab.serving.predict_args", "labels and class probabilities for new texts, from a run folder"),
            ("export", "ebslab.serving.export_args", "a folder transformers.pipeline loads, with a model card"),
            ("tune", "ebslab.experiments.tune", "an Optuna search from a study file, ending in a multi-seed verdict"))
# the module whose run(args) does a command, where its arguments live apart: imported only when the command runs
RUNNERS = {"bench": "ebslab.tools.bench", "predict": "ebslab.serving.predict", "export": "ebslab.serving.export"}
TRAIN_HELP = "one run (config file and/or key=value overrides) into its run folder"

EPILOG = """\
examples:
  ebslab train configs/demo.yaml                        one run -> runs/demo/
  ebslab train model.name=tiny-bert data.limit=300      defaults + dotted overrides, no file
  ebslab train --resume runs/demo                       continue an interrupted run
  ebslab sweep configs/sweeps/cpu-minilm.yaml --out runs
  ebslab report runs/cpu-minilm
  ebslab predict runs/demo texts.txt
  ebslab export runs/demo --out exports/demo
  ebslab tune configs/tune/cpu-minilm-tune.yaml --out runs

`ebslab COMMAND --help` lists a command's options. Config keys: docs/config.md; sweep and study files:
docs/files.md."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebslab", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Fine-tune text encoders for classification and measure which training choices matter.")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help=TRAIN_HELP, description=TRAIN_HELP)
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="a YAML config file, then dotted overrides, e.g. batch.effective=256")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.set_defaults(func=_train)

    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        # every command's module needs only ebslab's required dependencies: an ImportError here is a bug to show,
        # not a command to hide; a runner module that is missing is one too
        importlib.import_module(module).add_arguments(p)
        runner = RUNNERS.get(name, module)
        if importlib.util.find_spec(runner) is None:
            raise ModuleNotFoundError(f"No module named '{runner}' (the runner of `ebslab {name}`)", name=runner)
        p.set_defaults(func=_report if name == "report" else functools.partial(_run_command, runner))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # a log file: no "Loading weights" bars (carriage returns) from the HF libraries
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # options may sit between overrides (`train cfg.yaml --overwrite a=1`): argparse leaves the rest here
    if args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.items += extra
    elif args.command == "predict" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"ebslab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ebslab: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
