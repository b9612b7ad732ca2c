"""ebslab report: statistics, tables and plots from hand-written run folders (no training)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from ebslab.analysis import compare, render, report, report_figures
from ebslab.analysis import runs as run_folders
from ebslab.analysis import stats as ebs_stats
from ebslab.core.errors import UserError


def make_run(root: Path, name: str, *, ebs: int = 32, seed: int = 1, lr_scaling: str = "none",
             model: str = "minilm", status: str = "completed", test_acc: float = 0.9, test_last: float | None = None,
             val_acc: float = 0.9, duration: float = 100.0, evals: list[tuple[float, float]] | None = None,
             correct: np.ndarray | None = None, torn: bool = False, summary: bool = True, message=None,
             micro: int = 16) -> Path:
    """A run folder as docs/run-folder.md describes it. evals: (val/acc, val/loss) per epoch."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {
        "model": {"name": model, "pooling": "cls", "dropout": 0.1},
        "batch": {"effective": ebs, "micro": micro},
        "optim": {"name": "adamw", "lr": 5e-5, "lr_scaling": lr_scaling, "betas": [0.9, 0.999]},
        "train": {"epochs": 2, "seed": seed},
        "out": {"dir": str(root), "name": name},
        "derived": {"micro": 16, "accum_steps": ebs // 16, "lr": 5e-5, "steps_per_epoch": 10, "world_size": 1},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    evals = evals if evals is not None else [(val_acc - 0.05, 0.5), (val_acc, 0.4)]
    lines = [json.dumps({"event": "step", "step": 1, "epoch": 0, "train/loss": 0.7, "lr": 5e-5})]
    for e, (va, vl) in enumerate(evals):
        lines.append(json.dumps({"event": "eval", "epoch": e, "step": 10 * (e + 1), "train/loss": 0.3,
                                 "train/acc": 0.95, "val/loss": vl, "val/acc": va, "test/acc": test_acc,
                                 "elapsed_s": 50.0 * (e + 1)}))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"event": "eval", "epoch": 9, "step": 99, "val/acc": 0.1, "val/lo'
    (d / "metrics.jsonl").write_text(text)
    if summary:
        s = {"status": status, "message": message, "best_epoch": len(evals) - 1, "best_step": 10 * len(evals),
             "steps": 20, "duration_s": duration, "val_best": {"acc": val_acc, "loss": 0.4, "ece": 0.05},
             "test_best": {"acc": test_acc, "loss": 0.3, "ece": 0.04, "n": 100},
             "test_last": {"acc": test_last if test_last is not None else test_acc, "loss": 0.3, "ece": 0.04,
                           "n": 100}}
        (d / "summary.json").write_text(json.dumps(s))
    if correct is not None:
        (d / "predictions").mkdir()
        n = len(correct)
        labels = np.arange(n) % 2
        preds = np.where(correct, labels, 1 - labels)
        prob1 = np.where(preds == 1, 0.9, 0.1)
        pd.DataFrame({"index": np.arange(n), "label": labels, "pred": preds, "prob": 0.9, "prob_0": 1 - prob1,
                      "prob_1": prob1}).to_parquet(
            d / "predictions" / "test_best.parquet")
    return d


# ---------------------------------------------------------------------------------------------- statistics


def test_the_tables_interval_matches_hand_formula():
    """stats.t_interval is the one interval of a configuration's mean: the table's and the figure's bars."""
    accs = [0.90, 0.92, 0.94]
    lo, hi, note = ebs_stats.t_interval(accs, 0.95, compare.metric_bounds("acc"))
    # by hand: mean 0.92, deviations ±0.02 -> var = (0.0004 + 0 + 0.0004) / 2 = 0.0004, std = 0.02
    assert note is None and (lo + hi) / 2 == pytest.approx(0.92)
    half = stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)  # t(0.975, 2) = 4.3027
    assert half == pytest.approx(0.049683, abs=1e-5)
    assert lo == pytest.approx(0.92 - half)
    assert hi == pytest.approx(0.92 + half)


def test_the_tables_interval_of_a_single_value_is_none():
    lo, hi, note = ebs_stats.t_interval([0.8], 0.95, compare.metric_bounds("acc"))
    assert math.isnan(lo) and math.isnan(hi) and note == "n = 1: no interval"


def test_mcnemar_exact_known_counts():
    # b=10, c=2: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096 = 0.03857
    assert ebs_stats.mcnemar_p(10, 2) == pytest.approx(2 * 79 / 4096)
    assert ebs_stats.mcnemar_p(10, 2) == pytest.approx(0.0386, abs=5e-5)
    assert ebs_stats.mcnemar_p(2, 10) == ebs_stats.mcnemar_p(10, 2)
    assert ebs_stats.mcnemar_p(5, 5) == 1.0
    assert ebs_stats.mcnemar_p(0, 0) == 1.0


