"""`ebslab report`: tables, plots and statistics from run folders only (docs/run-folder.md).

What it writes into the output folder:
- `report.md`: "what mattered" (main effect of each varying key, paired by seed and the other keys), one row
  per run, the configurations over seeds (seeds completed / fell back / collapsed / diverged / failed, validation
  and test means), each configuration against the reference, and the runs without a test metric.
- `report.json`: every number the markdown shows (groups, comparisons, main effects, ignored keys, the family).
- `val_acc.png`, `val_loss.png`, `test_acc_vs_ebs.png`.

Statistics (numbers from ebslab.analysis.stats):
- Runs are compared only within one data fingerprint; which runs are one configuration and one replicate is
  ebslab.analysis.replicates' rule: keys that do not change training never split a configuration, and runs of one
  configuration and seed count once (their agreement is checked and said).
- Nothing is selected on test: the reference is the configuration with the best mean validation metric.
- Every run counts: collapsed runs with their score, diverged runs by `diverged_score`, failed seeds named as
  missing in each comparison (`--exclude-collapsed` gives the old view). Run folders from before summary.json
  judged the whole validation history are judged here (`history_status`).
- The seed is the unit of replication: A vs B pairs seeds; estimate = mean per-seed difference, crossed bootstrap
  interval next to the paired t-interval, P(A better) with a Clopper-Pearson interval, paired t-test p (exact
  sign-flip where every seed ties), Holm over every comparison and main effect together, power at Holm's first
  level for `--detect`; McNemar only within a seed, as secondary evidence; one seed gives no p-value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats as sps

from ebslab.analysis import ebs_study, lr_study, replicates, stats
from ebslab.core import runfolder
from ebslab.core.config import flatten as config_flatten
from ebslab.core.errors import UserError
from ebslab.core.files import check_folder_target
from ebslab.core.metrics import METRICS, higher_is_better, metric_value, run_history

OK_STATUS = "completed"
# A configuration is what is trained: keys that provably do not change it never split one (ebslab.analysis.replicates).
GROUP_EXCLUDED_PREFIXES = replicates.NON_TRAINING_PREFIXES
GROUP_EXCLUDED_KEYS = (replicates.SEED_KEY, *replicates.NON_TRAINING_KEYS)
ALPHA = 0.05
DETECT_PT = 1.0  # `--detect` default: the difference the power sentences size seeds for (1 point of accuracy)


# ----------------------------------------------------------------------------------------------------------
# Small pure statistics functions


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sample std (ddof=1), lower, upper) of a Student-t interval. NaN where not defined (n < 2)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


mcnemar_p = stats.mcnemar_p
holm = stats.holm


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """A run's config -> {dotted key: leaf}, `derived.*` included. Lists are leaves (kept as tuples so they can
    be compared)."""
    flat = config_flatten(mapping or {}, prefix, skip=())
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}


def varying_keys(flat_configs: Sequence[dict[str, Any]], exclude: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose value differs between configs (a missing key counts as a value); out.*, derived.* never."""
    exclude = set(exclude)
    keys: list[str] = []
    for cfg in flat_configs:
        for k in cfg:
            if k not in keys:
                keys.append(k)
    result = []
    for k in keys:
        if k in exclude or k.startswith(GROUP_EXCLUDED_PREFIXES):
            continue
        values = {replicates.hashable(cfg.get(k, _MISSING)) for cfg in flat_configs}
        if len(values) > 1:
            result.append(k)
    return result


def format_duration(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return ""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h {m:02d}m {sec:02d}s"
    if m:
        return f"{m}m {sec:02d}s"
    return f"{sec}s"


class _Missing:
    def __repr__(self) -> str:
        return "—"


_MISSING = _Missing()


def _fmt_value(v: Any) -> str:
    if v is _MISSING or v is None:
        return "—" if v is _MISSING else "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _sort_value(v: Any) -> tuple:
    if isinstance(v, bool):
        return (1, str(v))
    if isinstance(v, (int, float)):
        return (0, float(v))
    return (1, _fmt_value(v))


# ----------------------------------------------------------------------------------------------------------
# Reading run folders


@dataclass
class Run:
    path: Path
    name: str
    config: dict
    flat: dict[str, Any]
    summary: dict | None
    records: list[dict]
    status: str
    message: str | None = None
    predictions: dict[str, Any] = field(default_factory=dict)  # "best"/"last" -> DataFrame, loaded lazily
    fell_back: bool = False  # learned, then back at the majority-class rate at its last evaluation

    @property
    def ok(self) -> bool:
        return self.status == OK_STATUS

    @property
    def seed(self) -> Any:
        return self.flat.get("train.seed")

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("event") == "eval"]

    @property
    def warnings(self) -> list[dict]:
        return [r for r in self.records if r.get("event") == "warning"]

    def group_key(self) -> tuple:
        # as trained: a run folder from before a key existed groups with one that has it at its default, and
        # train.precision=auto with one that asked for what auto resolved to
        return replicates.configuration(self.config)

    def test(self, which: str, metric: str) -> float:
        """The test metric the report scores this run with: the summary's, or the diverged rule's."""
        if self.status == "diverged":
            return diverged_score(self, metric)
        return self.measured(which, metric)

    def measured(self, which: str, metric: str) -> float:
        """The test metric summary.json recorded (none for a diverged run): what the runs table shows."""
        block = (self.summary or {}).get(f"test_{which}") or {}
        return _num(block.get(metric))

    def val(self, metric: str) -> float:
        if self.status == "diverged":
            return diverged_score(self, metric)
        return _num(((self.summary or {}).get("val_best") or {}).get(metric))

    def duration(self) -> float:
        d = _num((self.summary or {}).get("duration_s"))
        if math.isnan(d):
            times = [_num(r.get("elapsed_s")) for r in self.records if "elapsed_s" in r]
            times = [t for t in times if not math.isnan(t)]
            d = max(times) if times else math.nan
        return d

    def best_eval(self) -> dict:
        """The eval line of the best checkpoint (summary's best_step), else the one with the highest val acc."""
        evals = self.evals
        if not evals:
            return {}
        best_step = (self.summary or {}).get("best_step")
        if best_step is not None:
            for r in evals:
                if r.get("step") == best_step:
                    return r
        return max(evals, key=lambda r: _num(r.get("val/acc"), -math.inf))

    def load_predictions(self, which: str = "best"):
        if which not in self.predictions:
            self.predictions[which] = runfolder.read_predictions(self.path, which)
        return self.predictions[which]


_in_group = replicates.changes_training


def diverged_score(run: Run, metric: str) -> float:
    """THE rule for how a diverged run scores (its weights are NaN: it has no test predictions): as a model that
    learned nothing, the majority-class rate (summary.json's `majority_rate`) for accuracy; no score for any
    other metric (it then counts as a missing seed, and says so)."""
    return _num((run.summary or {}).get("majority_rate")) if metric == "acc" else math.nan


def history_status(summary: dict, records: Sequence[dict]) -> tuple[str, bool] | None:
    """(status, fell_back) of a run folder written before summary.json judged the whole validation history:
    run_history over its eval lines' val/acc, with the majority rate and val size from summary.json. None
    when the summary already judged it, the run did not finish, or what it needs was not recorded."""
    status = summary.get("status")
    if "fell_back" in summary or status not in ("completed", "collapsed"):
        return None
    majority = _num(summary.get("majority_rate"))
    n_val = _num((summary.get("val_best") or {}).get("n"))
    accs = [_num(r.get("val/acc")) for r in records if r.get("event") == "eval"]
    accs = [a for a in accs if not math.isnan(a)]
    if math.isnan(majority) or math.isnan(n_val) or not accs:
        return None
    h = run_history(accs, majority, int(n_val))
    if status == "collapsed" and not h["collapsed"]:
        return "completed", h["fell_back"]
    if status == "completed" and h["collapsed"]:
        return "collapsed", False
    return status, h["fell_back"]


def _num(v: Any, default: float = math.nan) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f


def is_run_dir(path: Path) -> bool:
    if (path / "summary.json").is_file() or (path / "metrics.jsonl").is_file():
        return True
    return (path / "config.yaml").is_file() and not (path / "sweep.json").exists()


