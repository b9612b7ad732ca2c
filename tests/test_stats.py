"""ebslab.analysis.stats against simulations with a known truth, and against values computed by hand.

The simulations are vectorised over trials (a few seconds each on one core)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.power import TTestPower

from ebslab.core import metrics
from ebslab.analysis import stats

# Accuracy ~0.90, seed-to-seed spread ~0.5 point, two models agreeing on ~93% of the test examples. Example i has
# a difficulty z_i shared by every model and seed (errors are correlated across runs: the test set is crossed
# with the seeds); a run adds its own per-example noise (TAU) and a seed-level skill shift (SIGMA_SEED).
TAU, SIGMA_SEED = 0.38, 0.03
SCALE = math.sqrt(1 + TAU ** 2 + SIGMA_SEED ** 2)
THRESHOLD = sps.norm.ppf(0.90) * SCALE


def correctness(rng, trials: int, seeds: int, examples: int, shift_b: float = 0.0) -> np.ndarray:
    """(trials, 2 configurations, seeds, examples) correct/incorrect, one fresh test set per trial."""
    z = rng.standard_normal((trials, 1, 1, examples), dtype=np.float32)
    line = THRESHOLD + np.array([0.0, shift_b])[None, :, None, None] + rng.normal(0, SIGMA_SEED, (trials, 2, seeds, 1))
    noise = rng.standard_normal((trials, 2, seeds, examples), dtype=np.float32)
    return z + np.float32(TAU) * noise < line.astype(np.float32)


def seed_differences(rng, trials: int, seeds: int, examples: int, shift_b: float = 0.0) -> np.ndarray:
    """(trials, seeds) per-seed test accuracy differences A - B, simulated in chunks of ~4M cells."""
    out = np.empty((trials, seeds))
    step = max(1, 4_000_000 // (2 * seeds * examples))
    for start in range(0, trials, step):
        acc = correctness(rng, min(step, trials - start), seeds, examples, shift_b).mean(axis=-1)
        out[start:start + step] = acc[:, 0] - acc[:, 1]
    return out


def _truth(shift_b: float) -> float:
    """Population accuracy difference A - B (over examples and seeds) of the simulation."""
    return float(sps.norm.cdf(THRESHOLD / SCALE) - sps.norm.cdf((THRESHOLD + shift_b) / SCALE))


def test_simulation_matches_the_setting():
    rng = np.random.default_rng(1)
    c = correctness(rng, 60, 3, 5000)
    acc = c.mean(axis=-1)  # (trials, 2, seeds)
    assert acc.mean() == pytest.approx(0.90, abs=0.01)
    assert (c[:, 0] == c[:, 1]).mean() == pytest.approx(0.93, abs=0.01)
    assert 0.004 < acc[:, 0].std(axis=-1, ddof=1).mean() < 0.006


@pytest.mark.parametrize("seeds", [2, 3, 5])
@pytest.mark.parametrize("examples", [200, 2500])
def test_false_positive_rate_under_the_null_ties_included(seeds, examples):
    # Identical configurations: the verdict's p (paired t, sign-flip where every seed gives the same difference)
    # rejects at most ~5%. Truth: alpha = 0.05. Measured (1,500 trials each, seed 0):
    # 2 seeds: 0.6% (200 ex.), 5.1% (2,500); 3 seeds: 4.9%, 5.2%; 5 seeds: 5.0%, 4.1%. The old rule (a tie gives
    # p = 0) rejected 6-7% of 2-seed, 200-example pairs from ties alone.
    rng = np.random.default_rng(seeds * 10_000 + examples)
    d = seed_differences(rng, 1500, seeds, examples)
    p = np.array([stats.verdict_p(x)[0] for x in d])
    assert not np.isnan(p).any() and p.min() > 0
    assert np.mean(p < stats.ALPHA) <= 0.06
    ties = np.all(d == d[:, :1], axis=1) & (d[:, 0] != 0)
    if seeds == 2 and examples == 200:
        assert ties.mean() > 0.03  # ties are common here, and none of them is called significant
        assert (p[ties] == 0.5).all()


def test_power_for_a_three_sd_effect_matches_the_noncentral_t():
    # B is worse by 1.6 points = 3 seed standard deviations of one configuration (0.52 point). Truth: the power
    # TTestPower gives at the effect size truth / sd(d) (sd of a per-seed difference from 4,000 trials: 0.93
    # point): 0.81 with 5 seeds, 0.98 with 8. Measured (400 trials, seed 2): 0.84 and 0.99.
    rng = np.random.default_rng(2)
    shift_b = -0.0916
    truth = _truth(shift_b)
    assert truth == pytest.approx(0.0159, abs=0.0005)
    sd = seed_differences(rng, 4000, 1, 2500, shift_b)[:, 0].std(ddof=1)
    for seeds in (5, 8):
        d = seed_differences(rng, 400, seeds, 2500, shift_b)
        detected = np.mean([stats.verdict_p(x)[0] < stats.ALPHA for x in d])
        expected = TTestPower().power(effect_size=truth / sd, nobs=seeds, alpha=stats.ALPHA)
        assert detected == pytest.approx(expected, abs=0.06), (seeds, detected, expected)
        cover = np.mean([(lambda lo, hi, _: lo <= truth <= hi)(*stats.t_interval(x, 0.95, (-1, 1))) for x in d])
        assert 0.92 <= cover <= 0.98, cover


def regime(rng, kind: str, seeds: int, examples: int) -> tuple[np.ndarray, float]:
    """Per-example differences correct_A - correct_B (seeds, examples) on one fresh test set, and the truth.

    "example": per-example effects dominate: 12% of examples only A gets right, 8% only B, the rest both or
    neither, each run flipping 2% of them at random (truth 0.04 x 0.96). "noise": every example is a coin that
    each seed throws anew (A right 72%, B 70%: seed-by-example noise, no per-example effect; truth 0.02)."""
    if kind == "example":
        u = rng.random(examples)
        a_right = (u < 0.12) | (u >= 0.20) & (u < 0.90)
        b_right = (u >= 0.12) & (u < 0.90)
        pa, pb, truth = np.where(a_right, 0.98, 0.02), np.where(b_right, 0.98, 0.02), 0.04 * 0.96
    else:
        pa, pb, truth = np.full(examples, 0.72), np.full(examples, 0.70), 0.02
    return (rng.random((seeds, examples)) < pa).astype(float) - (rng.random((seeds, examples)) < pb), truth


@pytest.mark.parametrize("kind,seeds,examples,nested_below", [
    ("example", 3, 500, 0.85), ("example", 5, 1000, 0.75), ("noise", 3, 500, None), ("noise", 5, 500, None)])
def test_crossed_bootstrap_covers_in_both_regimes_and_nested_does_not(kind, seeds, examples, nested_below):
    # Truth: the population difference of `regime`. Measured (300 trials, 1,000 resamples each): crossed 0.96 /
    # 0.96 (example regime, 3 / 5 seeds), 0.99 / 1.00 (noise regime: conservative, it counts the seed-by-example
    # noise from both sides); nested 0.78 / 0.67 in the example regime: it misses the per-example effects every
    # seed shares.
    rng = np.random.default_rng(seeds * 7 + examples)
    crossed = nested = 0
    trials = 300
    for _ in range(trials):
        diffs, truth = regime(rng, kind, seeds, examples)
        lo, hi = stats.percentile_interval(stats.crossed_bootstrap_mean(diffs, 1000, rng))
        crossed += lo <= truth <= hi
        if nested_below is not None:
            lo, hi = stats.percentile_interval(stats.nested_bootstrap_mean(diffs, 1000, rng))
            nested += lo <= truth <= hi
    assert crossed / trials >= 0.93, crossed / trials
    if nested_below is not None:
        assert nested / trials < nested_below, nested / trials


# ------------------------------------------------------------------------------------------ small known cases


def test_sign_flip_p_by_hand_and_its_floor():
    # every seed the same non-zero difference: only the all-+ and all-- sign vectors reach |sum|: 2 / 2^n
    assert stats.sign_flip_p([0.01] * 3) == 0.25 and stats.min_sign_flip_p(3) == 0.25
    assert stats.sign_flip_p([0.01] * 5) == 0.0625 and stats.min_sign_flip_p(5) == 0.0625
    assert stats.sign_flip_p([0.01] * 8) == pytest.approx(0.0078125) and stats.min_sign_flip_p(8) == 2 / 256
    # d = [1, 2, 3]: |sum| 6 is reached by (+++), (---) only; sums of the 8 vectors: 6,4,2,0,0,-2,-4,-6
    assert stats.sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    # d = [3, -1, 1, 1]: |sum| = 4; the three 1s sum to x in {-3, -1, 1, 3} (1, 3, 3, 1 ways): |3 + x| >= 4 for
    # x >= 1 (4 ways), |-3 + x| >= 4 for x <= -1 (4 ways): 8 of 16
    assert stats.sign_flip_p([3.0, -1.0, 1.0, 1.0]) == 0.5
    assert stats.sign_flip_p([0.0, 0.0]) == 1.0
    # the Monte Carlo path (more than 16 seeds) agrees with the normal approximation of the exact test
    d = np.linspace(0.5, 1.5, 20) * np.where(np.arange(20) % 4 == 0, -1, 1)
    p_mc = stats.sign_flip_p(d)
    z = d.sum() / math.sqrt((d ** 2).sum())
    assert p_mc == pytest.approx(2 * sps.norm.sf(abs(z)), abs=0.01)


def test_a_tie_gives_the_sign_flip_p_never_zero():
    assert math.isnan(stats.paired_t_test([0.01, 0.01]))
    assert stats.verdict_p([0.01, 0.01]) == (0.5, "sign-flip")
    assert stats.verdict_p([0.0, 0.0, 0.0]) == (1.0, "sign-flip")
    assert stats.verdict_p([0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]) == (2 / 256, "sign-flip")
    d = [0.01, 0.03, 0.02, 0.04]
    assert stats.verdict_p(d) == (pytest.approx(stats.paired_t_test(d)), "t")
    assert math.isnan(stats.verdict_p([0.3])[0])
    out = stats.seed_comparison([0.02, 0.02, 0.02])
    assert out["p"] == 0.25 and out["p_test"] == "sign-flip" and math.isnan(out["p_t"]) and out["p_min"] == 0.25
    assert out["t_note"] == "all 3 values equal: no spread to size an interval"


def test_t_interval_by_hand_and_bounded():
    lo, hi, why = stats.t_interval([0.01, 0.02, 0.03], 0.95, (-1, 1))
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert why is None and lo == pytest.approx(0.02 - half) and hi == pytest.approx(0.02 + half)
    lo, hi, why = stats.t_interval([0.30, 1.00], 0.95, (0, 1))
    assert math.isnan(lo) and math.isnan(hi) and why == "n = 2 is too small for an interval inside [0, 1]"
    assert stats.t_interval([0.5], 0.95, (0, 1))[2] == "n = 1: no interval"


def test_one_seed_has_no_p_value_and_no_p_better():
    out = stats.seed_comparison([0.458])
    assert out["n_seeds"] == 1 and out["estimate"] == pytest.approx(0.458)
    assert math.isnan(out["p"]) and math.isnan(out["t_low"]) and out["t_note"] == "n = 1: no interval"
    assert math.isnan(out["p_better"]) and math.isnan(out["p_min"])


def test_p_better_has_an_exact_clopper_pearson_interval():
    # 3 wins of 3: [0.025^(1/3), 1] = [0.292, 1]
    p, lo, hi = stats.prob_of_improvement([0.01, 0.02, 0.03])
    assert (p, hi) == (1.0, 1.0) and lo == pytest.approx(0.025 ** (1 / 3))
    # 1 win, 1 tie, 1 loss: estimate 0.5 (a tie counts one half); interval from CP(1 of 3) low to CP(2 of 3) high
    p, lo, hi = stats.prob_of_improvement([0.01, 0.0, -0.01])
    assert p == 0.5
    assert lo == pytest.approx(sps.beta.ppf(0.025, 1, 3)) and hi == pytest.approx(sps.beta.ppf(0.975, 3, 1))
    assert all(math.isnan(x) for x in stats.prob_of_improvement([0.01]))


def test_p_better_interval_covers_by_simulation():
    # Truth P(d > 0) = 0.7 over 5 seeds; Clopper-Pearson is exact, so coverage >= 0.95 (measured 0.97)
    rng = np.random.default_rng(4)
    d = np.where(rng.random((2000, 5)) < 0.7, 1.0, -1.0)
    cover = np.mean([(lambda p, lo, hi: lo <= 0.7 <= hi)(*stats.prob_of_improvement(x)) for x in d])
    assert cover >= 0.95, cover


def test_holm_and_mcnemar_by_hand():
    assert stats.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    out = stats.holm([0.01, float("nan")])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])
    assert stats.mcnemar_p(10, 2) == pytest.approx(2 * 79 / 4096)
    assert stats.mcnemar_p(0, 0) == 1.0 and stats.mcnemar_p(5, 5) == 1.0


def _power_by_hand(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample t-test from the noncentral t distribution."""
    crit = sps.t.ppf(1 - alpha / 2, n - 1)
    nc = effect * math.sqrt(n)
    return float(sps.nct.sf(crit, n - 1, nc) + sps.nct.cdf(-crit, n - 1, nc))