def test_holm_known_pvalues():
    # sorted 0.01, 0.02, 0.03, 0.04 with m=4 -> 0.04, 0.06, 0.06 (monotone), 0.06 ... by hand:
    # 4*0.01 = 0.04; 3*0.02 = 0.06; 2*0.03 = 0.06; 1*0.04 = 0.04 -> max-accumulated 0.06
    adj = ebs_stats.holm([0.03, 0.01, 0.04, 0.02])
    assert adj == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert ebs_stats.holm([0.5, 0.8]) == pytest.approx([1.0, 1.0])  # 2*0.5 = 1.0, capped
    out = ebs_stats.holm([0.01, float("nan")])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])


def test_flatten_and_varying_keys():
    a = run_folders.flatten({"batch": {"effective": 64}, "train": {"seed": 1}, "out": {"name": "a"},
                        "derived": {"lr": 1}, "optim": {"betas": [0.9, 0.99]}})
    b = run_folders.flatten({"batch": {"effective": 256}, "train": {"seed": 2}, "out": {"name": "b"},
                        "derived": {"lr": 2}, "optim": {"betas": [0.9, 0.99]}})
    assert a["optim.betas"] == (0.9, 0.99)
    assert run_folders.varying_keys([a, b]) == ["batch.effective", "train.seed"]


