"""The report's "effective batch size" section: the steps/examples trade-off measured from a sweep over
batch.effective, and the critical batch size it implies (McCandlish et al. 2018, arXiv 1812.06162, section 2.2).

To reach a given result, a run at batch B needs S optimizer steps and E = B S examples, and the empirical model
says S(B) = S_min (1 + B_crit / B): a straight line in 1/B with intercept S_min and slope E_min = S_min B_crit.
Below B_crit doubling the batch nearly halves the steps at nearly no extra examples; above it, extra examples buy
few steps. The fit reads steps-to-target from the evaluation lines of the run folders (`eval.every_examples`
puts every EBS on the same data points), averages over seeds, and bootstraps the seeds for an interval.

Pure functions on run-folder data: `load_study_run` reads a folder; everything else takes `StudyRun`s.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from ebslab.config import as_trained
from ebslab.figures import pyplot, save
from ebslab.metrics import higher_is_better
from ebslab.replicates import changes_training
from ebslab.runfolder import with_logged_precision


@dataclass
class StudyRun:
    name: str
    effective_batch: int
    seed: int
    lr_scaling: str
    lr: float | None
    evals: list[tuple[int, int, float]]  # (step, training examples seen, validation metric)
    b_simple_curve: list[tuple[int, float]] = field(default_factory=list)  # (examples seen, B_simple)
    b_simple: float | None = None  # summary.json: over the last half of training
    gns: bool = True  # measured at all: off with one micro-batch gradient per step (summary.json has no `gns`)
    status: str = "completed"
    config: dict[str, Any] = field(default_factory=dict)  # dotted keys, as in a sweep's grid


def load_study_run(path: Path, metric: str = "acc") -> StudyRun:
    """One run folder -> StudyRun (config.yaml, metrics.jsonl and summary.json only)."""
    path = Path(path)
    config = with_logged_precision(path, yaml.safe_load((path / "config.yaml").read_text()))
    effective = int(config["batch"]["effective"])
    evals, curve = [], []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
            continue
        if not isinstance(rec, dict):
            continue
        samples = rec.get("samples", rec.get("step", 0) * effective)
        if rec.get("event") == "eval" and rec.get(f"val/{metric}") is not None:
            evals.append((int(rec["step"]), int(samples), float(rec[f"val/{metric}"])))
        elif rec.get("event") == "step" and rec.get("gns/b_simple") is not None:
            curve.append((int(rec["step"]) * effective, float(rec["gns/b_simple"])))
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    seed = int((config.get("train") or {}).get("seed", 1))
    return StudyRun(name=path.name, effective_batch=effective, seed=seed,
                    lr_scaling=str((config.get("optim") or {}).get("lr_scaling", "none")), lr=(config.get("derived") or {}).get("lr"),
                    evals=evals, b_simple_curve=curve, b_simple=(summary.get("gns") or {}).get("b_simple"),
                    gns="gns" in summary,
                    status=str(summary.get("status", "unknown")), config=as_trained(config))



# ------------------------------------------------------------------------------------------------------------
# Steps and examples to a target


def _reached(value: float, target: float, higher: bool) -> bool:
    return value >= target if higher else value <= target


def default_target(runs: Sequence[StudyRun], metric: str = "acc") -> float:
    """The best value that every run reached at some evaluation (the highest for acc, the lowest for loss)."""
    bests = [max(v for *_, v in r.evals) if higher_is_better(metric) else min(v for *_, v in r.evals)
             for r in runs if r.evals]
    if not bests:
        raise ValueError("no run has an evaluation")
    return min(bests) if higher_is_better(metric) else max(bests)


def to_target(run: StudyRun, target: float, metric: str = "acc") -> tuple[int, int] | None:
    """(steps, examples) at the first evaluation that reached the target, or None."""
    for step, samples, value in run.evals:
        if _reached(value, target, higher_is_better(metric)):
            return step, samples
    return None


@dataclass
class EbsRow:
    effective_batch: int
    seeds: list[int]
    steps: list[int | None]  # per seed, None = never reached
    examples: list[int | None]
    b_simple: list[float | None]
    gns: list[bool] = field(default_factory=list)  # per seed: the gradient noise scale was on

    @property
    def complete(self) -> bool:
        return all(s is not None for s in self.steps)

    @property
    def mean_steps(self) -> float:
        return float(np.mean([s for s in self.steps if s is not None])) if any(
            s is not None for s in self.steps) else math.nan

    @property
    def mean_examples(self) -> float:
        return float(np.mean([e for e in self.examples if e is not None])) if any(
            e is not None for e in self.examples) else math.nan

    @property
    def mean_b_simple(self) -> float | None:
        values = [b for b in self.b_simple if b is not None]
        return float(np.mean(values)) if values else None


def steps_table(runs: Sequence[StudyRun], target: float, metric: str = "acc") -> list[EbsRow]:
    rows = []
    for ebs in sorted({r.effective_batch for r in runs}):
        group = sorted((r for r in runs if r.effective_batch == ebs), key=lambda r: r.seed)
        reached = [to_target(r, target, metric) for r in group]
        rows.append(EbsRow(ebs, [r.seed for r in group], [x[0] if x else None for x in reached],
                           [x[1] if x else None for x in reached], [r.b_simple for r in group],
                           [r.gns for r in group]))
    return rows


# ------------------------------------------------------------------------------------------------------------
# The fit S = S_min + E_min / B and its bootstrap over seeds


def fit_tradeoff(effective_batch: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """Least-squares line of S against 1/B: (S_min, E_min) = (intercept, slope)."""
    fit = stats.linregress(1.0 / np.asarray(effective_batch, dtype=float), np.asarray(steps, dtype=float))
    return float(fit.intercept), float(fit.slope)


def critical_batch(s_min: float, e_min: float) -> float:
    """E_min / S_min; inf when S_min <= 0 (steps fell as fast as 1/B: no critical batch within the range run)."""
    return e_min / s_min if s_min > 0 else math.inf


def bootstrap_critical_batch(effective_batch: Sequence[int], steps_by_seed: np.ndarray, confidence: float = 0.95,
                             n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of B_crit over resamples of the seeds (rows of `steps_by_seed`, seeds x EBS): the seed
    is the unit of replication, so a resample redraws whole seeds and refits the seed-mean steps."""
    steps_by_seed = np.asarray(steps_by_seed, dtype=float)

    def statistic(idx: np.ndarray) -> float:
        return critical_batch(*fit_tradeoff(effective_batch, steps_by_seed[idx.astype(int)].mean(axis=0)))

    with np.errstate(invalid="ignore"), warnings.catch_warnings():  # resamples with an unbounded B_crit (inf)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.bootstrap((np.arange(len(steps_by_seed)),), statistic, vectorized=False, method="percentile",
                              confidence_level=confidence, n_resamples=n_resamples, random_state=seed)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class EbsStudy:
    metric: str
    target: float
    rows: list[EbsRow]
    fitted: list[int]  # the EBS values in the fit (every seed reached the target)
    s_min: float | None
    e_min: float | None
    critical_batch: float | None
    critical_batch_ci: tuple[float, float] | None
    b_simple: float | None
    lr_scaling: list[str]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else x

        return {"metric": f"val/{self.metric}", "target": self.target,
                "rows": [{"effective_batch": r.effective_batch, "seeds": r.seeds, "steps": r.steps,
                          "examples": r.examples, "mean_steps": num(r.mean_steps),
                          "mean_examples": num(r.mean_examples), "b_simple": r.b_simple,
                          "mean_b_simple": r.mean_b_simple} for r in self.rows],
                "fitted_effective_batch": self.fitted, "s_min": num(self.s_min), "e_min": num(self.e_min),
                "critical_batch": num(self.critical_batch),
                "critical_batch_ci": None if self.critical_batch_ci is None else
                [num(self.critical_batch_ci[0]), num(self.critical_batch_ci[1])],
                "b_simple": self.b_simple, "lr_scaling": self.lr_scaling, "notes": self.notes}


