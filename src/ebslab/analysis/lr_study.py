"""The report's learning-rate section: when runs vary both `optim.lr` and `batch.effective`, the best lr at each
EBS and the exponent alpha of lr_opt proportional to EBS^alpha, with intervals, and which scaling rule (none: 0,
sqrt: 0.5, linear: 1) the interval holds.

The model, per EBS B and pooled over seeds: the run's best validation metric y (the value `eval.select_by`
keeps) is a parabola in x = log lr around the best lr, y = p_B - k (x - log lr_opt(B))^2, with one peak p_B per
EBS and one curvature k > 0. Alone per EBS it gives the best lr there; across EBS with log lr_opt(B) = a + alpha
log(B / B_ref) it gives alpha. For a fixed (a, alpha) the model is linear in (p_B, k), so both are profiled out
exactly; the intervals are profile-likelihood (F) intervals over a grid, an end at the grid's edge unbounded (null).
McCandlish et al. 2018 and Shallue et al. 2019 tune the lr at every batch size; Malladi et al. 2022 derive the
sqrt rule for Adam; Li et al. 2024 find Adam's best lr rises and then falls with the batch size.
Coverage and recovery of a known exponent are checked by simulation in tests/test_lr_study.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ebslab.core.tables import md_table
from ebslab.core.metrics import higher_is_better

CONFIDENCE = 0.95
RULES = (("none", 0.0), ("sqrt", 0.5), ("linear", 1.0))
ALPHA_GRID = np.linspace(-2.0, 3.0, 501)
SCORED = ("completed", "collapsed", "diverged")  # run statuses whose evaluations enter the lr study


def profile_rss(x: np.ndarray, y: np.ndarray, group: np.ndarray, log_b: np.ndarray, centres: np.ndarray,
                alphas: np.ndarray) -> np.ndarray:
    """RSS of y = p_group - k (x - a - alpha log_b)^2 (k >= 0) with p and k profiled out, for every (alpha, a):
    shape (len(alphas), len(centres)). k fitted <= 0 (no peak) gives the flat model's RSS."""
    levels = np.unique(group)
    onehot = (group[:, None] == levels[None, :]).astype(float)
    counts = onehot.sum(axis=0)

    def centred(values: np.ndarray) -> np.ndarray:
        return values - ((values @ onehot) / counts) @ onehot.T

    yc = centred(y)
    syy = float(yc @ yc)
    z = (x[None, None, :] - centres[None, :, None] - alphas[:, None, None] * log_b[None, None, :]) ** 2
    zc = centred(z)
    sxy = (zc * yc).sum(axis=-1)
    sxx = (zc * zc).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rss = np.where((sxy < 0) & (sxx > 0), syy - sxy ** 2 / sxx, syy)
    return rss


def _interval(values: np.ndarray, rss: np.ndarray, best: int, dof: int, confidence: float
              ) -> tuple[float | None, float | None]:
    threshold = rss[best] * (1 + stats.f.ppf(confidence, 1, dof) / dof)
    inside = rss <= threshold
    j = best
    while j > 0 and inside[j - 1]:
        j -= 1
    k = best
    while k < len(values) - 1 and inside[k + 1]:
        k += 1
    return (None if j == 0 else float(values[j])), (None if k == len(values) - 1 else float(values[k]))


@dataclass
class BestLr:
    effective_batch: int
    lrs: list[float]  # the lrs run
    mean_scores: list[float]  # best validation metric per lr, mean over seeds
    seeds: int
    lr: float | None  # the fitted best lr, when it lies inside the lrs run
    ci: tuple[float | None, float | None] | None  # None ends: unbounded
    bound: dict[str, float] | None  # {"above": largest lr} / {"below": smallest lr} when outside the lrs run
    observed: float  # the lr run with the best mean score

    def to_json(self) -> dict[str, Any]:
        return {"effective_batch": self.effective_batch, "lr": self.lr,
                "lr_ci": None if self.ci is None else list(self.ci), "bound": self.bound,
                "observed_best_lr": self.observed, "lrs": self.lrs, "mean_scores": self.mean_scores,
                "seeds": self.seeds}


