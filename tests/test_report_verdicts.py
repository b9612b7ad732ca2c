"""The report's verdicts in the cases real studies are in: replicates, ties, missing and diverged seeds, one Holm
family, power for --detect, data fingerprints, confounded keys, old run folders re-judged; every generated sentence
branch. Hand-written run folders only (no training)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ebslab.analysis import render, report_figures, stats
from ebslab.analysis import runs as run_folders
from ebslab.cli import main
from test_report import _edit_config, _report, make_run


def _set(**values):
    """An edit of config.yaml: dotted key -> value."""
    def edit(cfg):
        for key, v in values.items():
            *path, leaf = key.split(".")
            node = cfg
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = v
    return edit


def _summary(run_dir, **fields):
    path = run_dir / "summary.json"
    s = json.loads(path.read_text())
    s.update(fields)
    path.write_text(json.dumps(s))
    return run_dir


def _line(md: str, start: str) -> str:
    return next(ln for ln in md.splitlines() if ln.startswith(start))


def _block(md: str, start: str) -> str:
    """A comparison's bullet and its indented lines."""
    lines = md.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(start))
    out = [lines[i]]
    for ln in lines[i + 1:]:
        if not ln.startswith("  "):
            break
        out.append(ln)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- replicates


def test_runs_differing_only_in_backend_are_one_replicate(tmp_path):
    """exp2-ebs.yaml's structure: train.backend varies. 3 seeds x 2 backends per EBS: each seed counts once (the
    group's n is 3, not 6, and its interval is the 3-seed one), the comparison pairs 3 seeds, and the report says
    the two backends' runs agree."""
    runs = tmp_path / "sw"
    acc = {(64, 1): 0.90, (64, 2): 0.92, (64, 3): 0.91, (256, 1): 0.86, (256, 2): 0.89, (256, 3): 0.85}
    for (ebs, seed), a in acc.items():
        for backend in ("torch", "accelerate"):
            _edit_config(make_run(runs, f"e{ebs}-{backend}-s{seed}", ebs=ebs, seed=seed, test_acc=a,
                                  val_acc=0.9 if ebs == 64 else 0.8), _set(**{"train.backend": backend}))
    md, rep = _report(tmp_path, runs)
    groups = {g["label"]: g for g in rep["groups"]}
    assert set(groups) == {"batch.effective=64", "batch.effective=256"}
    g = groups["batch.effective=64"]
    assert (g["started"], g["n_seeds"], g["n_scored"], g["completed"]) == (6, 3, 3, 3)
    lo, hi, _ = stats.t_interval([0.90, 0.92, 0.91], 0.95, (0, 1))
    assert g["test_ci"] == pytest.approx([lo, hi])  # 3 seeds; six "runs" would give an interval 2.6x narrower
    [c] = rep["comparisons"]
    assert c["seeds"] == [1, 2, 3] and c["differences"] == pytest.approx([-0.04, -0.03, -0.06])
    assert "their runs agree on test acc. Each seed counts once." in md
    assert "Replicates: 6 seed(s) ran more than once" in md
    assert "`train.backend` varies but does not change what is trained" in md


def test_replicates_that_disagree_count_once_with_their_mean_and_are_named(tmp_path):
    runs = tmp_path / "sw"
    for seed in (1, 2):
        make_run(runs, f"a-s{seed}", ebs=64, seed=seed, test_acc=0.90, val_acc=0.9)
        make_run(runs, f"b-s{seed}-m16", ebs=256, seed=seed, test_acc=0.80, val_acc=0.8)
    make_run(runs, "b-s1-m8", ebs=256, seed=1, test_acc=0.84, val_acc=0.8, micro=8)
    md, rep = _report(tmp_path, runs)
    [c] = rep["comparisons"]
    assert c["differences"] == pytest.approx([0.82 - 0.90, 0.80 - 0.90])  # seed 1 once: the mean of its 2 runs
    assert "batch.effective=256 seed 1 by 0.04 over 2 runs" in md


def test_pair_by_seed_keeps_every_run_of_a_seed():
    a = run_folders.Replicate(seed=1, runs=[])
    assert math.isnan(a.test("best", "acc"))  # nothing scored: no value, never a silent pick