def test_read_jsonl_tolerates_torn_last_line(tmp_path):
    from ebslab.core.runfolder import read_jsonl

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"event": "eval", "val/acc": 0.5}\n{"event": "eval", "val/acc": 0.6}\n{"event": "ev')
    recs = read_jsonl(p)
    assert [r["val/acc"] for r in recs] == [0.5, 0.6]


def test_bold_marks_max_and_min():
    texts = ["0.9", "0.95", "0.8"]
    assert render.bold_best([0.9, 0.95, 0.8], texts, True) == ["0.9", "**0.95**", "0.8"]
    assert render.bold_best([0.9, 0.95, 0.8], texts, False) == ["0.9", "0.95", "**0.8**"]
    # a not-completed row never gets the bold
    assert render.bold_best([0.9, 0.95, 0.8], texts, False, [True, True, False]) == ["**0.9**", "0.95", "0.8"]


# ---------------------------------------------------------------------------------------------- folders


def test_find_run_dirs_at_any_depth_and_errors(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / "sweep.json").write_text("{}")
    make_run(sweep / "a", "r1")
    make_run(sweep / "b" / "c", "r2")
    found = run_folders.find_run_dirs([sweep])
    assert sorted(p.name for p in found) == ["r1", "r2"]
    assert run_folders.find_run_dirs([sweep / "a" / "r1"]) == [sweep / "a" / "r1"]
    with pytest.raises(UserError, match="no such"):
        run_folders.find_run_dirs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run folders"):
        run_folders.find_run_dirs([tmp_path / "empty"])


def _table_rows(md: str, heading: str) -> list[list[str]]:
    section = md.split(heading, 1)[1]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    rows = []
    for ln in lines:
        if set(ln.replace("|", "").strip()) <= set("-: "):
            continue
        rows.append([c.strip() for c in ln.strip("|").split("|")])
        if len(rows) > 1 and not ln.startswith("|"):
            break
    return rows


def test_report_end_to_end(tmp_path, capsys):
    runs = tmp_path / "sweep"
    n = 100
    rng = np.random.default_rng(0)
    # EBS 64 (best): 3 seeds, accuracies 0.90 / 0.92 / 0.94 in the summaries
    for seed, acc in zip([1, 2, 3], [0.90, 0.92, 0.94]):
        c = np.ones(n, bool)
        make_run(runs, f"ebs64-s{seed}", ebs=64, seed=seed, test_acc=acc, val_acc=0.91 + seed / 100,
                 correct=c, torn=(seed == 2), duration=60.0 * seed)
    # EBS 256: 3 seeds, each with 4 errors where EBS 64 is right (b=12, c=0)
    for seed, acc in zip([1, 2, 3], [0.85, 0.86, 0.87]):
        c = np.ones(n, bool)
        c[rng.choice(n, 4, replace=False)] = False
        make_run(runs, f"ebs256-s{seed}", ebs=256, seed=seed, test_acc=acc, correct=c)
    # EBS 1024: a collapsed run and a completed one
    make_run(runs, "ebs1024-s1", ebs=1024, seed=1, status="collapsed", test_acc=0.5, message="val acc at 0.5")
    make_run(runs, "ebs1024-s2", ebs=1024, seed=2, test_acc=0.80, correct=np.ones(n, bool))

    out = tmp_path / "out"
    args = argparse.Namespace(dirs=[runs], out=out)
    assert report.run(args) == 0
    md = (out / "report.md").read_text()
    stdout = capsys.readouterr().out
    assert str(out / "report.md") in stdout
    assert "batch.effective=64" in stdout

    # per-run table: all 8 runs, the collapsed one marked
    runs_rows = _table_rows(md, "## Runs\n")
    header = runs_rows[0]
    body = runs_rows[1:9]
    assert len(body) == 8
    names = [r[0] for r in body]
    assert "ebs1024-s1" in names
    collapsed = body[names.index("ebs1024-s1")]
    assert "COLLAPSED" in collapsed[header.index("status")]
    # bold = max of the test acc column (0.94), min of duration (60 s -> "1m 00s")
    col = header.index("test acc")
    bold = [r[col] for r in body if r[col].startswith("**")]
    assert bold == ["**0.9400**"]
    dcol = header.index("duration")
    assert [r[dcol] for r in body if r[dcol].startswith("**")] == ["**1m 00s**"]
    # collapsed 0.5 is not bold in test loss although ties exist: only completed rows compete
    assert "batch.effective" in header and "train.seed" in header

    # grouped: EBS 1024 started 2, 1 completed, 1 collapsed; the collapsed 0.5 enters its mean: (0.5 + 0.8) / 2
    g_rows = _table_rows(md, "## Configurations")
    gh, gb = g_rows[0], g_rows[1:4]
    by_label = {r[0].replace(" (reference)", ""): r for r in gb}
    assert set(by_label) == {"batch.effective=64", "batch.effective=256", "batch.effective=1024"}
    r1024 = by_label["batch.effective=1024"]
    assert [r1024[gh.index(h)] for h in ("runs", "completed", "collapsed", "collapse rate")] == ["2", "1", "1", "50%"]
    assert r1024[gh.index("test acc (best) mean ± std")] == f"0.6500 ± {np.std([0.5, 0.8], ddof=1):.4f}"
    r64 = by_label["batch.effective=64"]
    assert r64[gh.index("test acc (best) mean ± std")] == "0.9200 ± 0.0200"
    half = stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)
    assert r64[gh.index("95% t-interval")] == f"[{0.92 - half:.4f}, {0.92 + half:.4f}]"

    # comparisons against the reference (EBS 64: best mean val acc 0.93), paired by seed
    sig = md.split("## Each configuration against the reference", 1)[1].split("## Plots", 1)[0]
    assert "Reference (best mean validation `acc`): **batch.effective=64**" in sig
    line256 = [ln for ln in sig.splitlines() if ln.startswith("- batch.effective=256 vs")][0]
    d = np.array([0.85, 0.86, 0.87]) - np.array([0.90, 0.92, 0.94])  # summaries' test acc, per seed
    p_raw = stats.ttest_1samp(d, 0.0).pvalue
    assert f"{100 * d.mean():+.2f} pt (mean of 3 per-seed differences: -5.00 pt, -6.00 pt, -7.00 pt for seeds " \
           "1, 2, 3)" in line256
    assert f"raw {p_raw:.2g})" in line256
    assert "McNemar" not in line256  # never the headline
    assert "they disagree on 4, 4, 4 of 100 test examples (seed 1, 2, 3, in order)" in sig
    # vs 1024: seeds 1 (collapsed, 0.5) and 2 (0.8) pair with 64's seeds 1 and 2
    line1024 = [ln for ln in sig.splitlines() if ln.startswith("- batch.effective=1024 vs")][0]
    assert f"{100 * np.mean([0.5 - 0.90, 0.80 - 0.92]):+.2f} pt (mean of 2 per-seed" in line1024
    assert "Nothing is selected on test" in md

    # left-out list: the collapsed run has a score, so none is left out
    left = md.split("## Runs without a test metric", 1)[1]
    assert "None: every run has a test metric." in left

    # plots
    for name in ("val_acc.png", "val_loss.png", "test_acc_vs_ebs.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"]({name})" in md


def test_torn_line_and_missing_summary(tmp_path):
    make_run(tmp_path, "a", torn=True, evals=[(0.7, 0.6), (0.8, 0.5)])
    make_run(tmp_path, "b", summary=False)
    r = run_folders.load_run(tmp_path / "a")
    assert [e["val/acc"] for e in r.evals] == [0.7, 0.8]  # torn 0.1 line dropped
    xs, m, s = report_figures.curve([r], "val/acc")
    assert list(xs) == [1.0, 2.0] and list(m) == [0.7, 0.8]
    rb = run_folders.load_run(tmp_path / "b")
    assert rb.status == "incomplete" and not rb.ok
    path = report.build_report([tmp_path], tmp_path / "rep")
    md = path.read_text()
    assert "`b` (incomplete)" in md


