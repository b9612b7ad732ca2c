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
from ebslab.config import UserError, flatten as config_flatten

OK_STATUS = "completed"
GROUP_EXCLUDED_PREFIXES = ("out.", "derived.")
GROUP_EXCLUDED_KEYS = ("train.seed",)
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

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

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
    other: Group
    best: Group
    seeds: list
    n: int
    acc_best: float
    acc_other: float
    b: int  # best right, other wrong
    c: int  # best wrong, other right
    p: float
    p_holm: float = math.nan
    note: str | None = None

    @property
    def diff_pt(self) -> float:
        return 100.0 * (self.acc_best - self.acc_other)


def paired_counts(best_runs: Sequence[Run], other_runs: Sequence[Run], which: str = "best"):
    """Pool per-example correctness over the seeds both ran, matched by (seed, index).

    Returns (seeds, n, acc_best, acc_other, b, c, note); note says why no test is possible.
    """
    import pandas as pd

    by_seed_b = {r.seed: r for r in best_runs}
    by_seed_o = {r.seed: r for r in other_runs}
    seeds = sorted(set(by_seed_b) & set(by_seed_o), key=_sort_value)
    if not seeds:
        return [], 0, math.nan, math.nan, 0, 0, "no seed in common"
    parts = []
    used = []
    for s in seeds:
        pb, po = by_seed_b[s].load_predictions(which), by_seed_o[s].load_predictions(which)
        if pb is None or po is None:
            continue
        m = pd.merge(pb, po, on="index", suffixes=("_b", "_o"))
        if len(m) == 0:
            continue
        if (m["label_b"] != m["label_o"]).any():
            return seeds, 0, math.nan, math.nan, 0, 0, "test labels differ at the same index (not the same test split)"
        parts.append(m)
        used.append(s)
    if not parts:
        return seeds, 0, math.nan, math.nan, 0, 0, f"no predictions/test_{which}.parquet to pair"
    m = pd.concat(parts, ignore_index=True)
    cb = (m["pred_b"] == m["label_b"]).to_numpy()
    co = (m["pred_o"] == m["label_o"]).to_numpy()
    b = int((cb & ~co).sum())
    c = int((~cb & co).sum())
    return used, len(m), float(cb.mean()), float(co.mean()), b, c, None


def compare_to_best(groups: Sequence[Group]) -> tuple[Group | None, list[Comparison]]:
    scored = [g for g in groups if g.ok_runs and not math.isnan(g.stats("best")[0])]
    if not scored:
        return None, []
    best = max(scored, key=lambda g: g.stats("best")[0])
    comps: list[Comparison] = []
    for g in scored:
        if g is best:
            continue
        seeds, n, ab, ao, b, c, note = paired_counts(best.ok_runs, g.ok_runs)
        p = mcnemar_p(b, c) if note is None else math.nan
        comps.append(Comparison(other=g, best=best, seeds=seeds, n=n, acc_best=ab, acc_other=ao, b=b, c=c, p=p,
                                note=note))
    for comp, adj in zip(comps, holm([c.p for c in comps])):
        comp.p_holm = adj
    return best, comps


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.2g}"  # two significant digits: 0.047 must not print as 0.05 next to "significant at 0.05"