def best_lr(lr: Sequence[float], score: Sequence[float], effective_batch: int, higher: bool = True,
            confidence: float = CONFIDENCE) -> BestLr:
    """The best lr at one EBS: the vertex of the parabola of the score in log lr (pooled over seeds) and its
    profile interval; outside the lrs run it is a bound."""
    x, y = np.log(np.asarray(lr, dtype=float)), np.asarray(score, dtype=float) * (1 if higher else -1)
    lrs = sorted(set(float(v) for v in lr))
    means = [float(np.mean([s for v, s in zip(lr, score) if v == level])) for level in lrs]
    observed = lrs[int(np.argmax(means) if higher else np.argmin(means))]
    seeds = max(sum(1 for v in lr if v == level) for level in lrs)
    if len(lrs) < 3:
        return BestLr(effective_batch, lrs, means, seeds, None, None, None, observed)
    span = x.max() - x.min()
    centres = np.linspace(x.min() - span, x.max() + span, 601)
    rss = profile_rss(x, y, np.zeros(len(x)), np.zeros(len(x)), centres, np.zeros(1))[0]
    i = int(np.argmin(rss))
    dof = len(x) - 3
    ci = None
    if dof >= 1 and rss[i] < rss[0]:  # a peak: better than the flat model
        low, high = _interval(centres, rss, i, dof, confidence)
        ci = (None if low is None else math.exp(low), None if high is None else math.exp(high))
    vertex = float(centres[i])
    if rss[i] >= rss[0] - 1e-15:  # no peak anywhere: the score is flat or bowl-shaped in log lr
        bound = None
        value = None
    elif vertex > x.max():
        value, bound = None, {"above": lrs[-1]}
    elif vertex < x.min():
        value, bound = None, {"below": lrs[0]}
    else:
        value, bound = math.exp(vertex), None
    return BestLr(effective_batch, lrs, means, seeds, value, ci, bound, observed)


@dataclass
class ExponentFit:
    exponent: float
    ci: tuple[float | None, float | None] | None
    centre: float  # log lr_opt at B_ref
    b_ref: float
    dof: int

    def best_lr_at(self, effective_batch: float) -> float:
        return math.exp(self.centre + self.exponent * math.log(effective_batch / self.b_ref))

    @property
    def rules_inside(self) -> list[str]:
        if self.ci is None:
            return []
        low, high = self.ci
        return [name for name, value in RULES if (low is None or low <= value) and (high is None or value <= high)]


def fit_exponent(lr: Sequence[float], effective_batch: Sequence[int], score: Sequence[float], higher: bool = True,
                 confidence: float = CONFIDENCE) -> ExponentFit | None:
    """alpha of lr_opt proportional to EBS^alpha from the joint parabola model; None with fewer than 2 EBS of 3
    lrs each, or no peak."""
    x = np.log(np.asarray(lr, dtype=float))
    b = np.asarray(effective_batch, dtype=float)
    y = np.asarray(score, dtype=float) * (1 if higher else -1)
    usable = [v for v in np.unique(b) if len(set(x[b == v])) >= 3]
    if len(usable) < 2:
        return None
    keep = np.isin(b, usable)
    x, b, y = x[keep], b[keep], y[keep]
    b_ref = float(np.exp(np.mean(np.log(np.unique(b)))))
    log_b = np.log(b / b_ref)
    span = x.max() - x.min()
    centres = np.linspace(x.min() - span, x.max() + span, 241)
    rss = profile_rss(x, y, b, log_b, centres, ALPHA_GRID)
    flat = float(((y - np.array([y[b == v].mean() for v in b])) ** 2).sum())
    ia, ic = np.unravel_index(int(np.argmin(rss)), rss.shape)
    if rss[ia, ic] >= flat - 1e-15:
        return None
    dof = len(y) - (len(usable) + 3)
    profile = rss.min(axis=1)
    ci = _interval(ALPHA_GRID, profile, int(ia), dof, confidence) if dof >= 1 else None
    return ExponentFit(float(ALPHA_GRID[ia]), ci, float(centres[ic]), b_ref, dof)


# ------------------------------------------------------------------------------------------------------------
# Run folders -> the section


def applies(runs: Sequence[Any]) -> bool:
    """Whether the runs vary both optim.lr and batch.effective."""
    return (len({r.config.get("optim.lr") for r in runs}) > 1 and len({r.effective_batch for r in runs}) > 1)


def _points(runs: Sequence[Any], metric: str) -> tuple[list[float], list[int], list[float]]:
    from ebslab.analysis.ebs_study import peak

    runs = [r for r in runs if r.evals and r.lr]
    return [float(r.lr) for r in runs], [r.effective_batch for r in runs], [peak(r, metric) for r in runs]


@dataclass
class LrStudy:
    metric: str
    best: list[BestLr]
    exponent: ExponentFit | None
    why_no_exponent: str | None
    fell: list[tuple[int, float, str]] = field(default_factory=list)  # (EBS, lr, status) of runs that collapsed
    #                                                                   or diverged

    def to_json(self) -> dict[str, Any]:
        e = self.exponent
        return {"metric": f"val/{self.metric} (best over evaluations)",
                "exponent": None if e is None else e.exponent,
                "exponent_ci": None if e is None or e.ci is None else list(e.ci),
                "rules_inside": None if e is None else e.rules_inside,
                "best_lr": [b.to_json() for b in self.best], "why_no_exponent": self.why_no_exponent}