# ---------------------------------------------------------------------------------------------- ties, p, power


def test_a_tie_gives_the_sign_flip_p_and_says_so(tmp_path):
    runs = tmp_path / "sw"
    for seed in (1, 2, 3):
        make_run(runs, f"a{seed}", ebs=64, seed=seed, test_acc=0.90, val_acc=0.9)
        make_run(runs, f"b{seed}", ebs=256, seed=seed, test_acc=0.85, val_acc=0.8)
    md, rep = _report(tmp_path, runs)
    [c] = rep["comparisons"]
    assert c["p_test"] == "sign-flip" and c["p"] == 0.25 and c["p_t"] is None and c["p_min"] == 0.25
    assert c["p_holm"] == pytest.approx(0.25)  # the main effect is the same test: a family of one
    block = _block(md, "- batch.effective=256 vs")
    assert "every seed gave the same difference, so the t statistic is undefined: exact sign-flip test" in block
    assert "the smallest a sign-flip test over 3 seeds allows being 0.25; not significant" in block
    assert "p = 0 " not in md and "< 0.001" not in block


def test_t_branch_power_and_detect(tmp_path):
    runs = tmp_path / "sw"
    a = {1: 0.90, 2: 0.92, 3: 0.91, 4: 0.93}
    b = {1: 0.86, 2: 0.89, 3: 0.85, 4: 0.88}
    for seed in a:
        make_run(runs, f"a{seed}", ebs=64, seed=seed, test_acc=a[seed], val_acc=0.9)
        make_run(runs, f"b{seed}", ebs=256, seed=seed, test_acc=b[seed], val_acc=0.8)
    out = tmp_path / "out"
    assert main(["report", str(runs), "--out", str(out), "--detect", "2.0"]) == 0
    rep = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    [c] = rep["comparisons"]
    d = np.array([b[s] - a[s] for s in a])
    level = 0.05  # the main effect is the comparison's own test: a family of one
    assert rep["detect"] == pytest.approx(0.02) and rep["power_level"] == pytest.approx(level)
    pw = c["power"]
    sd_lo, sd_hi = stats.sd_interval(d.std(ddof=1), 4)
    assert pw["mdd"] == pytest.approx(stats.minimal_detectable_difference(d.std(ddof=1), 4, level))
    assert pw["mdd_range"] == pytest.approx([stats.minimal_detectable_difference(sd_lo, 4, level),
                                             stats.minimal_detectable_difference(sd_hi, 4, level)])
    assert pw["seeds_needed"] == stats.seeds_needed(0.02, d.std(ddof=1), level)
    block = _block(md, "- batch.effective=256 vs")
    assert f"paired t-test over seeds p = {render.fmt_p(c['p_holm'])} (Holm; raw {render.fmt_p(c['p'])})" in block
    assert f"exact sign-flip p = {render.fmt_p(stats.sign_flip_p(d))}" in block
    assert "the smallest a sign-flip test over 4 seeds allows being 0.12" in block
    assert "over the 1 test(s) corrected together" in block
    assert f"detecting 2.00 pt with 80% power needs {int(pw['seeds_needed'])} seeds" in block
    assert "Power at the level 0.05 (Holm's first step over 1 test(s))" in block
    assert "would need" not in block.split("Power at", 1)[1].split("detecting 2.00 pt")[0]
    # P(better) with its Clopper-Pearson bracket, explained where it is printed: 0 wins of 4
    lo, hi = 0.0, 1 - 0.025 ** (1 / 4)
    assert (f"P(batch.effective=256 better) = 0.00 [{lo:.2f}, {hi:.2f}] (share of the 4 seeds where it is ahead, "
            "a tie counting one half; bracket = Clopper-Pearson 95% over seeds, ties counted either way)") in block
    table = md.split("## What mattered", 1)[1].split("## Runs", 1)[0]
    assert "Clopper-Pearson 95% over seeds" in table and f"0.00 [{lo:.2f}, {hi:.2f}]" in table
    assert "Tests: 1 hypothesis test(s) (every comparison and main effect; a main effect that pairs the same two " \
           "configurations as a comparison is that test, counted once) are Holm-corrected together" in md
    # the default --detect is 1 point of accuracy
    md2, rep2 = _report(tmp_path / "o2", runs)
    assert rep2["detect"] == pytest.approx(0.01) and "detecting 1.00 pt with 80% power" in md2


