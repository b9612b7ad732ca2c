"""`ebslab report`: tables, plots and statistics from run folders only (docs/run-folder.md).

What it writes into the output folder:
- `report.md`: "what mattered" (main effect of each varying key, paired by seed and the other keys), one row
  per run, the configurations over seeds (runs started / completed / collapsed / diverged / failed, validation
  and test means), each configuration against the reference, and the runs without a test metric.
- `report.json`: every number the markdown shows (groups, comparisons, main effects, ignored keys).
- `val_acc.png`, `val_loss.png`, `test_acc_vs_ebs.png`.

Statistics (numbers from ebslab.stats; issue 13):
- A configuration is what is trained: keys that provably do not change it (`train.seed`, `batch.micro`,
  `train.backend`, `track`, `eval.batch_size`, `train.log_every_steps`, `train.device`, `out.*`, `checkpoint.*`,
  `derived.*`) never split one; when a sweep varies one, the report says whether the results were identical.
- Nothing is selected on test: the reference is the configuration with the best mean validation metric.
- Every run counts: collapsed runs enter the means with their score (`--exclude-collapsed` gives the old view).
- The seed is the unit of replication: A vs B pairs runs by seed; estimate = mean per-seed difference, two-level
  bootstrap interval next to the paired t-interval, P(A better), paired t-test p Holm-corrected over the
  report's comparisons; McNemar only within a seed, as secondary evidence; one seed gives no p-value.
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
import yaml
from scipy import stats as sps

from ebslab import ebs_study, lr_study, stats
from ebslab.config import UserError, as_trained, flatten as config_flatten
from ebslab.metrics import METRICS, higher_is_better, metric_value

OK_STATUS = "completed"
# A configuration is what is trained: keys that provably do not change it never split one (issue 13 item 6).
GROUP_EXCLUDED_PREFIXES = ("out.", "derived.", "checkpoint.")
GROUP_EXCLUDED_KEYS = ("train.seed", "batch.micro", "batch.auto_cap", "batch.auto_cpu_tokens", "train.backend",
                       "track", "eval.batch_size", "train.log_every_steps", "train.device")
ALPHA = 0.05


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
        values = {_hashable(cfg.get(k, _MISSING)) for cfg in flat_configs}
        if len(values) > 1:
            result.append(k)
    return result


def read_jsonl(path: Path) -> list[dict]:
    """JSON objects, one per line; a torn (unparsable) line, e.g. the last one of a killed run, is skipped."""
    records: list[dict] = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


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


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


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
        return tuple(sorted((k, _hashable(v)) for k, v in as_trained(self.config).items() if _in_group(k)))

    def test(self, which: str, metric: str) -> float:
        block = (self.summary or {}).get(f"test_{which}") or {}
        return _num(block.get(metric))

    def val(self, metric: str) -> float:
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
            import pandas as pd

            path = self.path / "predictions" / f"test_{which}.parquet"
            try:
                self.predictions[which] = pd.read_parquet(path)
            except Exception:  # missing or unreadable file: no paired test for this run
                self.predictions[which] = None
        return self.predictions[which]


def _in_group(key: str) -> bool:
    return key not in GROUP_EXCLUDED_KEYS and not key.startswith(GROUP_EXCLUDED_PREFIXES)


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


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def with_logged_precision(path: Path, config: dict) -> dict:
    """A run folder written before config.yaml recorded derived.precision: train.precision=auto resolved as the
    sweep's log beside the folder (<folder>.log) printed it at start-up ("precision fp32 (train.precision=auto)"),
    so such a run groups with runs that asked for that precision. Unchanged when that is not known."""
    derived = config.get("derived")
    if (config.get("train") or {}).get("precision", "auto") != "auto" or not isinstance(derived, dict) \
            or derived.get("precision"):
        return config
    import re

    try:
        log = path.parent.joinpath(f"{path.name}.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return config
    seen = set(re.findall(r"precision (\w+) \(train\.precision=auto\)", log))
    if len(seen) != 1:  # never printed, or resumed on another kind of device: not one answer
        return config
    return {**config, "derived": {**derived, "precision": seen.pop()}}


def load_run(path: Path, name: str | None = None) -> Run:
    path = Path(path)
    config: dict = {}
    try:
        loaded = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            config = with_logged_precision(path, loaded)
    except (FileNotFoundError, yaml.YAMLError):
        pass
    summary = _read_json(path / "summary.json")
    records = read_jsonl(path / "metrics.jsonl")
    if summary is None:
        status, message = "incomplete", "no summary.json (still running, or killed)"
    else:
        status = str(summary.get("status") or "unknown")
        message = summary.get("message")
    return Run(path=path, name=name or path.name, config=config, flat=flatten(config), summary=summary,
               records=records, status=status, message=message)


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


@dataclass
class Group:
    key: tuple
    runs: list[Run]
    label: str = ""

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.key)

    def scored_runs(self, exclude_collapsed: bool = False) -> list[Run]:
        """Runs with a test metric: completed and collapsed (with the score they got) unless excluded."""
        keep = (OK_STATUS,) if exclude_collapsed else SCORED_STATUS
        return [r for r in self.runs if r.status in keep]

    def stats(self, which: str = "best", metric: str = "acc",
              exclude_collapsed: bool = False) -> tuple[float, float, float, float]:
        return mean_ci([r.test(which, metric) for r in self.scored_runs(exclude_collapsed)])


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


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.2g}"  # two significant digits: 0.047 must not print as 0.05 next to "significant at 0.05"



# ----------------------------------------------------------------------------------------------------------
# Seed-level statistics of a report (numbers from ebslab.stats; this section only pairs runs and arrays)

SCORED_STATUS = ("completed", "collapsed")  # runs with a test metric; collapsed ones count with their score
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


def pair_by_seed(runs_a: Sequence[Run], runs_b: Sequence[Run], metric: str) -> list[PairedSeed]:
    by_a = {r.seed: r for r in runs_a}
    by_b = {r.seed: r for r in runs_b}
    out = []
    for s in sorted(set(by_a) & set(by_b), key=_sort_value):
        va, vb = by_a[s].test("best", metric), by_b[s].test("best", metric)
        if math.isnan(va) or math.isnan(vb):
            continue
        p = PairedSeed(seed=s, value_a=va, value_b=vb, a=seed_arrays(by_a[s]), b=seed_arrays(by_b[s]))
        if p.a is not None and p.b is not None:
            p.rows = _matched(p.a, p.b)
        out.append(p)
    return out


def bootstrap_interval(pairs: Sequence[PairedSeed], metric: str, n_boot: int, rng: np.random.Generator,
                       confidence: float = 1 - ALPHA) -> tuple[float, float, str | None]:
    """Two-level bootstrap interval of mean(A - B) over seeds (seeds, then test examples with one index set for
    A and B). Accuracy takes the fast per-example path; other metrics are recomputed on every resample."""
    return bootstrap_interval_cells([[p] for p in pairs], metric, n_boot, rng, confidence)


def bootstrap_interval_cells(per_seed: Sequence[Sequence[PairedSeed]], metric: str, n_boot: int,
                             rng: np.random.Generator, confidence: float = 1 - ALPHA) -> tuple[float, float, str | None]:
    """The same for a main effect: per_seed[s] holds seed s's pairs (one per combination of the other keys);
    the seed's difference is their mean, resampled on one set of test examples shared by all of them."""
    if not per_seed:
        return math.nan, math.nan, "no paired seed"
    if any(p.rows is None for cell in per_seed for p in cell):
        return math.nan, math.nan, "no paired test predictions for every seed"
    if metric != "acc" and any(p.a.probs is None or p.b.probs is None for cell in per_seed for p in cell):
        return math.nan, math.nan, "predictions lack prob_k columns"
    seeds = []  # per seed: (label, [(rows of A, rows of B, pair)]) on the test indices every pair has
    for cell in per_seed:
        common = cell[0].a.index[cell[0].rows[0]]
        for p in cell[1:]:
            common = np.intersect1d(common, p.a.index[p.rows[0]])
        if not len(common):
            return math.nan, math.nan, "no test example shared by every pair of a seed"
        parts = [(np.searchsorted(p.a.index, common), np.searchsorted(p.b.index, common), p) for p in cell]
        seeds.append((cell[0].a.label[parts[0][0]], parts))
    if metric == "acc":
        diffs = [np.mean([(p.a.pred[ia] == label).astype(float) - (p.b.pred[ib] == label) for ia, ib, p in parts],
                         axis=0) for label, parts in seeds]
        return (*stats.percentile_interval(stats.two_level_bootstrap_mean(diffs, n_boot, rng), confidence), None)

    def seed_difference(label, parts):
        arrays = [(p.a.probs[ia], p.b.probs[ib]) for ia, ib, p in parts]
        return lambda idx: float(np.mean([metric_value(metric, label[idx], pa[idx])
                                          - metric_value(metric, label[idx], pb[idx]) for pa, pb in arrays]))

    boot = stats.two_level_bootstrap([seed_difference(*x) for x in seeds], [len(x[0]) for x in seeds], n_boot, rng)
    return (*stats.percentile_interval(boot, confidence), None)


