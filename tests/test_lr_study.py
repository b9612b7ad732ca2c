"""The learning-rate section: the best lr per EBS and the exponent of lr_opt ~ EBS^alpha, recovered from synthetic
runs with a known exponent, with interval coverage checked by simulation; the section and report.json from run
folders; the EBS fit then uses each EBS's best lr."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from ebslab.analysis import report
from ebslab.analysis.lr_study import best_lr, fit_exponent

EBS, LRS = (8, 24, 64), (3e-5, 1.5e-4, 7.5e-4)


def score(lr: float, ebs: int, alpha: float, noise: float = 0.0, rng=None) -> float:
    """A parabola in log lr around lr_opt = 1.5e-4 (EBS / 22)^alpha, peak 0.8."""
    centre = math.log(1.5e-4) + alpha * math.log(ebs / 22)
    return 0.8 - 0.02 * (math.log(lr) - centre) ** 2 + (rng.normal(0, noise) if rng is not None else 0.0)


def grid(alpha: float, seeds: int = 2, noise: float = 0.0, rng=None, lrs=LRS, ebs=EBS):
    points = [(lr, b, score(lr, b, alpha, noise, rng)) for b in ebs for lr in lrs for _ in range(seeds)]
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def test_a_known_exponent_and_best_lr_are_recovered_without_noise():
    fit = fit_exponent(*grid(0.5))
    assert fit.exponent == pytest.approx(0.5, abs=0.011)
    assert fit.best_lr_at(64) == pytest.approx(1.5e-4 * (64 / 22) ** 0.5, rel=0.05)
    lr, ebs, y = grid(0.5)
    b = best_lr([l for l, e in zip(lr, ebs) if e == 8], [s for s, e in zip(y, ebs) if e == 8], 8)
    assert b.lr == pytest.approx(1.5e-4 * (8 / 22) ** 0.5, rel=0.02) and b.bound is None


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_the_exponent_interval_covers_a_known_exponent(alpha):
    """80 synthetic studies (3 EBS x 3 lrs x 2 seeds, score noise sd 0.015 around a curvature of 0.02 per log-lr
    squared): the estimate is unbiased within its spread and the 95% profile interval holds alpha in >= 85%."""
    rng = np.random.default_rng(int(alpha * 10))
    estimates, covered, n = [], 0, 80
    for _ in range(n):
        fit = fit_exponent(*grid(alpha, noise=0.015, rng=rng))
        estimates.append(fit.exponent)
        low, high = fit.ci
        covered += (low is None or low <= alpha) and (high is None or alpha <= high)
    assert abs(np.mean(estimates) - alpha) < 3 * np.std(estimates) / math.sqrt(n) + 0.02
    assert covered / n >= 0.85


def test_rules_inside_the_interval_and_a_best_lr_past_the_grid():
    fit = fit_exponent(*grid(1.0, noise=0.002, rng=np.random.default_rng(0)))
    assert "linear" in fit.rules_inside and "none" not in fit.rules_inside
    # a score still rising at the largest lr: the best lr is a bound, not a number
    b = best_lr(list(LRS), [0.6, 0.7, 0.75], 64)
    assert b.lr is None and b.bound == {"above": 7.5e-4} and b.observed == 7.5e-4


def _write(d, ebs, lr, seed, curve):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({
        "batch": {"effective": ebs}, "train": {"seed": seed}, "optim": {"lr": lr, "lr_scaling": "none"},
        "derived": {"lr": lr, "num_train": 10**6, "steps_per_epoch": 10**6 // ebs, "total_steps": 200, "epochs": 1}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"event": "eval", "step": s, "samples": s * ebs,
                                                         "val/acc": v}) + "\n" for s, v in curve))
    (d / "summary.json").write_text(json.dumps({"status": "completed", "majority_rate": 0.5,
                                                "val_best": {"n": 5000}}))


def test_the_report_adds_the_lr_section_and_fits_steps_at_each_best_lr(tmp_path):
    """A lr x EBS grid whose peak score follows lr_opt ~ EBS^0.5: report.json's lr_study has the exponent and a
    best lr per EBS; the EBS section keeps only the runs at each EBS's best lr (steps 40 (1 + 32 / B) there, the
    other lrs 3x slower), so its fit finds B_crit 32."""
    for seed in (1, 2):
        for ebs in (8, 32, 128):
            best = 1.5e-4 * (ebs / 22) ** 0.5
            for lr in (3e-5, 1e-4, 3e-4, 1e-3):
                peak = score(lr, ebs, 0.5)
                nearest = min((3e-5, 1e-4, 3e-4, 1e-3), key=lambda v: abs(math.log(v / best)))
                need = 40 * (1 + 32 / ebs) * (1.0 if lr == nearest else 3.0)
                curve = [(s, 0.5 + (peak - 0.5) * min(1.0, s / need)) for s in range(1, 400)]
                _write(tmp_path / "sweep" / f"e{ebs}-lr{lr}-s{seed}", ebs, lr, seed, curve)
    md = report.build_report([tmp_path / "sweep"], tmp_path / "out").read_text()
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    lr = data["lr_study"]
    assert lr["exponent"] == pytest.approx(0.5, abs=0.1) and "sqrt" in lr["rules_inside"]
    assert [b["effective_batch"] for b in lr["best_lr"]] == [8, 32, 128]
    assert "## Learning rate and effective batch size" in md and "The joint fit puts the best lr" in md
    ebs = data["ebs_study"]
    assert all(r["replicates"] == [1, 1] for r in ebs["rows"])  # one lr per EBS kept
    assert "this fit uses, at each EBS, the runs at the lr nearest its best lr" in md
    assert (tmp_path / "out" / "lr_vs_ebs.png").stat().st_size > 1000
    assert "collapsed or diverged" not in md  # every run completed


def test_runs_that_collapsed_at_a_large_lr_are_named():
    from types import SimpleNamespace

    from ebslab.analysis.lr_study import analyse, fell_words

    runs = [SimpleNamespace(effective_batch=b, lr=lr, seed=1, status="collapsed" if lr == 7.5e-4 else "completed",
                            evals=[(1, b, score(lr, b, 0.5) if lr < 7.5e-4 else 0.5)], config={})
            for b in EBS for lr in LRS]
    study = analyse(runs)
    assert fell_words(study) == ("3 run(s) collapsed or diverged, at lr 7.5e-04 (EBS 8, 24, 64): there the score "
                                 "falls off a cliff rather than along a parabola, and the intervals above, which "
                                 "assume the parabola, are only as good as that description.")