def test_curve_mean_and_std_over_seeds(tmp_path):
    a = run_folders.load_run(make_run(tmp_path, "s1", seed=1, evals=[(0.6, 0.7), (0.8, 0.5)]))
    b = run_folders.load_run(make_run(tmp_path, "s2", seed=2, evals=[(0.7, 0.6), (0.9, 0.4)]))
    xs, m, s = report_figures.curve([a, b], "val/acc")
    assert list(xs) == [1.0, 2.0]
    assert m == pytest.approx([0.65, 0.85])
    assert s == pytest.approx([np.std([0.6, 0.7], ddof=1)] * 2)


def test_groups_ignore_seed_and_out(tmp_path):
    runs = [run_folders.load_run(make_run(tmp_path, f"r{s}", seed=s)) for s in (1, 2)]
    runs.append(run_folders.load_run(make_run(tmp_path, "other", seed=1, lr_scaling="sqrt")))
    groups = run_folders.group_runs(runs)
    assert sorted(len(g.runs) for g in groups) == [1, 2]
    assert sorted(g.label for g in groups) == ["optim.lr_scaling=none", "optim.lr_scaling=sqrt"]
    a, b = groups
    assert run_folders.pair_label(a, b) == ("optim.lr_scaling=none", "optim.lr_scaling=sqrt")


def test_default_out_is_the_single_dir(tmp_path):
    make_run(tmp_path / "sw", "r1")
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "sw")])
    assert args.out is None
    assert report.run(args) == 0
    assert (tmp_path / "sw" / "report.md").is_file()


def test_bold_nothing_when_all_tie():
    assert render.bold_best([0.5, 0.5], ["0.5", "0.5"], True) == ["0.5", "0.5"]
    assert render.bold_best([0.5, 0.5, 0.6], ["0.5", "0.5", "0.6"], False) == ["**0.5**", "**0.5**", "0.6"]


def test_report_has_the_effective_batch_size_section_when_ebs_varies(tmp_path):
    """EBS 16 reaches val acc 0.8 at its second evaluation (step 20), EBS 64 at its first (step 10), 2 seeds each:
    the section's table and report.json's ebs_study carry those steps; a sweep of one EBS gets no section."""
    for seed in (1, 2):
        make_run(tmp_path / "sweep", f"ebs16-s{seed}", ebs=16, seed=seed, lr_scaling="sqrt",
                 evals=[(0.7, 0.5), (0.8, 0.4)])
        make_run(tmp_path / "sweep", f"ebs64-s{seed}", ebs=64, seed=seed, lr_scaling="sqrt",
                 evals=[(0.8, 0.5), (0.8, 0.4)])
        make_run(tmp_path / "one", f"ebs32-s{seed}", ebs=32, seed=seed)
    md = report.build_report([tmp_path / "sweep"], tmp_path / "out").read_text()
    assert "## Effective batch size" in md and "lr_scaling=sqrt" in md
    study = json.loads((tmp_path / "out" / "report.json").read_text())["ebs_study"]
    assert study["target"] == 0.8
    assert [(r["effective_batch"], r["steps"]) for r in study["rows"]] == [(16, [20, 20]), (64, [10, 10])]
    assert (tmp_path / "out" / "ebs_steps_vs_examples.png").exists()
    md_one = report.build_report([tmp_path / "one"], tmp_path / "out1").read_text()
    assert "## Effective batch size" not in md_one
    assert "ebs_study" not in json.loads((tmp_path / "out1" / "report.json").read_text())


# ------------------------------------------------------------------------------------- seed-aware comparisons


def _report(tmp_path, runs, **kw) -> tuple[str, dict]:
    out = tmp_path / "out"
    report.build_report([runs], out, n_boot=kw.pop("n_boot", 500), **kw)
    return (out / "report.md").read_text(), json.loads((out / "report.json").read_text())


def test_reference_is_chosen_by_validation_not_test(tmp_path):
    runs = tmp_path / "sw"
    # EBS 64: best on val (0.95) but worse on test (0.80); EBS 256 the reverse
    for seed in (1, 2, 3):
        make_run(runs, f"a{seed}", ebs=64, seed=seed, val_acc=0.95, test_acc=0.80 + seed / 100)
        make_run(runs, f"b{seed}", ebs=256, seed=seed, val_acc=0.85, test_acc=0.90 + seed / 100)
    md, rep = _report(tmp_path, runs)
    assert rep["reference"] == "batch.effective=64"
    assert "Reference (best mean validation `acc`): **batch.effective=64**" in md
    [c] = rep["comparisons"]
    assert (c["a"], c["b"]) == ("batch.effective=256", "batch.effective=64")
    assert c["estimate"] == pytest.approx(0.10)
    # main effect: 256 against the best-on-val level 64
    [e] = rep["main_effects"]
    assert (e["key"], e["level"], e["vs"]) == ("batch.effective", "256", "64")
    assert e["estimate"] == pytest.approx(0.10)