def test_detect_must_be_positive(tmp_path, capsys):
    make_run(tmp_path / "sw", "a")
    assert main(["report", str(tmp_path / "sw"), "--out", str(tmp_path / "o"), "--detect", "0"]) == 2
    assert "--detect" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_one_family_over_comparisons_and_main_effects(tmp_path):
    runs = tmp_path / "sw"
    rng = np.random.default_rng(0)
    for seed in (1, 2, 3):
        for ebs in (16, 64):
            for scaling in ("none", "sqrt"):
                make_run(runs, f"e{ebs}-{scaling}-s{seed}", ebs=ebs, seed=seed, lr_scaling=scaling,
                         test_acc=0.8 + 0.05 * (ebs == 16) + rng.normal(0, 0.01), val_acc=0.9 if ebs == 16 else 0.8)
    md, rep = _report(tmp_path, runs)
    family = rep["comparisons"] + rep["main_effects"]
    assert len(rep["comparisons"]) == 3 and len(rep["main_effects"]) == 2 and rep["family_size"] == 5
    assert [t["p_holm"] for t in family] == pytest.approx(stats.holm([t["p"] for t in family]))
    assert all(t["power"]["alpha"] == pytest.approx(0.01) for t in family)


# ---------------------------------------------------------------------------------------------- every run counts


def test_diverged_scores_by_rule_and_failed_seeds_are_named(tmp_path):
    runs = tmp_path / "sw"
    for seed in (1, 2, 3):
        make_run(runs, f"a{seed}", ebs=64, seed=seed, test_acc=0.90, val_acc=0.9)
    make_run(runs, "b1", ebs=256, seed=1, test_acc=0.85, val_acc=0.8)
    _summary(make_run(runs, "b2", ebs=256, seed=2, status="diverged", message="loss is NaN at step 7"),
             test_best=None, test_last=None, val_best=None, majority_rate=0.52)
    _summary(make_run(runs, "b3", ebs=256, seed=3, status="failed", message="CUDA out of memory"),
             test_best=None, test_last=None)
    md, rep = _report(tmp_path, runs)
    g = {x["label"]: x for x in rep["groups"]}["batch.effective=256"]
    assert (g["completed"], g["diverged"], g["failed"], g["n_scored"]) == (1, 1, 1, 2)
    assert g["test_values"] == pytest.approx([0.85, 0.52])  # the diverged seed scores the majority-class rate
    assert g["missing"] == [{"seed": 3, "why": "failed: CUDA out of memory"}]
    [c] = rep["comparisons"]
    assert c["seeds"] == g["seeds"] == [1, 2]  # the group row and the comparison use the same seeds
    assert c["differences"] == pytest.approx([0.85 - 0.90, 0.52 - 0.90])
    block = _block(md, "- batch.effective=256 vs")
    assert ("Not in this comparison: seed 3 of batch.effective=256 (failed: CUDA out of memory); seed 3 of "
            "batch.effective=64 (the other configuration's run of this seed has no score).") in block
    assert "a diverged run scores as a model that learned nothing, the majority-class rate" in md
    assert "- `b2`: 0.5200 (loss is NaN at step 7)" in md
    rows = [ln for ln in md.split("## Runs\n", 1)[1].splitlines() if ln.startswith("| b2 ")]
    assert "0.5200" not in rows[0]  # the runs table shows what was measured: nothing
    # no score for a diverged run in another metric: a missing seed, with why
    md_loss, rep_loss = _report(tmp_path / "loss", runs, metric="loss")
    g = {x["label"]: x for x in rep_loss["groups"]}["batch.effective=256"]
    assert {"seed": 2, "why": "diverged (no loss score for a diverged run)"} in g["missing"]


