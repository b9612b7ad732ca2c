"""The effective-batch-size section: interpolated steps to a target, the log-space fit with seed intercepts and
its profile interval (coverage and error checked on simulated studies with a known B_crit), B_crit only inside the
range run, the refusals, and every sentence against the numbers beside it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from ebs_simulation import DOC_DESIGN, EXP2_DESIGN, simulate_runs

from ebslab.analysis.ebs_section import report_section, section
from ebslab.analysis.ebs_study import (StudyRun, analyse, crossing, default_target, first_eval_at_or_past, fit_log_tradeoff,
                              fit_linear_tradeoff, fit_target, load_study_run, steps_table)

EBS = [8, 16, 32, 64, 128]


def synthetic_run(ebs: int, seed: int, steps_needed: float, total_steps: int | None = None, plateau: float = 0.8,
                  every: int = 1, b_simple: float | None = 50.0) -> StudyRun:
    """Evaluated every `every` steps: val acc climbs linearly from 0.5 to `plateau` at `steps_needed`, then stays."""
    total = total_steps or int(steps_needed * 2) + 10
    evals = [(s, s * ebs, 0.5 + (plateau - 0.5) * min(1.0, s / steps_needed)) for s in range(every, total + 1, every)]
    return StudyRun(name=f"ebs{ebs}-seed{seed}", effective_batch=ebs, seed=seed, lr_scaling="sqrt", lr=1e-4,
                    evals=evals, b_simple_curve=[(s * ebs, b_simple) for s in range(1, total + 1)] if b_simple else [],
                    b_simple=b_simple, budget=total * ebs, majority_rate=0.5, n_val=2000)


def known_runs(s_min: float = 40.0, b_crit: float = 64.0, seeds=(1, 2, 3), factors=None, ebs=EBS, **kw):
    factors = factors or {}
    return [synthetic_run(b, seed, s_min * (1 + b_crit / b) * factors.get(seed, 1.0), **kw)
            for seed in seeds for b in ebs]


# ------------------------------------------------------------------------------------------------------------
# Steps to a target


def test_crossing_is_interpolated_between_evaluations():
    """Evaluated every 10 steps, acc 0.5 + 0.3 s / 95: 0.75 is crossed at s = 79.17; the first evaluation past
    it (s = 80) rounds up, and from the majority rate at 0 the first interval is interpolated too."""
    run = synthetic_run(8, 1, 95, every=10, total_steps=200, plateau=0.8)
    steps, examples = crossing(run, 0.75)
    assert steps == pytest.approx(95 * 0.25 / 0.3) and examples == pytest.approx(8 * 95 * 0.25 / 0.3)
    assert first_eval_at_or_past(run, 0.75) == (80, 640)
    assert crossing(run, 0.52)[0] == pytest.approx(95 * 0.02 / 0.3)  # before the first evaluation at s = 10
    assert crossing(run, 0.81) is None


def test_the_fit_recovers_a_known_critical_batch_exactly():
    """S = 40 (1 + 64 / B) with seed-wide factors 0.8, 1, 1.3: the seed intercepts absorb the factors."""
    runs = known_runs(factors={1: 0.8, 3: 1.3})
    tf = fit_target(runs, 0.8)
    assert tf.fitted == EBS and tf.refusal is None
    assert tf.fit.critical_batch == pytest.approx(64.0, rel=1e-3) and tf.critical_batch == pytest.approx(64.0, rel=1e-3)
    assert tf.fit.s_min == pytest.approx(40.0 * (0.8 * 1.3) ** (1 / 3), rel=1e-3)
    low, high = tf.fit.ci
    assert low == pytest.approx(64.0, rel=0.02) and high == pytest.approx(64.0, rel=0.02)  # no residual noise


def _old_reading(runs, target):
    """The section before: first evaluation at or past the target, seed-mean steps, least squares in 1/B."""
    ebs = sorted({r.effective_batch for r in runs})
    means = [np.mean([first_eval_at_or_past(r, target)[0] for r in runs if r.effective_batch == b]) for b in ebs]
    s_min, e_min = fit_linear_tradeoff(ebs, means)
    return e_min / s_min if s_min > 0 else math.inf


@pytest.mark.parametrize("design", [DOC_DESIGN, EXP2_DESIGN], ids=["doc", "exp2"])
@pytest.mark.parametrize("b_crit", [128, 512])
def test_the_interval_covers_on_simulated_studies(design, b_crit):
    """300 studies drawn from the model (seed factor sd 0.15, run factor sd 0.25 in log steps, evaluation every
    200 or 4096 examples): the 95% profile interval holds the true B_crit in >= 90% of them."""
    rng = np.random.default_rng(b_crit + design["eval_every"])
    covered = 0
    n = 300
    for _ in range(n):
        runs = simulate_runs(rng, design["ebs"], design["seeds"], design["eval_every"], design["e_min"], b_crit)
        fit = fit_target(runs, 0.75).fit
        low, high = fit.ci
        covered += (low is None or low <= b_crit) and (high is None or b_crit <= high)
    assert covered / n >= 0.9


def test_the_log_fit_is_closer_than_the_old_one_on_the_same_studies():
    """Doc-like design, B_crit 128: median |log(estimate / truth)| of the new fit is below the old reading's."""
    rng = np.random.default_rng(7)
    new, old = [], []
    for _ in range(200):
        runs = simulate_runs(rng, DOC_DESIGN["ebs"], DOC_DESIGN["seeds"], 200, DOC_DESIGN["e_min"], 128)
        estimate = fit_target(runs, 0.75).fit.critical_batch
        new.append(abs(math.log(estimate / 128)) if 0 < estimate < math.inf else math.inf)
        b_old = _old_reading(runs, 0.75)
        old.append(abs(math.log(b_old / 128)) if 0 < b_old < math.inf else math.inf)
    assert np.median(new) < 0.8 * np.median(old)


