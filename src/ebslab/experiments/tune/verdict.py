"""The end of `ebslab tune`: the confirmation verdict (the report's comparison) and `ebslab report STUDY_DIR`."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

from ebslab.core.errors import UserError
from ebslab.core.metrics import higher_is_better
from ebslab.core.tables import md_table
from ebslab.experiments.tune.studyfile import is_number


# ----------------------------------------------------------------------------------------------------------
# The verdict: the report's comparison of the winner candidate with the runner-up.


def confirmation_verdict(root: Path, metric: str) -> dict[str, Any]:
    """The verdict that `ebslab report` of the confirmation runs (STUDY/confirm) gives, from the same numbers.

    The candidate is the configuration best on mean validation `metric` over the fresh seeds (the report's
    reference; test never chooses), the runner-up the second best; the candidate is the winner when the
    report's comparison of the two (test `metric` at the best checkpoint, paired by seed, paired t-test over
    seeds, Holm-corrected as the report corrects it) puts it ahead beyond seed noise."""
    from ebslab.analysis import compare, render, runs
    from ebslab.analysis import report as rp

    try:
        _, _, groups, result = rp.analyse_dirs([root / "confirm"], metric)
    except UserError:  # no confirmation run folder was written
        return {"winner": None, "text": "no confirmation run finished: no verdict", "table": []}
    sign = 1.0 if higher_is_better(metric) else -1.0
    names = [g.runs[0].path.name.split(",seed=")[0] for g in groups]  # confirm/trial-0003,seed=11 -> trial-0003
    summaries = result["groups"]
    ranked = sorted((i for i, g in enumerate(summaries) if is_number(g["val_mean"])),
                    key=lambda i: (-sign * summaries[i]["val_mean"], i))
    table = [{"config": names[i], "n": summaries[i]["n_scored"], f"val_{metric}": summaries[i]["val_mean"],
              f"test_{metric}": summaries[i]["test_mean"]} for i in ranked]
    if len(ranked) < 2:
        return {"winner": None, "text": "fewer than two confirmed configurations finished: no verdict",
                "table": table}
    first, second = ranked[0], ranked[1]
    assert first == result["reference_index"]  # the report's reference: the same rule, the same tie-break
    label = runs.pair_label(groups[second], groups[first])[0]
    comp = next(c for c in result["comparisons"] if c["a"] == label)  # runner-up minus candidate
    lo, hi = comp["t_ci"] if comp["ci_note"] is not None else comp["ci"]
    kind = "paired t-interval" if comp["ci_note"] is not None else "crossed bootstrap"
    numbers = (f"{render.fmt_diff(-comp['estimate'], metric)} on test {metric} (mean of {comp['n_seeds']} per-seed "
               f"differences on fresh seeds, 95% {kind} {render.fmt_ci(-hi, -lo, metric)}; "
               f"{'paired t-test' if comp['p_test'] == 't' else 'exact sign-flip test (every seed tied)'} over seeds "
               f"p = {render.fmt_p(comp['p_holm'])})")
    significant = comp["p_holm"] < compare.ALPHA
    won = significant and sign * comp["estimate"] < 0  # the estimate is runner-up minus candidate
    a, b = names[first], names[second]
    if won:
        text = f"winner: {a}, better than the runner-up {b} by {numbers}"
    elif significant:
        text = (f"no winner: {a} is best on val/{metric} but {b} is better on test by "
                f"{render.fmt_diff(comp['estimate'], metric)}, beyond seed noise; validation and test disagree")
    else:
        text = f"indistinguishable: {a} and {b} differ by {numbers}: within seed noise, no winner"
    return rp.json_num({"winner": a if won else None, "runner_up": b,
                         "metric": f"test/{metric}", "comparison": comp, "text": text, "table": table})


def nothing_to_rank(trials: list[dict], space_size: float) -> str | None:
    """Why the confirmation cannot name a winner before it runs, or None: fewer than two distinct configurations
    of the search learned (completed with a value; a collapsed trial, at the majority-class rate, is never
    promoted). `trials` are study.json's entries."""
    learned = {json.dumps(t["params"], sort_keys=True, default=str) for t in trials
               if t["status"] == "completed" and is_number(t["value"])}
    if len(learned) >= 2:
        return None
    tried = {json.dumps(t["params"], sort_keys=True, default=str) for t in trials}
    counts = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    if space_size < 2:
        why = f"the search space holds {space_size:g} configuration: widen it"
    elif len(tried) < 2:
        why = f"the {len(trials)} trial(s) tried {len(tried)} distinct configuration: raise trials or widen the space"
    else:
        why = ("the others collapsed (never left the majority-class rate), were pruned or failed: raise trials, "
               "widen the space, or change the base (lr, epochs) so that runs learn")
    return (f"nothing to rank: {len(learned)} distinct configuration(s) of the search learned ("
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"), and a winner needs two; {why}")