def test_seed_missing_on_one_side_is_named(tmp_path):
    runs = tmp_path / "sw"
    for seed in (1, 2, 3):
        make_run(runs, f"a{seed}", ebs=64, seed=seed, test_acc=0.9, val_acc=0.9)
    for seed in (1, 2):
        make_run(runs, f"b{seed}", ebs=256, seed=seed, test_acc=0.8 + seed / 100, val_acc=0.8)
    md, rep = _report(tmp_path, runs)
    assert "seed 3 of batch.effective=64 (no run of this seed in the other configuration)" in md


def test_no_shared_seed_says_no_comparison(tmp_path):
    runs = tmp_path / "sw"
    make_run(runs, "a1", ebs=64, seed=1, val_acc=0.9)
    make_run(runs, "b2", ebs=256, seed=2, val_acc=0.8)
    md, rep = _report(tmp_path, runs)
    block = _block(md, "- batch.effective=256 vs")
    assert "no seed with a test acc in both: no comparison." in block
    assert "seed 2 of batch.effective=256 (no run of this seed in the other configuration)" in block


# ---------------------------------------------------------------------------------------------- status, plots


def test_old_summaries_are_rejudged_from_the_whole_history_and_tables_and_plots_count_the_same(tmp_path):
    """Run folders from before the status rule: a 'collapsed' run whose validation rose to 0.767 (30 val
    examples, majority 0.533) is completed and fell back; a 'completed' one that never rose above 0.567 is
    collapsed. The collapse rate, the means and the val curve all count the same 3 seeds."""
    runs = tmp_path / "sw"
    hist = {1: [(0.60, 0.6), (0.70, 0.6)], 2: [(0.767, 0.5), (0.533, 0.7)], 3: [(0.50, 0.7), (0.567, 0.7)]}
    status = {1: "completed", 2: "collapsed", 3: "completed"}
    for seed, evals in hist.items():
        d = make_run(runs, f"s{seed}", seed=seed, evals=evals, status=status[seed],
                     val_acc=max(v for v, _ in evals), test_acc=0.6 + seed / 100)
        s = json.loads((d / "summary.json").read_text())
        s["val_best"]["n"] = 30
        _summary(d, majority_rate=16 / 30, val_best=s["val_best"])
    loaded = {r.seed: r for r in (run_folders.load_run(runs / f"s{s}") for s in (1, 2, 3))}
    assert (loaded[1].status, loaded[1].fell_back) == ("completed", False)  # 0.70 > 0.533 + 0.150
    assert (loaded[2].status, loaded[2].fell_back) == ("completed", True)
    assert (loaded[3].status, loaded[3].fell_back) == ("collapsed", False)
    assert loaded[2].message == "completed over its whole validation history (summary.json says collapsed)"
    md, rep = _report(tmp_path, runs)
    [g] = rep["groups"]
    assert (g["completed"], g["fell_back"], g["collapsed"], g["n_scored"]) == (2, 1, 1, 3)
    assert g["collapse_rate"] == pytest.approx(1 / 3)
    assert "completed (fell back)" in md
    [group] = run_folders.group_runs(list(loaded.values()))
    assert len(report_figures.curve_runs(group)) == g["n_scored"] == 3


# ---------------------------------------------------------------------------------------------- data, confounding