# ------------------------------------------------------------------------------------------------------------
# Only inside the range run; refusals in words


def test_a_critical_batch_past_the_largest_ebs_is_a_bound_and_null_in_json(tmp_path):
    runs = known_runs(b_crit=600.0, ebs=[8, 16, 32, 64, 128])
    md, data = section(runs, tmp_path, target=0.8)
    assert data["critical_batch"] is None and data["critical_batch_bound"] == {"above": 128}
    assert "puts B_crit above 128, the largest EBS run, so every EBS run is below the critical batch size" in md
    assert "600" not in md.split("\n")[2]  # no number from past the range in the headline
    json.dumps(data, allow_nan=False)


def test_an_unbounded_upper_end_is_null_and_said_in_words():
    """Steps falling exactly as 1/B plus noise: the data cannot tell B_crit from infinity."""
    rng = np.random.default_rng(3)
    runs = [synthetic_run(b, s, 3200 / b * math.exp(rng.normal(0, 0.2))) for s in (1, 2, 3) for b in EBS]
    study = analyse(runs, target=0.8)
    assert study.main.fit.ci[1] is None and study.to_json()["critical_batch_ci"][1] is None
    assert "no upper end (the runs cannot tell B_crit from infinity)" in section(runs, Path(_tmp()), 0.8)[0]


def _tmp() -> str:
    import tempfile

    return tempfile.mkdtemp()


def test_a_target_within_noise_of_the_majority_rate_is_refused(tmp_path):
    """100 validation examples at a majority rate of 0.5: 2 standard errors reach 0.6; a target of 0.55 is
    refused in words, with no placeholder line."""
    runs = known_runs()
    for r in runs:
        r.n_val = 100
    md, data = section(runs, tmp_path, target=0.55)
    assert data["refusal"].startswith("val/acc 0.55 is within noise of the majority rate 0.5")
    assert "No critical batch size for val/acc 0.55: val/acc 0.55 is within noise" in md
    assert "= -" not in md and "S_min = -" not in md
    assert data["critical_batch"] is None and data["critical_batch_ci"] is None


def test_fewer_than_three_ebs_reaching_the_target_is_refused():
    runs = known_runs(ebs=[8, 16, 32])
    for r in runs:
        if r.effective_batch == 32 and r.seed == 2:
            r.evals = [(s, x, min(v, 0.7)) for s, x, v in r.evals]
    tf = fit_target(runs, 0.75)
    assert tf.fit is None and tf.refusal == "only 2 EBS value(s) (8, 16) had every seed reach val/acc 0.75; a fit needs 3"
    assert "EBS 32 left out of the fit: a seed never reached the target" in tf.warnings


def test_crossings_at_the_end_of_the_budget_are_warned():
    runs = known_runs()
    for r in runs:
        if r.effective_batch == 128:
            r.budget = int(crossing(r, 0.8)[1] / 0.95)
    tf = fit_target(runs, 0.8)
    assert any(w.startswith("EBS 128 seed 1, EBS 128 seed 2, EBS 128 seed 3 reached the target in the last 10% "
                            "of the budget") for w in tf.warnings)


