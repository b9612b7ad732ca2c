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

from ebslab import report
from ebslab.config import UserError


def make_run(root: Path, name: str, *, ebs: int = 32, seed: int = 1, lr_scaling: str = "none",
             model: str = "minilm", status: str = "completed", test_acc: float = 0.9, test_last: float | None = None,
             val_acc: float = 0.9, duration: float = 100.0, evals: list[tuple[float, float]] | None = None,
             correct: np.ndarray | None = None, torn: bool = False, summary: bool = True, message=None) -> Path:
    """A run folder as docs/run-folder.md describes it. evals: (val/acc, val/loss) per epoch."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {
        "model": {"name": model, "pooling": "cls", "dropout": 0.1},
        "batch": {"effective": ebs, "micro": 16},
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
        pd.DataFrame({"index": np.arange(n), "label": labels, "pred": preds, "prob": 0.9}).to_parquet(
            d / "predictions" / "test_best.parquet")
    return d


# ---------------------------------------------------------------------------------------------- statistics


def test_mean_ci_matches_hand_formula():
    accs = [0.90, 0.92, 0.94]
    mean, std, lo, hi = report.mean_ci(accs)
    # by hand: mean 0.92, deviations ±0.02 -> var = (0.0004 + 0 + 0.0004) / 2 = 0.0004, std = 0.02
    assert mean == pytest.approx(0.92)
    assert std == pytest.approx(0.02)
    half = stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)  # t(0.975, 2) = 4.3027
    assert half == pytest.approx(0.049683, abs=1e-5)
    assert lo == pytest.approx(0.92 - half)
    assert hi == pytest.approx(0.92 + half)


def test_mean_ci_single_value_has_no_interval():
    mean, std, lo, hi = report.mean_ci([0.8])
    assert mean == 0.8 and math.isnan(std) and math.isnan(lo) and math.isnan(hi)


def test_mcnemar_exact_known_counts():
    # b=10, c=2: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096 = 0.03857
    assert report.mcnemar_p(10, 2) == pytest.approx(2 * 79 / 4096)
    assert report.mcnemar_p(10, 2) == pytest.approx(0.0386, abs=5e-5)
    assert report.mcnemar_p(2, 10) == report.mcnemar_p(10, 2)
    # mid-p subtracts P(X = 2) = 66/4096
    assert report.mcnemar_p(10, 2, mid_p=True) == pytest.approx((2 * 79 - 66) / 4096)
    assert report.mcnemar_p(5, 5) == 1.0
    assert report.mcnemar_p(0, 0) == 1.0


def test_holm_known_pvalues():
    # sorted 0.01, 0.02, 0.03, 0.04 with m=4 -> 0.04, 0.06, 0.06 (monotone), 0.06 ... by hand:
    # 4*0.01 = 0.04; 3*0.02 = 0.06; 2*0.03 = 0.06; 1*0.04 = 0.04 -> max-accumulated 0.06
    adj = report.holm([0.03, 0.01, 0.04, 0.02])
    assert adj == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert report.holm([0.5, 0.8]) == pytest.approx([1.0, 1.0])  # 2*0.5 = 1.0, capped
    out = report.holm([0.01, float("nan")])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])


def test_flatten_and_varying_keys():
    a = report.flatten({"batch": {"effective": 64}, "train": {"seed": 1}, "out": {"name": "a"},
                        "derived": {"lr": 1}, "optim": {"betas": [0.9, 0.99]}})
    b = report.flatten({"batch": {"effective": 256}, "train": {"seed": 2}, "out": {"name": "b"},
                        "derived": {"lr": 2}, "optim": {"betas": [0.9, 0.99]}})
    assert a["optim.betas"] == (0.9, 0.99)
    assert report.varying_keys([a, b]) == ["batch.effective", "train.seed"]


def test_read_jsonl_tolerates_torn_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"event": "eval", "val/acc": 0.5}\n{"event": "eval", "val/acc": 0.6}\n{"event": "ev')
    recs = report.read_jsonl(p)
    assert [r["val/acc"] for r in recs] == [0.5, 0.6]


def test_bold_marks_max_and_min():
    texts = ["0.9", "0.95", "0.8"]
    assert report.bold_best([0.9, 0.95, 0.8], texts, True) == ["0.9", "**0.95**", "0.8"]
    assert report.bold_best([0.9, 0.95, 0.8], texts, False) == ["0.9", "0.95", "**0.8**"]
    # a not-completed row never gets the bold
    assert report.bold_best([0.9, 0.95, 0.8], texts, False, [True, True, False]) == ["**0.9**", "0.95", "0.8"]


# ---------------------------------------------------------------------------------------------- folders


def test_find_run_dirs_at_any_depth_and_errors(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / "sweep.json").write_text("{}")
    make_run(sweep / "a", "r1")
    make_run(sweep / "b" / "c", "r2")
    found = report.find_run_dirs([sweep])
    assert sorted(p.name for p in found) == ["r1", "r2"]
    assert report.find_run_dirs([sweep / "a" / "r1"]) == [sweep / "a" / "r1"]
    with pytest.raises(UserError, match="no such"):
        report.find_run_dirs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run folders"):
        report.find_run_dirs([tmp_path / "empty"])


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

    # grouped: every run counts; EBS 1024's collapsed run enters the mean with its score: (0.5 + 0.8) / 2
    g_rows = _table_rows(md, "## Configurations")
    gh, gb = g_rows[0], g_rows[1:4]
    by_label = {r[0]: r for r in gb}
    assert set(by_label) == {"batch.effective=64", "batch.effective=256", "batch.effective=1024"}
    r1024 = by_label["batch.effective=1024"]
    assert [r1024[gh.index(h)] for h in ("started", "completed", "collapsed", "diverged", "failed")] == \
        ["2", "1", "1", "0", "0"]
    assert r1024[gh.index("collapse rate")] == "50%"
    assert r1024[gh.index("test acc (best) mean ± std")].startswith("0.6500 ± ")
    r64 = by_label["batch.effective=64"]
    assert r64[gh.index("test acc (best) mean ± std")] == "0.9200 ± 0.0200"
    half = stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)
    assert r64[gh.index("95% CI")] == f"[{0.92 - half:.4f}, {0.92 + half:.4f}]"
    # two seeds of 0.5 and 0.8: the t-interval would leave [0, 1], so n is too small for one
    assert r1024[gh.index("95% CI")] == "n = 2 is too small for an interval inside [0, 1]"

    # comparisons: paired t over seeds; 64 vs 256 per-seed differences 0.05, 0.06, 0.07
    sig = md.split("## Comparisons", 1)[1].split("## Plots", 1)[0]
    assert "Reference configuration (highest mean validation acc at the best checkpoint): " \
           "**batch.effective=64**" in sig and "never used to choose" in sig
    data = json.loads((out / "report.json").read_text())
    c256 = [c for c in data["comparisons"] if c["b"] == "batch.effective=256"][0]
    assert c256["per_seed_diff"] == pytest.approx([0.05, 0.06, 0.07])
    assert c256["p"] == pytest.approx(stats.ttest_1samp([0.05, 0.06, 0.07], 0).pvalue)
    c1024 = [c for c in data["comparisons"] if c["b"] == "batch.effective=1024"][0]
    assert c1024["seeds"] == ["1", "2"] and c1024["per_seed_diff"] == pytest.approx([0.40, 0.12])
    assert c256["p_holm"] == pytest.approx(min(1, 2 * min(c256["p"], c1024["p"])) if c256["p"] < c1024["p"]
                                           else max(c256["p"], 2 * c1024["p"]))
    line256 = [ln for ln in sig.splitlines() if "vs batch.effective=256" in ln][0]
    assert "+6.0 pt test acc (mean over seeds 1, 2, 3)" in line256
    assert "12 test examples right only with the first, 0 only with the second over 300" in line256
    assert data["groups"][2]["collapsed"] == 1 and data["reference"] == "batch.effective=64"

    # left-out list
    left = md.split("## Runs left out", 1)[1]
    assert "`ebs1024-s1`" not in left  # collapsed runs are scored, not left out
    assert "ebs256" not in left

    # plots
    for name in ("val_acc.png", "val_loss.png", "test_acc_vs_ebs.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"]({name})" in md


def test_torn_line_and_missing_summary(tmp_path):
    make_run(tmp_path, "a", torn=True, evals=[(0.7, 0.6), (0.8, 0.5)])
    make_run(tmp_path, "b", summary=False)
    r = report.load_run(tmp_path / "a")
    assert [e["val/acc"] for e in r.evals] == [0.7, 0.8]  # torn 0.1 line dropped
    xs, m, s = report.curve([r], "val/acc")
    assert list(xs) == [1.0, 2.0] and list(m) == [0.7, 0.8]
    rb = report.load_run(tmp_path / "b")
    assert rb.status == "incomplete" and not rb.ok
    path = report.build_report([tmp_path], tmp_path / "rep")
    md = path.read_text()
    assert "`b` (incomplete)" in md


def test_curve_mean_and_std_over_seeds(tmp_path):
    a = report.load_run(make_run(tmp_path, "s1", seed=1, evals=[(0.6, 0.7), (0.8, 0.5)]))
    b = report.load_run(make_run(tmp_path, "s2", seed=2, evals=[(0.7, 0.6), (0.9, 0.4)]))
    xs, m, s = report.curve([a, b], "val/acc")
    assert list(xs) == [1.0, 2.0]
    assert m == pytest.approx([0.65, 0.85])
    assert s == pytest.approx([np.std([0.6, 0.7], ddof=1)] * 2)


def test_groups_ignore_seed_and_out(tmp_path):
    runs = [report.load_run(make_run(tmp_path, f"r{s}", seed=s)) for s in (1, 2)]
    runs.append(report.load_run(make_run(tmp_path, "other", seed=1, lr_scaling="sqrt")))
    groups = report.group_runs(runs)
    assert sorted(len(g.runs) for g in groups) == [1, 2]
    assert sorted(g.label for g in groups) == ["optim.lr_scaling=none", "optim.lr_scaling=sqrt"]
    a, b = groups
    assert report.pair_label(a, b) == ("optim.lr_scaling=none", "optim.lr_scaling=sqrt")


def test_default_out_is_the_single_dir(tmp_path):
    make_run(tmp_path / "sw", "r1")
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "sw")])
    assert args.out is None
    assert report.run(args) == 0
    assert (tmp_path / "sw" / "report.md").is_file()


def test_bold_nothing_when_all_tie():
    assert report.bold_best([0.5, 0.5], ["0.5", "0.5"], True) == ["0.5", "0.5"]
    assert report.bold_best([0.5, 0.5, 0.6], ["0.5", "0.5", "0.6"], False) == ["**0.5**", "**0.5**", "0.6"]


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


def test_reference_is_chosen_by_validation_not_test(tmp_path):
    # A: best on test (0.95) but worse on validation (0.80); B: best on validation (0.90)
    for seed in (1, 2, 3):
        make_run(tmp_path, f"a{seed}", seed=seed, lr_scaling="none", test_acc=0.95, val_acc=0.80 + seed / 1000)
        make_run(tmp_path, f"b{seed}", seed=seed, lr_scaling="sqrt", test_acc=0.85, val_acc=0.90 + seed / 1000)
    out = tmp_path / "rep"
    report.build_report([tmp_path], out)
    data = json.loads((out / "report.json").read_text())
    assert data["reference"] == "optim.lr_scaling=sqrt" and data["selection"] == "validation"
    assert data["comparisons"][0]["estimate"] == pytest.approx(-0.10)  # reference minus other, on test


def test_grouping_ignores_batch_micro_and_counts_collapsed(tmp_path):
    runs = []
    for seed, micro in ((1, 8), (2, 16), (3, 32)):
        d = make_run(tmp_path, f"r{seed}", seed=seed, status="collapsed" if seed == 3 else "completed",
                     test_acc=0.5 if seed == 3 else 0.9)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["batch"]["micro"] = micro
        cfg["track"] = ["jsonl"] if seed == 1 else ["jsonl", "tensorboard"]
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        runs.append(report.load_run(d))
    groups = report.group_runs(runs)
    assert len(groups) == 1 and len(groups[0].runs) == 3
    assert groups[0].stats("best")[0] == pytest.approx((0.9 + 0.9 + 0.5) / 3)  # collapsed run included
    groups[0].exclude_collapsed = True
    assert groups[0].stats("best")[0] == pytest.approx(0.9)  # --exclude-collapsed: the old view
