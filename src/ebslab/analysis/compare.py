"""The report's numbers, from configurations and arrays: no file is written and no markdown made here.

- Nothing is selected on test: the reference is the configuration with the best mean validation metric.
- Every run counts: collapsed runs with their score, diverged runs by `diverged_score`, failed seeds named as
  missing in each comparison (`exclude_collapsed` gives the old view).
- The seed is the unit of replication: A vs B pairs seeds; estimate = mean per-seed difference, crossed bootstrap
  interval next to the paired t-interval, P(A better) with a Clopper-Pearson interval, paired t-test p (exact
  sign-flip where every seed ties), Holm over every comparison and main effect together, power at Holm's first
  level for `detect`; McNemar only within a seed, as secondary evidence; one seed gives no p-value.

Every statistic is ebslab.analysis.stats'; this module pairs runs and arrays and says which seeds enter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ebslab.analysis import replicates, stats
from ebslab.analysis.report_args import DETECT_PT
from ebslab.analysis.runs import (MISSING, SCORED_STATUS, COUNTED_STATUS, Group, Replicate, Run, fmt_value,
                                  scored_statuses, sort_value, varying_keys, pair_label)
from ebslab.core.metrics import higher_is_better, metric_value

ALPHA = 0.05


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
    for s in sorted(set(by_a) & set(by_b), key=sort_value):
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
    missing = [str(fmt_value(cell[0].seed)) for cell in per_seed if any(p.rows is None for p in cell)]
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
        "label": g.label, "config": {k: fmt_value(v) for k, v in g.config.items()},
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
        "ci": [lo, hi], "ci_note": why, **_test_numbers(res),
        "disagreements": [b_ + c_ for b_, c_ in disagree],
        "disagreement_seeds": [p.seed for p in with_rows],
        "examples": [p.n_examples for p in with_rows],
        "mcnemar_p": [stats.mcnemar_p(b_, c_) for b_, c_ in disagree],
        "missing": _missing_seeds(a, la, paired, keep, metric, b) + _missing_seeds(b, lb, paired, keep, metric, a),
    }


def _rest(config: dict, key: str) -> tuple:
    return tuple((k, replicates.hashable(v)) for k, v in sorted(config.items()) if k != key)


def _level_of(config: dict, key: str) -> Any:
    return replicates.hashable(config.get(key, MISSING))


def confounded_keys(groups: Sequence[Group]) -> list[str]:
    """Varying keys that no two configurations differ in alone (a search's lr and EBS): their effects cannot be
    told apart, so no main effect is estimated for them."""
    configs = [g.config for g in groups]
    out = []
    for key in varying_keys(configs):
        rests: dict[tuple, set] = {}
        for c in configs:
            rests.setdefault(_rest(c, key), set()).add(_level_of(c, key))
        if not any(len(levels) > 1 for levels in rests.values()):
            out.append(key)
    return out if len(out) > 1 else []


def main_effects(groups: Sequence[Group], metric: str, exclude_collapsed: bool,
                 n_boot: int, rng: np.random.Generator) -> list[dict]:
    """Per varying key: each level vs the level best on validation, paired by seed AND by the other keys; the
    per-seed difference averages over the other keys' combinations both levels ran with that seed. Keys that
    vary only together with others (`confounded_keys`) get none. Ranked by the size of the estimate."""
    confounded = set(confounded_keys(groups))
    effects = []
    for key in varying_keys([g.config for g in groups]):
        if key in confounded:
            continue
        val_by_level = _val_mean_by_level(groups, key, metric, exclude_collapsed)
        best = _best_level(val_by_level, metric)
        if best is None:
            continue
        base = _seed_units(groups, key, best, metric, exclude_collapsed)
        for level in val_by_level:
            if level != best:
                other = _seed_units(groups, key, level, metric, exclude_collapsed)
                numbers, group_pairs = _level_effect(base, other, metric, exclude_collapsed, n_boot, rng)
                effects.append({"key": key, "level": fmt_value(level), "vs": fmt_value(best), **numbers,
                                "val_mean": val_by_level[level], "vs_val_mean": val_by_level[best],
                                "groups": group_pairs})
    effects.sort(key=lambda e: -abs(e["estimate"]) if not math.isnan(e["estimate"]) else math.inf)
    return effects


def _val_mean_by_level(groups: Sequence[Group], key: str, metric: str, exclude_collapsed: bool) -> dict[Any, float]:
    """Each level of `key` (in sort order) -> mean validation metric of its scored replicates (NaN: none)."""
    keep = scored_statuses(exclude_collapsed)
    levels = sorted({_level_of(g.config, key) for g in groups}, key=sort_value)
    out = {}
    for level in levels:
        vals = [v for g in groups if _level_of(g.config, key) == level
                for v in (rep.val(metric, keep) for rep in g.scored_replicates(metric, exclude_collapsed))
                if not math.isnan(v)]
        out[level] = float(np.mean(vals)) if vals else math.nan
    return out


def _best_level(val_by_level: dict[Any, float], metric: str) -> Any | None:
    """The level best on validation; None when fewer than two levels have a validation mean."""
    ranked = [level for level, val in val_by_level.items() if not math.isnan(val)]
    if len(ranked) < 2:
        return None
    return max(ranked, key=lambda level: _direction(metric) * val_by_level[level])


def _seed_units(groups: Sequence[Group], key: str, level: Any, metric: str,
                exclude_collapsed: bool) -> dict[tuple, tuple[Replicate, str]]:
    """A level's scored replicates keyed by (the other keys' values, seed): the unit a main effect pairs on."""
    out = {}
    for g in groups:
        if _level_of(g.config, key) != level:
            continue
        for rep in g.scored_replicates(metric, exclude_collapsed):
            out[(_rest(g.config, key), replicates.hashable(rep.seed))] = (rep, g.label)
    return out


def _level_effect(base: dict[tuple, tuple[Replicate, str]], other: dict[tuple, tuple[Replicate, str]], metric: str,
                  exclude_collapsed: bool, n_boot: int, rng: np.random.Generator) -> tuple[dict, list[tuple]]:
    """One level (`other`) against the best (`base`): per seed, the mean difference over the units both have.
    Returns the effect's numbers and the (level's, best's) configuration labels that were paired."""
    keep = scored_statuses(exclude_collapsed)
    per_seed: dict[Any, list[PairedSeed]] = {}
    group_pairs = set()
    for unit in sorted(set(base) & set(other), key=lambda u: (sort_value(u[1]), str(u[0]))):
        for pair in pair_by_seed([other[unit][0]], [base[unit][0]], metric, keep):
            per_seed.setdefault(unit[1], []).append(pair)
            group_pairs.add((other[unit][1], base[unit][1]))
    seeds = sorted(per_seed, key=sort_value)
    d = [float(np.mean([p.value_a - p.value_b for p in per_seed[s]])) for s in seeds]
    res = compare(d, metric)
    lo, hi, why = bootstrap_interval_cells([per_seed[s] for s in seeds], metric, n_boot, rng)
    return {"seeds": seeds, "differences": d, "estimate": res["estimate"], "sd": res["sd"], "n_seeds": res["n_seeds"],
            "ci": [lo, hi], "ci_note": why, "combinations": [len(per_seed[s]) for s in seeds],
            **_test_numbers(res)}, sorted(group_pairs)


