"""The report's words: numbers formatted, sentences that say what a comparison found, and the markdown tables
(through tabulate, `md_table`). Everything here takes the numbers `ebslab.analysis.compare` made (dicts) or runs,
and returns text; nothing is computed that report.json does not already hold.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence


from ebslab.analysis.compare import ALPHA
from ebslab.analysis.runs import MISSING, Run, fmt_value, num, scored_statuses
from ebslab.core.metrics import higher_is_better
from ebslab.core.tables import md_table

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


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.2g}"  # two significant digits: 0.047 must not print as 0.05 next to "significant at 0.05"


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


def _pt(v: float, metric: str) -> str:
    return fmt_diff(v, metric).lstrip("+")


def _fmt_range(lo: float, hi: float, metric: str | None) -> str:
    fmt = (lambda v: _pt(v, metric)) if metric else _fmt_seeds
    return f"{fmt(lo)} to {fmt(hi)}"


def _seed_list(seeds: Sequence[Any]) -> str:
    return ", ".join(fmt_value(s) for s in seeds)


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
    parts = [f"seed {fmt_value(m['seed'])} of {m['config']} ({m['why']})" for m in c["missing"]]
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
        lines = [f"{head}: {est} on one seed (seed {fmt_value(c['seeds'][0])}). One seed cannot separate the "
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


def _fmt_num(v: float, digits: int = 4) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.{digits}f}"


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
        ("train acc", lambda r: num(r.best_eval().get("train/acc")), 4, True),
        ("train loss", lambda r: num(r.best_eval().get("train/loss")), 4, False),
        ("val acc", lambda r: num(((r.summary or {}).get("val_best") or {}).get("acc")), 4, True),
        ("val loss", lambda r: num(((r.summary or {}).get("val_best") or {}).get("loss")), 4, False),
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
            + [fmt_value(r.flat.get(k, MISSING)) for k in keys]
            + [fmt_value(r.flat.get(k, MISSING)) for _, k in fixed] for r in runs]
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
# The report's sections (markdown lines), in the order report.md shows them


def intro(result: dict, n_runs: int, n_groups: int, keys: Sequence[str]) -> list[str]:
    """The head of report.md: what was read, what is compared, and the rules every number below follows."""
    metric, exclude_collapsed = result["metric"], result["exclude_collapsed"]
    md: list[str] = ["# ebslab report", ""]
    md.append(f"{n_runs} run(s) in {n_groups} configuration(s); headline metric: test `{metric}` at the "
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
    return md


def what_mattered(result: dict) -> list[str]:
    """Main effects, confounded keys, replicates that ran more than once, and the non-training keys checked."""
    metric = result["metric"]
    md: list[str] = []
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
                          f"{lab} seed {fmt_value(r['seed'])} by {r['spread']:.4g} over {r['runs']} runs"
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
    return md


def runs_section(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """One row per run, in the configurations' order."""
    return ["## Runs", "",
            "One row per run. train acc/loss: the training pass's running means over the epoch of the best "
            "checkpoint; val: best checkpoint; test acc, loss, ECE: best-val checkpoint; test acc (last): last "
            "checkpoint; lr: after scaling. **Bold**: best value of the column among completed runs. "
            "⚠: run did not complete.", "",
            runs_table(runs, keys), ""]


def configurations_section(result: dict) -> list[str]:
    metric, exclude_collapsed = result["metric"], result["exclude_collapsed"]
    md: list[str] = []
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
    return md + [gtable, ""]


def comparisons_section(result: dict) -> list[str]:
    metric, n_boot = result["metric"], result["n_boot"]
    md: list[str] = []
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
    return md


def plots_section(plots: Sequence[Path]) -> list[str]:
    md = ["## Plots", ""]
    for p in plots:
        md += [f"![{p.stem}]({p.name})", ""]
    return md


def left_out_section(runs: Sequence[Run], result: dict) -> list[str]:
    """Runs without a score in the means (named, with why), diverged runs scored by the rule, and completed runs
    that logged warnings."""
    metric, scored_status = result["metric"], scored_statuses(result["exclude_collapsed"])
    left_out = [r for r in runs if r.status not in scored_status or math.isnan(r.test("best", metric))]
    md: list[str] = []
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
    diverged = [r for r in runs if r.status == "diverged" and r.status in scored_status
                and not math.isnan(r.test("best", metric))]
    if diverged:
        md += ["", "Diverged runs, scored by the rule (the majority-class rate) in the means and tests:", ""]
        md += [f"- `{r.name}`: {r.test('best', metric):.4f}" + (f" ({r.message})" if r.message else "")
               for r in diverged]
    warned = [r for r in runs if r.ok and r.warnings]
    if warned:
        md += ["", "Completed runs that logged warnings:", ""]
        for r in warned:
            md.append(f"- `{r.name}`: " + "; ".join(f"{w.get('kind')} at step {w.get('step')}: {w.get('message')}"
                                                     for w in r.warnings))
    md.append("")
    return md
