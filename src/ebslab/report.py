"""`ebslab report`: tables, plots and statistics from run folders only (docs/run-folder.md).

What it writes into the output folder:
- `report.md`: one row per run (best value of each column in bold, runs that did not complete marked),
  the runs grouped over seeds into configurations (n, mean ± std, 95% t-interval of test accuracy on the best
  and last checkpoint), significance of each configuration against the best one, and the runs left out.
- `val_acc.png`, `val_loss.png`: val accuracy / loss per epoch, one mean line per configuration, band = ± 1 std
  over seeds.
- `test_acc_vs_ebs.png`: mean test accuracy (best checkpoint) against batch.effective, one line per combination
  of the other varying keys (model.name, optim.lr_scaling, ...), error bars = 95% t-interval.

Statistics:
- A configuration is every config value except `train.seed`, `out.*` and `derived.*` (derived values follow
  from the config; micro=auto or the world size may differ between seeds without changing what was trained).
- Only runs with status "completed" enter means, intervals and tests; collapsed / diverged / failed /
  interrupted runs and folders without summary.json are listed in the per-run table (marked) and in
  "Runs left out".
- Significance: McNemar's exact test (two-sided binomial on the discordant pairs) on pooled per-example
  correctness. For each seed that both configurations ran, predictions/test_best.parquet rows are matched by
  test-set index, so pairs are (seed, index). b = examples the best configuration got right and the other wrong,
  c = the reverse. p-values are Holm-corrected over all comparisons with the best configuration.
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
from scipy import stats

from ebslab import ebs_study
from ebslab import stats as seed_stats
from ebslab.config import UserError, flatten as config_flatten

OK_STATUS = "completed"
GROUP_EXCLUDED_PREFIXES = ("out.", "derived.")
GROUP_EXCLUDED_KEYS = ("train.seed",)
# keys that provably do not change what is trained (accumulation is exact by the loss rule): never split a group
NOT_TRAINING_KEYS = ("batch.micro", "batch.auto_cap", "batch.auto_cpu_tokens", "train.backend", "train.device",
                     "track", "eval.batch_size", "train.log_every_steps")
NOT_TRAINING_PREFIXES = ("checkpoint.",)
SCORED_STATUSES = ("completed", "collapsed")
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
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def mcnemar_p(b: int, c: int, mid_p: bool = False) -> float:
    """McNemar's exact two-sided p-value for b and c discordant pairs (binomial, p = 1/2).

    mid_p=True gives the mid-p variant (exact p minus the probability of the observed count).
    """
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    k = min(int(b), int(c))
    p = 2.0 * float(stats.binom.cdf(k, n, 0.5))
    if mid_p:
        p -= float(stats.binom.pmf(k, n, 0.5))
    return min(1.0, p)


def holm(pvals: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order. NaN stays NaN and is not counted."""
    idx = [i for i, p in enumerate(pvals) if p is not None and not math.isnan(p)]
    out = [math.nan] * len(pvals)
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvals[i])):
        running = max(running, min(1.0, (m - rank) * pvals[i]))
        out[i] = running
    return out


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
        return tuple(sorted((k, _hashable(v)) for k, v in self.flat.items() if _in_group(k)))

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
                self.predictions[which] = pd.read_parquet(path, columns=["index", "label", "pred"])
            except Exception:  # missing or unreadable file: no paired test for this run
                self.predictions[which] = None
        return self.predictions[which]


def _in_group(key: str) -> bool:
    return (key not in GROUP_EXCLUDED_KEYS and key not in NOT_TRAINING_KEYS
            and not key.startswith(GROUP_EXCLUDED_PREFIXES + NOT_TRAINING_PREFIXES))


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


