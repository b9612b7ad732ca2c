"""Seed-aware statistics for "is configuration A better than B?": pure functions on numpy arrays.

The seed is the unit of replication. ebslab gives runs with the same seed the same data order and head
initialisation, so two configurations are paired by seed, and the evidence is the per-seed difference
`d[s] = metric(A, seed s) - metric(B, seed s)`; its spread over seeds is the variance that a conclusion must
beat. Test examples are a second, smaller source of variance: A and B are scored on the same test set, so
the two-level bootstrap resamples seeds, then test examples within each resampled seed, with the SAME example
indices for A and B.

Pooling (seed, example) pairs into one McNemar test treats every test prediction as independent evidence and
ignores that each seed is a different trained model: under the null it rejects far more often than alpha
(tests/test_stats.py measures it). McNemar stays here only as within-seed evidence.

Every random function takes a seeded `np.random.Generator`, so a report is reproducible.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

N_BOOT = 10_000
ALPHA = 0.05
POWER = 0.8
# Above this many distinct per-example values a resample is drawn by index; at or below it (accuracy: -1, 0, 1)
# by one multinomial over the distinct values, which is exact and costs O(values) instead of O(examples).
_MULTINOMIAL_MAX_VALUES = 64
_CHUNK_CELLS = 4_000_000  # rows x columns per chunk of resampled indices (32 MB of int64)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Per-seed differences a - b of two aligned arrays; seeds where either is NaN are dropped."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep] - b[keep]


def t_interval(x: Sequence[float], confidence: float = 0.95,
               bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float, str | None]:
    """Student-t interval of the mean of x: (lower, upper, None), or (nan, nan, why) when there is none.

    `bounds` is the range the mean can take (accuracy [0, 1]; a difference of accuracies [-1, 1]). A
    t-interval that leaves it is not clipped into a fake interval: n is too small for one, and that is said.
    """
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n < 2:
        return math.nan, math.nan, f"n = {n}: no interval"
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if lo < bounds[0] or hi > bounds[1]:
        return math.nan, math.nan, f"n = {n} is too small for an interval inside [{bounds[0]:g}, {bounds[1]:g}]"
    return lo, hi, None


def paired_t_test(d: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test over seeds (H0: mean difference 0). NaN with fewer than 2 seeds."""
    d = np.asarray(d, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) < 2:
        return math.nan
    if float(d.std(ddof=1)) == 0.0:  # every seed gave the same difference: t is 0 or infinite
        return 1.0 if float(d.mean()) == 0.0 else 0.0
    return float(sps.ttest_1samp(d, 0.0).pvalue)