def test_collapsed_counted_included_and_excluded_with_flag(tmp_path):
    runs = tmp_path / "sw"
    for seed, acc in zip((1, 2, 3), (0.90, 0.91, 0.92)):
        make_run(runs, f"a{seed}", ebs=64, seed=seed, test_acc=acc, val_acc=0.9)
    make_run(runs, "b1", ebs=1024, seed=1, status="collapsed", test_acc=0.5, val_acc=0.5)
    make_run(runs, "b2", ebs=1024, seed=2, test_acc=0.88, val_acc=0.88)
    make_run(runs, "b3", ebs=1024, seed=3, status="diverged", summary=True, test_acc=float("nan"))
    md, rep = _report(tmp_path, runs)
    g = {x["label"]: x for x in rep["groups"]}["batch.effective=1024"]
    assert (g["started"], g["completed"], g["collapsed"], g["diverged"], g["failed"]) == (3, 1, 1, 1, 0)
    assert g["collapse_rate"] == pytest.approx(0.5)
    assert g["test_mean"] == pytest.approx((0.5 + 0.88) / 2) and g["n_scored"] == 2
    [c] = rep["comparisons"]
    assert c["seeds"] == [1, 2] and c["estimate"] == pytest.approx(np.mean([0.5 - 0.90, 0.88 - 0.91]))
    assert "`b3` (diverged)" in md.split("## Runs without a test metric", 1)[1]
    assert "Old view" not in md

    md_old, old = _report(tmp_path / "old", runs, exclude_collapsed=True)
    g = {x["label"]: x for x in old["groups"]}["batch.effective=1024"]
    assert g["test_mean"] == pytest.approx(0.88) and g["n_scored"] == 1 and g["collapsed"] == 1
    assert "Old view (--exclude-collapsed)" in md_old and old["exclude_collapsed"] is True
    assert "`b1` (collapsed)" in md_old.split("## Runs without a test metric", 1)[1]


def test_grouping_ignores_batch_micro_and_track_and_counts_collapsed(tmp_path):
    runs = []
    for seed, micro in ((1, 8), (2, 16), (3, 32)):
        d = make_run(tmp_path, f"r{seed}", seed=seed, status="collapsed" if seed == 3 else "completed",
                     test_acc=0.5 if seed == 3 else 0.9)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["batch"]["micro"] = micro
        cfg["track"] = ["jsonl"] if seed == 1 else ["jsonl", "tensorboard"]
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        runs.append(run_folders.load_run(d))
    groups = run_folders.group_runs(runs)
    assert len(groups) == 1 and len(groups[0].runs) == 3
    mean = compare.group_summary(groups[0], "acc", False)["test_mean"]
    assert mean == pytest.approx((0.9 + 0.9 + 0.5) / 3)  # collapsed run included
    assert compare.group_summary(groups[0], "acc", True)["test_mean"] == pytest.approx(0.9)  # the old view


def test_a_comparison_with_no_spread_and_no_difference_says_so(tmp_path):
    runs = tmp_path / "sw"
    for seed in (1, 2, 3):
        make_run(runs, f"a{seed}", ebs=64, seed=seed, val_acc=0.9, test_acc=0.9)
        make_run(runs, f"b{seed}", ebs=256, seed=seed, val_acc=0.8, test_acc=0.9)
    md, rep = _report(tmp_path, runs)
    [c] = rep["comparisons"]
    assert c["estimate"] == 0.0 and c["p"] == 1.0 and c["p_test"] == "sign-flip"
    assert "the 3 seeds show no spread, so neither the smallest detectable difference nor the seeds needed" in md


def test_grouping_ignores_batch_micro_and_says_identical(tmp_path):
    runs = tmp_path / "sw"
    for seed in (1, 2):
        for micro in (8, 16):
            make_run(runs, f"m{micro}-s{seed}", ebs=64, seed=seed, micro=micro, test_acc=0.9 + seed / 100)
    md, rep = _report(tmp_path, runs)
    assert [g["label"] for g in rep["groups"]] == ["all runs"] and rep["groups"][0]["started"] == 4
    assert rep["ignored_keys"] == [{"key": "batch.micro", "pairs": 2, "max_abs_difference": 0.0, "identical": True}]
    assert "`batch.micro` varies but does not change what is trained" in md and "identical test acc" in md
    # a micro-batch that changed the result is reported as not identical
    runs2 = tmp_path / "sw2"
    make_run(runs2, "m8", micro=8, test_acc=0.90)
    make_run(runs2, "m16", micro=16, test_acc=0.93)
    md2, rep2 = _report(tmp_path / "o2", runs2)
    assert rep2["ignored_keys"][0]["max_abs_difference"] == pytest.approx(0.03)
    assert "not identical" in md2