def load_run(path: Path, name: str | None = None) -> Run:
    path = Path(path)
    config: dict = {}
    try:
        loaded = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            config = loaded
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

    exclude_collapsed: bool = False

    @property
    def ok_runs(self) -> list[Run]:
        """Runs that enter means and tests: completed, and collapsed with their score (unless excluded)."""
        allowed = ("completed",) if self.exclude_collapsed else SCORED_STATUSES
        return [r for r in self.runs if r.status in allowed]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.runs)

    def val_mean(self, metric: str = "acc") -> float:
        vals = [r.val(metric) for r in self.ok_runs]
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.key)

    def stats(self, which: str = "best") -> tuple[float, float, float, float]:
        return mean_ci([r.test(which, "acc") for r in self.ok_runs])


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


@dataclass
class Comparison:
    """The reference configuration against another, paired by seed (ebslab.seed_stats.seed_comparison)."""
    other: Group
    best: Group
    seeds: list
    diffs: list[float]  # per-seed test acc (best checkpoint): reference minus other
    result: dict
    b: int = 0  # pooled over seeds: reference right, other wrong (secondary, within-seed evidence)
    c: int = 0
    n: int = 0
    mcnemar: list[float] = field(default_factory=list)  # within-seed McNemar p per seed (secondary)
    p_holm: float = math.nan
    note: str | None = None

    @property
    def p(self) -> float:
        return self.result.get("p", math.nan) if self.result else math.nan

    @property
    def diff_pt(self) -> float:
        return 100.0 * self.result["estimate"] if self.result else math.nan


def paired_seeds(best_runs: Sequence[Run], other_runs: Sequence[Run], metric: str = "acc"):
    """(seeds, per-seed differences best - other of the test metric at the best checkpoint)."""
    by_b = {r.seed: r for r in best_runs}
    by_o = {r.seed: r for r in other_runs}
    seeds = sorted(set(by_b) & set(by_o), key=_sort_value)
    used, diffs = [], []
    for s in seeds:
        d = by_b[s].test("best", metric) - by_o[s].test("best", metric)
        if not math.isnan(d):
            used.append(s)
            diffs.append(d)
    return used, diffs


def within_seed_counts(best_runs: Sequence[Run], other_runs: Sequence[Run], seeds: Sequence) -> tuple:
    """Secondary evidence: per seed, examples only one of the two got right (b, c), and McNemar per seed."""
    by_b = {r.seed: r for r in best_runs}
    by_o = {r.seed: r for r in other_runs}
    b = c = n = 0
    per_seed = []
    for s in seeds:
        pb, po = by_b[s].load_predictions(), by_o[s].load_predictions()
        if pb is None or po is None:
            continue
        m = pb.merge(po, on="index", suffixes=("_b", "_o"))
        if len(m) == 0 or (m["label_b"] != m["label_o"]).any():
            continue
        cb = (m["pred_b"] == m["label_b"]).to_numpy()
        co = (m["pred_o"] == m["label_o"]).to_numpy()
        bs, cs = int((cb & ~co).sum()), int((~cb & co).sum())
        b, c, n = b + bs, c + cs, n + len(m)
        per_seed.append(seed_stats.mcnemar_p(bs, cs))
    return b, c, n, per_seed


def compare_to_best(groups: Sequence[Group], metric: str = "acc") -> tuple[Group | None, list[Comparison]]:
    """Reference = highest mean VALIDATION metric (best checkpoint); test is never used to choose."""
    scored = [g for g in groups if g.ok_runs and not math.isnan(g.val_mean(metric))]
    if not scored:
        return None, []
    best = max(scored, key=lambda g: g.val_mean(metric))
    comps: list[Comparison] = []
    for g in scored:
        if g is best:
            continue
        seeds, diffs = paired_seeds(best.ok_runs, g.ok_runs, metric)
        if not seeds:
            comps.append(Comparison(other=g, best=best, seeds=[], diffs=[], result={}, note="no seed in common"))
            continue
        result = seed_stats.seed_comparison(diffs, alpha=ALPHA, rng=np.random.default_rng(20211), bounds=(-1.0, 1.0))
        b, c, n, per_seed = within_seed_counts(best.ok_runs, g.ok_runs, seeds)
        comps.append(Comparison(other=g, best=best, seeds=seeds, diffs=diffs, result=result, b=b, c=c, n=n,
                                mcnemar=per_seed))
    for comp, adj in zip(comps, seed_stats.holm([c.p for c in comps])):
        comp.p_holm = adj
    return best, comps


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.2g}"  # two significant digits: 0.047 must not print as 0.05 next to "significant at 0.05"