def test_runs_on_other_data_are_not_compared(tmp_path, capsys):
    runs = tmp_path / "sw"
    for seed in (1, 2):
        for ebs in (16, 64):
            _edit_config(make_run(runs, f"imdb-e{ebs}-s{seed}", ebs=ebs, seed=seed, val_acc=0.9 - ebs / 1000),
                         _set(**{"derived.data_fingerprint": "aaaa1111"}))
    _edit_config(make_run(runs, "csv-e16-s1", ebs=16, seed=1, test_acc=0.7333),
                 _set(**{"derived.data_fingerprint": "bbbb2222", "data.path": "reviews.csv"}))
    md, rep = _report(tmp_path, runs)
    assert [g["started"] for g in rep["groups"]] == [2, 2]
    assert rep["not_compared"] == [{"data": "data.name=imdb, data.path=reviews.csv, data.text_column=text, "
                                            "data.label_column=label, data.split=[0.8, 0.1, 0.1], data.split_seed=42, "
                                            "data.drop_empty=False (fingerprint bbbb2222)", "runs": ["csv-e16-s1"]}]
    assert "**Not compared (other data):** 1 run(s) on data.name=imdb, data.path=reviews.csv" in md
    assert "csv-e16-s1" not in md.split("## Runs", 1)[1]
    # an old run folder (no fingerprint) with the IMDB runs' data keys joins their fingerprint
    make_run(runs, "old-e64-s3", ebs=64, seed=3)
    md, rep = _report(tmp_path / "o2", runs)
    assert sum(g["started"] for g in rep["groups"]) == 5
    # nothing comparable: one line, exit 2, no folder
    lone = tmp_path / "lone"
    _edit_config(make_run(lone, "x", ebs=16), _set(**{"derived.data_fingerprint": "aaaa"}))
    _edit_config(make_run(lone, "y", ebs=16), _set(**{"derived.data_fingerprint": "bbbb"}))
    assert main(["report", str(lone), "--out", str(tmp_path / "lone-out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 different data sets" in err[0] and "nothing is comparable" in err[0]
    assert not (tmp_path / "lone-out").exists()


def test_keys_that_vary_together_are_named_confounded(tmp_path):
    runs = tmp_path / "sw"
    for seed in (1, 2):
        for ebs, lr in ((16, 1e-4), (64, 3e-4)):
            _edit_config(make_run(runs, f"e{ebs}-s{seed}", ebs=ebs, seed=seed, val_acc=0.9 - ebs / 1000),
                         _set(**{"optim.lr": lr}))
    md, rep = _report(tmp_path, runs)
    assert rep["confounded_keys"] == ["batch.effective", "optim.lr"]
    assert rep["main_effects"] == []
    assert ("`batch.effective`, `optim.lr` vary together: no two configurations differ in only one of them, so "
            "their effects are confounded") in md
    assert "no paired seed" not in md


# ---------------------------------------------------------------------------------------------- sentences


def test_sentence_branches():
    base = {"a": "A", "b": "B", "seeds": [1, 2, 3], "differences": [0.01, 0.02, 0.03], "estimate": 0.02,
            "sd": 0.01, "n_seeds": 3, "ci": [0.0, 0.04], "ci_note": None, "t_ci": [-0.005, 0.045],
            "t_ci_note": None, "p": 0.07, "p_test": "t", "p_t": 0.07, "p_sign_flip": 0.25, "p_min": 0.25,
            "p_holm": 0.07, "family_size": 1, "prob_improvement": [1.0, 0.29, 1.0],
            "disagreements": [4, 1, 3], "disagreement_seeds": [1, 2, 3], "examples": [30, 30, 30],
            "mcnemar_p": [0.1, 1.0, 0.6], "missing": [],
            "power": stats.power_summary(0.01, 3, 0.01, 0.05)}
    lines = render.comparison_sentences(base, "acc", 0.01)
    assert lines[0].startswith("A vs B: +2.00 pt (mean of 3 per-seed differences: +1.00 pt, +2.00 pt, +3.00 pt "
                               "for seeds 1, 2, 3), 95% crossed bootstrap [+0.00, +4.00] pt")
    assert "not significant at 0.05 over the 1 test(s)" in lines[0]
    assert lines[1].startswith("Power at the level 0.05")
    assert lines[2] == ("Secondary (within seed): they disagree on 4, 1, 3 of 30 test examples (seed 1, 2, 3, in "
                        "order); McNemar p per seed 0.1, 1, 0.6.")  # per seed, not the rounded mean 3
    sig = render.comparison_sentences({**base, "p_holm": 0.01, "examples": [30, 29, 30]}, "acc", 0.01)
    assert "significant at 0.05" in sig[0] and "not significant" not in sig[0]
    assert "of 30, 29, 30 test examples" in sig[2]
    no_boot = render.comparison_sentences({**base, "ci_note": "no paired test predictions for seed 2"}, "acc", 0.01)
    assert "95% crossed bootstrap n/a (no paired test predictions for seed 2)" in no_boot[0]
    no_t = render.comparison_sentences({**base, "t_ci_note": "n = 3 is too small"}, "acc", 0.01)
    assert "paired t n/a (n = 3 is too small)" in no_t[0]
    flat = render.comparison_sentences({**base, "sd": 0.0, "examples": []}, "acc", 0.01)
    assert flat[1].startswith("Power: the 3 seeds show no spread") and len(flat) == 2
    one = {**base, "n_seeds": 1, "seeds": [4], "differences": [0.02], "examples": [],
           "power": {"alpha": 0.05, "detect": 0.01, "seeds_needed": 12.0}}
    assert render.comparison_sentences(one, "acc", 0.02)[0].endswith(
        "With the seed-to-seed spread seen in this report (sd of a difference ≈ 2.00 pt), detecting 1.00 pt with "
        "80% power at level 0.05 would need 12 seeds.")
    unsized = {**one, "power": {"alpha": 0.05, "detect": 0.01, "seeds_needed": math.nan}}
    assert "Run at least 3 seeds per configuration" in render.comparison_sentences(unsized, "acc", math.nan)[0]
    none = render.comparison_sentences({**base, "n_seeds": 0, "missing": [{"config": "B", "seed": 2,
                                                                           "why": "failed: OOM"}]}, "acc", 0.01)
    assert none == ["A vs B: no seed with a test acc in both: no comparison.",
                    "Not in this comparison: seed 2 of B (failed: OOM)."]
    loss = render.comparison_sentences({**base, "power": stats.power_summary(0.01, 3, 0.01, 0.05)}, "loss", 0.01)
    assert "+0.0200 (mean of 3 per-seed differences" in loss[0]


def test_report_sentences_for_small_and_empty_cases(tmp_path):
    # one configuration, a backend that varies on different seeds (no cell to check): no key varies, no comparison
    runs = tmp_path / "sw"
    _edit_config(make_run(runs, "a1", seed=1), _set(**{"train.backend": "torch"}))
    _edit_config(make_run(runs, "a2", seed=2), _set(**{"train.backend": "accelerate"}))
    md, rep = _report(tmp_path, runs)
    assert "No key varies between configurations with a validation metric." in md
    assert "Reference: all runs. No other configuration with scored runs to compare." in md
    assert ("`train.backend` varies but does not change what is trained; no configuration and seed ran with more "
            "than one value, so it could not be checked.") in md
    assert "Replicates:" not in md  # no seed ran twice
    # no run with a validation metric
    empty = tmp_path / "empty"
    _summary(make_run(empty, "f1", status="failed"), val_best=None, test_best=None, test_last=None)
    md, rep = _report(tmp_path / "e", empty)
    assert "No run with a validation `acc`: nothing to compare." in md
    assert "- `f1` (failed)" in md


def test_the_replicate_rule_in_one_place():
    from ebslab.analysis import replicates

    base = {"batch": {"effective": 64, "micro": 16}, "train": {"seed": 1, "backend": "torch"}}
    other = {"batch": {"effective": 64, "micro": 8}, "train": {"seed": 1, "backend": "accelerate"},
             "out": {"name": "x"}, "derived": {"lr": 1}}
    assert replicates.replicate_key(base) == replicates.replicate_key(other)
    assert replicates.configuration(base) != replicates.configuration({**base, "batch": {"effective": 256}})
    assert not replicates.changes_training("train.backend") and not replicates.changes_training("train.seed")
    assert replicates.changes_training("data.max_length")
    fp = {"derived": {"data_fingerprint": "f1"}}
    csv = {"data": {"path": "x.csv"}}
    # an old folder with IMDB's data keys joins the one IMDB fingerprint; a CSV one stays apart; two
    # fingerprints never mix
    f2 = {"data": {"limit": 300}, "derived": {"data_fingerprint": "f2"}}
    assert replicates.comparable_sets([fp, {}, csv, f2]) == [[0, 1], [2], [3]]
    # two fingerprints on the same data keys (the files changed): an old folder cannot tell which: on its own
    f3 = {"derived": {"data_fingerprint": "f3"}}
    assert replicates.comparable_sets([fp, {}, f3]) == [[0], [1], [2]]