def test_one_seed_gives_no_p_value(tmp_path):
    runs = tmp_path / "sw"
    n = 24
    make_run(runs, "a", ebs=64, seed=1, test_acc=1.0, val_acc=0.9, correct=np.ones(n, bool))
    c = np.ones(n, bool)
    c[:11] = False
    make_run(runs, "b", ebs=256, seed=1, test_acc=13 / 24, val_acc=0.8, correct=c)
    md, rep = _report(tmp_path, runs)
    [comp] = rep["comparisons"]
    assert comp["n_seeds"] == 1 and comp["p"] is None and comp["p_holm"] is None and comp["t_ci"] == [None, None]
    line = [ln for ln in md.splitlines() if ln.startswith("- batch.effective=256 vs")][0]
    assert "One seed cannot separate the configurations: no p-value." in line
    assert "p = " not in line and "significant" not in line
    assert "Run at least 3 seeds" in line  # no spread anywhere in this report to size it
    [e] = rep["main_effects"]
    assert e["p_holm"] is None
    assert "n/a (one seed)" in md.split("## What mattered", 1)[1].split("## Runs", 1)[0]
    # a second seed of the reference alone gives a spread: the sentence says how many seeds would be needed
    from ebslab.analysis import stats as st

    make_run(runs, "a2", ebs=64, seed=2, test_acc=0.96, val_acc=0.9)
    md, rep = _report(tmp_path / "o2", runs)
    sd = math.sqrt(2 * np.var([1.0, 0.96], ddof=1))
    need = int(st.seeds_needed(0.01, sd, 0.05))  # --detect's default 1 point; no test in the family: level 0.05
    assert rep["comparisons"][0]["p"] is None and need >= 2
    assert f"would need {need} seeds" in [ln for ln in md.splitlines() if ln.startswith("- batch.effective=256")][0]


def test_report_json_numbers_equal_the_stats_functions(tmp_path):
    from ebslab.analysis import stats as st

    runs = tmp_path / "sw"
    n, rng = 60, np.random.default_rng(3)
    diffs = []
    for seed in (1, 2, 3, 4):
        ca = rng.random(n) < 0.85
        cb = ca.copy()
        flip = rng.choice(n, 6, replace=False)
        cb[flip] = ~cb[flip]
        make_run(runs, f"a{seed}", ebs=64, seed=seed, val_acc=0.9, test_acc=ca.mean(), correct=ca)
        make_run(runs, f"b{seed}", ebs=256, seed=seed, val_acc=0.8, test_acc=cb.mean(), correct=cb)
        diffs.append(cb.astype(float) - ca)
    md, rep = _report(tmp_path, runs, n_boot=2000)
    [c] = rep["comparisons"]
    d = np.array([x.mean() for x in diffs])
    assert c["differences"] == pytest.approx(list(d))
    expect = st.seed_comparison(d, bounds=(-1.0, 1.0))
    assert c["estimate"] == pytest.approx(d.mean())
    assert c["p"] == pytest.approx(st.paired_t_test(d))
    assert c["p_holm"] == pytest.approx(c["p"]) == rep["main_effects"][0]["p_holm"]
    assert rep["main_effects"][0]["ci"] == c["ci"]  # one test, one interval
    assert c["t_ci"] == pytest.approx([expect["t_low"], expect["t_high"]])
    # the main effect pairs the same two configurations: the same test, counted once in the family
    assert c["family_size"] == 1 and rep["family_size"] == 1
    assert rep["main_effects"][0]["same_test_as"] == "batch.effective=256 vs batch.effective=64"
    assert c["power"]["mdd"] == pytest.approx(st.minimal_detectable_difference(d.std(ddof=1), 4, 0.05))
    assert c["prob_improvement"] == pytest.approx(list(st.prob_of_improvement(d)))
    # the bootstrap interval: the stats function on the same per-example arrays brackets the same estimate
    lo, hi = st.percentile_interval(st.crossed_bootstrap_mean(np.array(diffs), 2000, np.random.default_rng(7)))
    assert c["ci"][0] == pytest.approx(lo, abs=0.02) and c["ci"][1] == pytest.approx(hi, abs=0.02)
    assert c["ci"][0] < d.mean() < c["ci"][1]
    assert c["disagreements"] == [6, 6, 6, 6] and c["examples"] == [60] * 4
    # the markdown shows the json's numbers
    assert f"{100 * c['estimate']:+.2f} pt" in md and f"raw {c['p']:.2g})" in md


def test_metric_flag_uses_prob_columns_and_rejects_unknown(tmp_path):
    runs = tmp_path / "sw"
    for seed in (1, 2):
        make_run(runs, f"a{seed}", ebs=64, seed=seed, correct=np.ones(20, bool))
        c = np.ones(20, bool)
        c[: 2 * seed] = False
        make_run(runs, f"b{seed}", ebs=256, seed=seed, correct=c)
    with pytest.raises(UserError, match="unknown metric"):
        report.build_report([runs], tmp_path / "bad", metric="accuracy")
    assert not (tmp_path / "bad").exists()
    md, rep = _report(tmp_path, runs, metric="loss", n_boot=200)
    assert rep["metric"] == "loss" and rep["higher_is_better"] is False
    [c] = rep["comparisons"]
    # summaries carry loss 0.3 for every run: the estimate is 0, the bootstrap recomputes loss from prob_k
    assert c["estimate"] == pytest.approx(0.0)
    assert c["ci_note"] is None and c["ci"][1] > 0  # b's wrong predictions cost log-loss in every resample


