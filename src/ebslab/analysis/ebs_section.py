"""The report's "effective batch size" section in words, tables and figures, from ebslab.analysis.ebs_study's
numbers: the headline, the interval and cost sentences, the steps table, the B_crit-over-targets table, the three
figures, and `report_section`, the report's one call (which keeps, when lr varies too, each EBS's runs at its best
lr as a `BestLr` says: this module imports neither the lr study nor the report).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ebslab.analysis.ebs_study import (CONFIDENCE, EbsStudy, StudyRun, TargetFit, analyse, b_simple_at, crossing,
                                       group_by_other_keys, load_study_run)
from ebslab.analysis.figures import pyplot, save
from ebslab.core.tables import md_table


# ------------------------------------------------------------------------------------------------------------
# Text


def _bc(x: float) -> str:
    return f"{x:.0f}"


def interval_words(tf: TargetFit, confidence: float = CONFIDENCE) -> str:
    """The profile interval in words, each end a number only inside the range of EBS in the fit."""
    if tf.fit is None or tf.fit.ci is None:
        return "no interval"
    low, high = tf.fit.ci
    small, large = tf.ebs_range
    if low is None:
        low_text = "no lower end"
    elif low < small:
        low_text = f"a lower end below {small}"
    elif low > large:
        low_text = f"a lower end above {large}"
    else:
        low_text = f"a lower end of {_bc(low)}"
    if high is None:
        high_text = "no upper end (the runs cannot tell B_crit from infinity)"
    elif high > large:
        high_text = f"an upper end above {large}"
    elif high < small:
        high_text = f"an upper end below {small}"
    else:
        high_text = f"an upper end of {_bc(high)}"
    return f"the {confidence:.0%} profile interval has {low_text} and {high_text}"


def headline(study: EbsStudy) -> str:
    tf = study.main
    what = f"val/{study.metric} {tf.target:.3g}"
    if tf.fit is None:
        return f"No critical batch size for {what}: {tf.refusal}."
    small, large = tf.ebs_range
    if tf.critical_batch is not None:
        return (f"To reach {what}, the steps fit S = {tf.fit.s_min:.1f} (1 + {_bc(tf.critical_batch)} / B) over EBS "
                f"{small} to {large}: the critical batch size is B_crit = {_bc(tf.critical_batch)} "
                f"({interval_words(tf)}).")
    if tf.bound == {"above": large}:
        return (f"To reach {what}, the fit over EBS {small} to {large} puts B_crit above {large}, the largest EBS "
                f"run, so every EBS run is below the critical batch size ({interval_words(tf)}).")
    return (f"To reach {what}, the fit over EBS {small} to {large} puts B_crit below {small}, the smallest EBS run, "
            f"so every EBS run is above the critical batch size ({interval_words(tf)}).")


LITTLE_COST = 1.25  # examples ratio below which a larger batch saved steps "at little cost in examples"


def cost_sentence(study: EbsStudy) -> str | None:
    rows = [r for r in study.rows if r.complete] if study.main.fit is None else \
        [r for r in study.rows if r.effective_batch in study.main.fitted]
    if len(rows) < 2:
        return None
    small, large = rows[0], rows[-1]
    examples = large.mean_examples / small.mean_examples
    steps = large.mean_steps / small.mean_steps
    text = (f"EBS {large.effective_batch} needed {examples:.2f}x the examples of EBS {small.effective_batch} for "
            f"{steps:.2f}x the steps (geometric means over seeds)")
    if examples < LITTLE_COST:
        return text + ": the larger batch saved steps at little cost in examples."
    return text + f": the fewer steps cost {examples - 1:.0%} more examples."


def b_simple_sentences(study: EbsStudy) -> list[str]:
    parts = []
    unmeasured = [r.effective_batch for r in study.rows if not any(r.gns)]
    measured = [r for r in study.rows if r.mean_b_simple is not None]
    swamped = [r.effective_batch for r in study.rows if any(r.gns) and r.complete and r.mean_b_simple is None]
    if measured:
        per_ebs = ", ".join(f"{_bc(r.mean_b_simple)} at EBS {r.effective_batch}" for r in measured)
        parts.append(f"The gradient noise scale where each run reached the target was B_simple = {per_ebs} (mean "
                     f"over seeds; median over runs {_bc(study.b_simple)}).")
        parts.append("McCandlish et al. predict B_crit to be about the noise scale B_noise = tr(H Sigma) / "
                     "(G^T H G), which equals B_simple = tr(Sigma) / |G|^2 when the Hessian H is a multiple of the "
                     "identity; B_simple is the one measurable during training, an estimate of B_crit, not a "
                     "measurement of it.")
    if unmeasured:
        parts.append(f"EBS {', '.join(map(str, unmeasured))} ran one micro-batch gradient per step "
                     "(accum_steps x world_size = 1), which gives no gradient noise scale.")
    if swamped:
        parts.append(f"At EBS {', '.join(map(str, swamped))} the |G|^2 estimate averaged at or below 0 up to the "
                     "target (the noise swamped the signal): no B_simple.")
    return parts


def paragraph(study: EbsStudy) -> str:
    parts = [headline(study)]
    cost = cost_sentence(study)
    if cost:
        parts.append(cost)
    parts += b_simple_sentences(study)
    if study.lr_note:
        parts.append(study.lr_note)
    else:
        rules = ", ".join(study.lr_scaling)
        parts.append(f"The model assumes the learning rate is tuned at each EBS (McCandlish et al. and Shallue et "
                     f"al. 2019 tune it at every batch size); these runs used lr_scaling={rules} from one base lr, "
                     "so this is the trade-off under that rule.")
    parts.append("Steps and examples to the target are interpolated between evaluations; the fit is least squares "
                  "in log steps with one intercept per seed, and the interval is its profile-likelihood interval.")
    return " ".join(parts)


def curve_table(study: EbsStudy) -> list[str]:
    rows = []
    for tf in study.curve:
        fitted = ", ".join(map(str, tf.fitted))
        if tf.fit is None:
            rows.append([f"{tf.target:.3g}", fitted or "none", f"no fit: {tf.refusal}", ""])
            continue
        small, large = tf.ebs_range
        value = _bc(tf.critical_batch) if tf.critical_batch is not None else (
            f"above {large}" if tf.bound == {"above": large} else f"below {small}")
        rows.append([f"{tf.target:.3g}", fitted, value, interval_words(tf)])
    return [md_table(["target", "EBS in the fit", "B_crit", "interval"], rows, ["r", "l", "l", "l"])]


# ------------------------------------------------------------------------------------------------------------
# Plots


def plain_log_ticks(axis: Any) -> None:
    """Log-scale ticks as plain numbers (8, 16, 1000, 2000), not 6x10^0."""
    from matplotlib import ticker

    def fmt(value: float, _pos: Any = None) -> str:
        return f"{value:,.0f}" if value >= 10 else f"{value:g}"

    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(fmt))
    axis.set_minor_formatter(ticker.NullFormatter())


def plot_tradeoff(study: EbsStudy, path: Path) -> Path:
    from matplotlib.lines import Line2D

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    handles = []
    for row in study.rows:
        pts = [(e, s) for e, s in zip(row.examples, row.steps) if s is not None]
        if pts:
            (line,) = ax.plot(*zip(*pts), "o", alpha=0.45, ms=4)
            ax.plot([row.mean_examples], [row.mean_steps], "s", color=line.get_color(), ms=8)
            handles.append(Line2D([], [], color=line.get_color(), marker="s", ls="", label=f"EBS {row.effective_batch}"))
    handles += [Line2D([], [], color="grey", marker="o", ls="", alpha=0.45, ms=4, label="one seed (dot)"),
                Line2D([], [], color="grey", marker="s", ls="", ms=8, label="geometric mean over seeds (square)")]
    tf = study.main
    if tf.fit is not None and 0 < tf.fit.critical_batch < math.inf:
        small, large = tf.ebs_range
        batches = np.geomspace(small, large, 100)
        steps = tf.fit.s_min * (1 + tf.fit.critical_batch / batches)
        (fit_line,) = ax.plot(batches * steps, steps, "k-", lw=1)
        words = (f"B_crit = {_bc(tf.critical_batch)}" if tf.critical_batch is not None else
                 f"B_crit {'above ' + str(large) if tf.bound == {'above': large} else 'below ' + str(small)}")
        handles.append(Line2D([], [], color="k", lw=1, label=f"fit S = S_min (1 + B_crit / B), {words}"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax.xaxis)
    plain_log_ticks(ax.yaxis)
    ax.set_xlabel("Training examples to target (examples)")
    ax.set_ylabel("Optimizer steps to target (steps)")
    ax.set_title(f"Steps vs. Examples to Val/{study.metric.capitalize()} {study.target:.3g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, fontsize=7)
    return save(fig, path, dpi=90)


def plot_b_simple(runs: Sequence[StudyRun], study: EbsStudy, path: Path) -> Path:
    """B_simple over the training examples seen, one colour per EBS: thin lines are seeds, the thick line their
    mean at the logged steps, a cross where each run reached the target."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    handles = []
    positive = True
    for ebs in sorted({r.effective_batch for r in runs}):
        group = sorted((r for r in runs if r.effective_batch == ebs and r.b_simple_curve), key=lambda r: r.seed)
        if not group:
            continue
        color = None
        by_x: dict[int, list[float]] = {}
        for run in group:
            xs, ys = zip(*run.b_simple_curve)
            positive = positive and min(ys) > 0
            (line,) = ax.plot(xs, ys, lw=0.7, alpha=0.45, **({"color": color} if color else {}))
            color = line.get_color()
            for x, y in run.b_simple_curve:
                by_x.setdefault(x, []).append(y)
            hit = crossing(run, study.target, study.metric)
            if hit is not None and b_simple_at(run, hit[1]) is not None:
                ax.plot([hit[1]], [b_simple_at(run, hit[1])], "x", color=color, ms=7, mew=1.5)
        xs = sorted(x for x, ys in by_x.items() if len(ys) == len(group))
        if xs:
            ax.plot(xs, [np.mean(by_x[x]) for x in xs], lw=2, color=color)
        handles.append(Line2D([], [], color=color, lw=2, label=f"EBS {ebs}: mean of {len(group)} seed(s)"))
    handles += [Line2D([], [], color="grey", lw=0.7, alpha=0.6, label="one seed (thin line)"),
                Line2D([], [], color="grey", marker="x", ls="", label=f"run reached val/{study.metric} "
                                                                      f"{study.target:.3g}")]
    ax.set_xlabel("Training examples seen (examples)")
    ax.set_ylabel("B_simple, ratio of moving averages (examples)")
    if positive and handles[:-2]:
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
    ax.set_title("Gradient Noise Scale During Training")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, fontsize=7)
    return save(fig, path, dpi=90)