def _pt(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f} pt"


def comparison_sentence(comp: Comparison) -> str:
    fb, fo = pair_label(comp.best, comp.other)
    if comp.note:
        return f"{fb} vs {fo}: no paired comparison ({comp.note})."
    r = comp.result
    seeds = ", ".join(_fmt_value(s) for s in comp.seeds)
    if r["n_seeds"] < 2:
        return (f"{fb} vs {fo}: {comp.diff_pt:+.1f} pt test acc on seed {seeds} only. One seed cannot separate two "
                "configurations: no p-value, no interval; at least 2 seeds (and, with the usual seed-to-seed "
                "spread, more) are needed.")
    verdict = "significant" if comp.p_holm < ALPHA else "not significant"
    ci = (f"[{100 * r['t_low']:+.1f}, {100 * r['t_high']:+.1f}] pt" if r["t_note"] is None else r["t_note"])
    text = (f"{fb} vs {fo}: {comp.diff_pt:+.1f} pt test acc (mean over seeds {seeds}), 95% paired t-interval {ci}, "
            f"P(first better) = {r['p_better']:.2f} [{r['p_better_low']:.2f}, {r['p_better_high']:.2f}], "
            f"paired t over {r['n_seeds']} seeds p = {_fmt_p(comp.p_holm)} (Holm; raw {_fmt_p(comp.p)}): "
            f"{verdict} at {ALPHA:g}.")
    text += (f" With {r['n_seeds']} seeds and a seed-to-seed sd of {_pt(r['sd'])} in the difference, the smallest "
             f"difference detectable at 80% power is {_pt(r['mdd'])}.")
    if comp.p_holm >= ALPHA:
        need = r["seeds_needed"]
        if math.isnan(need):  # zero observed difference or zero spread: no number of seeds answers it
            text += " The seeds show no difference to detect."
        else:
            text += (" Detecting the observed difference would need " +
                     ("more seeds than any sweep runs." if math.isinf(need) else f"about {int(need)} seeds."))
    if comp.n:
        text += (f" Secondary, within seeds: {comp.b} test examples right only with the first, {comp.c} only with "
                 f"the second over {comp.n} paired predictions (McNemar per seed: "
                 + ", ".join(_fmt_p(p) for p in comp.mcnemar) + ").")
    return text


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