def test_the_default_target_is_reached_early_by_every_run():
    """Runs of 3 x the steps they need to 0.8: the default is the hardest level all reach within 75% of the
    budget, well above the noise floor (0.5 + 2 se at 2000 examples = 0.522)."""
    runs = known_runs()
    target, why = default_target(runs)
    assert 0.6 < target <= 0.8
    for r in runs:
        assert crossing(r, target)[1] <= 0.75 * r.budget
    assert why == "target = the hardest val/acc that every run reached within the first 75% of its budget"


# ------------------------------------------------------------------------------------------------------------
# Sentences, table, plots, report.json


def test_section_writes_plots_json_and_sentences_that_match_the_numbers(tmp_path):
    md, data = section(known_runs(), tmp_path, target=0.8)
    for name in ("ebs_steps_vs_examples.png", "ebs_b_simple.png", "ebs_critical_batch_vs_target.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert data["critical_batch"] == pytest.approx(64.0, rel=1e-3) and data["b_simple"] == 50.0
    json.dumps(data, allow_nan=False)
    assert "the critical batch size is B_crit = 64 (" in md
    # S = 40 (1 + 64/B): E(8) = 2880, E(128) = 7680 examples, steps 360 -> 60
    assert "EBS 128 needed 2.67x the examples of EBS 8 for 0.17x the steps (geometric means over seeds): the " \
           "fewer steps cost 167% more examples." in md
    assert "at little cost in examples" not in md
    assert "| 8 | 1, 2, 3 | 360.0, 360.0, 360.0 | 2880, 2880, 2880 | 360.0 | 2880 | 50 |" in unpadded(md)
    assert "lr_scaling=sqrt from one base lr" in md
    assert len(data["targets"]) == 6


def test_little_cost_in_examples_only_when_the_examples_say_so(tmp_path):
    md, _ = section(known_runs(b_crit=2000.0, ebs=[8, 16, 32]), tmp_path, target=0.8)
    assert "EBS 32 needed 1.01x the examples of EBS 8" in md and "at little cost in examples" in md


def test_b_simple_is_read_where_each_run_reached_the_target(tmp_path):
    """B_simple climbs with the examples seen (B_simple = examples / 10): each run's value is the one logged at
    its crossing, not a median over the last half; EBS 8 (one micro-batch per step) has none, said in words."""
    runs = known_runs()
    for r in runs:
        r.b_simple_curve = [(x, x / 10) for _, x, _ in r.evals]
        if r.effective_batch == 8:
            r.gns, r.b_simple_curve = False, []
    study = analyse(runs, target=0.8)
    row16 = study.rows[1]  # crossing at 200 steps x 16 = 3200 examples
    assert row16.b_simple == [pytest.approx(320.0)] * 3
    md, _ = section(runs, tmp_path, target=0.8)
    assert "B_simple = 320 at EBS 16, 384 at EBS 32" in md
    assert "EBS 8 ran one micro-batch gradient per step (accum_steps x world_size = 1), which gives no gradient " \
           "noise scale." in md
    assert "| 8 | 1, 2, 3 |" in unpadded(md) and "| not measured |" in unpadded(md)


def unpadded(md: str) -> str:
    """Markdown with the padding that aligns table columns taken out (one space either side of a cell)."""
    return re.sub(" {2,}", " ", md)


def _write_run(d: Path, run: StudyRun, config: dict) -> None:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"event": "eval", "step": s, "samples": e, "val/acc": v})
                                             + "\n" for s, e, v in run.evals))
    (d / "summary.json").write_text(json.dumps({"status": "completed", "majority_rate": 0.5,
                                                "val_best": {"acc": 0.8, "n": 2000}}))


def test_runs_differing_only_in_the_backend_are_one_replicate(tmp_path):
    """exp2-ebs's structure: EBS x train.backend (torch, accelerate) x seeds, equal training: one row per EBS with
    each seed once, a fit, and no "not every seed completed" note."""
    for backend in ("torch", "accelerate"):
        for seed in (1, 2, 3):
            for ebs in (64, 256, 512, 1024):
                run = synthetic_run(ebs, seed, 30 * (1 + 200 / ebs) * (1 + 0.1 * seed))
                _write_run(tmp_path / "sweep" / f"{backend}-{ebs}-{seed}", run, {
                    "batch": {"effective": ebs, "micro": 16}, "train": {"seed": seed, "backend": backend},
                    "optim": {"lr_scaling": "sqrt"}, "derived": {"lr": 1e-4, "total_steps": 1000, "num_train": 10**6,
                                                                  "epochs": 1, "steps_per_epoch": 1000}})
    lines, data = report_section(sorted((tmp_path / "sweep").iterdir()), tmp_path, target=0.79)
    assert [r["seeds"] for r in data["rows"]] == [[1, 2, 3]] * 4
    assert [r["replicates"] for r in data["rows"]] == [[2, 2, 2]] * 4
    assert data["critical_batch"] == pytest.approx(200.0, rel=0.01)
    assert not any("not every seed" in w for w in data["warnings"])