def plot_critical_batch_curve(study: EbsStudy, path: Path) -> Path:
    """B_crit with its interval over the targets; an estimate outside the range of EBS run is a triangle at the
    range's end pointing away; the range run is shaded."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch


    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ebs = [r.effective_batch for r in study.rows]
    top, bottom = max(ebs) * 8, min(ebs) / 8
    ax.axhspan(min(ebs), max(ebs), color="tab:blue", alpha=0.08)
    for tf in study.curve:
        if tf.fit is None:
            continue
        small, large = tf.ebs_range
        low, high = tf.fit.ci if tf.fit.ci is not None else (None, None)
        low, high = bottom if low is None else max(low, bottom), top if high is None else min(high, top)
        ax.plot([tf.target, tf.target], [low, high], "-", color="tab:blue", lw=1.5)
        if tf.critical_batch is not None:
            ax.plot([tf.target], [tf.critical_batch], "o", color="tab:blue")
        elif tf.bound == {"above": large}:
            ax.plot([tf.target], [large], "^", color="tab:orange", ms=8)
        else:
            ax.plot([tf.target], [small], "v", color="tab:orange", ms=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    plain_log_ticks(ax.yaxis)
    ax.set_xlabel(f"Target val/{study.metric}")
    ax.set_ylabel("Critical batch size B_crit (examples per step)")
    ax.set_title("Critical Batch Size vs. Target")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=[Line2D([], [], color="tab:blue", marker="o", label="B_crit inside the EBS range run"),
                       Line2D([], [], color="tab:orange", marker="^", ls="", label="above (or below) the range run"),
                       Line2D([], [], color="tab:blue", lw=1.5, label="95% profile interval (clipped at the axes)"),
                       Patch(color="tab:blue", alpha=0.15, label="EBS range run")], fontsize=7)
    return save(fig, path, dpi=90)


# ------------------------------------------------------------------------------------------------------------
# The section


def steps_markdown(study: EbsStudy) -> str:
    """The steps table: each EBS's steps and examples to the target per seed, their geometric means, B_simple."""
    def num(x: float | None, digits: int = 0) -> str:
        return "not reached" if x is None else f"{x:.{digits}f}"

    rows = []
    for r in study.rows:
        b = "not measured" if not any(r.gns) else ("none" if r.mean_b_simple is None else _bc(r.mean_b_simple))
        rows.append([str(r.effective_batch), ", ".join(map(str, r.seeds)), ", ".join(num(s, 1) for s in r.steps),
                     ", ".join(num(e) for e in r.examples), num(r.mean_steps if r.complete else None, 1),
                     num(r.mean_examples if r.complete else None), b])
    return md_table(["EBS", "seeds", "steps per seed", "examples per seed", "S", "E", "B_simple at target"], rows,
                    ["r", "l", "l", "l", "r", "r", "r"])