def comparison_sentence(comp: Comparison) -> str:
    fb, fo = pair_label(comp.best, comp.other)
    if comp.note:
        return f"{fb} vs {fo}: no paired test ({comp.note})."
    verdict = "significant" if comp.p_holm < ALPHA else "not significant"
    seeds = ", ".join(_fmt_value(s) for s in comp.seeds)
    return (f"{fb} vs {fo}: {comp.diff_pt:+.1f} pt, p = {_fmt_p(comp.p_holm)} (Holm; raw {_fmt_p(comp.p)}), "
            f"{verdict} at {ALPHA:g} — {comp.n} paired test predictions over seed(s) {seeds}, "
            f"{comp.b} right only with the first, {comp.c} only with the second.")


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
    header = ["configuration", "n", "left out", "test acc (best) mean ± std", "95% CI",
              "test acc (last) mean ± std", "95% CI (last)"]
    rows = []
    for g in groups:
        row = [g.label, str(len(g.ok_runs)), str(len(g.runs) - len(g.ok_runs))]
        for which in ("best", "last"):
            m, s, lo, hi = g.stats(which)
            if math.isnan(m):
                row += ["", ""]
                continue
            row.append(f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}")
            row.append(f"[{lo:.4f}, {hi:.4f}]" if not math.isnan(lo) else "n < 2")
        rows.append(row)
    return md_table(header, rows, ["l", "r", "r", "r", "l", "r", "l"]), rows


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


def build_report(run_dirs: list[Path], out_dir: Path, target: float | None = None) -> Path:
    """Read the run folders (or folders holding them), write out_dir/report.md and PNG plots; return report.md."""
    dirs = find_run_dirs(run_dirs)
    names = _run_names(dirs)
    runs = [load_run(d, n) for d, n in zip(dirs, names)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    groups = group_runs(runs)
    order = {id(r): i for i, r in enumerate(r for g in groups for r in g.runs)}
    runs_sorted = sorted(runs, key=lambda r: order[id(r)])
    keys = varying_keys([r.flat for r in runs])
    best, comps = compare_to_best(groups)
    left_out = [r for r in runs_sorted if not r.ok]

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
           "A configuration is every config value except `train.seed`, `out.*` and `derived.*`. "
           "n = completed runs; mean ± sample std; 95% CI from the t-distribution (n − 1 degrees of freedom).", ""]
    gtable, _ = groups_table(groups)
    md += [gtable, ""]

    md += ["## Significance against the best configuration", ""]
    if best is None:
        md.append("No completed run with a test accuracy: nothing to compare.")
    elif not comps:
        md.append(f"Best configuration: {best.label}. No other configuration with completed runs to compare.")
    else:
        md.append(f"Best configuration (highest mean test acc, best checkpoint): **{best.label}**.")
        md.append("")
        md.append("McNemar's exact test (two-sided, binomial on the discordant pairs) on per-example correctness "
                  "from `predictions/test_best.parquet`, pooled over the seeds both configurations ran and matched "
                  f"by (seed, test index); p-values Holm-corrected over the {len(comps)} comparison(s). "
                  "The difference is in accuracy points on the paired examples (best minus other).")
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
    if ebs_json is not None:
        from ebslab.checkpoint import atomic_write_json  # here: the report needs no torch otherwise

        atomic_write_json(out_dir / "report.json", {"ebs_study": ebs_json})

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

    report = out_dir / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md), encoding="utf-8")
    tmp.replace(report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="run folders, or folders (e.g. a sweep) holding run folders at any depth")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md and the plots go (default: the DIR when one is given, else ./report)")
    parser.add_argument("--target", type=float, default=None,
                        help="validation accuracy the effective-batch-size section measures steps to (default: the "
                             "highest value every run reached)")


def run(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.dirs]
    out = args.out if getattr(args, "out", None) is not None else (dirs[0] if len(dirs) == 1 else Path("report"))
    if len(dirs) == 1 and (dirs[0] / "study.json").is_file():  # an `ebslab tune` study: verdict, search, plots
        from ebslab.tune import report_study

        print(report_study(dirs[0], Path(out)))
        return 0
    report = build_report(dirs, Path(out), getattr(args, "target", None))
    runs = [load_run(d) for d in find_run_dirs(dirs)]
    groups = group_runs(runs)
    print(report)
    _, rows = groups_table(groups)
    width = max([len("configuration")] + [len(r[0]) for r in rows])
    print(f"{'configuration':<{width}}  {'n':>3}  {'test acc (best)':>17}  95% CI")
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>3}  {r[3]:>17}  {r[4]}")
    return 0