# ----------------------------------------------------------------------------------------------------------
# The report section (read from study.json and the run folders only).


def report_study(study_dir: Path, out_dir: Path) -> Path:
    """`ebslab report STUDY_DIR`: the confirmation runs' report (seed-aware), then the search: verdict, table,
    optimization history and parameter importances (Optuna's own plots, from study.json)."""
    from ebslab.analysis.report import build_report

    try:
        index = json.loads((study_dir / "study.json").read_text())
        metric = index["objective"].split("/", 1)[1]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"'{study_dir / 'study.json'}' is damaged ({type(e).__name__}: {str(e)[:100]}); rewrite it "
                        "with `ebslab tune STUDY.yaml --resume` (it is rebuilt from the study's storage)") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    confirm_dir = study_dir / "confirm"
    # on the study's metric: the verdict in study.json is this report's comparison
    report = build_report([confirm_dir], out_dir, metric=metric) \
        if confirm_dir.is_dir() and any(confirm_dir.iterdir()) else None
    md = [f"# ebslab tune: {index['name']}", "",
          f"Objective {index['objective']} ({index['direction']}), sampler {index['sampler']}, pruner "
          f"{index['pruner']['name']}" + (f" at every {index['every_examples']} examples seen"
                                          if index['pruner']['name'] != 'none' else "")
          + f"; {len(index['trials'])} of {index['trials_asked']} trials: "
          + ", ".join(f"{n} {s}" for s, n in index["counts"].items()) + ".", ""]
    md += _verdict_section(index, metric)
    rows = [[t["folder"], t["status"], "-" if t["value"] is None else f"{t['value']:.4f}", format_params(t["params"])]
            for t in index["trials"]]
    md += ["## Search trials", "", md_table(["trial", "status", index["objective"], "params"], rows,
                                           ["l", "l", "r", "l"]), ""]
    plots = _study_plots(index, out_dir)
    for p in plots:
        md += [f"![{p.stem}]({p.name})", ""]
    text = "\n".join(md)
    if report is not None:
        text += "\n\n" + report.read_text().replace("# ebslab report", "# Confirmation runs (seed-aware report)", 1)
    path = out_dir / "report.md"
    from ebslab.core.files import atomic_write_text

    atomic_write_text(path, text)
    return path


def _verdict_section(index: dict, metric: str) -> list[str]:
    """The verdict's lines, then the confirmed configurations' table when the confirmation ran."""
    verdict = index.get("verdict")
    md = ["## Verdict", "", (verdict or {}).get("text", "confirmation not finished"), ""]
    if not (verdict and verdict.get("table")):
        return md
    md += [f"Confirmation on fresh seeds: ranked by the validation objective (mean over seeds); the verdict "
           f"compares the first two on test {metric} as the seed-aware report below does.", ""]
    params = {t["folder"]: t["params"] for t in index["trials"]}
    rows = [[row["config"], format_params(params.get(row["config"], {})), row["n"],
             *(("-" if v is None else f"{v:.4f}") for v in (row[f"val_{metric}"], row[f"test_{metric}"]))]
            for row in verdict["table"]]
    return md + [md_table(["configuration", "params", "seeds", f"val {metric} (mean)", f"test {metric} (mean)"],
                          rows, ["l", "l", "r", "r", "r"]), ""]


def format_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# Fewer completed trials than this: the parameter importance plot carries a caveat (fANOVA on a handful of
# points ranks noise as readily as an effect).
FEW_TRIALS_FOR_IMPORTANCE = 20