def analyse(runs: Sequence[Any], metric: str = "acc", confidence: float = CONFIDENCE) -> LrStudy:
    lr, ebs, score = _points(runs, metric)
    higher = higher_is_better(metric)
    best = []
    for b in sorted(set(ebs)):
        idx = [i for i, v in enumerate(ebs) if v == b]
        best.append(best_lr([lr[i] for i in idx], [score[i] for i in idx], b, higher, confidence))
    fit = fit_exponent(lr, ebs, score, higher, confidence)
    why = None
    if fit is None:
        why = ("fewer than 2 EBS values ran 3 or more lrs" if sum(len(x.lrs) >= 3 for x in best) < 2 else
               f"the best val/{metric} has no peak in log lr at any EBS (flat or bowl-shaped)")
    elif fit.ci is None:
        why = "no interval: too few runs for the model's parameters"
    fell = sorted((r.effective_batch, float(r.lr), r.status) for r in runs
                  if r.evals and r.lr and r.status in ("collapsed", "diverged"))
    return LrStudy(metric, best, fit, why, fell)


def fell_words(study: LrStudy) -> str | None:
    """The sentence on runs that collapsed or diverged: there the score falls off a cliff, not along a parabola."""
    if not study.fell:
        return None
    by_lr: dict[float, list[int]] = {}
    for ebs, lr, _ in study.fell:
        by_lr.setdefault(lr, []).append(ebs)
    parts = [f"lr {_lr(lr)} (EBS {', '.join(map(str, sorted(set(e))))})" for lr, e in sorted(by_lr.items())]
    return (f"{len(study.fell)} run(s) collapsed or diverged, at {'; '.join(parts)}: there the score falls off a "
            "cliff rather than along a parabola, and the intervals above, which assume the parabola, are only as "
            "good as that description.")


def _lr(v: float) -> str:
    return f"{v:.1e}"


def best_words(b: BestLr) -> str:
    if b.bound is not None:
        side, edge = next(iter(b.bound.items()))
        return f"{side} {_lr(edge)}, the {'largest' if side == 'above' else 'smallest'} lr run"
    if len(b.lrs) < 3:
        return f"fewer than 3 lrs run (best run: {_lr(b.observed)})"
    if b.lr is None:
        return f"no peak in log lr (best run: {_lr(b.observed)})"
    if b.ci is None:
        return f"{_lr(b.lr)} (no interval)"
    low, high = b.ci
    return (f"{_lr(b.lr)} (95% interval {'unbounded below' if low is None else _lr(low)} to "
            f"{'unbounded above' if high is None else _lr(high)})")


def exponent_words(study: LrStudy) -> str:
    fit = study.exponent
    if fit is None:
        return f"No exponent of the lr rule could be fitted: {study.why_no_exponent}."
    if fit.ci is None:
        return (f"The joint fit puts the best lr proportional to EBS^{fit.exponent:.2f}, with no interval "
                f"({study.why_no_exponent}).")
    low, high = fit.ci
    ci = (f"{'no lower end' if low is None else f'{low:.2f}'} to {'no upper end' if high is None else f'{high:.2f}'}")
    inside = fit.rules_inside
    outside = [f"{name} ({value:g})" for name, value in RULES if name not in inside]
    rules = (f"inside it: {', '.join(f'{n} ({v:g})' for n, v in RULES if n in inside)}" if inside
             else "none of the rules none (0), sqrt (0.5), linear (1) is inside it")
    return (f"The joint fit puts the best lr proportional to EBS^alpha with alpha = {fit.exponent:.2f} (95% profile "
            f"interval {ci}); {rules}" + (f"; outside it: {', '.join(outside)}" if inside and outside else "") + ".")