def find_run_dirs(paths: Sequence[Path | str]) -> list[Path]:
    """Run folders given directly or found at any depth below the given folders (not below a run folder)."""
    found: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError(f"{p}: no such file or folder (give run folders or sweep folders)")
        if not p.is_dir():
            raise UserError(f"{p}: not a folder (give run folders or sweep folders)")
        candidates: list[Path] = []
        if is_run_dir(p):
            candidates.append(p)
        else:
            for root, dirs, _files in os.walk(p):
                dirs.sort()
                rootp = Path(root)
                if rootp != p and is_run_dir(rootp):
                    candidates.append(rootp)
                    dirs[:] = []  # never look inside a run folder (checkpoints/, predictions/, ...)
        for c in candidates:
            r = c.resolve()
            if r not in seen:
                seen.add(r)
                found.append(c)
    if not found:
        shown = " ".join(str(p) for p in paths)
        raise UserError(f"no run folders (with summary.json or config.yaml) found in {shown}")
    return found


def load_run(path: Path, name: str | None = None) -> Run:
    path = Path(path)
    config = runfolder.read_config(path) or {}
    summary = runfolder.read_summary(path)
    records = runfolder.read_metrics(path)
    fell_back = False
    if summary is None:
        status, message = "incomplete", "no summary.json (still running, or killed)"
    else:
        status = str(summary.get("status") or "unknown")
        message = summary.get("message")
        fell_back = bool(summary.get("fell_back"))
        judged = history_status(summary, records)
        if judged is not None:
            if judged[0] != status:
                message = f"{judged[0]} over its whole validation history (summary.json says {status})"
            status, fell_back = judged
    return Run(path=path, name=name or path.name, config=config, flat=flatten(config), summary=summary,
               records=records, status=status, message=message, fell_back=fell_back)


def _run_names(dirs: Sequence[Path]) -> list[str]:
    """Folder names; paths relative to the common parent where names collide."""
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    resolved = [d.resolve() for d in dirs]
    common = Path(os.path.commonpath([str(r) for r in resolved]))
    return [str(r.relative_to(common)) or r.name for r in resolved]


# ----------------------------------------------------------------------------------------------------------
# Configurations


# Status order of a replicate whose runs disagree: the best outcome any of its runs reached
_STATUS_ORDER = ("completed", "collapsed", "diverged", "failed", "interrupted", "pruned", "incomplete")


def scored_statuses(exclude_collapsed: bool = False) -> tuple[str, ...]:
    """Statuses that enter means and tests: completed, collapsed (with the score it got) and diverged (scored by
    `diverged_score`); only completed in the old view (--exclude-collapsed)."""
    return (OK_STATUS,) if exclude_collapsed else SCORED_STATUS


@dataclass
class Replicate:
    """One seed of one configuration: every run of it (runs that differ only in keys that do not change training,
    e.g. train.backend, are the same replicate and count once)."""
    seed: Any
    runs: list[Run]

    @property
    def status(self) -> str:
        statuses = [r.status for r in self.runs]
        return min(statuses, key=lambda s: _STATUS_ORDER.index(s) if s in _STATUS_ORDER else len(_STATUS_ORDER))

    @property
    def fell_back(self) -> bool:
        return any(r.fell_back for r in self.runs if r.status == self.status)

    def scored(self, statuses: Sequence[str], metric: str, which: str = "best") -> list[Run]:
        return [r for r in self.runs if r.status in statuses and not math.isnan(r.test(which, metric))]

    def test(self, which: str, metric: str, statuses: Sequence[str] = ("completed", "collapsed", "diverged")) -> float:
        """Mean over its scored runs (identical when they agree, as they should)."""
        vals = [r.test(which, metric) for r in self.scored(statuses, metric, which)]
        return float(np.mean(vals)) if vals else math.nan

    def val(self, metric: str, statuses: Sequence[str]) -> float:
        vals = [v for v in (r.val(metric) for r in self.runs if r.status in statuses) if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan

    def spread(self, metric: str, statuses: Sequence[str]) -> float:
        """Largest difference in test metric between its scored runs (0 when they agree; NaN with one run)."""
        vals = [r.test("best", metric) for r in self.scored(statuses, metric)]
        return max(vals) - min(vals) if len(vals) > 1 else math.nan

    def representative(self, statuses: Sequence[str], metric: str) -> Run | None:
        """The scored run whose predictions stand for the replicate (the first by name)."""
        scored = self.scored(statuses, metric)
        return scored[0] if scored else None

    def why_missing(self, statuses: Sequence[str], metric: str) -> str:
        r = self.runs[0]
        if r.status == "diverged" and r.status in statuses:
            return f"diverged (no {metric} score for a diverged run)"
        return r.status + (f": {r.message}" if r.message else "")


@dataclass
class Group:
    key: tuple
    runs: list[Run]
    label: str = ""
    replicates: list[Replicate] = field(default_factory=list)

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.key)

    def scored_runs(self, exclude_collapsed: bool = False) -> list[Run]:
        """Runs with a score: completed, collapsed and diverged (its rule) unless excluded."""
        return [r for r in self.runs if r.status in scored_statuses(exclude_collapsed)]

    def scored_replicates(self, metric: str = "acc", exclude_collapsed: bool = False) -> list[Replicate]:
        keep = scored_statuses(exclude_collapsed)
        return [rep for rep in self.replicates if not math.isnan(rep.test("best", metric, keep))]

    def stats(self, which: str = "best", metric: str = "acc",
              exclude_collapsed: bool = False) -> tuple[float, float, float, float]:
        keep = scored_statuses(exclude_collapsed)
        return mean_ci([rep.test(which, metric, keep) for rep in self.scored_replicates(metric, exclude_collapsed)])


def group_runs(runs: Sequence[Run]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for r in runs:
        groups.setdefault(r.group_key(), Group(key=r.group_key(), runs=[])).runs.append(r)
    glist = list(groups.values())
    keys = varying_keys([g.config for g in glist])
    for g in glist:
        cfg = g.config
        g.label = ", ".join(f"{k}={_fmt_value(cfg.get(k, _MISSING))}" for k in keys) or "all runs"
        g.runs.sort(key=lambda r: (_sort_value(r.seed), r.name))
        by_seed: dict[Any, list[Run]] = {}
        for r in g.runs:
            by_seed.setdefault(replicates.hashable(r.seed), []).append(r)
        g.replicates = [Replicate(seed=runs_[0].seed, runs=runs_) for runs_ in by_seed.values()]
    glist.sort(key=lambda g: tuple(_sort_value(g.config.get(k, _MISSING)) for k in keys))
    return glist


def pair_label(a: Group, b: Group) -> tuple[str, str]:
    """Names of two configurations by the keys in which they differ."""
    ca, cb = a.config, b.config
    keys = varying_keys([ca, cb])
    if not keys:
        return a.label, b.label
    fa = ", ".join(f"{k}={_fmt_value(ca.get(k, _MISSING))}" for k in keys)
    fb = ", ".join(f"{k}={_fmt_value(cb.get(k, _MISSING))}" for k in keys)
    return fa, fb


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.2g}"  # two significant digits: 0.047 must not print as 0.05 next to "significant at 0.05"



# ----------------------------------------------------------------------------------------------------------
# Seed-level statistics of a report (numbers from ebslab.analysis.stats; this section only pairs runs and arrays)

SCORED_STATUS = ("completed", "collapsed", "diverged")  # runs that score: collapsed with theirs, diverged by rule
COUNTED_STATUS = ("completed", "collapsed", "diverged", "failed")


def metric_bounds(metric: str) -> tuple[float, float]:
    """Range of a metric (MCC in [-1, 1], loss unbounded above, the rest in [0, 1])."""
    if metric == "loss":
        return 0.0, math.inf
    if metric == "mcc":
        return -1.0, 1.0
    return 0.0, 1.0


def difference_bounds(metric: str) -> tuple[float, float]:
    lo, hi = metric_bounds(metric)
    return lo - hi, hi - lo


def _direction(metric: str) -> float:
    return 1.0 if higher_is_better(metric) else -1.0


@dataclass
class SeedArrays:
    """One run's test predictions at the best checkpoint: label and class probabilities, rows sorted by index."""
    index: np.ndarray
    label: np.ndarray
    probs: np.ndarray | None  # (n, K) when prob_k columns exist
    pred: np.ndarray