def _test_numbers(res: dict) -> dict:
    """A comparison's and a main effect's fields from `compare`: t-interval, the tests' p (Holm added later),
    P(A better)."""
    return {"t_ci": [res["t_low"], res["t_high"]], "t_ci_note": res["t_note"],
            "p": res["p"], "p_test": res["p_test"], "p_t": res["p_t"], "p_sign_flip": res["p_sign_flip"],
            "p_min": res["p_min"], "p_holm": math.nan,
            "prob_improvement": [res["p_better"], res["p_better_low"], res["p_better_high"]]}


def ignored_key_checks(runs: Sequence[Run], metric: str) -> list[dict]:
    """For each non-training key the runs vary: were runs of the same configuration and seed identical?"""
    keys = sorted({k for r in runs for k in r.flat if not replicates.changes_training(k) and k != "train.seed"
                   and not k.startswith(("out.", "derived."))})
    keys = [k for k in keys if len({replicates.hashable(r.flat.get(k, MISSING)) for r in runs}) > 1]
    checks = []
    for key in keys:
        cells: dict[tuple, dict] = {}
        for r in runs:
            if r.status not in SCORED_STATUS:
                continue
            cell = cells.setdefault((r.group_key(), replicates.hashable(r.seed)), {})
            cell[replicates.hashable(r.flat.get(key, MISSING))] = r.test("best", metric)
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

