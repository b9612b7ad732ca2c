"""The report's "effective batch size" section: the steps/examples trade-off measured from a sweep over
batch.effective, and the critical batch size it implies (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", arXiv:1812.06162).

To reach a given result, a run at batch B needs S optimizer steps and E = B S examples, and the empirical model
says (S / S_min - 1)(E / E_min - 1) = 1, i.e. S(B) = S_min (1 + B_crit / B) with B_crit = E_min / S_min.

How the section reads the runs and fits the model:

- Steps and examples to a target are interpolated linearly between the last evaluation below the target and the
  first at or past it (from the majority rate at 0 examples when the first evaluation is already past it): reading
  the first evaluation at or past the target instead adds up to one evaluation interval of examples to every run,
  which falls on E_min only and biases B_crit up.
- Seed-to-seed variation in steps is multiplicative, so the fit is least squares in log space with one intercept
  per seed (a seed-wide factor cancels): log S = a_seed + log(1 + B_crit / B). B_crit is its only nonlinear
  parameter; its interval is the profile-likelihood (F) interval, whose coverage is checked by simulation in
  tests/test_ebs_study.py. An end of the interval past the grid searched is unbounded (null).
- B_crit is reported as a number only inside the range of EBS that ran; outside it, as a bound.
- Runs of one configuration and seed that differ only in keys that do not change training (train.backend,
  batch.micro, ...) are one replicate (their crossings are averaged, geometrically).

Pure functions on run-folder data: `load_study_run` reads a folder; everything else takes `StudyRun`s or arrays.
The section's words, tables and figures are ebslab.analysis.ebs_section's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, stats

from ebslab.core.config import as_trained
from ebslab.core.metrics import higher_is_better
from ebslab.analysis.replicates import changes_training
from ebslab.core import runfolder

CONFIDENCE = 0.95
BUDGET_END = 0.9  # a crossing past this share of the run's budget is "at the end of the budget"
DEFAULT_TARGET_BUDGET = 0.75  # the default target: every run reaches it before this share of its budget
NOISE_SE = 2.0  # a target within this many standard errors of the majority rate is within noise
MIN_EBS = 3  # EBS values (every seed reaching the target) a fit needs
N_TARGETS = 6  # targets on the B_crit-over-target curve


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
    budget: int | None = None  # training examples the run was given (epochs x train set, or max_steps x EBS)
    majority_rate: float | None = None  # of the validation labels
    n_val: int | None = None  # validation examples


def _examples_at(step: int, effective: int, derived: dict) -> int:
    """Training examples seen after `step` optimizer steps (an epoch's last window may be short)."""
    num_train, per_epoch = derived.get("num_train"), derived.get("steps_per_epoch")
    if not num_train or not per_epoch:
        return step * effective
    epochs, within = divmod(step, per_epoch)
    return epochs * num_train + min(within * effective, num_train)


def load_study_run(path: Path, metric: str = "acc") -> StudyRun:
    """One run folder -> StudyRun (config.yaml, metrics.jsonl and summary.json only)."""
    path = Path(path)
    config = runfolder.read_config(path, strict=True)
    effective = int(config["batch"]["effective"])
    derived = config.get("derived") or {}
    evals, curve = [], []
    for rec in runfolder.read_metrics(path):  # torn lines (a run killed mid-write) skipped
        step = int(rec.get("step") or 0)
        samples = rec.get("samples", _examples_at(step, effective, derived))
        if rec.get("event") == "eval" and rec.get(f"val/{metric}") is not None:
            evals.append((step, int(samples), float(rec[f"val/{metric}"])))
        elif rec.get("event") == "step" and rec.get("gns/b_simple") is not None:
            curve.append((int(samples), float(rec["gns/b_simple"])))
    summary = runfolder.read_summary(path) or {}
    seed = int((config.get("train") or {}).get("seed", 1))
    budget = None
    if derived.get("total_steps"):
        budget = int(derived["total_steps"]) * effective
        if derived.get("num_train") and derived.get("epochs"):
            budget = min(budget, int(derived["num_train"]) * int(derived["epochs"]))
    n_val = (summary.get("val_best") or {}).get("n")
    return StudyRun(name=path.name, effective_batch=effective, seed=seed,
                    lr_scaling=str((config.get("optim") or {}).get("lr_scaling", "none")), lr=derived.get("lr"),
                    evals=evals, b_simple_curve=curve, b_simple=(summary.get("gns") or {}).get("b_simple"),
                    gns="gns" in summary, status=str(summary.get("status", "unknown")), config=as_trained(config),
                    budget=budget, majority_rate=summary.get("majority_rate"),
                    n_val=int(n_val) if n_val else None)


# ------------------------------------------------------------------------------------------------------------
# Steps and examples to a target


def _reached(value: float, target: float, higher: bool) -> bool:
    return value >= target if higher else value <= target


def crossing(run: StudyRun, target: float, metric: str = "acc") -> tuple[float, float] | None:
    """(steps, examples) at which the validation metric first reached `target`, interpolated linearly between the
    last evaluation short of it and the first at or past it; None if no evaluation reached it. Before the first
    evaluation the run starts at 0 examples from the majority rate (accuracy) when it is known below the target;
    otherwise a target reached at the first evaluation is read there."""
    higher = higher_is_better(metric)
    previous = None
    if metric == "acc" and run.majority_rate is not None and not _reached(run.majority_rate, target, higher):
        previous = (0.0, 0.0, float(run.majority_rate))
    for step, examples, value in run.evals:
        if _reached(value, target, higher):
            if previous is None or value == previous[2]:
                return float(step), float(examples)
            frac = (target - previous[2]) / (value - previous[2])
            return (previous[0] + frac * (step - previous[0]), previous[1] + frac * (examples - previous[1]))
        previous = (float(step), float(examples), value)
    return None


def first_eval_at_or_past(run: StudyRun, target: float, metric: str = "acc") -> tuple[int, int] | None:
    """(steps, examples) at the first evaluation at or past the target: the reading before interpolation, kept for
    comparison in the simulations."""
    for step, samples, value in run.evals:
        if _reached(value, target, higher_is_better(metric)):
            return step, samples
    return None


def peak(run: StudyRun, metric: str = "acc") -> float:
    values = [v for *_, v in run.evals]
    return max(values) if higher_is_better(metric) else min(values)


def b_simple_at(run: StudyRun, examples: float) -> float | None:
    """The logged B_simple (moving averages) at the last step line at or before `examples` seen."""
    before = [b for x, b in run.b_simple_curve if x <= examples]
    return before[-1] if before else None


@dataclass
class EbsRow:
    effective_batch: int
    seeds: list[int]
    steps: list[float | None]  # per seed, None = never reached
    examples: list[float | None]
    b_simple: list[float | None]  # per seed: B_simple where the run reached the target
    gns: list[bool] = field(default_factory=list)  # per seed: the gradient noise scale was on
    budget_share: list[float | None] = field(default_factory=list)  # per seed: examples to target / budget
    replicates: list[int] = field(default_factory=list)  # per seed: runs merged (differing only in keys that do
    #                                                      not change training)

    @property
    def complete(self) -> bool:
        return bool(self.steps) and all(s is not None for s in self.steps)

    @property
    def mean_steps(self) -> float:
        """Geometric mean over the seeds that reached the target (the noise is multiplicative)."""
        values = [s for s in self.steps if s is not None]
        return _geomean(values) if values else math.nan

    @property
    def mean_examples(self) -> float:
        values = [e for e in self.examples if e is not None]
        return _geomean(values) if values else math.nan

    @property
    def mean_b_simple(self) -> float | None:
        values = [b for b in self.b_simple if b is not None]
        return float(np.mean(values)) if values else None


def _geomean(values: list[float]) -> float:
    if len(set(values)) == 1:  # exact for one run (exp(log(x)) is not)
        return float(values[0])
    return float(np.exp(np.mean(np.log(values))))


def steps_table(runs: Sequence[StudyRun], target: float, metric: str = "acc") -> list[EbsRow]:
    """One row per EBS, one entry per seed; runs of one EBS and seed are one replicate (their crossings averaged
    geometrically; a replicate counts as reached only if every run of it reached the target)."""
    rows = []
    for ebs in sorted({r.effective_batch for r in runs}):
        row = EbsRow(ebs, [], [], [], [], [], [], [])
        for seed in sorted({r.seed for r in runs if r.effective_batch == ebs}):
            group = [r for r in runs if r.effective_batch == ebs and r.seed == seed]
            reached = [crossing(r, target, metric) for r in group]
            row.seeds.append(seed)
            row.replicates.append(len(group))
            row.gns.append(any(r.gns for r in group))
            if all(x is not None for x in reached):
                steps = _geomean([x[0] for x in reached])
                examples = _geomean([x[1] for x in reached])
                shares = [x[1] / r.budget for x, r in zip(reached, group) if r.budget]
                b_values = [b for b in (b_simple_at(r, x[1]) for x, r in zip(reached, group)) if b is not None]
                row.steps.append(steps)
                row.examples.append(examples)
                row.budget_share.append(max(shares) if shares else None)
                row.b_simple.append(float(np.mean(b_values)) if b_values else None)
            else:
                row.steps.append(None)
                row.examples.append(None)
                row.budget_share.append(None)
                row.b_simple.append(None)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------
# The fit log S = a_seed + log(1 + B_crit / B) and its profile interval


@dataclass
class TradeoffFit:
    s_min: float  # geometric mean over seeds of exp(a_seed)
    critical_batch: float  # E_min / S_min; inf when the steps fell as fast as 1/B (best fit at the grid's top)
    ci: tuple[float | None, float | None] | None  # None ends: unbounded (past the grid searched); None: no dof
    dof: int

    @property
    def e_min(self) -> float:
        return self.s_min * self.critical_batch


def _profile_rss(log_bcrit: np.ndarray, inv_b: np.ndarray, y: np.ndarray, onehot: np.ndarray) -> tuple[
        np.ndarray, np.ndarray]:
    """(RSS, per-seed intercepts) of log S = a_seed + log(1 + e^c / B) for each c in `log_bcrit`."""
    resid = y[None, :] - np.log1p(np.exp(log_bcrit)[:, None] * inv_b[None, :])
    intercepts = (resid @ onehot) / onehot.sum(axis=0)
    centred = resid - intercepts @ onehot.T
    return (centred ** 2).sum(axis=1), intercepts


def fit_log_tradeoff(effective_batch: Sequence[float], steps: Sequence[float], seeds: Sequence[Any],
                     confidence: float = CONFIDENCE) -> TradeoffFit:
    """Least squares of log S on log(1 + B_crit / B) with one intercept per seed; the profile (F) interval of
    B_crit. B_crit is searched from 1/1000 of the smallest EBS to 1000x the largest; an interval end that reaches
    either limit is None (unbounded: the data cannot tell B_crit from 0 or from infinity on that side)."""
    b = np.asarray(effective_batch, dtype=float)
    y = np.log(np.asarray(steps, dtype=float))
    levels = sorted(set(seeds), key=repr)
    onehot = np.array([[s == level for level in levels] for s in seeds], dtype=float)
    inv_b = 1.0 / b
    lo, hi = math.log(b.min() / 1000), math.log(b.max() * 1000)
    grid = np.linspace(lo, hi, 1201)
    rss, _ = _profile_rss(grid, inv_b, y, onehot)
    i = int(np.argmin(rss))
    if 0 < i < len(grid) - 1:
        res = optimize.minimize_scalar(lambda c: _profile_rss(np.array([c]), inv_b, y, onehot)[0][0],
                                       bounds=(grid[i - 1], grid[i + 1]), method="bounded")
        c_hat, rss_min = float(res.x), float(res.fun)
    else:
        c_hat, rss_min = float(grid[i]), float(rss[i])
    _, intercepts = _profile_rss(np.array([c_hat]), inv_b, y, onehot)
    s_min = float(np.exp(intercepts.mean()))
    b_crit = math.inf if i == len(grid) - 1 else (0.0 if i == 0 else math.exp(c_hat))
    dof = len(y) - len(levels) - 1
    if dof < 1:
        return TradeoffFit(s_min, b_crit, None, dof)
    threshold = max(rss_min, 1e-300) * (1 + stats.f.ppf(confidence, 1, dof) / dof)
    inside = rss <= threshold
    inside[i] = True

    def edge(j_out: int, j_in: int) -> float:
        f = lambda c: _profile_rss(np.array([c]), inv_b, y, onehot)[0][0] - threshold  # noqa: E731
        return math.exp(optimize.brentq(f, grid[j_out], grid[j_in])) if f(grid[j_out]) > 0 > f(grid[j_in]) \
            else math.exp(grid[j_in])

    j = i
    while j > 0 and inside[j - 1]:
        j -= 1
    low = None if j == 0 else edge(j - 1, j)
    k = i
    while k < len(grid) - 1 and inside[k + 1]:
        k += 1
    high = None if k == len(grid) - 1 else edge(k + 1, k)
    return TradeoffFit(s_min, b_crit, (low, high), dof)


def fit_linear_tradeoff(effective_batch: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """Least-squares line of S against 1/B: (S_min, E_min) = (intercept, slope). The fit before the log-space one,
    kept for the simulations that compare the two."""
    fit = stats.linregress(1.0 / np.asarray(effective_batch, dtype=float), np.asarray(steps, dtype=float))
    return float(fit.intercept), float(fit.slope)


# ------------------------------------------------------------------------------------------------------------
# Targets: the checks a fit must pass, the default, the curve over several


def noise_floor(runs: Sequence[StudyRun], metric: str = "acc") -> tuple[float, float, int] | None:
    """(majority rate, the level NOISE_SE standard errors above it, validation examples) for accuracy, when the
    runs record them; None otherwise."""
    rates = [r.majority_rate for r in runs if r.majority_rate is not None]
    sizes = [r.n_val for r in runs if r.n_val]
    if metric != "acc" or not rates or not sizes:
        return None
    rate, n = max(rates), min(sizes)
    return rate, rate + NOISE_SE * math.sqrt(rate * (1 - rate) / n), n


def _first_value(run: StudyRun) -> float:
    return run.evals[0][2]


def target_range(runs: Sequence[StudyRun], metric: str = "acc") -> tuple[float, float]:
    """(easy end, hard end) of the targets every run can be measured at: from the noise floor above the majority
    rate (else the median first evaluation) to the weakest run's best value."""
    higher = higher_is_better(metric)
    peaks = [peak(r, metric) for r in runs]
    hard = min(peaks) if higher else max(peaks)
    floor = noise_floor(runs, metric)
    easy = floor[1] if floor is not None else float(np.median([_first_value(r) for r in runs]))
    return easy, hard


def default_target(runs: Sequence[StudyRun], metric: str = "acc") -> tuple[float, str]:
    """(target, why): the hardest of 40 levels between the noise floor and the weakest run's best value that every
    run reaches before DEFAULT_TARGET_BUDGET of its budget; if none, the level that most runs reach that early."""
    runs = [r for r in runs if r.evals]
    if not runs:
        raise ValueError("no run has an evaluation")
    easy, hard = target_range(runs, metric)
    levels = np.linspace(easy, hard, 41)[1:]

    def early(run: StudyRun, level: float) -> bool:
        hit = crossing(run, level, metric)
        return hit is not None and (not run.budget or hit[1] <= DEFAULT_TARGET_BUDGET * run.budget)

    counts = [sum(early(r, t) for r in runs) for t in levels]
    share = f"{DEFAULT_TARGET_BUDGET:.0%}"
    for level, count in zip(levels[::-1], counts[::-1]):
        if count == len(runs):
            return float(level), (f"target = the hardest val/{metric} that every run reached within the first "
                                  f"{share} of its budget")
    best = max(counts)
    level = [t for t, c in zip(levels, counts) if c == best][-1]
    return float(level), (f"target: no val/{metric} level was reached by every run within the first {share} of its "
                          f"budget; this one was by {best} of {len(runs)} runs")


@dataclass
class TargetFit:
    target: float
    rows: list[EbsRow]
    fitted: list[int]  # the EBS values in the fit
    fit: TradeoffFit | None
    refusal: str | None  # why there is no fit, in words
    warnings: list[str]

    @property
    def ebs_range(self) -> tuple[int, int]:
        return min(self.fitted), max(self.fitted)

    @property
    def critical_batch(self) -> float | None:
        """B_crit when it lies inside the range of EBS in the fit; None outside it (see `bound`)."""
        if self.fit is None:
            return None
        low, high = self.ebs_range
        return self.fit.critical_batch if low <= self.fit.critical_batch <= high else None

    @property
    def bound(self) -> dict[str, int] | None:
        """{"above": largest EBS} or {"below": smallest EBS} when the estimate lies outside the range run."""
        if self.fit is None:
            return None
        low, high = self.ebs_range
        if self.fit.critical_batch > high:
            return {"above": high}
        if self.fit.critical_batch < low:
            return {"below": low}
        return None

    def to_json(self) -> dict[str, Any]:
        fit = self.fit
        return {"target": self.target, "fitted_effective_batch": self.fitted,
                "critical_batch": self.critical_batch, "critical_batch_bound": self.bound,
                "critical_batch_ci": None if fit is None or fit.ci is None else list(fit.ci),
                "s_min": None if fit is None else fit.s_min,
                "e_min": None if fit is None or not math.isfinite(fit.e_min) else fit.e_min,
                "refusal": self.refusal, "warnings": self.warnings}


def fit_target(runs: Sequence[StudyRun], target: float, metric: str = "acc",
               confidence: float = CONFIDENCE) -> TargetFit:
    """Steps to `target` per EBS and seed, the checks, and the log-space fit over the EBS where every seed reached
    it."""
    rows = steps_table(runs, target, metric)
    all_seeds = sorted({s for r in rows for s in r.seeds})
    fitted_rows = [r for r in rows if r.complete and r.seeds == all_seeds]
    warnings = []
    missed = [r.effective_batch for r in rows if not r.complete]
    if missed:
        warnings.append(f"EBS {', '.join(map(str, missed))} left out of the fit: a seed never reached the target")
    short = [r.effective_batch for r in rows if r.complete and r.seeds != all_seeds]
    if short:
        warnings.append(f"EBS {', '.join(map(str, short))} left out of the fit: not every seed "
                        f"({', '.join(map(str, all_seeds))}) completed there")
    fitted = [r.effective_batch for r in fitted_rows]
    floor = noise_floor(runs, metric)
    refusal = None
    if floor is not None and target <= floor[1]:
        refusal = (f"val/{metric} {target:.3g} is within noise of the majority rate {floor[0]:.3g} ({NOISE_SE:g} "
                   f"standard errors at {floor[2]} validation examples reach {floor[1]:.3g})")
    elif len(fitted) < MIN_EBS:
        refusal = (f"{'only ' if fitted else ''}{len(fitted)} EBS value(s){' (' + ', '.join(map(str, fitted)) + ')' if fitted else ''} "
                   f"had every seed reach val/{metric} {target:.3g}; a fit needs {MIN_EBS}")
    late = [f"EBS {r.effective_batch} seed {s}" for r in fitted_rows for s, share in zip(r.seeds, r.budget_share)
            if share is not None and share > BUDGET_END]
    if late:
        warnings.append(f"{', '.join(late)} reached the target in the last {1 - BUDGET_END:.0%} of the budget: "
                        "there the budget, not the batch size, sets the steps")
    fit = None
    if refusal is None:
        fit = fit_log_tradeoff([r.effective_batch for r in fitted_rows for _ in r.seeds],
                               [s for r in fitted_rows for s in r.steps],
                               [s for r in fitted_rows for s in r.seeds], confidence)
        if fit.ci is None:
            warnings.append("no interval: too few runs for the seeds and the two parameters")
    return TargetFit(target, rows, fitted, fit, refusal, warnings)


@dataclass
class EbsStudy:
    metric: str
    main: TargetFit
    curve: list[TargetFit]  # B_crit over several targets
    lr_scaling: list[str]
    notes: list[str]
    lr_note: str | None = None  # set when the runs are each EBS's best lr from the lr study

    @property
    def target(self) -> float:
        return self.main.target

    @property
    def rows(self) -> list[EbsRow]:
        return self.main.rows

    @property
    def b_simple(self) -> float | None:
        """Median over runs of B_simple where each run reached the target."""
        values = [b for r in self.rows for b in r.b_simple if b is not None]
        return float(np.median(values)) if values else None

    def to_json(self) -> dict[str, Any]:
        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else x

        return {"metric": f"val/{self.metric}", **self.main.to_json(),
                "rows": [{"effective_batch": r.effective_batch, "seeds": r.seeds, "steps": r.steps,
                          "examples": r.examples, "mean_steps": num(r.mean_steps),
                          "mean_examples": num(r.mean_examples), "b_simple_at_target": r.b_simple,
                          "mean_b_simple": r.mean_b_simple, "budget_share": r.budget_share,
                          "replicates": r.replicates} for r in self.rows],
                "b_simple": self.b_simple, "targets": [t.to_json() for t in self.curve],
                "lr_scaling": self.lr_scaling, "lr_note": self.lr_note, "notes": self.notes}


def analyse(runs: Sequence[StudyRun], target: float | None = None, metric: str = "acc",
            confidence: float = CONFIDENCE) -> EbsStudy | None:
    """The whole section's numbers; None when the runs do not vary batch.effective."""
    runs = [r for r in runs if r.evals]
    if len({r.effective_batch for r in runs}) < 2:
        return None
    notes = []
    if target is None:
        target, why = default_target(runs, metric)
        notes.append(why)
    main = fit_target(runs, target, metric, confidence)
    easy, hard = target_range(runs, metric)
    levels = easy + (hard - easy) * np.linspace(0.1, 1.0, N_TARGETS)
    curve = [fit_target(runs, float(t), metric, confidence) for t in levels]
    return EbsStudy(metric=metric, main=main, curve=curve, lr_scaling=sorted({r.lr_scaling for r in runs}),
                    notes=notes)


def group_by_other_keys(runs: Sequence[StudyRun], also_ignore: Sequence[str] = ()) -> dict[str, list[StudyRun]]:
    """Runs by the values of the config keys that vary besides batch.effective, the seed and the keys that do not
    change training (a fit mixes only runs that differ in EBS): {"optim.lr_scaling=sqrt": [...], ...}; one group
    "" when nothing else varies."""
    def ignored(key: str) -> bool:
        return key == "batch.effective" or key in also_ignore or not changes_training(key)

    keys = sorted({k for r in runs for k in r.config if not ignored(k)
                   and len({repr(x.config.get(k)) for x in runs}) > 1})
    groups: dict[str, list[StudyRun]] = {}
    for r in runs:
        groups.setdefault(", ".join(f"{k}={r.config.get(k)}" for k in keys), []).append(r)
    return groups