def test_power_functions_against_the_noncentral_t_at_the_holm_level():
    sd = 0.004
    mdd = stats.minimal_detectable_difference(sd, 5)
    assert _power_by_hand(mdd / sd, 5) == pytest.approx(0.8, abs=1e-4)
    # at Holm's first level over 3 tests (0.05 / 3) the same seeds detect only a larger difference
    strict = stats.minimal_detectable_difference(sd, 5, alpha=0.05 / 3)
    assert _power_by_hand(strict / sd, 5, 0.05 / 3) == pytest.approx(0.8, abs=1e-4) and strict > mdd
    assert stats.minimal_detectable_difference(sd, 400) == pytest.approx(2.8016 * sd / 20, rel=0.01)
    need = stats.seeds_needed(0.002, sd)
    assert _power_by_hand(0.5, int(need)) >= 0.8 > _power_by_hand(0.5, int(need) - 1)
    assert need == 34
    assert stats.seeds_needed(0.0, sd) == math.inf
    assert math.isnan(stats.minimal_detectable_difference(sd, 1))


def test_power_summary_carries_the_uncertainty_of_the_spread():
    # the sd of 3 seeds: 95% chi-square interval [0.52, 6.28] x sd; mdd and seeds needed at both ends
    lo, hi = stats.sd_interval(1.0, 3)
    assert lo == pytest.approx(math.sqrt(2 / sps.chi2.ppf(0.975, 2))) and hi == pytest.approx(6.2847, abs=1e-3)
    out = stats.power_summary(0.01, 3, detect=0.01, alpha=0.05 / 2)
    assert out["mdd"] == pytest.approx(stats.minimal_detectable_difference(0.01, 3, 0.025))
    assert out["mdd_range"][0] < out["mdd"] < out["mdd_range"][1]
    assert out["mdd_range"][1] == pytest.approx(stats.minimal_detectable_difference(0.01 * hi, 3, 0.025))
    n_lo, n_hi = out["seeds_needed_range"]
    assert n_lo <= out["seeds_needed"] <= n_hi
    assert out["seeds_needed"] == stats.seeds_needed(0.01, 0.01, 0.025)
    # the sd interval covers the true sd 95% of the time (truth: sd 1, 3 values each)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4000, 3))
    cover = np.mean([(lambda a, b: a <= 1.0 <= b)(*stats.sd_interval(s, 3)) for s in x.std(axis=1, ddof=1)])
    assert cover == pytest.approx(0.95, abs=0.015)