def seed_arrays(run: Run, which: str = "best") -> SeedArrays | None:
    df = run.load_predictions(which)
    if df is None or not len(df):
        return None
    df = df.sort_values("index")
    prob_cols = sorted((c for c in df.columns if c.startswith("prob_") and c[5:].isdigit()), key=lambda c: int(c[5:]))
    probs = df[prob_cols].to_numpy(float) if prob_cols else None
    return SeedArrays(index=df["index"].to_numpy(), label=df["label"].to_numpy(int), probs=probs,
                      pred=df["pred"].to_numpy(int))


def _matched(a: SeedArrays, b: SeedArrays) -> tuple[np.ndarray, np.ndarray] | None:
    """Row positions in a and b of the test indices both have; None when labels disagree (not one test split)."""
    common, ia, ib = np.intersect1d(a.index, b.index, return_indices=True)
    if not len(common) or (a.label[ia] != b.label[ib]).any():
        return None
    return ia, ib


@dataclass
class PairedSeed:
    """One seed of a comparison: both runs' test metric (summary) and, when predictions pair, the arrays."""
    seed: Any
    value_a: float
    value_b: float
    a: SeedArrays | None = None
    b: SeedArrays | None = None
    rows: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_examples(self) -> int:
        return 0 if self.rows is None else len(self.rows[0])

    def disagreements(self) -> tuple[int, int]:
        """(examples only A gets right, examples only B gets right)."""
        ia, ib = self.rows
        ca = self.a.pred[ia] == self.a.label[ia]
        cb = self.b.pred[ib] == self.b.label[ib]
        return int((ca & ~cb).sum()), int((~ca & cb).sum())


def pair_by_seed(reps_a: Sequence[Replicate], reps_b: Sequence[Replicate], metric: str,
                 statuses: Sequence[str] = SCORED_STATUS) -> list[PairedSeed]:
    """A's and B's replicates paired by seed (each seed once, whatever number of runs it has), with both scores
    and the representative runs' test predictions."""
    by_a = {replicates.hashable(r.seed): r for r in reps_a}
    by_b = {replicates.hashable(r.seed): r for r in reps_b}
    out = []
    for s in sorted(set(by_a) & set(by_b), key=_sort_value):
        va, vb = by_a[s].test("best", metric, statuses), by_b[s].test("best", metric, statuses)
        if math.isnan(va) or math.isnan(vb):
            continue
        ra, rb = by_a[s].representative(statuses, metric), by_b[s].representative(statuses, metric)
        p = PairedSeed(seed=by_a[s].seed, value_a=va, value_b=vb, a=seed_arrays(ra), b=seed_arrays(rb))
        if p.a is not None and p.b is not None:
            p.rows = _matched(p.a, p.b)
        out.append(p)
    return out


def bootstrap_interval(pairs: Sequence[PairedSeed], metric: str, n_boot: int, rng: np.random.Generator,
                       confidence: float = 1 - ALPHA) -> tuple[float, float, str | None]:
    """Crossed bootstrap interval of mean(A - B) over seeds (stats.crossed_bootstrap_mean: seeds, and one set of
    test examples shared by every seed and by A and B). Accuracy takes the fast per-example path; other metrics
    are recomputed on every resample."""
    return bootstrap_interval_cells([[p] for p in pairs], metric, n_boot, rng, confidence)


def bootstrap_interval_cells(per_seed: Sequence[Sequence[PairedSeed]], metric: str, n_boot: int,
                             rng: np.random.Generator, confidence: float = 1 - ALPHA) -> tuple[float, float, str | None]:
    """The same for a main effect: per_seed[s] holds seed s's pairs (one per combination of the other keys);
    the seed's difference is their mean. Every seed and pair is scored on the test examples all of them have."""
    if not per_seed:
        return math.nan, math.nan, "no paired seed"
    missing = [str(_fmt_value(cell[0].seed)) for cell in per_seed if any(p.rows is None for p in cell)]
    if missing:
        return math.nan, math.nan, f"no paired test predictions for seed {', '.join(missing)}"
    if metric != "acc" and any(p.a.probs is None or p.b.probs is None for cell in per_seed for p in cell):
        return math.nan, math.nan, "predictions lack prob_k columns"
    common = None
    for cell in per_seed:
        for p in cell:
            idx = p.a.index[p.rows[0]]
            common = idx if common is None else np.intersect1d(common, idx)
    if common is None or not len(common):
        return math.nan, math.nan, "no test example shared by every seed"
    seeds = []  # per seed: [(rows of A, rows of B, pair)] on the common test indices, in one order
    for cell in per_seed:
        seeds.append([(np.searchsorted(p.a.index, common), np.searchsorted(p.b.index, common), p) for p in cell])
    label = per_seed[0][0].a.label[seeds[0][0][0]]
    if metric == "acc":
        diffs = np.array([np.mean([(p.a.pred[ia] == label).astype(float) - (p.b.pred[ib] == label)
                                   for ia, ib, p in parts], axis=0) for parts in seeds])
        return (*stats.percentile_interval(stats.crossed_bootstrap_mean(diffs, n_boot, rng), confidence), None)

    def seed_difference(parts):
        arrays = [(p.a.probs[ia], p.b.probs[ib]) for ia, ib, p in parts]
        return lambda idx: float(np.mean([metric_value(metric, label[idx], pa[idx])
                                          - metric_value(metric, label[idx], pb[idx]) for pa, pb in arrays]))

    boot = stats.crossed_bootstrap([seed_difference(parts) for parts in seeds], len(common), n_boot, rng)
    return (*stats.percentile_interval(boot, confidence), None)


def compare(d: Sequence[float], metric: str) -> dict:
    """stats.seed_comparison of raw differences A - B; P(A better) in the metric's direction."""
    d = np.asarray(d, dtype=float)
    out = stats.seed_comparison(d, ALPHA, difference_bounds(metric))
    out["p_better"], out["p_better_low"], out["p_better_high"] = stats.prob_of_improvement(
        _direction(metric) * d, 1 - ALPHA)
    return out


def json_num(v: Any) -> Any:
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



def fmt_diff(v: float, metric: str) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return f"{100 * v:+.2f} pt" if metric == "acc" else f"{v:+.4f}"


def fmt_ci(lo: float, hi: float, metric: str) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    if metric == "acc":
        return f"[{100 * lo:+.2f}, {100 * hi:+.2f}] pt"
    return f"[{lo:+.4f}, {hi:+.4f}]"


def group_summary(g: Group, metric: str, exclude_collapsed: bool) -> dict:
    """A configuration's row: its seeds (replicates) by status, and means over the scored ones."""
    keep = scored_statuses(exclude_collapsed)
    counts = {s: sum(rep.status == s for rep in g.replicates) for s in COUNTED_STATUS}
    counts["other"] = len(g.replicates) - sum(counts.values())
    scored = g.scored_replicates(metric, exclude_collapsed)
    test = [rep.test("best", metric, keep) for rep in scored]
    val = [v for v in (rep.val(metric, keep) for rep in scored) if not math.isnan(v)]
    last = [v for v in (rep.test("last", metric, keep) for rep in scored) if not math.isnan(v)]
    lo, hi, note = stats.t_interval(test, 1 - ALPHA, metric_bounds(metric))
    learned_or_not = counts["completed"] + counts["collapsed"]
    scored_ids = {id(rep) for rep in scored}
    multi = [rep for rep in g.replicates if len(rep.runs) > 1]
    return {
        "label": g.label, "config": {k: _fmt_value(v) for k, v in g.config.items()},
        "started": len(g.runs), "n_seeds": len(g.replicates), **counts,
        "fell_back": sum(rep.fell_back for rep in g.replicates if rep.status == "completed"),
        "collapse_rate": counts["collapsed"] / learned_or_not if learned_or_not else math.nan,
        "n_scored": len(test), "seeds": [rep.seed for rep in scored],
        "missing": [{"seed": rep.seed, "why": rep.why_missing(keep, metric)} for rep in g.replicates
                    if id(rep) not in scored_ids],
        "replicate_runs": [{"seed": rep.seed, "runs": len(rep.runs), "spread": rep.spread(metric, keep)}
                           for rep in multi],
        "val_mean": float(np.mean(val)) if val else math.nan,
        "test_mean": float(np.mean(test)) if test else math.nan,
        "test_sd": float(np.std(test, ddof=1)) if len(test) > 1 else math.nan,
        "test_ci": [lo, hi], "test_ci_note": note, "test_values": test,
        "test_last_mean": float(np.mean(last)) if last else math.nan,
    }