def section(runs: Sequence[StudyRun], out_dir: Path, target: float | None = None, metric: str = "acc",
            title: str = "", prefix: str = "ebs", lr_note: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """(markdown, report.json's `ebs_study`) with the plots written into out_dir; None when the runs do not vary
    batch.effective."""
    study = analyse(runs, target, metric)
    if study is None:
        return None
    study.lr_note = lr_note
    out_dir = Path(out_dir)
    plot_tradeoff(study, out_dir / f"{prefix}_steps_vs_examples.png")
    plot_b_simple(runs, study, out_dir / f"{prefix}_b_simple.png")
    plot_critical_batch_curve(study, out_dir / f"{prefix}_critical_batch_vs_target.png")
    md = ["## Effective batch size" + (f": {title}" if title else ""), "", paragraph(study), "",
          f"Steps S and training examples E to reach val/{study.metric} {study.target:.3g} (interpolated between "
          "evaluations), per seed and as geometric means over seeds; B_simple where each run reached it.", "",
          steps_markdown(study), ""]
    if study.main.fit is not None:
        fit = study.main.fit
        md += [f"Fit of log S = a_seed + log(1 + B_crit / B) over EBS {', '.join(map(str, study.main.fitted))} "
               f"({fit.dof} residual degrees of freedom): S_min = {fit.s_min:.1f} (geometric mean over seeds); "
               + (f"B_crit = {_bc(study.main.critical_batch)}; " if study.main.critical_batch is not None else
                  f"B_crit outside the range run ({'above ' + str(study.main.ebs_range[1]) if study.main.bound == {'above': study.main.ebs_range[1]} else 'below ' + str(study.main.ebs_range[0])}); ")
               + interval_words(study.main) + ".", ""]
    md += [f"- {note}" for note in study.notes + study.main.warnings]
    if study.notes or study.main.warnings:
        md.append("")
    md += ["B_crit over several targets (the harder the target, the larger B_crit is expected to be):", ""]
    md += curve_table(study) + [""]
    md += [f"![Steps vs. examples]({prefix}_steps_vs_examples.png)", "",
           f"![B_crit vs. target]({prefix}_critical_batch_vs_target.png)", "",
           f"![B_simple]({prefix}_b_simple.png)", ""]
    return "\n".join(md), study.to_json()


class BestLr(Protocol):
    """Which runs of an EBS were at its best lr (the lr study, which builds on this module, provides it)."""

    def applies(self, runs: Sequence[StudyRun]) -> bool: ...

    def runs_at_best_lr(self, runs: Sequence[StudyRun]) -> tuple[list[StudyRun], str | None]: ...


def report_section(run_dirs: Sequence[Path], out_dir: Path, target: float | None = None,
                   metric: str = "acc", best_lr: BestLr | None = None) -> tuple[list[str], dict[str, Any] | None]:
    """`ebslab report`'s one call: (markdown lines, `ebs_study` for report.json or None) from the run folders;
    runs that did not complete are left out of the fit. When the runs vary optim.lr too, each EBS keeps only its
    runs at the best lr that `best_lr` (the lr study) found."""
    runs = [load_study_run(d, metric) for d in run_dirs]
    done = [r for r in runs if r.status == "completed"]
    lr_varies = best_lr is not None and best_lr.applies(done)
    groups = group_by_other_keys(done, also_ignore=("optim.lr",) if lr_varies else ())
    lines: list[str] = []
    studies: dict[str, Any] = {}
    for i, (label, members) in enumerate(groups.items()):
        note = None
        if lr_varies:
            members, note = best_lr.runs_at_best_lr(members)
        result = section(members, out_dir, target, metric, title=label,
                         prefix="ebs" if len(groups) == 1 else f"ebs{i + 1}", lr_note=note)
        if result is not None:
            lines += result[0].splitlines() + [""]
            studies[label] = result[1]
    if not studies:
        return [], None
    left_out = [r.name for r in runs if r.status != "completed"]
    if left_out:
        lines += [f"Left out of the effective-batch-size fit (not completed): {', '.join(left_out)}", ""]
    # one study: ebs_study is it; several (other keys vary too): one per combination of those keys
    return lines, next(iter(studies.values())) if len(studies) == 1 else {"groups": studies}