def holm(pvals: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values in the input order (statsmodels); NaN stays NaN and is not counted."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvals, dtype=float)
    out = np.full(len(p), math.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return [float(v) for v in out]


def mcnemar_p(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value for b and c discordant pairs (statsmodels; binomial, p = 1/2)."""
    from statsmodels.stats.contingency_tables import mcnemar

    if int(b) + int(c) == 0:
        return 1.0
    return float(mcnemar([[0, int(b)], [int(c), 0]], exact=True).pvalue)


def _seed_resamples(num_seeds: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, num_seeds, size=(n_boot, num_seeds))


def two_level_bootstrap_mean(diffs: Sequence[np.ndarray], n_boot: int = N_BOOT,
                             rng: np.random.Generator | None = None) -> np.ndarray:
    """Bootstrap distribution (n_boot,) of the mean over seeds of a per-example mean difference.

    diffs[s]: per-example differences score_A - score_B of seed s on the shared test set (accuracy: correct_A -
    correct_B), so that the seed's difference is diffs[s].mean(). Each resample draws seeds with replacement,
    then for each drawn seed the test examples with replacement (one index set for A and B: the difference is
    resampled, not A and B apart), and returns the mean of the drawn seeds' resampled means.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    diffs = [np.asarray(d, dtype=float) for d in diffs]
    if not diffs or any(len(d) == 0 for d in diffs):
        raise ValueError("every seed needs at least one paired example")
    picks = _seed_resamples(len(diffs), n_boot, rng)
    seed_means = np.empty(picks.shape)
    for s, d in enumerate(diffs):
        where = picks == s
        count = int(where.sum())
        if count:
            seed_means[where] = _resampled_means(d, count, rng)
    return seed_means.mean(axis=1)


def _resampled_means(d: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` means of d resampled with replacement (len(d) draws each)."""
    n = len(d)
    values, freq = np.unique(d, return_counts=True)
    if len(values) <= _MULTINOMIAL_MAX_VALUES:
        draws = rng.multinomial(n, freq / n, size=count)
        return draws @ values / n
    out = np.empty(count)
    rows = max(1, _CHUNK_CELLS // n)
    for start in range(0, count, rows):
        stop = min(count, start + rows)
        out[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def two_level_bootstrap(seed_difference: Sequence[Callable[[np.ndarray], float]], sizes: Sequence[int],
                        n_boot: int = N_BOOT, rng: np.random.Generator | None = None) -> np.ndarray:
    """Bootstrap distribution (n_boot,) for any metric: the generic path of `two_level_bootstrap_mean`.

    seed_difference[s](idx) is seed s's difference metric(A) - metric(B) computed on the test examples idx
    (one index array for both: they share the test set); sizes[s] its number of test examples. Costs n_boot x
    seeds calls: use it for metrics that are not a mean of per-example scores (F1, MCC, AUROC, ECE).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    if len(seed_difference) != len(sizes) or not sizes:
        raise ValueError("one size per seed, and at least one seed")
    picks = _seed_resamples(len(sizes), n_boot, rng)
    seed_values = np.empty(picks.shape)
    for b in range(n_boot):
        for j, s in enumerate(picks[b]):
            seed_values[b, j] = seed_difference[s](rng.integers(0, sizes[s], size=sizes[s]))
    return np.nanmean(seed_values, axis=1)


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution: inside the range of the statistic by construction."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[~np.isnan(samples)]
    if not len(samples):
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def prob_of_improvement(d: Sequence[float], n_boot: int = N_BOOT, rng: np.random.Generator | None = None,
                        confidence: float = 0.95) -> tuple[float, float, float]:
    """P(A > B) over seeds (Bouthillier et al. 2021) with a bootstrap-over-seeds percentile interval.

    d: per-seed differences oriented so that positive means A is better. A tie counts one half.
    Returns (p, lower, upper); NaNs without seeds.
    """
    d = np.asarray(d, dtype=float)
    d = d[~np.isnan(d)]
    if not len(d):
        return math.nan, math.nan, math.nan
    wins = (d > 0) + 0.5 * (d == 0)
    rng = rng if rng is not None else np.random.default_rng(0)
    boot = wins[_seed_resamples(len(d), n_boot, rng)].mean(axis=1)
    lo, hi = percentile_interval(boot, confidence)
    return float(wins.mean()), lo, hi


def minimal_detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean difference a two-sided paired t-test over n seeds detects with `power`, given the
    seed-to-seed standard deviation sd of the differences (statsmodels TTestPower). NaN when n < 2."""
    from statsmodels.stats.power import TTestPower

    if n < 2 or not sd > 0 or math.isnan(sd):
        return math.nan
    effect = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(np.asarray(effect).item()) * sd


def seeds_needed(diff: float, sd: float, alpha: float = ALPHA, power: float = POWER,
                 max_seeds: int = 100_000) -> float:
    """Seeds a paired t-test needs to detect a true difference `diff` with `power`, at seed-to-seed sd of the
    differences. inf when diff is 0 (or more than max_seeds would be needed)."""
    from statsmodels.stats.power import TTestPower

    if math.isnan(diff) or math.isnan(sd) or not sd > 0:
        return math.nan
    if diff == 0:
        return math.inf
    effect = abs(diff) / sd
    test = TTestPower()
    if test.power(effect_size=effect, nobs=max_seeds, alpha=alpha, alternative="two-sided") < power:
        return math.inf
    n = 2
    while test.power(effect_size=effect, nobs=n, alpha=alpha, alternative="two-sided") < power:
        n = n * 2 if n < 64 else n + max(1, n // 8)
        if n > max_seeds:
            return math.inf
    # the doubling overshoots: step back to the smallest n that reaches the power
    low = max(2, n // 2)
    while low < n:
        mid = (low + n) // 2
        if test.power(effect_size=effect, nobs=mid, alpha=alpha, alternative="two-sided") >= power:
            n = mid
        else:
            low = mid + 1
    return float(n)


def seed_comparison(d: Sequence[float], alpha: float = ALPHA, power: float = POWER, n_boot: int = N_BOOT,
                    rng: np.random.Generator | None = None,
                    bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict:
    """Every seed-level number of one comparison from its per-seed differences d (positive = A better).

    estimate (mean of d), sd, n_seeds, the paired t-interval, the paired-t p-value (none with one seed),
    P(A better) with its interval, the minimal detectable difference at `power`, and the seeds needed to
    detect the observed difference.
    """
    d = np.asarray(d, dtype=float)
    d = d[~np.isnan(d)]
    n = len(d)
    sd = float(d.std(ddof=1)) if n >= 2 else math.nan
    lo, hi, why = t_interval(d, 1 - alpha, bounds)
    p_better, pb_lo, pb_hi = prob_of_improvement(d, n_boot, rng, 1 - alpha)
    estimate = float(d.mean()) if n else math.nan
    return {
        "n_seeds": n, "estimate": estimate, "sd": sd,
        "t_low": lo, "t_high": hi, "t_note": why,
        "p": paired_t_test(d),
        "p_better": p_better, "p_better_low": pb_lo, "p_better_high": pb_hi,
        "mdd": minimal_detectable_difference(sd, n, alpha, power),
        "seeds_needed": seeds_needed(estimate, sd, alpha, power) if n >= 2 else math.nan,
    }
