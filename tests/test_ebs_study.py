"""The effective-batch-size section on synthetic runs built from a known S_min and B_crit."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ebslab.ebs_study import (StudyRun, analyse, bootstrap_critical_batch, default_target, fit_tradeoff,
                              load_study_run, section, steps_table, to_target)

EBS = [8, 16, 32, 64, 128, 256]


def synthetic_run(ebs: int, seed: int, steps_needed: int, total_steps: int | None = None,
                  plateau: float = 0.8, b_simple: float | None = 50.0) -> StudyRun:
    """Evaluated at every step: val acc climbs linearly to `plateau` at `steps_needed`, then stays there."""
    total = total_steps or steps_needed + 10
    evals = [(s, s * ebs, 0.5 + (plateau - 0.5) * min(1.0, s / steps_needed)) for s in range(1, total + 1)]
    return StudyRun(name=f"ebs{ebs}-seed{seed}", effective_batch=ebs, seed=seed, lr_scaling="sqrt", lr=1e-4,
                    evals=evals, b_simple_curve=[(s * ebs, b_simple) for s in range(1, total + 1)] if b_simple else [],
                    b_simple=b_simple)


def known_runs(s_min: float = 40.0, b_crit: float = 64.0, seeds=(1, 2, 3), spread: float = 0.0, rng=None):
    runs = []
    for seed in seeds:
        factor = 1.0 + (spread * rng.normal() if rng is not None else 0.0)
        for ebs in EBS:
            runs.append(synthetic_run(ebs, seed, max(1, round(s_min * (1 + b_crit / ebs) * factor))))
    return runs


def test_the_fit_recovers_a_known_critical_batch_exactly():
    runs = known_runs()  # S = 40 (1 + 64/B): 360, 200, 120, 80, 60, 50 steps
    study = analyse(runs)
    assert study.target == pytest.approx(0.8)
    assert [r.mean_steps for r in study.rows] == [360, 200, 120, 80, 60, 50]
    assert [r.mean_examples for r in study.rows] == [2880, 3200, 3840, 5120, 7680, 12800]
    assert study.s_min == pytest.approx(40.0) and study.e_min == pytest.approx(2560.0)
    assert study.critical_batch == pytest.approx(64.0)
    assert study.critical_batch_ci == pytest.approx((64.0, 64.0))  # seeds identical: every resample the same
    assert study.fitted == EBS and study.lr_scaling == ["sqrt"]


def test_the_bootstrap_interval_over_seeds_covers_the_truth():
    """8 seeds whose steps scatter by 10% (a seed-wide factor): the point estimate is near 64 and the 95% interval
    holds it; an interval over seeds is wider than zero."""
    rng = np.random.default_rng(4)
    study = analyse(known_runs(seeds=range(1, 9), spread=0.1, rng=rng))
    low, high = study.critical_batch_ci
    assert low < 64.0 < high and high - low > 0
    assert study.critical_batch == pytest.approx(64.0, rel=0.01)  # a seed-wide factor scales S_min and E_min alike


def test_bootstrap_resamples_whole_seeds():
    """Two seeds, one with B_crit 32 and one with 128 (S_min 40): resamples of whole seeds give B_crit between
    the two, the extremes included (both seeds drawn twice)."""
    ebs = np.array([8, 16, 32, 64])
    matrix = np.stack([40 * (1 + 32 / ebs), 40 * (1 + 128 / ebs)])
    low, high = bootstrap_critical_batch(ebs, matrix, confidence=0.99)
    assert low == pytest.approx(32.0) and high == pytest.approx(128.0)
    assert fit_tradeoff(ebs, matrix.mean(0)) == pytest.approx((40.0, 40 * 80))


def test_default_target_and_steps_to_it():
    runs = [synthetic_run(8, 1, 100, plateau=0.9), synthetic_run(64, 1, 20, plateau=0.7)]
    assert default_target(runs) == pytest.approx(0.7)  # the best that EVERY run reached
    assert to_target(runs[0], 0.745) == (62, 496)  # 0.5 + 0.4 s / 100 >= 0.745 first at s = 62, 62 x 8 examples
    assert to_target(runs[1], 0.75) is None


def test_a_seed_that_never_reaches_the_target_drops_its_ebs_from_the_fit():
    runs = known_runs()
    runs[0] = synthetic_run(8, 1, 360, plateau=0.7)  # seed 1 at EBS 8 tops out below the target
    study = analyse(runs, target=0.8)
    row8 = study.rows[0]
    assert row8.steps == [None, 360, 360] and not row8.complete
    assert study.fitted == EBS[1:] and study.critical_batch == pytest.approx(64.0)
    assert "EBS 8 left out of the fit: a seed never reached the target" in study.notes


def test_section_writes_plots_json_and_the_paragraph(tmp_path):
    md, data = section(known_runs(), tmp_path)
    assert (tmp_path / "ebs_steps_vs_examples.png").stat().st_size > 1000
    assert (tmp_path / "ebs_b_simple.png").stat().st_size > 1000
    assert set(data) >= {"target", "rows", "s_min", "e_min", "critical_batch", "critical_batch_ci", "b_simple"}
    assert data["critical_batch"] == pytest.approx(64.0) and data["b_simple"] == 50.0
    json.dumps(data, allow_nan=False)  # report.json stays strict JSON
    assert "critical batch size is B_crit = 64" in md
    assert "EBS 256 needed 4.4x the examples of EBS 8 for 0.14x the steps." in md
    assert "Above B_crit (EBS 128, 256) extra examples buy few steps." in md
    assert "lr_scaling=sqrt" in md
    assert "| 8 | 1, 2, 3 | 360, 360, 360 | 2880, 2880, 2880 | 360.0 | 2880 | 50 |" in md


def test_no_section_without_a_varying_effective_batch(tmp_path):
    assert section([synthetic_run(32, s, 50) for s in (1, 2, 3)], tmp_path) is None


def test_steps_falling_as_1_over_b_mean_no_critical_batch():
    runs = [synthetic_run(b, 1, 3200 // b) for b in EBS[:4]] + [synthetic_run(b, 2, 3200 // b) for b in EBS[:4]]
    study = analyse(runs)
    assert study.s_min == pytest.approx(0.0, abs=1e-9) or study.s_min < 0
    assert math.isinf(study.critical_batch) and study.to_json()["critical_batch"] is None


def test_load_study_run_reads_a_run_folder(tmp_path):
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"batch": {"effective": 16}, "train": {"seed": 2},
                                                          "optim": {"lr_scaling": "sqrt"},
                                                          "derived": {"lr": 7e-5}}))
    lines = [{"event": "step", "step": 1, "gns/b_simple": None}, {"event": "step", "step": 2, "gns/b_simple": 30.0},
             {"event": "eval", "step": 2, "samples": 32, "val/acc": 0.6},
             {"event": "eval", "step": 4, "samples": 64, "val/acc": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "gns": {"b_simple": 33.0}}))
    run = load_study_run(tmp_path)
    assert (run.effective_batch, run.seed, run.lr_scaling, run.lr) == (16, 2, "sqrt", 7e-5)
    assert run.evals == [(2, 32, 0.6), (4, 64, 0.7)] and run.b_simple_curve == [(32, 30.0)] and run.b_simple == 33.0
    assert steps_table([run], 0.65)[0].steps == [4]
    assert run.gns and steps_table([run], 0.65)[0].gns == [True]
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))  # train.gns off: no `gns`
    assert not load_study_run(tmp_path).gns


def test_an_upper_bound_far_past_the_runs_is_reported_as_unbounded(tmp_path):
    """One seed with S ~ 1/B (S_min 0) and one with B_crit 16: resamples of the first give no upper bound."""
    runs = [synthetic_run(b, 1, 3200 // b) for b in EBS[:4]] + [synthetic_run(b, 2, round(40 * (1 + 16 / b)))
                                                                 for b in EBS[:4]]
    md, data = section(runs, tmp_path)
    assert "to unbounded (S_min near 0 in some resamples)" in md
    assert data["critical_batch_ci"][1] is None or data["critical_batch_ci"][1] > 6400


def test_runs_that_differ_in_another_key_get_one_fit_each(tmp_path):
    """A sweep over EBS x lr_scaling: each lr rule gets its own fit (B_crit 64 for sqrt, 16 for linear)."""
    from ebslab.ebs_study import report_section

    import yaml

    for rule, b_crit in (("sqrt", 64), ("linear", 16)):
        for seed in (1, 2):
            for ebs in (8, 16, 32, 64):
                run = synthetic_run(ebs, seed, round(40 * (1 + b_crit / ebs)))
                d = tmp_path / "sweep" / f"{rule}-{ebs}-{seed}"
                d.mkdir(parents=True)
                (d / "config.yaml").write_text(yaml.safe_dump({"batch": {"effective": ebs}, "train": {"seed": seed},
                                                               "optim": {"lr_scaling": rule},
                                                               "out": {"name": d.name}}))
                (d / "metrics.jsonl").write_text("".join(json.dumps({"event": "eval", "step": s, "samples": e,
                                                                     "val/acc": v}) + "\n" for s, e, v in run.evals))
                (d / "summary.json").write_text(json.dumps({"status": "completed"}))
    lines, data = report_section(sorted((tmp_path / "sweep").iterdir()), tmp_path)
    assert set(data["groups"]) == {"optim.lr_scaling=sqrt", "optim.lr_scaling=linear"}
    assert data["groups"]["optim.lr_scaling=sqrt"]["critical_batch"] == pytest.approx(64.0)
    assert data["groups"]["optim.lr_scaling=linear"]["critical_batch"] == pytest.approx(16.0, rel=0.02)
    assert "## Effective batch size: optim.lr_scaling=linear" in lines
    assert (tmp_path / "ebs2_steps_vs_examples.png").exists()


def test_an_ebs_with_fewer_seeds_is_shown_but_left_out_of_the_fit():
    runs = [r for r in known_runs() if not (r.effective_batch == 256 and r.seed > 1)]
    study = analyse(runs)
    assert study.rows[-1].seeds == [1] and study.fitted == EBS[:-1]
    assert study.critical_batch == pytest.approx(64.0)
    assert "EBS 256 left out of the fit: not every seed (1, 2, 3) completed there" in study.notes


def test_the_paragraph_compares_only_fitted_ebs():
    runs = [r for r in known_runs() if not (r.effective_batch == 256 and r.seed > 1)]
    text = section(runs, Path(tempfile.mkdtemp()))[0]
    assert "EBS 128 needed 2.7x the examples of EBS 8 for 0.17x the steps." in text


def test_the_paragraph_names_the_ebs_without_a_noise_scale():
    """EBS 8 with micro 8 runs one micro-batch gradient per step (gns off, no `gns` in the summary); at EBS 16 the
    gns ran but its |G|^2 average stayed <= 0 (b_simple null). B_simple is the median over the other EBS."""
    runs = known_runs()
    for r in runs:
        if r.effective_batch == 8:
            r.gns, r.b_simple, r.b_simple_curve = False, None, []
        elif r.effective_batch == 16:
            r.b_simple = None
        elif r.effective_batch == 256:
            r.b_simple = 80.0
    md, data = section(runs, Path(tempfile.mkdtemp()))
    assert data["b_simple"] == 50.0  # median of 50 (EBS 32, 64, 128) x 9 and 80 (EBS 256) x 3
    assert "B_simple = 50 (median over the runs of EBS 32, 64, 128, 256 of the last half of training)" in md
    assert "EBS 8 ran one micro-batch gradient per step (accum_steps x world_size = 1), which gives no " \
           "gradient noise scale." in md
    assert "At EBS 16 the |G|^2 estimate averaged at or below 0" in md
    assert "| 8 | 1, 2, 3 | 360, 360, 360 | 2880, 2880, 2880 | 360.0 | 2880 | - |" in md
    full, _ = section(known_runs(), Path(tempfile.mkdtemp()))
    assert "(median over runs of the last half of training)" in full and "which gives no" not in full