def _study_plots(index: dict, out_dir: Path) -> list[Path]:
    """Optuna's matplotlib plots on an in-memory copy of the search rebuilt from study.json, relabelled in the
    report's style: trials by folder and status, examples seen (not Optuna's "Step"), and a caveat on parameter
    importance from few trials."""
    from ebslab.analysis import figures

    plt = figures.pyplot()  # the Agg backend before Optuna draws: no display needed
    study, names = _search_as_optuna_study(index)
    words = _plot_words(index["objective"], study, names)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is "experimental"
        from optuna.visualization import matplotlib as ovm

        for name, plot in (("search_history", ovm.plot_optimization_history),
                           ("param_importances", ovm.plot_param_importances),
                           ("intermediate_values", ovm.plot_intermediate_values)):
            try:
                ax = plot(study)
            except Exception:  # e.g. importances need two completed trials and a parameter that varies
                continue
            fig = ax.figure if hasattr(ax, "figure") else plt.gcf()
            _restyle(ax, name, words[name])
            out.append(figures.save(fig, out_dir / f"{name}.png"))
    return out


@dataclasses.dataclass(frozen=True)
class PlotWords:
    """What one of Optuna's plots says in the report: its title, axis labels and legend (Optuna's legend entries
    renamed by `entries`), and a caveat printed under it."""
    title: str
    xlabel: str
    ylabel: str
    entries: dict[str, str]
    legend_title: str | None = None
    legend: bool = True
    caveat: str | None = None


def _search_as_optuna_study(index: dict) -> tuple[Any, dict[str, str]]:
    """An in-memory Optuna study holding study.json's trials over the current space (a trial of another space is
    left out), and Optuna's trial names ("Trial<n>", in this order) -> "trial-NNNN (status)"."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    dists = {k: json_to_distribution(v) for k, v in index["space"].items()}
    study = optuna.create_study(direction=index["direction"])
    names: dict[str, str] = {}
    for t in index["trials"]:
        state = {"completed": TrialState.COMPLETE, "collapsed": TrialState.COMPLETE,
                 "pruned": TrialState.PRUNED}.get(t["status"], TrialState.FAIL)
        if state == TrialState.COMPLETE and t["value"] is None:
            state = TrialState.FAIL
        if set(t["params"]) != set(dists):
            continue
        names[f"Trial{len(names)}"] = f"{t.get('folder', f'trial {len(names)}')} ({t['status']})"
        study.add_trial(optuna.create_trial(
            state=state, value=t["value"] if state == TrialState.COMPLETE else None, params=t["params"],
            distributions=dists, intermediate_values={int(k): v for k, v in t["intermediate"].items()}))
    return study, names


def _plot_words(objective: str, study: Any, names: dict[str, str]) -> dict[str, PlotWords]:
    """Each plot's words: the objective by its metric's label, trials by folder, a caveat on few trials."""
    from optuna.trial import TrialState

    from ebslab.analysis import figures

    completed = sum(1 for t in study.trials if t.state == TrialState.COMPLETE)
    few = (f"From {completed} completed trial(s): a rough ranking at best; importances need tens of trials to "
           f"settle." if completed < FEW_TRIALS_FOR_IMPORTANCE else None)
    return {
        "search_history": PlotWords(
            title="Objective by trial", xlabel="Trial (in the order the search ran them)",
            ylabel=figures.metric_label(objective),
            entries={"Objective Value": f"a completed trial's {objective} (best checkpoint)",
                     "Best Value": "best so far"}),
        "param_importances": PlotWords(
            title="Parameter importance", xlabel="Importance (share of the objective's variance, fANOVA)",
            ylabel="Searched config key", entries={}, legend=False, caveat=few),
        "intermediate_values": PlotWords(
            title="Objective during training by trial", xlabel="Training examples seen",
            ylabel=figures.metric_label(objective), entries=names,
            legend_title="one line per trial; a line that stops was pruned there"),
    }


def _restyle(ax: Any, name: str, words: PlotWords) -> None:
    """Rename Optuna's legend entries on their artists, then let figures.style draw title, labels and legend."""
    from ebslab.analysis import figures

    if ax.get_legend() is not None:
        for artist in ax.get_children():
            text = artist.get_label() if hasattr(artist, "get_label") else ""
            if text in words.entries:
                artist.set_label(words.entries[text])
    if name == "search_history":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole numbers
    figures.style(ax, title=words.title, xlabel=words.xlabel, ylabel=words.ylabel,
                  legend_title=words.legend_title, caveat=words.caveat, legend=words.legend)
