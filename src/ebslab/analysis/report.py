"""`ebslab report`: tables, plots and statistics from run folders only (docs/run-folder.md).

What it writes into the output folder:
- `report.md`: "what mattered" (main effect of each varying key, paired by seed and the other keys), one row
  per run, the configurations over seeds (seeds completed / fell back / collapsed / diverged / failed, validation
  and test means), each configuration against the reference, and the runs without a test metric.
- `report.json`: every number the markdown shows (groups, comparisons, main effects, ignored keys, the family).
- `val_acc.png`, `val_loss.png`, `test_acc_vs_ebs.png`.

A report is four steps: read the run folders (ebslab.analysis.runs), analyse them (ebslab.analysis.compare: the
numbers, and the rules for which runs and seeds enter), render (ebslab.analysis.render: words and tables;
ebslab.analysis.report_figures: figures; the lr and EBS sections their own modules), write.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ebslab.analysis import ebs_section, lr_study, render, replicates, report_figures, stats
from ebslab.analysis.compare import analyse
from ebslab.analysis.report_args import add_arguments  # noqa: F401 (the command's options, kept light for the CLI)
from ebslab.analysis.runs import (Group, Run, comparable_runs, find_run_dirs, group_runs, load_run, run_names,
                                  varying_keys)
from ebslab.core.errors import UserError
from ebslab.core.files import atomic_write_json, atomic_write_text, check_folder_target
from ebslab.core.metrics import METRICS


def json_num(v: Any) -> Any:
    """report.json's form of a value: numpy numbers as Python ones, NaN as null, infinities as "inf"/"-inf"."""
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else (None if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, dict):
        return {k: json_num(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_num(x) for x in v]
    return v


def analyse_dirs(run_dirs: Sequence[Path], metric: str = "acc", exclude_collapsed: bool = False,
                 n_boot: int = stats.N_BOOT, detect: float | None = None
                 ) -> tuple[list[Path], list[Run], list[Group], dict]:
    """The run folders found in run_dirs, the runs compared (one data fingerprint), their configurations and
    `analyse` result: what a report of those folders shows (`ebslab tune` takes its verdict from here, so the two
    always agree). result["not_compared"] lists the runs on other data."""
    dirs = find_run_dirs(run_dirs)
    all_runs = [load_run(d, n) for d, n in zip(dirs, run_names(dirs))]
    runs, others = comparable_runs(all_runs)
    groups = group_runs(runs)
    result = analyse(runs, groups, metric, exclude_collapsed, n_boot, detect=detect)
    result["not_compared"] = [{"data": replicates.describe_data(s[0].config), "runs": [r.name for r in s]}
                              for s in others]
    if others:
        result["data"] = replicates.describe_data(runs[0].config)
    kept = {id(r) for r in runs}
    return [d for d, r in zip(dirs, all_runs) if id(r) in kept], runs, groups, result


def check_options(metric: str, detect: float | None) -> None:
    if metric not in METRICS:
        raise UserError(f"--metric {metric}: unknown metric; valid: {', '.join(METRICS)}")
    if detect is not None and not detect > 0:
        raise UserError(f"--detect {detect}: give a positive difference (points of accuracy, e.g. --detect 1.0)")


def study_sections(dirs: Sequence[Path], out_dir: Path, target: float | None, result: dict) -> list[str]:
    """The learning-rate and effective-batch-size sections (markdown; their numbers go into result), from the
    comparable runs' folders only."""
    lr_md, lr_json = lr_study.report_section(dirs, out_dir)
    if lr_json is not None:
        result["lr_study"] = lr_json
    ebs_md, ebs_json = ebs_section.report_section(dirs, out_dir, target, best_lr=lr_study)
    if ebs_json is not None:
        result["ebs_study"] = ebs_json
    return lr_md + ebs_md


def build_report(run_dirs: list[Path], out_dir: Path, target: float | None = None, metric: str = "acc",
                 exclude_collapsed: bool = False, n_boot: int = stats.N_BOOT, detect: float | None = None) -> Path:
    """Read the run folders (or folders holding them), write out_dir/report.md, report.json and PNG plots;
    return report.md. detect: the difference the power sentences size seeds for, in metric units."""
    check_options(metric, detect)
    dirs, runs, groups, result = analyse_dirs(run_dirs, metric, exclude_collapsed, n_boot, detect)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = report_figures.write_plots(groups, out_dir, metric, exclude_collapsed)

    in_table_order = [r for g in groups for r in g.runs]
    keys = varying_keys([r.flat for r in runs])
    md = (render.intro(result, len(runs), len(groups), keys) + render.what_mattered(result)
          + render.runs_section(in_table_order, keys) + render.configurations_section(result)
          + render.comparisons_section(result) + render.plots_section(plots)
          + study_sections(dirs, out_dir, target, result) + render.left_out_section(in_table_order, result))

    atomic_write_json(out_dir / "report.json", json_num(result))
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(md))
    return report


def run(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.dirs]
    out = args.out if getattr(args, "out", None) is not None else (dirs[0] if len(dirs) == 1 else Path("report"))
    check_folder_target(out, "--out")
    metric = getattr(args, "metric", "acc")
    detect = getattr(args, "detect", None)
    if detect is not None and metric == "acc":
        detect = detect / 100  # given in points of accuracy
    report = build_report(dirs, Path(out), getattr(args, "target", None), metric=metric,
                          exclude_collapsed=getattr(args, "exclude_collapsed", False), detect=detect)
    result = json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))
    print(report)
    width = max([len("configuration")] + [len(g["label"]) for g in result["groups"]])
    print(f"{'configuration':<{width}}  {'n':>3}  {'val ' + metric:>10}  {'test ' + metric:>10}")
    for g in result["groups"]:
        val = "" if g["val_mean"] is None else f"{g['val_mean']:.4f}"
        test = "" if g["test_mean"] is None else f"{g['test_mean']:.4f}"
        print(f"{g['label']:<{width}}  {g['n_scored']:>3}  {val:>10}  {test:>10}")
    return 0