def choose_reference(summaries: Sequence[dict], metric: str) -> int | None:
    """Index of the configuration with the best mean VALIDATION metric (test never chooses)."""
    cand = [i for i, s in enumerate(summaries) if not math.isnan(s["val_mean"])]
    if not cand:
        return None
    return max(cand, key=lambda i: _direction(metric) * summaries[i]["val_mean"])


def _missing_seeds(group: Group, name: str, paired: set, statuses: Sequence[str], metric: str,
                   other: Group) -> list[dict]:
    """The group's seeds that are not in a comparison, and why."""
    other_seeds = {replicates.hashable(rep.seed) for rep in other.replicates}
    out = []
    for rep in group.replicates:
        seed = replicates.hashable(rep.seed)
        if seed in paired:
            continue
        if math.isnan(rep.test("best", metric, statuses)):
            why = rep.why_missing(statuses, metric)
        elif seed not in other_seeds:
            why = "no run of this seed in the other configuration"
        else:
            why = "the other configuration's run of this seed has no score"
        out.append({"config": name, "seed": rep.seed, "why": why})
    return out


def comparison(a: Group, b: Group, metric: str, exclude_collapsed: bool, n_boot: int,
               rng: np.random.Generator) -> dict:
    """A vs B paired by seed (one replicate per seed): estimate, intervals, both tests' p, P(A better), the
    seeds left out and why. Holm and power are added by `analyse` once the family is known."""
    keep = scored_statuses(exclude_collapsed)
    pairs = pair_by_seed(a.replicates, b.replicates, metric, keep)
    d = [p.value_a - p.value_b for p in pairs]
    res = compare(d, metric)
    lo, hi, why = bootstrap_interval(pairs, metric, n_boot, rng) if pairs else (math.nan, math.nan, "no paired seed")
    with_rows = [p for p in pairs if p.rows is not None]
    disagree = [p.disagreements() for p in with_rows]
    la, lb = pair_label(a, b)
    paired = {replicates.hashable(p.seed) for p in pairs}
    return {
        "a": la, "b": lb, "groups": [[a.label, b.label]], "seeds": [p.seed for p in pairs], "differences": d,
        "estimate": res["estimate"], "sd": res["sd"], "n_seeds": res["n_seeds"],
        "ci": [lo, hi], "ci_note": why, "t_ci": [res["t_low"], res["t_high"]], "t_ci_note": res["t_note"],
        "p": res["p"], "p_test": res["p_test"], "p_t": res["p_t"], "p_sign_flip": res["p_sign_flip"],
        "p_min": res["p_min"], "p_holm": math.nan,
        "prob_improvement": [res["p_better"], res["p_better_low"], res["p_better_high"]],
        "disagreements": [b_ + c_ for b_, c_ in disagree],
        "disagreement_seeds": [p.seed for p in with_rows],
        "examples": [p.n_examples for p in with_rows],
        "mcnemar_p": [stats.mcnemar_p(b_, c_) for b_, c_ in disagree],
        "missing": _missing_seeds(a, la, paired, keep, metric, b) + _missing_seeds(b, lb, paired, keep, metric, a),
    }


def _rest(config: dict, key: str) -> tuple:
    return tuple((k, replicates.hashable(v)) for k, v in sorted(config.items()) if k != key)


def confounded_keys(groups: Sequence[Group]) -> list[str]:
    """Varying keys that no two configurations differ in alone (a search's lr and EBS): their effects cannot be
    told apart, so no main effect is estimated for them."""
    configs = [g.config for g in groups]
    out = []
    for key in varying_keys(configs):
        rests: dict[tuple, set] = {}
        for c in configs:
            rests.setdefault(_rest(c, key), set()).add(replicates.hashable(c.get(key, _MISSING)))
        if not any(len(levels) > 1 for levels in rests.values()):
            out.append(key)
    return out if len(out) > 1 else []


def main_effects(groups: Sequence[Group], metric: str, exclude_collapsed: bool,
                 n_boot: int, rng: np.random.Generator) -> list[dict]:
    """Per varying key: each level vs the level best on validation, paired by seed AND by the other keys; the
    per-seed difference averages over the other keys' combinations both levels ran with that seed. Keys that
    vary only together with others (`confounded_keys`) get none."""
    keep = scored_statuses(exclude_collapsed)
    configs = [g.config for g in groups]
    confounded = set(confounded_keys(groups))
    effects = []
    for key in varying_keys(configs):
        if key in confounded:
            continue
        levels = sorted({replicates.hashable(c.get(key, _MISSING)) for c in configs}, key=_sort_value)
        val_by_level = {}
        for lv in levels:
            vals = [v for g in groups if replicates.hashable(g.config.get(key, _MISSING)) == lv
                    for v in (rep.val(metric, keep) for rep in g.scored_replicates(metric, exclude_collapsed))
                    if not math.isnan(v)]
            val_by_level[lv] = float(np.mean(vals)) if vals else math.nan
        ranked = [lv for lv in levels if not math.isnan(val_by_level[lv])]
        if len(ranked) < 2:
            continue
        best = max(ranked, key=lambda lv: _direction(metric) * val_by_level[lv])

        def units(level) -> dict:
            out = {}
            for g in groups:
                if replicates.hashable(g.config.get(key, _MISSING)) != level:
                    continue
                for rep in g.scored_replicates(metric, exclude_collapsed):
                    out[(_rest(g.config, key), replicates.hashable(rep.seed))] = (rep, g.label)
            return out

        base = units(best)
        for lv in levels:
            if lv == best:
                continue
            other = units(lv)
            per_seed: dict[Any, list[PairedSeed]] = {}
            group_pairs = set()
            for unit in sorted(set(base) & set(other), key=lambda u: (_sort_value(u[1]), str(u[0]))):
                for pair in pair_by_seed([other[unit][0]], [base[unit][0]], metric, keep):
                    per_seed.setdefault(unit[1], []).append(pair)
                    group_pairs.add((other[unit][1], base[unit][1]))
            seeds = sorted(per_seed, key=_sort_value)
            d = [float(np.mean([p.value_a - p.value_b for p in per_seed[s]])) for s in seeds]
            res = compare(d, metric)
            lo, hi, why = bootstrap_interval_cells([per_seed[s] for s in seeds], metric, n_boot, rng)
            effects.append({
                "key": key, "level": _fmt_value(lv), "vs": _fmt_value(best), "seeds": seeds, "differences": d,
                "estimate": res["estimate"], "sd": res["sd"], "n_seeds": res["n_seeds"],
                "ci": [lo, hi], "ci_note": why, "combinations": [len(per_seed[s]) for s in seeds],
                "t_ci": [res["t_low"], res["t_high"]], "t_ci_note": res["t_note"],
                "p": res["p"], "p_test": res["p_test"], "p_t": res["p_t"], "p_sign_flip": res["p_sign_flip"],
                "p_min": res["p_min"], "p_holm": math.nan,
                "prob_improvement": [res["p_better"], res["p_better_low"], res["p_better_high"]],
                "val_mean": val_by_level[lv], "vs_val_mean": val_by_level[best],
                "groups": sorted(group_pairs),
            })
    effects.sort(key=lambda e: -abs(e["estimate"]) if not math.isnan(e["estimate"]) else math.inf)
    return effects


def ignored_key_checks(runs: Sequence[Run], metric: str) -> list[dict]:
    """For each non-training key the runs vary: were runs of the same configuration and seed identical?"""
    keys = sorted({k for r in runs for k in r.flat
                   if not _in_group(k) and k != "train.seed" and not k.startswith(("out.", "derived."))})
    keys = [k for k in keys if len({replicates.hashable(r.flat.get(k, _MISSING)) for r in runs}) > 1]
    checks = []
    for key in keys:
        cells: dict[tuple, dict] = {}
        for r in runs:
            if r.status not in SCORED_STATUS:
                continue
            cell = cells.setdefault((r.group_key(), replicates.hashable(r.seed)), {})
            cell[replicates.hashable(r.flat.get(key, _MISSING))] = r.test("best", metric)
        spreads = [max(v.values()) - min(v.values()) for v in cells.values() if len(v) > 1]
        checks.append({"key": key, "pairs": len(spreads),
                       "max_abs_difference": max(spreads) if spreads else math.nan,
                       "identical": bool(spreads) and max(spreads) == 0.0})
    return checks