def test_run_history_three_histories():
    # best then dip (300 reviews: 30 val examples, majority 0.533): learned, fell back at the end
    dip = metrics.run_history([0.6, 0.767, 0.533], 16 / 30, 30)
    assert not dip["collapsed"] and dip["fell_back"] and dip["best"] == 0.767 and dip["last"] == 0.533
    # never learned: never above 0.567 (17 of 30), within what chance gives on 30 examples
    never = metrics.run_history([0.5, 0.567, 0.533, 0.567], 16 / 30, 30)
    assert never["collapsed"] and not never["fell_back"]
    # learned, lower at the end (tune confirmation run: 100 val examples, majority 0.51, best 0.62)
    lower = metrics.run_history([0.55, 0.62, 0.53], 0.51, 100)
    assert not lower["collapsed"] and lower["fell_back"]
    assert not metrics.run_history([0.55, 0.62, 0.60], 0.51, 100)["fell_back"]
    # the margin: the one-sided 95% point of a majority-rate classifier's accuracy on n examples
    assert metrics.collapse_margin(0.5, 100) == pytest.approx(1.6449 * 0.05, abs=1e-4)
    assert never["margin"] == pytest.approx(1.6449 * math.sqrt(16 / 30 * 14 / 30 / 30), abs=1e-4)