def analyse(runs: Sequence[StudyRun], target: float | None = None, metric: str = "acc",
            confidence: float = 0.95) -> EbsStudy | None:
    """The whole section's numbers; None when the runs do not vary batch.effective."""
    runs = [r for r in runs if r.evals]
    if len({r.effective_batch for r in runs}) < 2:
        return None
    notes = []
    if target is None:
        target = default_target(runs, metric)
        notes.append(f"target = the {'highest' if higher_is_better(metric) else 'lowest'} val/{metric} that every "
                     "run reached")
    rows = steps_table(runs, target, metric)
    seed_sets = {tuple(r.seeds) for r in rows}
    all_seeds = sorted({s for r in rows for s in r.seeds})
    # the seed is the unit of the bootstrap: an EBS that misses a seed (not run, not completed) would bias the mean
    fitted_rows = [r for r in rows if r.complete and r.seeds == all_seeds]
    missed = [r.effective_batch for r in rows if not r.complete]
    if missed:
        notes.append(f"EBS {', '.join(map(str, missed))} left out of the fit: a seed never reached the target")
    short = [r.effective_batch for r in rows if r.complete and r.seeds != all_seeds]
    if short:
        notes.append(f"EBS {', '.join(map(str, short))} left out of the fit: not every seed "
                     f"({', '.join(map(str, all_seeds))}) completed there")
    s_min = e_min = b_crit = None
    ci = None
    if len(fitted_rows) >= 2:
        ebs = [r.effective_batch for r in fitted_rows]
        s_min, e_min = fit_tradeoff(ebs, [r.mean_steps for r in fitted_rows])
        b_crit = critical_batch(s_min, e_min)
        common = set.intersection(*(set(r.seeds) for r in fitted_rows))
        if len(common) >= 2:
            seeds = sorted(common)
            matrix = np.array([[r.steps[r.seeds.index(s)] for r in fitted_rows] for s in seeds], dtype=float)
            ci = bootstrap_critical_batch(ebs, matrix, confidence)
            if len(seeds) < 5:
                notes.append(f"the interval resamples {len(seeds)} seeds: it has few distinct resamples and is "
                             "rough")
        else:
            notes.append("no interval: fewer than 2 seeds ran every fitted EBS")
    elif len(seed_sets) >= 1:
        notes.append("no fit: fewer than 2 EBS values had every seed reach the target")
    all_b = [b for r in rows for b in r.b_simple if b is not None]
    return EbsStudy(metric=metric, target=target, rows=rows, fitted=[r.effective_batch for r in fitted_rows],
                    s_min=s_min, e_min=e_min, critical_batch=b_crit, critical_batch_ci=ci,
                    b_simple=float(np.median(all_b)) if all_b else None,
                    lr_scaling=sorted({r.lr_scaling for r in runs}), notes=notes)