def pooled_seed_sd(summaries: Sequence[dict]) -> float:
    """sd of a per-seed difference from the within-configuration spreads, assuming independent seeds
    (used only to size a one-seed comparison)."""
    var = [s["test_sd"] ** 2 for s in summaries if not math.isnan(s["test_sd"])]
    return math.sqrt(2 * float(np.mean(var))) if var else math.nan


def add_power(tests: Sequence[dict], detect: float, spread_sd: float) -> tuple[int, float]:
    """Holm over the family of `tests` (comparisons and main effects together), then each test's power at the
    level its verdict must beat: Holm's first step, ALPHA / (tests in the family). A main effect that pairs the
    same two configurations as a comparison (two configurations differing in one key) is that same test: it
    counts once and shares its p. Returns (family size, level)."""
    first: dict[tuple, dict] = {}
    family = []
    for t in tests:
        if math.isnan(t["p"]):
            continue
        same = tuple(map(tuple, t["groups"])) if len(t["groups"]) == 1 else None
        if same is not None and same in first:
            t["same_test_as"] = first[same]["a"] + " vs " + first[same]["b"]
            continue
        if same is not None:
            first[same] = t
        family.append(t)
    for t, adj in zip(family, stats.holm([t["p"] for t in family])):
        t["p_holm"] = adj
    for t in tests:
        if "same_test_as" in t:  # the same numbers as its comparison (the bootstraps would differ by resampling)
            same = first[tuple(map(tuple, t["groups"]))]
            t["p_holm"], t["ci"], t["ci_note"] = same["p_holm"], same["ci"], same["ci_note"]
    level = ALPHA / len(family) if family else ALPHA
    for t in tests:
        t["family_size"], t["holm_level"] = len(family), level
        if t["n_seeds"] >= 2:
            t["power"] = stats.power_summary(t["sd"], t["n_seeds"], detect, level)
        else:  # one seed: no spread of its own; the report's spread sizes the seeds a test would need
            t["power"] = {"alpha": level, "power": stats.POWER, "detect": detect, "spread_sd": spread_sd,
                          "seeds_needed": stats.seeds_needed(detect, spread_sd, level)}
    return len(family), level


def _pt(v: float, metric: str) -> str:
    return fmt_diff(v, metric).lstrip("+")


def _fmt_range(lo: float, hi: float, metric: str | None) -> str:
    fmt = (lambda v: _pt(v, metric)) if metric else _fmt_seeds
    return f"{fmt(lo)} to {fmt(hi)}"


def _seed_list(seeds: Sequence[Any]) -> str:
    return ", ".join(_fmt_value(s) for s in seeds)


def p_better_clause(pb: Sequence[float], a: str, n: int) -> str:
    """P(A better) and what its bracket is, in one clause."""
    return (f"P({a} better) = {pb[0]:.2f} [{pb[1]:.2f}, {pb[2]:.2f}] (share of the {n} seeds where it is ahead, "
            f"a tie counting one half; bracket = Clopper-Pearson 95% over seeds, ties counted either way)")


def p_clause(c: dict) -> str:
    """The verdict's p (Holm) with both tests and the floor the seeds set."""
    sig = c["p_holm"] < ALPHA
    if c["p_test"] == "sign-flip":
        test = (f"every seed gave the same difference, so the t statistic is undefined: exact sign-flip test over "
                f"seeds p = {fmt_p(c['p_holm'])} (Holm; raw {fmt_p(c['p'])})")
    else:
        test = (f"paired t-test over seeds p = {fmt_p(c['p_holm'])} (Holm; raw {fmt_p(c['p'])}); exact sign-flip "
                f"p = {fmt_p(c['p_sign_flip'])}")
    return (f"{test}, the smallest a sign-flip test over {c['n_seeds']} seeds allows being {fmt_p(c['p_min'])}; "
            f"{'significant' if sig else 'not significant'} at {ALPHA:g} over the {c['family_size']} test(s) "
            f"corrected together")


def power_sentence(c: dict, metric: str) -> str:
    pw = c["power"]
    detect = _pt(pw["detect"], metric)
    level = f"level {fmt_p(pw['alpha'])} (Holm's first step over {c['family_size']} test(s))"
    if math.isnan(c["sd"]) or c["sd"] == 0:
        return (f"Power: the {c['n_seeds']} seeds show no spread, so neither the smallest detectable difference nor "
                f"the seeds needed to detect {detect} can be sized; more seeds would show the spread.")
    sd_lo, sd_hi = pw["sd_range"]
    return (f"Power at the {level}: with {c['n_seeds']} seeds and this spread (sd {_pt(c['sd'], metric)}; 95% "
            f"{_fmt_range(sd_lo, sd_hi, metric)} from {c['n_seeds']} seeds), the smallest difference detectable "
            f"with 80% power is {_pt(pw['mdd'], metric)} ({_fmt_range(*pw['mdd_range'], metric)}); detecting "
            f"{detect} with 80% power needs {_fmt_seeds(pw['seeds_needed'])} seeds "
            f"({_fmt_range(*pw['seeds_needed_range'], None)}).")


def missing_sentence(c: dict) -> str | None:
    if not c["missing"]:
        return None
    parts = [f"seed {_fmt_value(m['seed'])} of {m['config']} ({m['why']})" for m in c["missing"]]
    return "Not in this comparison: " + "; ".join(parts) + "."


def comparison_sentences(c: dict, metric: str, spread_sd: float) -> list[str]:
    head = f"{c['a']} vs {c['b']}"
    missing = missing_sentence(c)
    if c["n_seeds"] == 0:
        return [f"{head}: no seed with a test {metric} in both: no comparison."] + ([missing] if missing else [])
    est = fmt_diff(c["estimate"], metric)
    if c["n_seeds"] == 1:
        pw = c["power"]
        detect = _pt(pw["detect"], metric)
        how = (f"with the seed-to-seed spread seen in this report (sd of a difference ≈ {_pt(spread_sd, metric)}), "
               f"detecting {detect} with 80% power at level {fmt_p(pw['alpha'])} would need "
               f"{_fmt_seeds(pw['seeds_needed'])} seeds"
               if not math.isnan(pw["seeds_needed"]) else "run at least 3 seeds per configuration to measure the spread")
        lines = [f"{head}: {est} on one seed (seed {_fmt_value(c['seeds'][0])}). One seed cannot separate the "
                 f"configurations: no p-value. {how[0].upper() + how[1:]}."]
    else:
        boot = fmt_ci(*c["ci"], metric) if c["ci_note"] is None else f"n/a ({c['ci_note']})"
        tci = fmt_ci(*c["t_ci"], metric) if c["t_ci_note"] is None else f"n/a ({c['t_ci_note']})"
        per_seed = ", ".join(fmt_diff(v, metric) for v in c["differences"])
        lines = [f"{head}: {est} (mean of {c['n_seeds']} per-seed differences: {per_seed} for seeds "
                 f"{_seed_list(c['seeds'])}), 95% crossed bootstrap {boot}, paired t {tci}; "
                 f"{p_better_clause(c['prob_improvement'], c['a'], c['n_seeds'])}; {p_clause(c)}.",
                 power_sentence(c, metric)]
    if c["examples"]:
        examples = c["examples"]
        shown = str(examples[0]) if len(set(examples)) == 1 else _seed_list(examples)
        lines.append(f"Secondary (within seed): they disagree on {_seed_list(c['disagreements'])} of {shown} test "
                     f"examples (seed {_seed_list(c['disagreement_seeds'])}, in order); "
                     "McNemar p per seed " + ", ".join(fmt_p(p) for p in c["mcnemar_p"]) + ".")
    if missing:
        lines.append(missing)
    return lines


def _fmt_seeds(n: float) -> str:
    if math.isnan(n):
        return "an unknown number of"
    return "more than 100,000" if math.isinf(n) else f"{int(n)}"


