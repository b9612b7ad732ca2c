"""Run folders as the report reads them: a `Run` per folder (through ebslab.core.runfolder only), the
configurations (`Group`) and their seeds (`Replicate`) by ebslab.analysis.replicates' rule, and the runs that
are comparable (one data fingerprint).

A configuration is what is trained: keys that provably do not change it never split one, and runs of one
configuration and seed count once. Run folders from before summary.json judged the whole validation history are
judged here (`history_status`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ebslab.analysis import replicates
from ebslab.core import runfolder
from ebslab.core.config import flatten as config_flatten
from ebslab.core.errors import UserError
from ebslab.core.metrics import run_history

OK_STATUS = "completed"
SCORED_STATUS = ("completed", "collapsed", "diverged")  # runs that score: collapsed with theirs, diverged by rule
COUNTED_STATUS = ("completed", "collapsed", "diverged", "failed")
# A configuration is what is trained: keys that provably do not change it never split one (ebslab.analysis.replicates).
GROUP_EXCLUDED_PREFIXES = replicates.NON_TRAINING_PREFIXES


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
        values = {replicates.hashable(cfg.get(k, MISSING)) for cfg in flat_configs}
        if len(values) > 1:
            result.append(k)
    return result


class _Missing:
    def __repr__(self) -> str:
        return "—"


MISSING = _Missing()


def fmt_value(v: Any) -> str:
    if v is MISSING or v is None:
        return "—" if v is MISSING else "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ",".join(fmt_value(x) for x in v) + "]"
    return str(v)


def sort_value(v: Any) -> tuple:
    if isinstance(v, bool):
        return (1, str(v))
    if isinstance(v, (int, float)):
        return (0, float(v))
    return (1, fmt_value(v))


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
        return num(block.get(metric))

    def val(self, metric: str) -> float:
        if self.status == "diverged":
            return diverged_score(self, metric)
        return num(((self.summary or {}).get("val_best") or {}).get(metric))

    def duration(self) -> float:
        d = num((self.summary or {}).get("duration_s"))
        if math.isnan(d):
            times = [num(r.get("elapsed_s")) for r in self.records if "elapsed_s" in r]
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
        return max(evals, key=lambda r: num(r.get("val/acc"), -math.inf))

    def load_predictions(self, which: str = "best"):
        if which not in self.predictions:
            self.predictions[which] = runfolder.read_predictions(self.path, which)
        return self.predictions[which]


def diverged_score(run: Run, metric: str) -> float:
    """THE rule for how a diverged run scores (its weights are NaN: it has no test predictions): as a model that
    learned nothing, the majority-class rate (summary.json's `majority_rate`) for accuracy; no score for any
    other metric (it then counts as a missing seed, and says so)."""
    return num((run.summary or {}).get("majority_rate")) if metric == "acc" else math.nan


def history_status(summary: dict, records: Sequence[dict]) -> tuple[str, bool] | None:
    """(status, fell_back) of a run folder written before summary.json judged the whole validation history:
    run_history over its eval lines' val/acc, with the majority rate and val size from summary.json. None
    when the summary already judged it, the run did not finish, or what it needs was not recorded."""
    status = summary.get("status")
    if "fell_back" in summary or status not in ("completed", "collapsed"):
        return None
    majority = num(summary.get("majority_rate"))
    n_val = num((summary.get("val_best") or {}).get("n"))
    accs = [num(r.get("val/acc")) for r in records if r.get("event") == "eval"]
    accs = [a for a in accs if not math.isnan(a)]
    if math.isnan(majority) or math.isnan(n_val) or not accs:
        return None
    h = run_history(accs, majority, int(n_val))
    if status == "collapsed" and not h["collapsed"]:
        return "completed", h["fell_back"]
    if status == "completed" and h["collapsed"]:
        return "collapsed", False
    return status, h["fell_back"]


def num(v: Any, default: float = math.nan) -> float:
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


def run_names(dirs: Sequence[Path]) -> list[str]:
    """Folder names; paths relative to the common parent where names collide."""
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    resolved = [d.resolve() for d in dirs]
    common = Path(os.path.commonpath([str(r) for r in resolved]))
    return [str(r.relative_to(common)) or r.name for r in resolved]


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


def group_runs(runs: Sequence[Run]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for r in runs:
        groups.setdefault(r.group_key(), Group(key=r.group_key(), runs=[])).runs.append(r)
    glist = list(groups.values())
    keys = varying_keys([g.config for g in glist])
    for g in glist:
        cfg = g.config
        g.label = ", ".join(f"{k}={fmt_value(cfg.get(k, MISSING))}" for k in keys) or "all runs"
        g.runs.sort(key=lambda r: (sort_value(r.seed), r.name))
        by_seed: dict[Any, list[Run]] = {}
        for r in g.runs:
            by_seed.setdefault(replicates.hashable(r.seed), []).append(r)
        g.replicates = [Replicate(seed=runs_[0].seed, runs=runs_) for runs_ in by_seed.values()]
    glist.sort(key=lambda g: tuple(sort_value(g.config.get(k, MISSING)) for k in keys))
    return glist


def pair_label(a: Group, b: Group) -> tuple[str, str]:
    """Names of two configurations by the keys in which they differ."""
    ca, cb = a.config, b.config
    keys = varying_keys([ca, cb])
    if not keys:
        return a.label, b.label
    fa = ", ".join(f"{k}={fmt_value(ca.get(k, MISSING))}" for k in keys)
    fb = ", ".join(f"{k}={fmt_value(cb.get(k, MISSING))}" for k in keys)
    return fa, fb


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