def groups_table(groups: Sequence[Group]) -> tuple[str, list[list[str]]]:
    header = ["configuration", "started", "completed", "collapsed", "diverged", "failed", "collapse rate",
              "val acc (mean)", "test acc (best) mean ± std", "95% CI", "test acc (last) mean ± std", "95% CI (last)"]
    rows = []
    vals = [g.val_mean("acc") for g in groups]
    val_texts = bold_best(vals, [_fmt_num(v) for v in vals], True)
    for g, vt in zip(groups, val_texts):
        started = len(g.runs)
        row = [g.label, str(started), str(g.count("completed")), str(g.count("collapsed")), str(g.count("diverged")),
               str(started - g.count("completed") - g.count("collapsed") - g.count("diverged")),
               f"{g.count('collapsed') / started:.0%}" if started else "", vt]
        for which in ("best", "last"):
            m, s, _lo, _hi = g.stats(which)
            if math.isnan(m):
                row += ["", ""]
                continue
            lo, hi, why = seed_stats.t_interval([r.test(which, "acc") for r in g.ok_runs], 0.95, (0.0, 1.0))
            row.append(f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}")
            row.append(f"[{lo:.4f}, {hi:.4f}]" if why is None else why)
        rows.append(row)
    return md_table(header, rows, ["l"] + ["r"] * 8 + ["l", "r", "l"]), rows


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_acc_vs_ebs(groups: Sequence[Group], path: Path) -> Path:
    """Mean test acc (best checkpoint) against batch.effective; one line per value of the other varying keys."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    scored = [g for g in groups if g.ok_runs]
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# The report


def build_report(run_dirs: list[Path], out_dir: Path, target: float | None = None,
                 exclude_collapsed: bool = False) -> Path:
    """Read the run folders (or folders holding them), write out_dir/report.md and PNG plots; return report.md."""
    dirs = find_run_dirs(run_dirs)
    names = _run_names(dirs)
    runs = [load_run(d, n) for d, n in zip(dirs, names)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    groups = group_runs(runs)
    for g in groups:
        g.exclude_collapsed = exclude_collapsed
    order = {id(r): i for i, r in enumerate(r for g in groups for r in g.runs)}
    runs_sorted = sorted(runs, key=lambda r: order[id(r)])
    keys = varying_keys([r.flat for r in runs])
    best, comps = compare_to_best(groups)
    left_out = [r for r in runs_sorted if r not in [x for g in groups for x in g.ok_runs]]

    plots = [
        plot_curves(groups, "val/acc", out_dir / "val_acc.png", "Validation accuracy per epoch (mean ± std over seeds)"),
        plot_curves(groups, "val/loss", out_dir / "val_loss.png", "Validation loss per epoch (mean ± std over seeds)"),
        plot_acc_vs_ebs(groups, out_dir / "test_acc_vs_ebs.png"),
    ]

    md: list[str] = ["# ebslab report", ""]
    md.append(f"{len(runs)} run(s) in {len(groups)} configuration(s); "
              f"{len(runs) - len(left_out)} completed, {len(left_out)} left out of means and tests.")
    if keys:
        md.append("Varying keys: " + ", ".join(f"`{k}`" for k in keys) + ".")
    md += ["", "## Runs", "",
           "One row per run. train acc/loss: the training pass's running means over the epoch of the best "
           "checkpoint; val: best checkpoint; test acc, loss, ECE: best-val checkpoint; test acc (last): last "
           "checkpoint; lr: after scaling. **Bold**: best value of the column among completed runs. "
           "⚠: run did not complete (left out of means).", "",
           runs_table(runs_sorted, keys), ""]

    md += ["## Configurations (grouped over seeds)", "",
           "A configuration is every config value except `train.seed`, `out.*`, `derived.*` and the keys that do "
           "not change what is trained (" + ", ".join(f"`{k}`" for k in NOT_TRAINING_KEYS) + ", `checkpoint.*`). "
           "Every run counts: collapsed runs enter the means with the accuracy they scored"
           + (" — EXCLUDED here (`--exclude-collapsed`: the old view, which flatters settings that collapse)"
              if exclude_collapsed else "")
           + "; diverged and failed runs have no test metric and appear as counts. Mean ± sample std; 95% "
           "t-interval, or a note when n is too small for one inside [0, 1].", ""]
    gtable, _ = groups_table(groups)
    md += [gtable, ""]

    md += ["## Comparisons with the reference configuration", ""]
    if best is None:
        md.append("No run with a validation accuracy: nothing to compare.")
    elif not comps:
        md.append(f"Reference configuration: {best.label}. No other configuration to compare.")
    else:
        md.append(f"Reference configuration (highest mean validation acc at the best checkpoint): **{best.label}**. "
                  "The reference, the bold marks and any ranking use validation only; test numbers are reported, "
                  "never used to choose.")
        md.append("")
        md.append("The seed is the unit of replication: each difference is the mean over shared seeds of the per-seed "
                  "difference in test acc (best checkpoint); p-values from a paired t-test over seeds, "
                  f"Holm-corrected over the {len(comps)} comparison(s). One seed gives no p-value. McNemar within "
                  "seeds is secondary evidence only.")
        md.append("")
        for comp in comps:
            md.append(f"- {comparison_sentence(comp)}")
    md.append("")

    md += ["## Plots", ""]
    for p in plots:
        md.append(f"![{p.stem}]({p.name})")
        md.append("")

    ebs_md, ebs_json = ebs_study.report_section(dirs, out_dir, target)
    md += ebs_md

    md += ["## Runs left out", ""]
    if not left_out:
        md.append("None: every run completed.")
    else:
        md.append("These runs are listed in the table above but left out of means, intervals, tests and "
                  "the test-accuracy plot.")
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

    from ebslab.checkpoint import atomic_write_json, atomic_write_text

    report = out_dir / "report.md"
    data = report_data(groups, best, comps, exclude_collapsed)
    if ebs_json is not None:
        data["ebs_study"] = ebs_json
    atomic_write_json(out_dir / "report.json", _clean(data))
    atomic_write_text(report, "\n".join(md))
    return report


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN and inf become null."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) or math.isinf(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def report_data(groups: Sequence[Group], best: Group | None, comps: Sequence[Comparison],
                exclude_collapsed: bool) -> dict:
    """Every number of report.md's configuration and comparison sections."""
    out_groups = []
    for g in groups:
        m, sd, _, _ = g.stats("best")
        lo, hi, why = seed_stats.t_interval([r.test("best", "acc") for r in g.ok_runs], 0.95, (0.0, 1.0))
        out_groups.append({
            "label": g.label, "config": {k: _fmt_value(v) for k, v in g.key},
            "started": len(g.runs), "completed": g.count("completed"), "collapsed": g.count("collapsed"),
            "diverged": g.count("diverged"),
            "failed": len(g.runs) - g.count("completed") - g.count("collapsed") - g.count("diverged"),
            "collapse_rate": g.count("collapsed") / len(g.runs) if g.runs else math.nan,
            "val_acc_mean": g.val_mean("acc"), "test_best_acc_mean": m, "test_best_acc_sd": sd,
            "test_best_acc_ci": [lo, hi], "test_best_acc_ci_note": why, "test_last_acc_mean": g.stats("last")[0]})
    out_comps = []
    for c in comps:
        out_comps.append({"a": c.best.label, "b": c.other.label, "seeds": [_fmt_value(s) for s in c.seeds],
                          "per_seed_diff": c.diffs, **(c.result or {}), "p_holm": c.p_holm,
                          "significant": bool(c.p_holm < ALPHA) if not math.isnan(c.p_holm) else None,
                          "within_seed": {"b": c.b, "c": c.c, "n": c.n, "mcnemar_p": c.mcnemar},
                          "note": c.note, "sentence": comparison_sentence(c)})
    return {"metric": "acc", "alpha": ALPHA, "test": "paired t over seeds", "selection": "validation",
            "exclude_collapsed": exclude_collapsed, "reference": best.label if best else None,
            "groups": out_groups, "comparisons": out_comps}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="run folders, or folders (e.g. a sweep) holding run folders at any depth")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md and the plots go (default: the DIR when one is given, else ./report)")
    parser.add_argument("--target", type=float, default=None,
                        help="validation accuracy the effective-batch-size section measures steps to (default: the "
                             "highest value every run reached)")
    parser.add_argument("--exclude-collapsed", action="store_true",
                        help="leave collapsed runs out of means and tests (the old view; labelled in the report)")


def run(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.dirs]
    out = args.out if getattr(args, "out", None) is not None else (dirs[0] if len(dirs) == 1 else Path("report"))
    excl = bool(getattr(args, "exclude_collapsed", False))
    report = build_report(dirs, Path(out), getattr(args, "target", None), exclude_collapsed=excl)
    runs = [load_run(d) for d in find_run_dirs(dirs)]
    groups = group_runs(runs)
    for g in groups:
        g.exclude_collapsed = excl
    print(report)
    _, rows = groups_table(groups)
    width = max([len("configuration")] + [len(r[0]) for r in rows])
    print(f"{'configuration':<{width}}  {'runs':>4}  {'test acc (best)':>17}  95% CI")
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>4}  {r[8]:>17}  {r[9]}")
    return 0