# ----------------------------------------------------------------------------------------------------------
# Markdown


def _fmt_num(v: float, digits: int = 4) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return "\n".join(lines)


def bold_best(values: Sequence[float], texts: Sequence[str], higher_is_better: bool,
              eligible: Sequence[bool] | None = None) -> list[str]:
    """Texts with the best value (all ties) wrapped in **; only eligible rows compete (all when none are).

    Nothing is bold when every competing value is the same.
    """
    eligible = list(eligible) if eligible is not None else [True] * len(values)
    if not any(eligible):
        eligible = [True] * len(values)
    cand = [v for v, e in zip(values, eligible) if e and v is not None and not math.isnan(v)]
    if not cand:
        return list(texts)
    best = max(cand) if higher_is_better else min(cand)
    if len(cand) > 1 and min(cand) == max(cand):
        return list(texts)  # every competing row ties: nothing stands out
    return [f"**{t}**" if e and v is not None and not math.isnan(v) and v == best and t else t
            for v, t, e in zip(values, texts, eligible)]


# (header, getter, digits, higher_is_better) for the numeric per-run columns
def _run_columns() -> list[tuple[str, Any, int | None, bool]]:
    return [
        ("train acc", lambda r: _num(r.best_eval().get("train/acc")), 4, True),
        ("train loss", lambda r: _num(r.best_eval().get("train/loss")), 4, False),
        ("val acc", lambda r: _num(((r.summary or {}).get("val_best") or {}).get("acc")), 4, True),
        ("val loss", lambda r: _num(((r.summary or {}).get("val_best") or {}).get("loss")), 4, False),
        ("test acc", lambda r: r.measured("best", "acc"), 4, True),
        ("test loss", lambda r: r.measured("best", "loss"), 4, False),
        ("test ECE", lambda r: r.measured("best", "ece"), 4, False),
        ("test acc (last)", lambda r: r.measured("last", "acc"), 4, True),
        ("duration", lambda r: r.duration(), None, False),
    ]


def runs_table(runs: Sequence[Run], keys: Sequence[str]) -> str:
    fixed = [("micro", "derived.micro"), ("accum_steps", "derived.accum_steps"), ("optimizer", "optim.name"),
             ("lr", "derived.lr")]
    fixed = [(h, k) for h, k in fixed if k not in keys]
    header = ["run", "status"] + list(keys) + [h for h, _ in fixed]
    cols = _run_columns()
    header += [c[0] for c in cols]
    rows = [[r.name, (r.status + (" (fell back)" if r.fell_back else "")) if r.ok else f"⚠ {r.status.upper()}"]
            + [_fmt_value(r.flat.get(k, _MISSING)) for k in keys]
            + [_fmt_value(r.flat.get(k, _MISSING)) for _, k in fixed] for r in runs]
    eligible = [r.ok for r in runs]
    for _title, get, digits, hib in cols:
        values = [get(r) for r in runs]
        texts = [format_duration(v) if digits is None else _fmt_num(v, digits) for v in values]
        for row, t in zip(rows, bold_best(values, texts, hib, eligible)):
            row.append(t)
    align = ["l"] * (len(header) - len(cols)) + ["r"] * len(cols)
    return md_table(header, rows, align)


def groups_table(summaries: Sequence[dict], metric: str, reference: int | None) -> tuple[str, list[list[str]]]:
    header = ["configuration", "runs", "seeds", "completed", "fell back", "collapsed", "diverged", "failed / other",
              "collapse rate", f"val {metric} (mean)", f"test {metric} (best) mean ± std", "n", "95% t-interval",
              f"test {metric} (last)"]
    rows = []
    for i, s in enumerate(summaries):
        m, sd = s["test_mean"], s["test_sd"]
        test = "" if math.isnan(m) else (f"{m:.4f} ± {sd:.4f}" if not math.isnan(sd) else f"{m:.4f}")
        ci = s["test_ci"]
        ci_text = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if not math.isnan(ci[0]) else (s["test_ci_note"] or "")
        val = _fmt_num(s["val_mean"])
        rate = "" if math.isnan(s["collapse_rate"]) else f"{s['collapse_rate']:.0%}"
        rows.append([s["label"] + (" (reference)" if i == reference else ""), str(s["started"]), str(s["n_seeds"]),
                     str(s["completed"]), str(s["fell_back"]), str(s["collapsed"]), str(s["diverged"]),
                     str(s["failed"] + s["other"]), rate, f"**{val}**" if i == reference and val else val, test,
                     str(s["n_scored"]), ci_text, _fmt_num(s["test_last_mean"])])
    return md_table(header, rows, ["l"] + ["r"] * 8 + ["r", "r", "r", "l", "r"]), rows


def main_effects_table(effects: Sequence[dict], metric: str) -> str:
    header = ["key", "level vs best-on-val level", f"test {metric} difference", "95% crossed bootstrap",
              "95% t-interval", "p (Holm)", "test", "P(better) [Clopper-Pearson 95%]", "seeds"]
    rows = []
    for e in effects:
        boot = fmt_ci(*e["ci"], metric) if e["ci_note"] is None else f"n/a ({e['ci_note']})"
        tci = fmt_ci(*e["t_ci"], metric) if e["t_ci_note"] is None else f"n/a ({e['t_ci_note']})"
        p = "n/a (one seed)" if e["n_seeds"] < 2 else fmt_p(e["p_holm"])
        test = {"t": "paired t", "sign-flip": f"sign-flip (tie; min {fmt_p(e['p_min'])})"}.get(e["p_test"], "")
        pb = e["prob_improvement"]
        rows.append([e["key"], f"{e['level']} vs {e['vs']}", fmt_diff(e["estimate"], metric), boot, tci, p, test,
                     "" if math.isnan(pb[0]) else f"{pb[0]:.2f} [{pb[1]:.2f}, {pb[2]:.2f}]", str(e["n_seeds"])])
    return md_table(header, rows, ["l", "l", "r", "l", "l", "r", "l", "r", "r"])


# ----------------------------------------------------------------------------------------------------------
# Plots


def _eval_x(run: Run, rec: dict) -> float:
    spe = _num(run.flat.get("derived.steps_per_epoch"))
    step = _num(rec.get("step"))
    if spe > 0 and not math.isnan(step):
        return round(step / spe, 4)
    return _num(rec.get("epoch"), 0.0) + 1.0


