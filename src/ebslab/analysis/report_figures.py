"""The report's figures, in ebslab.analysis.figures' style: validation curves per configuration (the seeds the
tables count) and test accuracy against the effective batch size, whose bars are the configurations table's
interval (none where the table gives none)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ebslab.analysis import figures
from ebslab.analysis.compare import group_summary
from ebslab.analysis.runs import MISSING, Group, Run, fmt_value, num, scored_statuses, varying_keys


def _eval_x(run: Run, rec: dict) -> float:
    spe = num(run.flat.get("derived.steps_per_epoch"))
    step = num(rec.get("step"))
    if spe > 0 and not math.isnan(step):
        return round(step / spe, 4)
    return num(rec.get("epoch"), 0.0) + 1.0


def curve(group_runs_: Sequence[Run], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x in epochs, mean, std over seeds) of an eval metric; x = step / steps_per_epoch (or epoch + 1)."""
    per_x: dict[float, list[float]] = {}
    for r in group_runs_:
        seen: dict[float, float] = {}
        for rec in r.evals:
            v = num(rec.get(metric))
            if not math.isnan(v):
                seen[_eval_x(r, rec)] = v  # a resumed run may repeat a point: keep the last
        for x, v in seen.items():
            per_x.setdefault(x, []).append(v)
    xs = np.array(sorted(per_x))
    means = np.array([np.mean(per_x[x]) for x in xs]) if len(xs) else np.array([])
    stds = np.array([np.std(per_x[x], ddof=1) if len(per_x[x]) > 1 else 0.0 for x in xs]) if len(xs) else np.array([])
    return xs, means, stds


def curve_runs(g: Group, head_metric: str = "acc", exclude_collapsed: bool = False) -> list[Run]:
    """The runs a configuration's curve averages: one per seed the tables count (its representative run), so
    that n in the legend is the table's n; all runs when none is scored."""
    keep = scored_statuses(exclude_collapsed)
    reps = g.scored_replicates(head_metric, exclude_collapsed)
    return [rep.representative(keep, head_metric) for rep in reps] or list(g.runs)


def plot_curves(groups: Sequence[Group], metric: str, path: Path, title: str, head_metric: str = "acc",
                exclude_collapsed: bool = False) -> Path:
    """`metric` (an eval key, e.g. val/acc) per epoch: one line per configuration, the mean over the seeds the
    tables count, with a band of one standard deviation."""
    fig, ax = figures.new_figure()
    for g in groups:
        scored = bool(g.scored_replicates(head_metric, exclude_collapsed))
        runs = curve_runs(g, head_metric, exclude_collapsed)
        xs, m, s = curve(runs, metric)
        if not len(xs):
            continue
        label = g.label if g.label != "all runs" else "these runs"
        label += f" ({len(runs)} seed{'s' if len(runs) != 1 else ''}" + ("" if scored else ", not scored") + ")"
        (line,) = ax.plot(xs, m, marker="o", ms=3, label=label)
        if len(runs) > 1:
            ax.fill_between(xs, m - s, m + s, color=line.get_color(), alpha=0.2)
    figures.style(ax, title=title, xlabel="Epoch (passes over the train split)",
                  ylabel=figures.metric_label(metric),
                  legend_title="line: mean over seeds; band: ± 1 std; dot: an evaluation")
    return figures.save(fig, path)


@dataclass
class EbsPoint:
    """One configuration in the accuracy-vs-EBS figure: its mean test acc over the seeds the table counts, the
    table's 95% t-interval (NaN where the table shows none), and each of those seeds' values."""
    line: str  # the other varying keys' values: one line per value
    ebs: float
    mean: float
    interval: tuple[float, float]
    seeds: list[float]


def acc_vs_ebs_points(groups: Sequence[Group], exclude_collapsed: bool = False) -> list[EbsPoint]:
    """Test acc (best checkpoint) per configuration with a batch.effective, as the configurations table has it
    (`compare.group_summary`), so the figure cannot show an interval the table refuses."""
    scored = [g for g in groups if g.scored_runs(exclude_collapsed)]
    keys = [k for k in varying_keys([g.config for g in scored]) if k != "batch.effective"]
    points = []
    for g in scored:
        ebs = num(g.config.get("batch.effective"))
        row = group_summary(g, "acc", exclude_collapsed)
        if math.isnan(ebs) or math.isnan(row["test_mean"]):
            continue
        points.append(EbsPoint(line=", ".join(f"{k}={fmt_value(g.config.get(k, MISSING))}" for k in keys), ebs=ebs,
                               mean=row["test_mean"], interval=tuple(row["test_ci"]), seeds=row["test_values"]))
    return points


def draw_acc_vs_ebs(points: Sequence[EbsPoint]):
    """The figure of `acc_vs_ebs_points`: a line per value of the other varying keys, a bar where the table has
    an interval, and a cross per seed."""
    fig, ax = figures.new_figure()
    lines: dict[str, list[EbsPoint]] = {}
    for p in points:
        lines.setdefault(p.line, []).append(p)
    for name, pts in lines.items():
        pts.sort(key=lambda p: p.ebs)
        n = sorted({len(p.seeds) for p in pts})
        seeds_text = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
        prefix = f"{name}: " if name else ""
        means = ax.errorbar([p.ebs for p in pts], [p.mean for p in pts], marker="o",
                            label=f"{prefix}mean of {seeds_text} seed(s)")
        color = means[0].get_color()
        barred = [p for p in pts if not math.isnan(p.interval[0])]
        if barred:
            ax.errorbar([p.ebs for p in barred], [p.mean for p in barred], fmt="none", capsize=4, color=color,
                        yerr=[[p.mean - p.interval[0] for p in barred], [p.interval[1] - p.mean for p in barred]])
        ax.plot([p.ebs for p in pts for _ in p.seeds], [y for p in pts for y in p.seeds], "x", ms=5, alpha=0.6,
                color=color, label=f"{prefix}one seed")
    xs_all = sorted({p.ebs for p in points})
    if xs_all and xs_all[0] > 0:
        figures.plain_log_axis(ax, "x", base=2, ticks=xs_all)
    figures.style(ax, title="Test accuracy against effective batch size",
                  xlabel="Effective batch size (examples per optimizer step, log scale)",
                  ylabel="Test accuracy, best checkpoint (fraction correct)",
                  legend_title="bar: 95% confidence interval of the mean, the table's (none where it has none)")
    return fig


def plot_acc_vs_ebs(groups: Sequence[Group], path: Path, exclude_collapsed: bool = False) -> Path:
    return figures.save(draw_acc_vs_ebs(acc_vs_ebs_points(groups, exclude_collapsed)), path)


def write_plots(groups: Sequence[Group], out_dir: Path, metric: str, exclude_collapsed: bool) -> list[Path]:
    """The report's three figures, written into out_dir."""
    return [
        plot_curves(groups, "val/acc", out_dir / "val_acc.png", "Validation accuracy per epoch", metric,
                    exclude_collapsed),
        plot_curves(groups, "val/loss", out_dir / "val_loss.png", "Validation loss per epoch", metric,
                    exclude_collapsed),
        plot_acc_vs_ebs(groups, out_dir / "test_acc_vs_ebs.png", exclude_collapsed),
    ]