def plot(study: LrStudy, runs: Sequence[Any], path: Path) -> Path:
    from matplotlib.lines import Line2D

    from ebslab.analysis.ebs_section import plain_log_ticks
    from ebslab.analysis.figures import pyplot, save

    plt = pyplot()
    lr, ebs, score = _points(runs, study.metric)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    handles = []
    for b in study.best:
        idx = [i for i, v in enumerate(ebs) if v == b.effective_batch]
        (dots,) = ax.plot([lr[i] for i in idx], [score[i] for i in idx], "o", alpha=0.45, ms=4)
        color = dots.get_color()
        ax.plot(b.lrs, b.mean_scores, "-", color=color, lw=1.5)
        if b.lr is not None:
            ax.axvline(b.lr, color=color, ls=":", lw=1)
        handles.append(Line2D([], [], color=color, lw=1.5, label=f"EBS {b.effective_batch}"))
    handles += [Line2D([], [], color="grey", marker="o", ls="", alpha=0.45, ms=4, label="one seed (dot)"),
                Line2D([], [], color="grey", lw=1.5, label="mean over seeds (line)"),
                Line2D([], [], color="grey", ls=":", lw=1, label="fitted best lr (dotted)")]
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    from matplotlib import ticker

    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _p: f"{v:.0e}".replace("e-0", "e-")))
    ax.set_xlabel("Learning rate (per step, no scaling rule)")
    ax.set_ylabel(f"Best val/{study.metric} over the run (fraction)" if study.metric == "acc" else
                  f"Best val/{study.metric}")
    ax.set_title("Validation Score vs. Learning Rate per EBS")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, fontsize=7)
    return save(fig, path, dpi=90)


def scores_markdown(study: LrStudy) -> str:
    """Mean best score per EBS and lr, and each EBS's best lr."""
    lrs = sorted({x for b in study.best for x in b.lrs})
    rows = [[str(b.effective_batch), str(b.seeds)]
            + [f"{b.mean_scores[b.lrs.index(v)]:.3f}" if v in b.lrs else "" for v in lrs] + [best_words(b)]
            for b in study.best]
    return md_table(["EBS", "seeds"] + [f"lr {_lr(v)}" for v in lrs] + ["best lr"], rows,
                    ["r", "r"] + ["r"] * len(lrs) + ["l"])


def section(runs: Sequence[Any], out_dir: Path, metric: str = "acc", title: str = "",
            prefix: str = "lr") -> tuple[list[str], dict[str, Any]]:
    study = analyse(runs, metric)
    plot(study, runs, Path(out_dir) / f"{prefix}_vs_ebs.png")
    md = ["## Learning rate and effective batch size" + (f": {title}" if title else ""), "",
          "Best lr at each EBS (vertex of a parabola of the run's best val/" + metric + " in log lr, pooled over "
          "seeds): " + "; ".join(f"EBS {b.effective_batch}: {best_words(b)}" for b in study.best) + ". "
          + exponent_words(study) + (" " + fell_words(study) if fell_words(study) else ""), "",
          f"Best val/{metric} over each run, mean over seeds:", "", scores_markdown(study), "",
          f"![Validation score vs. learning rate]({prefix}_vs_ebs.png)", ""]
    return md, study.to_json()


def report_section(run_dirs: Sequence[Path], out_dir: Path, metric: str = "acc"
                   ) -> tuple[list[str], dict[str, Any] | None]:
    """`ebslab report`'s call: (markdown lines, report.json's `lr_study`) when the completed runs vary both
    optim.lr and batch.effective, else ([], None). Other varying keys give one study each."""
    from ebslab.analysis.ebs_study import group_by_other_keys, load_study_run

    # a run that collapsed or diverged at too large an lr is a measurement of that lr: it stays in
    runs = [r for r in (load_study_run(d, metric) for d in run_dirs) if r.status in SCORED]
    if not applies(runs):
        return [], None
    groups = group_by_other_keys(runs, also_ignore=("optim.lr",))
    lines: list[str] = []
    studies = {}
    for i, (label, members) in enumerate(groups.items()):
        if not applies(members):
            continue
        md, data = section(members, out_dir, metric, title=label, prefix="lr" if len(groups) == 1 else f"lr{i + 1}")
        lines += md
        studies[label] = data
    if not studies:
        return [], None
    return lines, next(iter(studies.values())) if len(studies) == 1 else {"groups": studies}


def runs_at_best_lr(runs: Sequence[Any], metric: str = "acc") -> tuple[list[Any], str]:
    """Each EBS's runs at the lr run nearest (in log) its fitted best lr (the best mean when the fit has no peak
    inside the lrs run), and the sentence that says so."""
    study = analyse(runs, metric)
    chosen = {}
    for b in study.best:
        target = b.lr if b.lr is not None else b.observed
        chosen[b.effective_batch] = min(b.lrs, key=lambda v: abs(math.log(v / target)))
    kept = [r for r in runs if r.lr and chosen.get(r.effective_batch) == float(r.lr)]
    note = ("The runs vary the lr: this fit uses, at each EBS, the runs at the lr nearest its best lr ("
            + ", ".join(f"EBS {b}: {_lr(v)}" for b, v in sorted(chosen.items())) + "), as McCandlish et al. tune "
            "the lr at every batch size.")
    return kept, note