def curve(group_runs_: Sequence[Run], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x in epochs, mean, std over seeds) of an eval metric; x = step / steps_per_epoch (or epoch + 1)."""
    per_x: dict[float, list[float]] = {}
    for r in group_runs_:
        seen: dict[float, float] = {}
        for rec in r.evals:
            v = _num(rec.get(metric))
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
    from ebslab.analysis import figures

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


def plot_acc_vs_ebs(groups: Sequence[Group], path: Path) -> Path:
    """Mean test acc (best checkpoint) against batch.effective, with its 95% CI over seeds and each seed's value;
    one line per value of the other varying keys."""
    from ebslab.analysis import figures

    fig, ax = figures.new_figure()
    scored = [g for g in groups if g.scored_runs()]
    keys = [k for k in varying_keys([g.config for g in scored]) if k != "batch.effective"]
    lines: dict[str, list[tuple[float, float, float, list[float]]]] = {}
    for g in scored:
        ebs = _num(g.config.get("batch.effective"))
        m, _s, lo, hi = g.stats("best")
        if math.isnan(ebs) or math.isnan(m):
            continue
        err = 0.0 if math.isnan(lo) else hi - m
        seeds = [v for v in (_num(r.test("best", "acc")) for r in g.scored_runs()) if not math.isnan(v)]
        name = ", ".join(f"{k}={_fmt_value(g.config.get(k, _MISSING))}" for k in keys)
        lines.setdefault(name, []).append((ebs, m, err, seeds))
    for name, pts in lines.items():
        pts.sort(key=lambda p: p[0])
        xs, ys, es, seeds = zip(*pts)
        n = sorted({len(v) for v in seeds})
        seeds_text = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
        bar = ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4,
                          label=f"{name + ': ' if name else ''}mean of {seeds_text} seed(s)")
        ax.plot([x for x, v in zip(xs, seeds) for _ in v], [y for v in seeds for y in v], "x", ms=5, alpha=0.6,
                color=bar[0].get_color(), label=f"{name + ': ' if name else ''}one seed")
    xs_all = sorted({p[0] for pts in lines.values() for p in pts})
    if xs_all and xs_all[0] > 0:
        figures.plain_log_axis(ax, "x", base=2, ticks=xs_all)
    figures.style(ax, title="Test accuracy against effective batch size",
                  xlabel="Effective batch size (examples per optimizer step, log scale)",
                  ylabel="Test accuracy, best checkpoint (fraction correct)",
                  legend_title="bar: 95% confidence interval of the mean")
    return figures.save(fig, path)


# ----------------------------------------------------------------------------------------------------------
# The report


def analyse(runs: Sequence[Run], groups: Sequence[Group], metric: str = "acc", exclude_collapsed: bool = False,
            n_boot: int = stats.N_BOOT, seed: int = 0, detect: float | None = None) -> dict:
    """Every number of the report (report.json): groups, reference, comparisons, main effects (one Holm family),
    power for a difference `detect` (metric units; default DETECT_PT points of accuracy, 0.01 otherwise)."""
    rng = np.random.default_rng(seed)  # seeded: the same run folders give the same report
    detect = default_detect(metric) if detect is None else detect
    summaries = [group_summary(g, metric, exclude_collapsed) for g in groups]
    ref = choose_reference(summaries, metric)
    comps = []
    if ref is not None:
        for i, g in enumerate(groups):
            if i != ref and summaries[i]["n_scored"]:
                comps.append(comparison(g, groups[ref], metric, exclude_collapsed, n_boot, rng))
    effects = main_effects(groups, metric, exclude_collapsed, n_boot, rng)
    spread = pooled_seed_sd(summaries)
    family, level = add_power(comps + effects, detect, spread)
    return {
        "metric": metric, "higher_is_better": higher_is_better(metric), "alpha": ALPHA, "n_boot": n_boot,
        "exclude_collapsed": exclude_collapsed,
        "test": "paired t-test over seeds (exact sign-flip where every seed gives the same difference), Holm over "
                "every comparison and main effect together",
        "family_size": family, "power_level": level, "detect": detect,
        "groups": summaries, "reference": None if ref is None else summaries[ref]["label"], "reference_index": ref,
        "comparisons": comps, "spread_sd": spread, "main_effects": effects,
        "confounded_keys": confounded_keys(groups), "ignored_keys": ignored_key_checks(runs, metric),
    }


def default_detect(metric: str) -> float:
    return DETECT_PT / 100 if metric == "acc" else 0.01


def comparable_runs(runs: Sequence[Run]) -> tuple[list[Run], list[list[Run]]]:
    """(the runs the report compares, the other sets of runs it does not): runs compare only within one data
    fingerprint (ebslab.analysis.replicates.comparable_sets); the set with the most runs is analysed. UserError when the
    runs are on several data sets and none of them holds two runs (nothing is comparable)."""
    sets = [[runs[i] for i in idx] for idx in replicates.comparable_sets([r.config for r in runs])]
    if len(sets) == 1:
        return list(runs), []
    if max(len(s) for s in sets) < 2:
        raise UserError(f"the {len(runs)} runs were trained on {len(sets)} different data sets (data fingerprint "
                        "or data keys): nothing is comparable; report each run folder on its own")
    sets.sort(key=lambda s: -len(s))
    return sets[0], sets[1:]


def analyse_dirs(run_dirs: Sequence[Path], metric: str = "acc", exclude_collapsed: bool = False,
                 n_boot: int = stats.N_BOOT, detect: float | None = None
                 ) -> tuple[list[Path], list[Run], list[Group], dict]:
    """The run folders found in run_dirs, the runs compared (one data fingerprint), their configurations and
    `analyse` result: what a report of those folders shows (`ebslab tune` takes its verdict from here, so the two
    always agree). result["not_compared"] lists the runs on other data."""
    dirs = find_run_dirs(run_dirs)
    all_runs = [load_run(d, n) for d, n in zip(dirs, _run_names(dirs))]
    runs, others = comparable_runs(all_runs)
    groups = group_runs(runs)
    result = analyse(runs, groups, metric, exclude_collapsed, n_boot, detect=detect)
    result["not_compared"] = [{"data": replicates.describe_data(s[0].config), "runs": [r.name for r in s]}
                              for s in others]
    if others:
        result["data"] = replicates.describe_data(runs[0].config)
    kept = {id(r) for r in runs}
    return [d for d, r in zip(dirs, all_runs) if id(r) in kept], runs, groups, result


def build_report(run_dirs: list[Path], out_dir: Path, target: float | None = None, metric: str = "acc",
                 exclude_collapsed: bool = False, n_boot: int = stats.N_BOOT, detect: float | None = None) -> Path:
    """Read the run folders (or folders holding them), write out_dir/report.md, report.json and PNG plots;
    return report.md. detect: the difference the power sentences size seeds for, in metric units."""
    if metric not in METRICS:
        raise UserError(f"--metric {metric}: unknown metric; valid: {', '.join(METRICS)}")
    if detect is not None and not detect > 0:
        raise UserError(f"--detect {detect}: give a positive difference (points of accuracy, e.g. --detect 1.0)")
    dirs, runs, groups, result = analyse_dirs(run_dirs, metric, exclude_collapsed, n_boot, detect)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    order = {id(r): i for i, r in enumerate(r for g in groups for r in g.runs)}
    runs_sorted = sorted(runs, key=lambda r: order[id(r)])
    keys = varying_keys([r.flat for r in runs])
    scored_status = scored_statuses(exclude_collapsed)
    left_out = [r for r in runs_sorted if r.status not in scored_status or math.isnan(r.test("best", metric))]

    plots = [
        plot_curves(groups, "val/acc", out_dir / "val_acc.png", "Validation accuracy per epoch", metric,
                    exclude_collapsed),
        plot_curves(groups, "val/loss", out_dir / "val_loss.png", "Validation loss per epoch", metric,
                    exclude_collapsed),
        plot_acc_vs_ebs(groups, out_dir / "test_acc_vs_ebs.png"),
    ]

    md: list[str] = ["# ebslab report", ""]
    md.append(f"{len(runs)} run(s) in {len(groups)} configuration(s); headline metric: test `{metric}` at the "
              f"best checkpoint ({'higher' if higher_is_better(metric) else 'lower'} is better).")
    if keys:
        md.append("Varying keys: " + ", ".join(f"`{k}`" for k in keys) + ".")
    for other in result["not_compared"]:
        md.append(f"**Not compared (other data):** {len(other['runs'])} run(s) on {other['data']}: "
                  + ", ".join(f"`{n}`" for n in other["runs"]) + f". This report compares only the runs on "
                  f"{result['data']}; report the others on their own.")
    md.append("")
    md.append(f"Nothing is selected on test: the reference configuration, the bold marks and every ranking use the "
              f"validation `{metric}` (best checkpoint, mean over seeds); test numbers are only reported.")
    if exclude_collapsed:
        md += ["", "**Old view (--exclude-collapsed): collapsed runs are left out of means and tests, which "
               "flatters the settings that collapse.**"]
    else:
        md += ["", "Every run counts: collapsed runs (no validation accuracy ever beat the majority-class rate by "
               "more than chance does on the validation set) enter the means and tests with the score they got; a "
               "diverged run scores as a model that learned nothing, the majority-class rate (accuracy only; for "
               "other metrics it is a missing seed); failed and unfinished runs are missing seeds, named in each "
               "comparison. A run that learned and fell back to the majority-class rate at its last evaluation is "
               "completed, flagged \"fell back\"; it scores its best checkpoint."]
    md += ["", "A seed is one replicate: runs of one configuration and one seed that differ only in keys that do "
           "not change training (`train.backend`, `batch.micro`, ...) count once, with their mean score (they "
           "should agree; the check is below)."]
    md += ["", f"Tests: {result['family_size']} hypothesis test(s) (every comparison and main effect; a main effect "
           f"that pairs the same two configurations as a comparison is that test, counted once) are Holm-"
           f"corrected together as one family. Each p is a paired t-test over seeds, or, where every seed gives the "
           f"same difference (t undefined), the exact sign-flip test over seeds, whose smallest possible p is "
           f"2 / 2^seeds (0.25 at 3 seeds, 0.0625 at 5). Power is sized at Holm's first level "
           f"({fmt_p(result['power_level'])}) for a difference of {_pt(result['detect'], metric)} "
           f"(`--detect`), with its range over the 95% interval of the seed-to-seed spread."]
    md.append("")

    md += ["## What mattered", "",
           "Main effect of each varying key: each level against the level best on validation, paired by seed and "
           "by the other keys (the per-seed difference averages over the other keys' combinations); 95% crossed "
           "bootstrap (seeds and one shared set of test examples) and paired t-interval over seeds; p Holm-corrected "
           f"over the report's {result['family_size']} test(s); ranked by size. P(better) = share of seeds where the "
           "level beats the best-on-val level (a tie counts one half); bracket = Clopper-Pearson 95% over seeds "
           "(ties counted either way).", ""]
    if result["confounded_keys"]:
        md += [", ".join(f"`{k}`" for k in result["confounded_keys"]) + " vary together: no two configurations "
               "differ in only one of them, so their effects are confounded and not estimated apart; the "
               "configurations are compared as wholes below.", ""]
    if result["main_effects"]:
        md += [main_effects_table(result["main_effects"], metric), ""]
    elif not result["confounded_keys"]:
        md += ["No key varies between configurations with a validation metric.", ""]
    multi = [(g["label"], r) for g in result["groups"] for r in g["replicate_runs"]]
    if multi:
        differ = [(lab, r) for lab, r in multi if r["spread"] and r["spread"] > 0]
        if differ:
            md.append(f"Replicates: {len(multi)} seed(s) ran more than once (keys that do not change training); "
                      "their runs differ in test " + metric + ": " + "; ".join(
                          f"{lab} seed {_fmt_value(r['seed'])} by {r['spread']:.4g} over {r['runs']} runs"
                          for lab, r in differ) + ". Each seed counts once, with the mean of its runs.")
        else:
            md.append(f"Replicates: {len(multi)} seed(s) ran more than once (keys that do not change training); their "
                      f"runs agree on test {metric}. Each seed counts once.")
    for chk in result["ignored_keys"]:
        if not chk["pairs"]:
            md.append(f"`{chk['key']}` varies but does not change what is trained; no configuration and seed ran "
                      "with more than one value, so it could not be checked.")
        elif chk["identical"]:
            md.append(f"`{chk['key']}` varies but does not change what is trained: grouped together; the "
                      f"{chk['pairs']} configuration/seed cell(s) run with several values gave identical test {metric}.")
        else:
            md.append(f"`{chk['key']}` varies but should not change what is trained: grouped together, yet "
                      f"runs differing only in it differ in test {metric} by up to {chk['max_abs_difference']:.4g} "
                      f"over {chk['pairs']} cell(s): not identical.")
    if result["ignored_keys"]:
        md.append("")

    md += ["## Runs", "",
           "One row per run. train acc/loss: the training pass's running means over the epoch of the best "
           "checkpoint; val: best checkpoint; test acc, loss, ECE: best-val checkpoint; test acc (last): last "
           "checkpoint; lr: after scaling. **Bold**: best value of the column among completed runs. "
           "⚠: run did not complete.", "",
           runs_table(runs_sorted, keys), ""]

    md += ["## Configurations (grouped over seeds)", "",
           "A configuration is every config value that changes what is trained: not `train.seed`, `batch.micro`, "
           "`train.backend`, `track`, `eval.batch_size`, `train.log_every_steps`, `train.device`, `out.*`, "
           "`checkpoint.*`, `derived.*`. runs: run folders; seeds: replicates (a seed run more than once counts "
           "once); the status columns count seeds. Means over the n scored seeds "
           f"({'completed only' if exclude_collapsed else 'completed, collapsed, and diverged by its rule'}); the "
           "comparisons below use the same seeds, paired, and name any seed they leave out. 95% t-interval "
           "(n − 1 degrees of freedom), not shown when it would leave the metric's range. "
           f"**Bold**: best mean validation `{metric}` (the reference).", ""]
    gtable, _ = groups_table(result["groups"], metric, result["reference_index"])
    md += [gtable, ""]

    md += ["## Each configuration against the reference", ""]
    if result["reference"] is None:
        md.append(f"No run with a validation `{metric}`: nothing to compare.")
    elif not result["comparisons"]:
        md.append(f"Reference: {result['reference']}. No other configuration with scored runs to compare.")
    else:
        md.append(f"Reference (best mean validation `{metric}`): **{result['reference']}**. Each comparison pairs "
                  f"seeds (same data order and head initialisation): the estimate is the mean over shared seeds of "
                  f"the per-seed difference in test `{metric}` (first minus second), each listed; the 95% crossed "
                  f"bootstrap ({n_boot} seeded resamples of the seeds and of one set of test examples that every "
                  f"seed shares) sits next to the paired t-interval; p Holm-corrected over the report's "
                  f"{result['family_size']} test(s) (comparisons and main effects). Power: 80% at Holm's first level "
                  f"{fmt_p(result['power_level'])}, for a true difference of {_pt(result['detect'], metric)} "
                  f"(`--detect`).")
        md.append("")
        for c in result["comparisons"]:
            first, *rest = comparison_sentences(c, metric, result["spread_sd"])
            md.append(f"- {first}")
            md += [f"  {line}" for line in rest]
    md.append("")

    md += ["## Plots", ""]
    for p in plots:
        md.append(f"![{p.stem}]({p.name})")
        md.append("")

    # both sections read the comparable runs' folders only
    lr_md, lr_json = lr_study.report_section(dirs, out_dir)
    md += lr_md
    if lr_json is not None:
        result["lr_study"] = lr_json
    ebs_md, ebs_json = ebs_study.report_section(dirs, out_dir, target, best_lr=lr_study)
    md += ebs_md
    if ebs_json is not None:
        result["ebs_study"] = ebs_json

    md += ["## Runs without a test metric in the means", ""]
    if not left_out:
        md.append("None: every run has a test metric.")
    else:
        md.append("These runs are counted in the configurations table but have no score in the means and tests.")
        md.append("")
        for r in left_out:
            why = f": {r.message}" if r.message else ""
            warn = "; ".join(f"{w.get('kind')} at step {w.get('step')}" for w in r.warnings)
            md.append(f"- `{r.name}` ({r.status}){why}" + (f" [warnings: {warn}]" if warn else ""))
    diverged = [r for r in runs_sorted if r.status == "diverged" and r.status in scored_status
                and not math.isnan(r.test("best", metric))]
    if diverged:
        md += ["", f"Diverged runs, scored by the rule (the majority-class rate) in the means and tests:", ""]
        md += [f"- `{r.name}`: {r.test('best', metric):.4f}" + (f" ({r.message})" if r.message else "")
               for r in diverged]
    warned = [r for r in runs_sorted if r.ok and r.warnings]
    if warned:
        md += ["", "Completed runs that logged warnings:", ""]
        for r in warned:
            md.append(f"- `{r.name}`: " + "; ".join(f"{w.get('kind')} at step {w.get('step')}: {w.get('message')}"
                                                     for w in r.warnings))
    md.append("")

    from ebslab.core.files import atomic_write_json, atomic_write_text

    atomic_write_json(out_dir / "report.json", json_num(result))
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(md))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="run folders, or folders (e.g. a sweep) holding run folders at any depth")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md and the plots go (default: the DIR when one is given, else ./report)")
    parser.add_argument("--target", type=float, default=None,
                        help="validation accuracy the effective-batch-size section measures steps to (default: the "
                             "hardest value every run reached within the first 75%% of its budget)")
    parser.add_argument("--metric", default="acc", choices=METRICS,
                        help="headline test metric for comparisons (selection uses its validation value)")
    parser.add_argument("--exclude-collapsed", action="store_true",
                        help="old view: leave collapsed runs out of means and tests (labelled in the report)")
    parser.add_argument("--detect", type=float, default=None, metavar="D",
                        help=f"the true difference the power sentences size seeds for: in points for acc (default "
                             f"{DETECT_PT:g} = {DETECT_PT:g} point of accuracy), in metric units otherwise "
                             f"(default 0.01)")


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