def test_main_effect_pairs_by_seed_and_other_keys_and_ranks_by_size(tmp_path):
    from ebslab.analysis import stats as st

    runs = tmp_path / "sw"
    n, rng = 40, np.random.default_rng(5)
    acc = {}
    vectors = {}
    for seed in (1, 2, 3):
        for scaling in ("none", "sqrt"):
            for ebs in (64, 256):
                c = rng.random(n) < (0.9 if ebs == 64 else 0.7) - (0.02 if scaling == "sqrt" else 0.0)
                vectors[(seed, scaling, ebs)] = c
                acc[(seed, scaling, ebs)] = c.mean()
                make_run(runs, f"e{ebs}-{scaling}-s{seed}", ebs=ebs, seed=seed, lr_scaling=scaling,
                         val_acc=0.9 if ebs == 64 else 0.7, test_acc=c.mean(), correct=c)
    md, rep = _report(tmp_path, runs, n_boot=2000)
    effects = {e["key"]: e for e in rep["main_effects"]}
    e = effects["batch.effective"]
    assert (e["level"], e["vs"], e["combinations"]) == ("256", "64", [2, 2, 2])
    d = [np.mean([acc[(s, sc, 256)] - acc[(s, sc, 64)] for sc in ("none", "sqrt")]) for s in (1, 2, 3)]
    assert e["differences"] == pytest.approx(d)
    assert e["p"] == pytest.approx(st.paired_t_test(d))
    diffs = [np.mean([vectors[(s, sc, 256)].astype(float) - vectors[(s, sc, 64)] for sc in ("none", "sqrt")], axis=0)
             for s in (1, 2, 3)]
    lo, hi = st.percentile_interval(st.crossed_bootstrap_mean(np.array(diffs), 2000, np.random.default_rng(1)))
    assert e["ci"][0] == pytest.approx(lo, abs=0.03) and e["ci"][1] == pytest.approx(hi, abs=0.03)
    # one Holm family: the 3 comparisons against the reference and the 2 main effects
    family = rep["comparisons"] + rep["main_effects"]
    assert rep["family_size"] == 5
    assert [x["p_holm"] for x in family] == pytest.approx(st.holm([x["p"] for x in family]))
    # ranked by size: the EBS effect (about -20 pt) comes before lr scaling
    assert [x["key"] for x in rep["main_effects"]] == sorted(effects, key=lambda k: -abs(effects[k]["estimate"]))
    table = md.split("## What mattered", 1)[1].split("## Runs", 1)[0]
    assert table.index("| batch.effective ") < table.index("| optim.lr_scaling ")  # cells padded to the column