def test_collapse_margin_keeps_a_no_learning_run_collapsed_by_simulation():
    # Truth: a classifier that learned nothing predicts the majority class with some random flips, so its
    # expected accuracy is at most the majority rate; on 120 val examples at majority 0.525 its accuracy
    # exceeds the margin in at most 5% of evaluations (measured ~3%: flips only lower the mean)
    rng = np.random.default_rng(6)
    labels_major = rng.random((20_000, 120)) < 0.525
    flips = rng.random((20_000, 120)) < 0.1
    acc = np.where(flips, ~labels_major, labels_major).mean(axis=1)
    assert np.mean(acc > 0.525 + metrics.collapse_margin(0.525, 120)) <= 0.05


def test_bootstrap_paths_agree():
    rng = np.random.default_rng(3)
    a = rng.random((3, 400)) < 0.9
    b = rng.random((3, 400)) < 0.8
    per_example = a.astype(float) - b
    fast = stats.crossed_bootstrap_mean(per_example, 4000, np.random.default_rng(4))
    generic = stats.crossed_bootstrap([lambda idx, d=d: float(d[idx].mean()) for d in per_example], 400, 2000,
                                      np.random.default_rng(5))
    assert fast.mean() == pytest.approx(generic.mean(), abs=0.003)
    assert fast.std() == pytest.approx(generic.std(), rel=0.1)
    # the index path (many distinct columns) draws the same distribution as the multinomial path
    jitter = per_example + rng.normal(0, 1e-9, per_example.shape)
    by_index = stats.crossed_bootstrap_mean(jitter, 4000, np.random.default_rng(6))
    assert by_index.std() == pytest.approx(fast.std(), rel=0.1)
    lo, hi = stats.percentile_interval(stats.crossed_bootstrap_mean(np.ones((2, 50)), 500))
    assert (lo, hi) == (1.0, 1.0)


def test_bootstrap_is_reproducible_and_fast_for_accuracy():
    import time

    rng = np.random.default_rng(7)
    per_example = (rng.random((5, 5000)) < 0.9).astype(float) - (rng.random((5, 5000)) < 0.9)
    start = time.perf_counter()
    one = stats.crossed_bootstrap_mean(per_example, stats.N_BOOT, np.random.default_rng(0))
    elapsed = time.perf_counter() - start
    two = stats.crossed_bootstrap_mean(per_example, stats.N_BOOT, np.random.default_rng(0))
    assert one.shape == (10_000,) and np.array_equal(one, two)
    assert elapsed < 5.0  # 10,000 resamples of 5 seeds x 5,000 examples: ~0.25 s on a loaded core