def compare(d: Sequence[float], metric: str, n_boot: int, rng: np.random.Generator) -> dict:
    """stats.seed_comparison of raw differences A - B; P(A better) in the metric's direction."""
    d = np.asarray(d, dtype=float)
    out = stats.seed_comparison(d, ALPHA, stats.POWER, n_boot, rng, difference_bounds(metric))
    out["p_better"], out["p_better_low"], out["p_better_high"] = stats.prob_of_improvement(
        _direction(metric) * d, n_boot, rng, 1 - ALPHA)
    return out


def _json_num(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else (None if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, dict):
        return {k: _json_num(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_num(x) for x in v]
    return v



def _fmt_diff(v: float, metric: str) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return f"{100 * v:+.2f} pt" if metric == "acc" else f"{v:+.4f}"


def _fmt_ci(lo: float, hi: float, metric: str) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    if metric == "acc":
        return f"[{100 * lo:+.2f}, {100 * hi:+.2f}] pt"
    return f"[{lo:+.4f}, {hi:+.4f}]"


def group_summary(g: Group, metric: str, exclude_collapsed: bool) -> dict:
    counts = {s: sum(r.status == s for r in g.runs) for s in COUNTED_STATUS}
    counts["other"] = len(g.runs) - sum(counts.values())
    scored = g.scored_runs(exclude_collapsed)
    test = [r.test("best", metric) for r in scored]
    test = [v for v in test if not math.isnan(v)]
    val = [v for v in (r.val(metric) for r in scored) if not math.isnan(v)]
    last = [v for v in (r.test("last", metric) for r in scored) if not math.isnan(v)]
    lo, hi, note = stats.t_interval(test, 1 - ALPHA, metric_bounds(metric))
    scored_all = counts["completed"] + counts["collapsed"]
    return {
        "label": g.label, "config": {k: _fmt_value(v) for k, v in g.config.items()},
        "started": len(g.runs), **counts,
        "collapse_rate": counts["collapsed"] / scored_all if scored_all else math.nan,
        "n_scored": len(test), "seeds": [r.seed for r in scored],
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


def comparison(a: Group, b: Group, metric: str, exclude_collapsed: bool, n_boot: int,
               rng: np.random.Generator) -> dict:
    """A vs B paired by seed: every number of issue 13 item 1 and the power of item 4."""
    pairs = pair_by_seed(a.scored_runs(exclude_collapsed), b.scored_runs(exclude_collapsed), metric)
    d = [p.value_a - p.value_b for p in pairs]
    res = compare(d, metric, n_boot, rng)
    lo, hi, why = bootstrap_interval(pairs, metric, n_boot, rng) if pairs else (math.nan, math.nan, "no paired seed")
    disagree = [p.disagreements() for p in pairs if p.rows is not None]
    la, lb = pair_label(a, b)
    return {
        "a": la, "b": lb, "seeds": [p.seed for p in pairs], "differences": d,
        "estimate": res["estimate"], "sd": res["sd"], "n_seeds": res["n_seeds"],
        "ci": [lo, hi], "ci_note": why, "t_ci": [res["t_low"], res["t_high"]], "t_ci_note": res["t_note"],
        "p": res["p"], "p_holm": math.nan,
        "prob_improvement": [res["p_better"], res["p_better_low"], res["p_better_high"]],
        "mde": res["mdd"], "seeds_needed": res["seeds_needed"],
        "disagreements": [b_ + c_ for b_, c_ in disagree],
        "examples": [p.n_examples for p in pairs if p.rows is not None],
        "mcnemar_p": [stats.mcnemar_p(b_, c_) for b_, c_ in disagree],
    }


def main_effects(groups: Sequence[Group], metric: str, exclude_collapsed: bool,
                 n_boot: int, rng: np.random.Generator) -> list[dict]:
    """Per varying key: each level vs the level best on validation, paired by seed AND by the other keys; the
    per-seed difference averages over the other keys' combinations both levels ran with that seed."""
    configs = [g.config for g in groups]
    effects = []
    for key in varying_keys(configs):
        levels = sorted({_hashable(c.get(key, _MISSING)) for c in configs}, key=_sort_value)
        val_by_level = {}
        for lv in levels:
            vals = [v for g in groups if _hashable(g.config.get(key, _MISSING)) == lv
                    for v in (r.val(metric) for r in g.scored_runs(exclude_collapsed)) if not math.isnan(v)]
            val_by_level[lv] = float(np.mean(vals)) if vals else math.nan
        ranked = [lv for lv in levels if not math.isnan(val_by_level[lv])]
        if len(ranked) < 2:
            continue
        best = max(ranked, key=lambda lv: _direction(metric) * val_by_level[lv])

        def units(level) -> dict:
            out = {}
            for g in groups:
                if _hashable(g.config.get(key, _MISSING)) != level:
                    continue
                rest = tuple((k, _hashable(v)) for k, v in sorted(g.config.items()) if k != key)
                for r in g.scored_runs(exclude_collapsed):
                    out[(rest, r.seed)] = r
            return out

        base = units(best)
        for lv in levels:
            if lv == best:
                continue
            other = units(lv)
            per_seed: dict[Any, list[PairedSeed]] = {}
            for unit in sorted(set(base) & set(other), key=lambda u: (_sort_value(u[1]), str(u[0]))):
                for pair in pair_by_seed([other[unit]], [base[unit]], metric):
                    per_seed.setdefault(unit[1], []).append(pair)
            seeds = sorted(per_seed, key=_sort_value)
            d = [float(np.mean([p.value_a - p.value_b for p in per_seed[s]])) for s in seeds]
            res = compare(d, metric, n_boot, rng)
            lo, hi, why = bootstrap_interval_cells([per_seed[s] for s in seeds], metric, n_boot, rng)
            effects.append({
                "key": key, "level": _fmt_value(lv), "vs": _fmt_value(best), "seeds": seeds, "differences": d,
                "estimate": res["estimate"], "sd": res["sd"], "n_seeds": res["n_seeds"],
                "ci": [lo, hi], "ci_note": why, "combinations": [len(per_seed[s]) for s in seeds],
                "t_ci": [res["t_low"], res["t_high"]], "t_ci_note": res["t_note"], "p": res["p"],
                "p_holm": math.nan, "prob_improvement": [res["p_better"], res["p_better_low"], res["p_better_high"]],
                "mde": res["mdd"], "seeds_needed": res["seeds_needed"],
                "val_mean": val_by_level[lv], "vs_val_mean": val_by_level[best],
            })
    for e, adj in zip(effects, stats.holm([e["p"] for e in effects])):
        e["p_holm"] = adj
    effects.sort(key=lambda e: -abs(e["estimate"]) if not math.isnan(e["estimate"]) else math.inf)
    return effects


def ignored_key_checks(runs: Sequence[Run], metric: str) -> list[dict]:
    """For each non-training key the runs vary: were runs of the same configuration and seed identical?"""
    keys = sorted({k for r in runs for k in r.flat
                   if not _in_group(k) and k != "train.seed" and not k.startswith(("out.", "derived."))})
    keys = [k for k in keys if len({_hashable(r.flat.get(k, _MISSING)) for r in runs}) > 1]
    checks = []
    for key in keys:
        cells: dict[tuple, dict] = {}
        for r in runs:
            if r.status not in SCORED_STATUS:
                continue
            cell = cells.setdefault((r.group_key(), _hashable(r.seed)), {})
            cell[_hashable(r.flat.get(key, _MISSING))] = r.test("best", metric)
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


def comparison_sentences(c: dict, metric: str, spread_sd: float) -> list[str]:
    head = f"{c['a']} vs {c['b']}"
    if c["n_seeds"] == 0:
        return [f"{head}: no seed with a test {metric} in both: no comparison."]
    est = _fmt_diff(c["estimate"], metric)
    if c["n_seeds"] == 1:
        need = stats.seeds_needed(c["estimate"], spread_sd)
        how = (f"with the seed-to-seed spread seen in this report (sd of a difference ≈ {_fmt_diff(spread_sd, metric).lstrip('+')}), "
               f"detecting {est} at 80% power would need {_fmt_seeds(need)} seeds"
               if not math.isnan(need) else "run at least 3 seeds per configuration to measure the spread")
        return [f"{head}: {est} on one seed (seed {_fmt_value(c['seeds'][0])}). One seed cannot separate the "
                f"configurations: no p-value. {how[0].upper() + how[1:]}."]
    sig = c["p_holm"] < ALPHA
    boot = _fmt_ci(*c["ci"], metric) if c["ci_note"] is None else f"n/a ({c['ci_note']})"
    tci = _fmt_ci(*c["t_ci"], metric) if c["t_ci_note"] is None else f"n/a ({c['t_ci_note']})"
    pb = c["prob_improvement"]
    lines = [f"{head}: {est} (mean of {c['n_seeds']} per-seed differences), 95% two-level bootstrap {boot}, "
             f"paired t {tci}; P({c['a']} better) = {pb[0]:.2f} [{pb[1]:.2f}, {pb[2]:.2f}]; "
             f"paired t-test over seeds p = {_fmt_p(c['p_holm'])} (Holm; raw {_fmt_p(c['p'])}), "
             f"{'significant' if sig else 'not significant'} at {ALPHA:g}."]
    power = (f"With {c['n_seeds']} seeds and this spread (sd {_fmt_diff(c['sd'], metric).lstrip('+')}), the smallest "
             f"difference detectable at 80% power is {_fmt_diff(c['mde'], metric).lstrip('+')}")
    if not sig:
        if math.isnan(c["seeds_needed"]):  # zero observed difference or zero spread: no number of seeds answers it
            power += "; the seeds show no difference to detect"
        else:
            power += f"; detecting {est} would need {_fmt_seeds(c['seeds_needed'])} seeds"
    lines.append(power + ".")
    if c["examples"]:
        lines.append(f"Secondary (within seed): they disagree on {np.mean(c['disagreements']):.0f} of "
                     f"{np.mean(c['examples']):.0f} test examples per seed; McNemar p per seed "
                     + ", ".join(_fmt_p(p) for p in c["mcnemar_p"]) + ".")
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
        ("val acc", lambda r: r.val("acc"), 4, True),
        ("val loss", lambda r: r.val("loss"), 4, False),
        ("test acc", lambda r: r.test("best", "acc"), 4, True),
        ("test loss", lambda r: r.test("best", "loss"), 4, False),
        ("test ECE", lambda r: r.test("best", "ece"), 4, False),
        ("test acc (last)", lambda r: r.test("last", "acc"), 4, True),
        ("duration", lambda r: r.duration(), None, False),
    ]


def runs_table(runs: Sequence[Run], keys: Sequence[str]) -> str:
    fixed = [("micro", "derived.micro"), ("accum_steps", "derived.accum_steps"), ("optimizer", "optim.name"),
             ("lr", "derived.lr")]
    fixed = [(h, k) for h, k in fixed if k not in keys]
    header = ["run", "status"] + list(keys) + [h for h, _ in fixed]
    cols = _run_columns()
    header += [c[0] for c in cols]
    rows = [[r.name, r.status if r.ok else f"⚠ {r.status.upper()}"]
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
    header = ["configuration", "started", "completed", "collapsed", "diverged", "failed / other", "collapse rate",
              f"val {metric} (mean)", f"test {metric} (best) mean ± std", "95% t-interval", f"test {metric} (last)"]
    rows = []
    for i, s in enumerate(summaries):
        m, sd = s["test_mean"], s["test_sd"]
        test = "" if math.isnan(m) else (f"{m:.4f} ± {sd:.4f}" if not math.isnan(sd) else f"{m:.4f}")
        ci = s["test_ci"]
        ci_text = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if not math.isnan(ci[0]) else (s["test_ci_note"] or "")
        val = _fmt_num(s["val_mean"])
        rate = "" if math.isnan(s["collapse_rate"]) else f"{s['collapse_rate']:.0%}"
        rows.append([s["label"] + (" (reference)" if i == reference else ""), str(s["started"]),
                     str(s["completed"]), str(s["collapsed"]), str(s["diverged"]), str(s["failed"] + s["other"]),
                     rate, f"**{val}**" if i == reference and val else val, test, ci_text,
                     _fmt_num(s["test_last_mean"])])
    return md_table(header, rows, ["l"] + ["r"] * 6 + ["r", "r", "l", "r"]), rows


def main_effects_table(effects: Sequence[dict], metric: str) -> str:
    header = ["key", "level vs best-on-val level", f"test {metric} difference", "95% bootstrap", "95% t-interval",
              "p (Holm)", "P(better)", "seeds"]
    rows = []
    for e in effects:
        boot = _fmt_ci(*e["ci"], metric) if e["ci_note"] is None else f"n/a ({e['ci_note']})"
        tci = _fmt_ci(*e["t_ci"], metric) if e["t_ci_note"] is None else f"n/a ({e['t_ci_note']})"
        p = "n/a (one seed)" if e["n_seeds"] < 2 else _fmt_p(e["p_holm"])
        pb = e["prob_improvement"][0]
        rows.append([e["key"], f"{e['level']} vs {e['vs']}", _fmt_diff(e["estimate"], metric), boot, tci, p,
                     "" if math.isnan(pb) else f"{pb:.2f}", str(e["n_seeds"])])
    return md_table(header, rows, ["l", "l", "r", "l", "l", "r", "r", "r"])


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


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Lay out, write (durably, as every report file) and close a figure (closing keeps a report over many plots
    from holding them all)."""
    import matplotlib.pyplot as plt

    from ebslab.files import atomic_write_with

    fig.tight_layout()
    try:
        # the temporary sibling keeps the suffix, from which matplotlib picks the format
        atomic_write_with(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi))
    finally:
        plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(groups: Sequence[Group], metric: str, path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for g in groups:
        runs = g.ok_runs or g.runs
        xs, m, s = curve(runs, metric)
        if not len(xs):
            continue
        label = g.label + ("" if g.ok_runs else " (not completed)")
        (line,) = ax.plot(xs, m, marker="o", ms=3, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(xs, m - s, m + s, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path, dpi=110)


def plot_acc_vs_ebs(groups: Sequence[Group], path: Path) -> Path:
    """Mean test acc (best checkpoint) against batch.effective; one line per value of the other varying keys."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    scored = [g for g in groups if g.scored_runs()]
    keys = [k for k in varying_keys([g.config for g in scored]) if k != "batch.effective"]
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for g in scored:
        ebs = _num(g.config.get("batch.effective"))
        m, _s, lo, hi = g.stats("best")
        if math.isnan(ebs) or math.isnan(m):
            continue
        err = 0.0 if math.isnan(lo) else hi - m
        name = ", ".join(f"{k}={_fmt_value(g.config.get(k, _MISSING))}" for k in keys) or "all"
        lines.setdefault(name, []).append((ebs, m, err))
    for name, pts in lines.items():
        pts.sort()
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, label=name)
    xs_all = sorted({p[0] for pts in lines.values() for p in pts})
    if xs_all and xs_all[0] > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x:g}" for x in xs_all])
    ax.set_xlabel("batch.effective (EBS)")
    ax.set_ylabel("test acc (best checkpoint), mean ± 95% CI")
    ax.set_title("Test accuracy against effective batch size")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------------------------------------
# The report


def analyse(runs: Sequence[Run], groups: Sequence[Group], metric: str = "acc", exclude_collapsed: bool = False,
            n_boot: int = stats.N_BOOT, seed: int = 0) -> dict:
    """Every number of the report (report.json): groups, reference, comparisons, main effects, ignored keys."""
    rng = np.random.default_rng(seed)  # seeded: the same run folders give the same report
    summaries = [group_summary(g, metric, exclude_collapsed) for g in groups]
    ref = choose_reference(summaries, metric)
    comps = []
    if ref is not None:
        for i, g in enumerate(groups):
            if i != ref and summaries[i]["n_scored"]:
                comps.append(comparison(g, groups[ref], metric, exclude_collapsed, n_boot, rng))
    for c, adj in zip(comps, stats.holm([c["p"] for c in comps])):
        c["p_holm"] = adj
    return {
        "metric": metric, "higher_is_better": higher_is_better(metric), "alpha": ALPHA, "n_boot": n_boot,
        "exclude_collapsed": exclude_collapsed, "test": "paired t-test over seeds, Holm-corrected",
        "groups": summaries, "reference": None if ref is None else summaries[ref]["label"], "reference_index": ref,
        "comparisons": comps, "spread_sd": pooled_seed_sd(summaries),
        "main_effects": main_effects(groups, metric, exclude_collapsed, n_boot, rng),
        "ignored_keys": ignored_key_checks(runs, metric),
    }


def analyse_dirs(run_dirs: Sequence[Path], metric: str = "acc", exclude_collapsed: bool = False,
                 n_boot: int = stats.N_BOOT) -> tuple[list[Path], list[Run], list[Group], dict]:
    """The run folders found in run_dirs, their runs, configurations and `analyse` result: what a report of
    those folders shows (`ebslab tune` takes its verdict from here, so the two always agree)."""
    dirs = find_run_dirs(run_dirs)
    runs = [load_run(d, n) for d, n in zip(dirs, _run_names(dirs))]
    groups = group_runs(runs)
    return dirs, runs, groups, analyse(runs, groups, metric, exclude_collapsed, n_boot)


def build_report(run_dirs: list[Path], out_dir: Path, target: float | None = None, metric: str = "acc",
                 exclude_collapsed: bool = False, n_boot: int = stats.N_BOOT) -> Path:
    """Read the run folders (or folders holding them), write out_dir/report.md, report.json and PNG plots;
    return report.md."""
    if metric not in METRICS:
        raise UserError(f"--metric {metric}: unknown metric; valid: {', '.join(METRICS)}")
    dirs, runs, groups, result = analyse_dirs(run_dirs, metric, exclude_collapsed, n_boot)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    order = {id(r): i for i, r in enumerate(r for g in groups for r in g.runs)}
    runs_sorted = sorted(runs, key=lambda r: order[id(r)])
    keys = varying_keys([r.flat for r in runs])
    scored_status = (OK_STATUS,) if exclude_collapsed else SCORED_STATUS
    left_out = [r for r in runs_sorted if r.status not in scored_status]

    plots = [
        plot_curves(groups, "val/acc", out_dir / "val_acc.png", "Validation accuracy per epoch (mean ± std over seeds)"),
        plot_curves(groups, "val/loss", out_dir / "val_loss.png", "Validation loss per epoch (mean ± std over seeds)"),
        plot_acc_vs_ebs(groups, out_dir / "test_acc_vs_ebs.png"),
    ]

    md: list[str] = ["# ebslab report", ""]
    md.append(f"{len(runs)} run(s) in {len(groups)} configuration(s); headline metric: test `{metric}` at the "
              f"best checkpoint ({'higher' if higher_is_better(metric) else 'lower'} is better).")
    if keys:
        md.append("Varying keys: " + ", ".join(f"`{k}`" for k in keys) + ".")
    md.append("")
    md.append(f"Nothing is selected on test: the reference configuration, the bold marks and every ranking use the "
              f"validation `{metric}` (best checkpoint, mean over seeds); test numbers are only reported.")
    if exclude_collapsed:
        md += ["", "**Old view (--exclude-collapsed): collapsed runs are left out of means and tests, which "
               "flatters the settings that collapse.**"]
    else:
        md += ["", "Every run counts: collapsed runs enter the means and tests with the score they got; diverged "
               "and failed runs have no test metric and appear as counts."]
    md.append("")

    md += ["## What mattered", "",
           "Main effect of each varying key: each level against the level best on validation, paired by seed and "
           "by the other keys (the per-seed difference averages over the other keys' combinations); 95% two-level "
           f"bootstrap and paired t-interval over seeds; paired t-test p Holm-corrected over the {len(result['main_effects'])} "
           "effect(s); ranked by size. P(better) = share of seeds where the level beats the best-on-val level.", ""]
    if result["main_effects"]:
        md += [main_effects_table(result["main_effects"], metric), ""]
    else:
        md += ["No key varies between configurations with a validation metric.", ""]
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
           f"`checkpoint.*`, `derived.*`. Means over {'completed' if exclude_collapsed else 'completed and collapsed'}"
           " runs; 95% t-interval (n − 1 degrees of freedom), not shown when it would leave the metric's range. "
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
                  f"runs by seed (same data order and head initialisation): the estimate is the mean over shared "
                  f"seeds of the per-seed difference in test `{metric}` (first minus second); the 95% two-level "
                  f"bootstrap ({n_boot} resamples of seeds, then of test examples within each seed, seeded) sits "
                  f"next to the paired t-interval; p from a paired t-test over seeds, Holm-corrected over the "
                  f"{len(result['comparisons'])} comparison(s). Power: 80% at alpha {ALPHA:g}.")
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

    lr_md, lr_json = lr_study.report_section(dirs, out_dir)
    md += lr_md
    if lr_json is not None:
        result["lr_study"] = lr_json
    ebs_md, ebs_json = ebs_study.report_section(dirs, out_dir, target)
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
    warned = [r for r in runs_sorted if r.ok and r.warnings]
    if warned:
        md += ["", "Completed runs that logged warnings:", ""]
        for r in warned:
            md.append(f"- `{r.name}`: " + "; ".join(f"{w.get('kind')} at step {w.get('step')}: {w.get('message')}"
                                                     for w in r.warnings))
    md.append("")

    from ebslab.checkpoint import atomic_write_json, atomic_write_text  # here: the report needs no torch otherwise

    atomic_write_json(out_dir / "report.json", _json_num(result))
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


def run(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.dirs]
    out = args.out if getattr(args, "out", None) is not None else (dirs[0] if len(dirs) == 1 else Path("report"))
    if len(dirs) == 1 and (dirs[0] / "study.json").is_file():  # an `ebslab tune` study: verdict, search, plots
        from ebslab.tune import report_study

        print(report_study(dirs[0], Path(out)))
        return 0
    metric = getattr(args, "metric", "acc")
    report = build_report(dirs, Path(out), getattr(args, "target", None), metric=metric,
                          exclude_collapsed=getattr(args, "exclude_collapsed", False))
    result = json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))
    print(report)
    width = max([len("configuration")] + [len(g["label"]) for g in result["groups"]])
    print(f"{'configuration':<{width}}  {'n':>3}  {'val ' + metric:>10}  {'test ' + metric:>10}")
    for g in result["groups"]:
        val = "" if g["val_mean"] is None else f"{g['val_mean']:.4f}"
        test = "" if g["test_mean"] is None else f"{g['test_mean']:.4f}"
        print(f"{g['label']:<{width}}  {g['n_scored']:>3}  {val:>10}  {test:>10}")
    return 0