def _edit_config(run_dir: Path, edit) -> Path:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    edit(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_dir


def test_old_and_new_run_folders_of_one_configuration_form_one_group(tmp_path):
    """An old run folder (no eval.select_by, explicit train.precision=fp32) and a new one (eval.select_by at its
    default acc, precision auto that derived.precision records as fp32) trained the same thing: one group, and
    one effective-batch-size fit. An auto run from before derived.precision is what it recorded (auto), whatever a
    log beside it printed. A new key set to another value, or auto resolved to bf16, still splits."""
    from ebslab.analysis import ebs_study
    from ebslab.core.config import default_flat

    assert default_flat()["eval.select_by"] == "acc" and default_flat()["train.precision"] == "auto"

    def old(cfg):
        cfg["train"]["precision"] = "fp32"

    def new(precision="fp32", select_by="acc"):
        def edit(cfg):
            cfg["train"]["precision"] = "auto"
            cfg["eval"] = {"select_by": select_by}
            cfg["derived"]["precision"] = precision
        return edit

    dirs = [_edit_config(make_run(tmp_path / "sw", f"old-ebs{ebs}", ebs=ebs), old) for ebs in (16, 64)]
    dirs += [_edit_config(make_run(tmp_path / "sw", f"new-ebs{ebs}", ebs=ebs, seed=2), new()) for ebs in (16, 64)]
    groups = run_folders.group_runs([run_folders.load_run(d) for d in dirs])
    assert [sorted(r.name for r in g.runs) for g in groups] == [["new-ebs16", "old-ebs16"], ["new-ebs64", "old-ebs64"]]
    assert [g.label for g in groups] == ["batch.effective=16", "batch.effective=64"]
    # a run from before derived.precision was recorded is what it asked for, auto: a group of its own, and a log
    # beside it that printed what auto resolved to changes nothing
    unrecorded = make_run(tmp_path / "sw", "auto-ebs16", ebs=16, seed=3)
    _edit_config(unrecorded, lambda cfg: cfg["train"].update(precision="auto"))
    dirs.append(unrecorded)

    def grouped():
        groups = run_folders.group_runs([run_folders.load_run(d) for d in dirs])
        fits = ebs_study.group_by_other_keys([ebs_study.load_study_run(d) for d in dirs])
        return [(g.label, sorted(r.name for r in g.runs)) for g in groups], {k: len(v) for k, v in fits.items()}

    without_log = grouped()
    assert without_log == ([("batch.effective=16, train.precision=auto", ["auto-ebs16"]),
                            ("batch.effective=16, train.precision=fp32", ["new-ebs16", "old-ebs16"]),
                            ("batch.effective=64, train.precision=fp32", ["new-ebs64", "old-ebs64"])],
                           {"train.precision=fp32": 4, "train.precision=auto": 1})
    (tmp_path / "sw" / "auto-ebs16.log").write_text("ebslab run x\nmodel tiny-bert, device cpu, precision fp32 "
                                                   "(train.precision=auto), backend torch\n")
    assert grouped() == without_log

    bf16 = _edit_config(make_run(tmp_path / "sw2", "bf16", ebs=16, seed=3), new(precision="bf16"))
    by_loss = _edit_config(make_run(tmp_path / "sw2", "by-loss", ebs=16, seed=4), new(select_by="loss"))
    groups = run_folders.group_runs([run_folders.load_run(d) for d in (dirs[0], bf16, by_loss)])
    assert sorted(g.label for g in groups) == ["eval.select_by=acc, train.precision=bf16",
                                               "eval.select_by=acc, train.precision=fp32",
                                               "eval.select_by=loss, train.precision=fp32"]


def test_the_ebs_figures_bars_are_the_configurations_tables_intervals(tmp_path):
    """Test acc vs EBS: a configuration's bar is the 95% t-interval the configurations table shows (report.json's
    test_ci), and where the table refuses one (one seed) the figure draws no bar either."""
    sweep = tmp_path / "sw"
    for seed, acc in ((1, 0.80), (2, 0.84), (3, 0.86)):
        make_run(sweep, f"e32-s{seed}", ebs=32, seed=seed, test_acc=acc, val_acc=acc)
    make_run(sweep, "e128-s1", ebs=128, seed=1, test_acc=0.7, val_acc=0.7)
    report.build_report([sweep], tmp_path / "out", n_boot=200)
    table = {g["label"]: g for g in json.loads((tmp_path / "out" / "report.json").read_text())["groups"]}
    assert table["batch.effective=128"]["test_ci"] == [None, None]
    assert table["batch.effective=128"]["test_ci_note"] == "n = 1: no interval"
    lo, hi = table["batch.effective=32"]["test_ci"]
    half = stats.t.ppf(0.975, 2) * np.std([0.80, 0.84, 0.86], ddof=1) / math.sqrt(3)
    assert (lo, hi) == pytest.approx((0.8333 - half, 0.8333 + half), abs=1e-4)

    groups = run_folders.group_runs([run_folders.load_run(d) for d in sorted(sweep.iterdir())])
    points = report_figures.acc_vs_ebs_points(groups)
    assert [(p.ebs, p.seeds) for p in points] == [(32, [0.80, 0.84, 0.86]), (128, [0.7])]
    fig = report_figures.draw_acc_vs_ebs(points)
    bars = [seg.ravel().tolist() for coll in fig.axes[0].collections for seg in coll.get_segments()]
    assert len(bars) == 1 and bars[0] == pytest.approx([32, lo, 32, hi])  # none at EBS 128


def test_a_table_keeps_its_cells_as_given_and_escapes_a_pipe():
    """md_table (tabulate's pipe format): text is not read as numbers ("0.9000" stays, "1e-05" is not 1e-05 as
    0.00001), bold marks stay, a `|` inside a cell is escaped, and the alignment row says left or right."""
    md = render.md_table(["run | name", "acc"], [["a|b", "0.9000"], ["**c**", "1e-05"]], ["l", "r"])
    lines = md.splitlines()
    cells = [[c.strip() for c in line.strip("|").replace("\\|", "\0").split("|")] for line in lines]
    cells = [[c.replace("\0", "\\|") for c in row] for row in cells]
    assert cells[0] == ["run \\| name", "acc"]
    assert cells[2:] == [["a\\|b", "0.9000"], ["**c**", "1e-05"]]
    assert cells[1][0].startswith(":-") and cells[1][1].endswith("-:")
    assert len({len(line) for line in lines}) == 1  # padded to the columns' widths