# ------------------------------------------------------------------------------------------------------------
# Text and plots


def _num(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-" if x is None or math.isnan(x) else "unbounded"
    return f"{x:.{digits}f}"


def _interval(study: EbsStudy) -> str:
    """The bootstrap interval in words; a bound beyond 100x the largest EBS run is a resample whose S_min was about
    0 (steps fell like 1/B): no upper bound is measured then."""
    if study.critical_batch_ci is None:
        return ""
    low, high = study.critical_batch_ci
    far = 100 * max(r.effective_batch for r in study.rows)
    high_text = "unbounded (S_min near 0 in some resamples)" if not math.isfinite(high) or high > far else _num(high)
    return f" (95% bootstrap interval over seeds {_num(low)} to {high_text})"


def paragraph(study: EbsStudy) -> str:
    parts = []
    if study.critical_batch is not None:
        interval = _interval(study)
        if math.isfinite(study.critical_batch):
            parts.append(f"To reach val/{study.metric} {study.target:.4g}, the runs needed S = "
                         f"{study.s_min:.1f} (1 + {study.critical_batch:.0f} / B) optimizer steps: the measured "
                         f"critical batch size is B_crit = {study.critical_batch:.0f}{interval}.")
        else:
            parts.append(f"To reach val/{study.metric} {study.target:.4g}, the steps fell as fast as 1/B over the "
                         f"whole range run: no critical batch within it (B_crit unbounded{interval}).")
    else:
        parts.append(f"No critical batch size could be fitted for val/{study.metric} {study.target:.4g} "
                     f"({'; '.join(study.notes)}).")
    unmeasured = [r.effective_batch for r in study.rows if not any(r.gns)]
    swamped = [r.effective_batch for r in study.rows if any(r.gns) and r.mean_b_simple is None]
    if study.b_simple is not None:
        measured = [str(r.effective_batch) for r in study.rows if r.mean_b_simple is not None]
        over = f"the runs of EBS {', '.join(measured)}" if unmeasured or swamped else "runs"
        parts.append(f"The gradient noise scale measured during training predicted B_simple = "
                     f"{study.b_simple:.0f} (median over {over} of the last half of training); McCandlish et al. "
                     "use B_simple as an estimate of B_crit, off by how far the Hessian is from a multiple of "
                     "the identity (they find agreement within a factor of a few).")
    if unmeasured:
        parts.append(f"EBS {', '.join(map(str, unmeasured))} ran one micro-batch gradient per step "
                     "(accum_steps x world_size = 1), which gives no gradient noise scale.")
    if swamped:
        parts.append(f"At EBS {', '.join(map(str, swamped))} the |G|^2 estimate averaged at or below 0 (the noise "
                     "swamped the signal): no B_simple.")
    fitted = [r for r in study.rows if r.effective_batch in study.fitted]
    if len(fitted) >= 2:
        small, large = fitted[0], fitted[-1]
        parts.append(f"EBS {large.effective_batch} needed {large.mean_examples / small.mean_examples:.1f}x the "
                     f"examples of EBS {small.effective_batch} for {large.mean_steps / small.mean_steps:.2f}x the "
                     "steps.")
        if study.critical_batch is not None and math.isfinite(study.critical_batch):
            above = [r.effective_batch for r in fitted if r.effective_batch > study.critical_batch]
            parts.append("Above B_crit (EBS " + ", ".join(map(str, above)) + ") extra examples buy few steps."
                         if above else "Every EBS run is at or below B_crit: a larger batch still saves steps "
                                       "at little cost in examples.")
    parts.append(f"The fit assumes the learning rate is adjusted to each EBS; these runs used lr_scaling="
                 f"{', '.join(study.lr_scaling)}. Steps and examples are read at the evaluations (every "
                 "eval.every_examples), so each is rounded up to the next evaluation.")
    return " ".join(parts)


def plot_tradeoff(study: EbsStudy, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in study.rows:
        pts = [(e, s) for e, s in zip(row.examples, row.steps) if s is not None]
        if pts:
            (line,) = ax.plot(*zip(*pts), "o", alpha=0.4, ms=4)
            ax.plot([row.mean_examples], [row.mean_steps], "s", color=line.get_color(), ms=8,
                    label=f"EBS {row.effective_batch}")
    if study.s_min and study.s_min > 0 and study.e_min and study.e_min > 0:
        batches = np.geomspace(min(r.effective_batch for r in study.rows) / 4,
                               max(r.effective_batch for r in study.rows) * 4, 200)
        steps = study.s_min * (1 + study.critical_batch / batches)
        ax.plot(batches * steps, steps, "k-", lw=1,
                label=f"S = {study.s_min:.0f} (1 + {study.critical_batch:.0f}/B)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training examples to target")
    ax.set_ylabel("optimizer steps to target")
    ax.set_title(f"steps vs examples to val/{study.metric} {study.target:.4g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save(fig, path, dpi=90)


def plot_b_simple(runs: Sequence[StudyRun], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors: dict[int, Any] = {}
    for run in sorted(runs, key=lambda r: (r.effective_batch, r.seed)):
        if not run.b_simple_curve:
            continue
        xs, ys = zip(*run.b_simple_curve)
        kwargs = {"color": colors[run.effective_batch]} if run.effective_batch in colors else {
            "label": f"EBS {run.effective_batch}"}
        (line,) = ax.plot(xs, ys, lw=1, alpha=0.8, **kwargs)
        colors.setdefault(run.effective_batch, line.get_color())
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("B_simple (moving averages)")
    ax.set_yscale("symlog")
    ax.set_title("gradient noise scale during training")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return save(fig, path, dpi=90)


def section(runs: Sequence[StudyRun], out_dir: Path, target: float | None = None, metric: str = "acc",
            title: str = "", prefix: str = "ebs") -> tuple[str, dict[str, Any]] | None:
    """(markdown, report.json's `ebs_study`) with the two plots written into out_dir; None when the runs do not
    vary batch.effective."""
    study = analyse(runs, target, metric)
    if study is None:
        return None
    out_dir = Path(out_dir)
    plot_tradeoff(study, out_dir / f"{prefix}_steps_vs_examples.png")
    plot_b_simple(runs, out_dir / f"{prefix}_b_simple.png")
    md = ["## Effective batch size" + (f": {title}" if title else ""), "", paragraph(study), "",
          f"Steps S and training examples E to reach val/{study.metric} {study.target:.4g} (first evaluation at or "
          "past it), per seed and averaged; B_simple = the gradient noise scale over the last half of each run.", "",
          "| EBS | seeds | steps per seed | examples per seed | mean S | mean E | B_simple |",
          "|---:|---|---|---|---:|---:|---:|"]
    for r in study.rows:
        md.append(f"| {r.effective_batch} | {', '.join(map(str, r.seeds))} | "
                  f"{', '.join(_num(s) for s in r.steps)} | {', '.join(_num(e) for e in r.examples)} | "
                  f"{_num(r.mean_steps, 1)} | {_num(r.mean_examples)} | {_num(r.mean_b_simple)} |")
    md += ["", f"Fit of S = S_min + E_min / B over EBS {', '.join(map(str, study.fitted))}: S_min = "
           f"{_num(study.s_min, 1)}, E_min = {_num(study.e_min)}, B_crit = E_min / S_min = "
           f"{_num(study.critical_batch)}" + _interval(study) + ".", ""]
    md += [f"- {note}" for note in study.notes] + ([""] if study.notes else [])
    md += [f"![steps vs examples]({prefix}_steps_vs_examples.png)", "", f"![B_simple]({prefix}_b_simple.png)", ""]
    return "\n".join(md), study.to_json()


def report_section(run_dirs: Sequence[Path], out_dir: Path, target: float | None = None,
                   metric: str = "acc") -> tuple[list[str], dict[str, Any] | None]:
    """`ebslab report`'s one call: (markdown lines, `ebs_study` for report.json or None) from the run folders;
    runs that did not complete are left out of the fit."""
    runs = [load_study_run(d, metric) for d in run_dirs]
    done = [r for r in runs if r.status == "completed"]
    groups = group_by_other_keys(done)
    lines: list[str] = []
    studies: dict[str, Any] = {}
    for i, (label, members) in enumerate(groups.items()):
        result = section(members, out_dir, target, metric, title=label,
                         prefix="ebs" if len(groups) == 1 else f"ebs{i + 1}")
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


def group_by_other_keys(runs: Sequence[StudyRun]) -> dict[str, list[StudyRun]]:
    """Runs by the values of the config keys that vary besides batch.effective and the seed (a fit mixes only
    runs that differ in EBS): {"optim.lr_scaling=sqrt": [...], ...}; one group "" when nothing else varies."""

    def ignored(key: str) -> bool:
        return key == "batch.effective" or not changes_training(key)

    keys = sorted({k for r in runs for k in r.config if not ignored(k)
                   and len({repr(x.config.get(k)) for x in runs}) > 1})
    groups: dict[str, list[StudyRun]] = {}
    for r in runs:
        groups.setdefault(", ".join(f"{k}={r.config.get(k)}" for k in keys), []).append(r)
    return groups