def test_runs_that_differ_in_another_key_get_one_fit_each(tmp_path):
    for rule, b_crit in (("sqrt", 32), ("linear", 16)):
        for seed in (1, 2):
            for ebs in (8, 16, 32, 64):
                run = synthetic_run(ebs, seed, 40 * (1 + b_crit / ebs))
                _write_run(tmp_path / "sweep" / f"{rule}-{ebs}-{seed}", run,
                           {"batch": {"effective": ebs}, "train": {"seed": seed}, "optim": {"lr_scaling": rule}})
    lines, data = report_section(sorted((tmp_path / "sweep").iterdir()), tmp_path, target=0.8)
    assert set(data["groups"]) == {"optim.lr_scaling=sqrt", "optim.lr_scaling=linear"}
    assert data["groups"]["optim.lr_scaling=sqrt"]["critical_batch"] == pytest.approx(32.0, rel=1e-3)
    assert data["groups"]["optim.lr_scaling=linear"]["critical_batch"] == pytest.approx(16.0, rel=1e-3)
    assert "## Effective batch size: optim.lr_scaling=linear" in lines
    assert (tmp_path / "ebs2_steps_vs_examples.png").exists()


def test_load_study_run_reads_a_run_folder(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "batch": {"effective": 16}, "train": {"seed": 2}, "optim": {"lr_scaling": "sqrt"},
        "derived": {"lr": 7e-5, "num_train": 40, "steps_per_epoch": 3, "total_steps": 6, "epochs": 2}}))
    lines = [{"event": "step", "step": 1, "gns/b_simple": None}, {"event": "step", "step": 3, "gns/b_simple": 30.0},
             {"event": "step", "step": 4, "gns/b_simple": 31.0},
             {"event": "eval", "step": 2, "samples": 32, "val/acc": 0.6},
             {"event": "eval", "step": 4, "samples": 56, "val/acc": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "gns": {"b_simple": 33.0},
                                                       "majority_rate": 0.55, "val_best": {"n": 120}}))
    run = load_study_run(tmp_path)
    assert (run.effective_batch, run.seed, run.lr_scaling, run.lr) == (16, 2, "sqrt", 7e-5)
    # examples seen: step 3 ends epoch 1 (40, the last window short), step 4 is 40 + 16
    assert run.evals == [(2, 32, 0.6), (4, 56, 0.7)] and run.b_simple_curve == [(40, 30.0), (56, 31.0)]
    assert (run.budget, run.majority_rate, run.n_val) == (80, 0.55, 120)
    assert steps_table([run], 0.65)[0].steps == [pytest.approx(3.0)]


def test_a_critical_batch_below_the_smallest_ebs_is_a_bound(tmp_path):
    """S = 400 (1 + 2 / B): the steps barely fall from EBS 16 on; B_crit 2 is below the smallest EBS run."""
    md, data = section(known_runs(s_min=400.0, b_crit=2.0, ebs=[16, 32, 64, 128]), tmp_path, target=0.79)
    assert data["critical_batch"] is None and data["critical_batch_bound"] == {"below": 16}
    assert "puts B_crit below 16, the smallest EBS run, so every EBS run is above the critical batch size" in md


def test_an_ebs_whose_signal_was_swamped_says_so(tmp_path):
    runs = known_runs()
    for r in runs:
        if r.effective_batch == 16:
            r.b_simple_curve = []  # gns on, but its |G|^2 average never positive: no B_simple logged
    md, _ = section(runs, tmp_path, target=0.8)
    assert "At EBS 16 the |G|^2 estimate averaged at or below 0 up to the target (the noise swamped the signal): " \
           "no B_simple." in md


def test_the_fit_has_no_interval_without_residual_degrees_of_freedom():
    """3 EBS x 1 seed: 3 points, one intercept and B_crit leave 1 degree of freedom; 2 EBS x 1 seed leave none."""
    ebs = [8, 32, 128]
    steps = [40 * (1 + 64 / b) for b in ebs]
    assert fit_log_tradeoff(ebs, steps, [1, 1, 1]).dof == 1
    none = fit_log_tradeoff(ebs[:2], steps[:2], [1, 1])
    assert none.dof == 0 and none.ci is None and none.critical_batch == pytest.approx(64.0, rel=1e-3)
