"""Seed-aware statistics for "is configuration A better than B?": pure functions on numpy arrays.

The seed is the unit of replication. ebslab gives runs with the same seed the same data order and head
initialisation, so two configurations are paired by seed, and the evidence is the per-seed difference
`d[s] = metric(A, seed s) - metric(B, seed s)`; its spread over seeds is the variance that a conclusion must
beat.

Test examples are a second source of variance, and they are CROSSED with the seeds: every seed is scored on the
same test set, so an example that A gets right and B wrong pulls every seed's difference the same way. The
bootstrap therefore draws, per resample, seeds with replacement and ONE set of test examples with replacement
that every drawn seed is scored on (and A and B: the difference is resampled, not A and B apart). Drawing fresh
examples per seed (a nested bootstrap) misses the shared per-example part and is too narrow when it dominates
(tests/test_stats.py measures both).

Tests over seeds: the paired t-test, and beside it the exact sign-flip (permutation over seeds) test, which needs
no normality and is defined when every seed gives the same difference (the t statistic is not: 0/0 or x/0). The
sign-flip p can never be below 2 / 2^n (0.25 at 3 seeds, 0.0625 at 5, 0.0078 at 8). `verdict_p` is the t-test's
p where t is defined and the sign-flip p where it is not, so a tie never gives p = 0.

Pooling (seed, example) pairs into one McNemar test treats every test prediction as independent evidence and
ignores that each seed is a different trained model: under the null it rejects far more often than alpha.
McNemar stays here only as within-seed evidence.

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
# When the test examples take few distinct columns (the per-seed differences of one example: accuracy over a few
# seeds gives patterns of -1, 0, 1), a resample is one multinomial over the distinct columns, which is exact and
# costs O(columns) instead of O(examples); with more than examples / _MULTINOMIAL_SHARE columns, by index.
_MULTINOMIAL_SHARE = 16  # a binomial draw costs ~16 index draws
_CHUNK_CELLS = 4_000_000  # rows x columns per chunk of resampled indices (32 MB of int64)
_EXACT_SIGN_FLIP_MAX = 16  # up to 2^16 sign vectors enumerated; beyond, a seeded Monte Carlo of 2^16 draws


# ---------------------------------------------------------------------------------------------- tests over seeds


def paired_difference(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Per-seed differences a - b of two aligned arrays; seeds where either is NaN are dropped."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep] - b[keep]


def _clean(d: Sequence[float]) -> np.ndarray:
    d = np.asarray(d, dtype=float)
    return d[~np.isnan(d)]


def t_interval(x: Sequence[float], confidence: float = 0.95,
               bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float, str | None]:
    """Student-t interval of the mean of x: (lower, upper, None), or (nan, nan, why) when there is none.

    `bounds` is the range the mean can take (accuracy [0, 1]; a difference of accuracies [-1, 1]). A
    t-interval that leaves it is not clipped into a fake interval: n is too small for one, and that is said.
    Every value equal (sd 0) gives no interval either: a width of 0 would claim certainty the seeds do not give.
    """
    x = _clean(x)
    n = len(x)
    if n < 2:
        return math.nan, math.nan, f"n = {n}: no interval"
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    if sd == 0.0:
        return math.nan, math.nan, f"all {n} values equal: no spread to size an interval"
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if lo < bounds[0] or hi > bounds[1]:
        return math.nan, math.nan, f"n = {n} is too small for an interval inside [{bounds[0]:g}, {bounds[1]:g}]"
    return lo, hi, None


def paired_t_test(d: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test over seeds (H0: mean difference 0). NaN with fewer than 2 seeds,
    and NaN when every seed gives the same difference (t is 0/0 or x/0: undefined; see `verdict_p`)."""
    d = _clean(d)
    if len(d) < 2 or float(d.std(ddof=1)) == 0.0:
        return math.nan
    return float(sps.ttest_1samp(d, 0.0).pvalue)


def min_sign_flip_p(n: int) -> float:
    """The smallest two-sided p an exact sign-flip test over n seeds can give: 2 / 2^n (1 for n = 0)."""
    return 1.0 if n < 1 else min(1.0, 2.0 / 2.0 ** n)


def sign_flip_p(d: Sequence[float], rng: np.random.Generator | None = None) -> float:
    """Exact two-sided sign-flip (permutation over seeds) p of H0 "A and B are exchangeable": the share of the
    2^n sign vectors whose |sum of signed differences| reaches the observed |sum| (the observed one included).
    Above 16 seeds a seeded Monte Carlo of 65,536 sign vectors (plus the observed). NaN without seeds."""
    d = _clean(d)
    n = len(d)
    if n == 0:
        return math.nan
    observed = abs(float(d.sum()))
    tol = 1e-9 * max(1.0, float(np.abs(d).max()))
    if n <= _EXACT_SIGN_FLIP_MAX:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    rng = rng if rng is not None else np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], size=(2 ** _EXACT_SIGN_FLIP_MAX, n))
    hits = int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (hits + 1) / (len(signs) + 1)


def verdict_p(d: Sequence[float]) -> tuple[float, str]:
    """(p, which test) of the report's verdict over seeds: the paired t-test where t is defined, the exact
    sign-flip test where every seed gives the same difference (never p = 0 from a tie). NaN with < 2 seeds."""
    d = _clean(d)
    if len(d) < 2:
        return math.nan, "none"
    p = paired_t_test(d)
    if math.isnan(p):
        return sign_flip_p(d), "sign-flip"
    return p, "t"


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


# ---------------------------------------------------------------------------------------------- bootstrap


def _seed_resamples(num_seeds: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, num_seeds, size=(n_boot, num_seeds))


def crossed_bootstrap_mean(diffs: Sequence[np.ndarray] | np.ndarray, n_boot: int = N_BOOT,
                           rng: np.random.Generator | None = None) -> np.ndarray:
    """Bootstrap distribution (n_boot,) of the mean over seeds of a per-example mean difference, seeds and test
    examples crossed.

    diffs[s][i]: the difference score_A - score_B of seed s on test example i (accuracy: correct_A - correct_B),
    every seed on the SAME examples in the same order. Each resample draws seeds with replacement and one set of
    example indices with replacement, shared by every drawn seed, and returns the mean over the drawn seeds of
    their means on those examples.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    D = np.asarray(diffs, dtype=float)
    if D.ndim != 2 or D.shape[0] == 0 or D.shape[1] == 0:
        raise ValueError("diffs must be seeds x examples, with at least one of each")
    S, N = D.shape
    picks = _seed_resamples(S, n_boot, rng)
    seed_weights = np.zeros((n_boot, S))  # how often each seed was drawn, / S
    np.add.at(seed_weights, (np.repeat(np.arange(n_boot), S), picks.ravel()), 1.0 / S)
    columns, inverse, freq = np.unique(D, axis=1, return_inverse=True, return_counts=True)
    if columns.shape[1] * _MULTINOMIAL_SHARE <= N:
        counts = rng.multinomial(N, freq / N, size=n_boot)  # (n_boot, distinct columns)
        per_seed = counts @ columns.T / N  # (n_boot, S): each seed's mean on the drawn examples
        return np.einsum("bs,bs->b", per_seed, seed_weights)
    out = np.empty(n_boot)
    rows = max(1, _CHUNK_CELLS // N)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, N, size=(stop - start, N))
        weights = np.bincount((idx + N * np.arange(stop - start)[:, None]).ravel(),
                              minlength=(stop - start) * N).reshape(stop - start, N)
        per_seed = weights @ D.T / N
        out[start:stop] = np.einsum("bs,bs->b", per_seed, seed_weights[start:stop])
    return out


def nested_bootstrap_mean(diffs: Sequence[np.ndarray] | np.ndarray, n_boot: int = N_BOOT,
                          rng: np.random.Generator | None = None) -> np.ndarray:
    """The nested bootstrap (seeds, then FRESH examples within each drawn seed): kept only so that the tests can
    show what it misses when the seeds share per-example effects. Not used by the report."""
    rng = rng if rng is not None else np.random.default_rng(0)
    D = np.asarray(diffs, dtype=float)
    S, N = D.shape
    picks = _seed_resamples(S, n_boot, rng)
    means = np.empty(picks.shape)
    for s in range(S):
        where = picks == s
        count = int(where.sum())
        if count:
            values, freq = np.unique(D[s], return_counts=True)
            means[where] = rng.multinomial(N, freq / N, size=count) @ values / N
    return means.mean(axis=1)


def crossed_bootstrap(seed_difference: Sequence[Callable[[np.ndarray], float]], n_examples: int,
                      n_boot: int = N_BOOT, rng: np.random.Generator | None = None) -> np.ndarray:
    """Bootstrap distribution (n_boot,) for any metric: the generic path of `crossed_bootstrap_mean`.

    seed_difference[s](idx) is seed s's difference metric(A) - metric(B) on the test examples idx (positions in
    the test set every seed shares; one index array for A and B and for every seed of a resample). Costs up to
    n_boot x seeds calls: for metrics that are not a mean of per-example scores (F1, MCC, AUROC, ECE, loss).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    if not seed_difference or n_examples < 1:
        raise ValueError("at least one seed and one test example")
    picks = _seed_resamples(len(seed_difference), n_boot, rng)
    out = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n_examples, size=n_examples)
        values = {s: seed_difference[s](idx) for s in set(picks[b].tolist())}
        out[b] = np.nanmean([values[s] for s in picks[b]])
    return out


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution: inside the range of the statistic by construction."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[~np.isnan(samples)]
    if not len(samples):
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------- P(A better)


def prob_of_improvement(d: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """P(A > B) over seeds (Bouthillier et al. 2021) with an exact Clopper-Pearson interval over the seeds.

    d: per-seed differences oriented so that positive means A is better. A tie (d = 0) counts one half in the
    estimate; the interval covers ties counted either way (from the Clopper-Pearson lower bound with ties as
    losses to the upper bound with ties as wins), so it stays exact. 3 wins of 3: (1.0, 0.29, 1.0).
    Returns (p, lower, upper); NaNs with fewer than 2 seeds (one seed is no proportion).
    """
    from statsmodels.stats.proportion import proportion_confint

    d = _clean(d)
    n = len(d)
    if n < 2:
        return math.nan, math.nan, math.nan
    wins, ties = int(np.sum(d > 0)), int(np.sum(d == 0))
    lo = float(proportion_confint(wins, n, alpha=1 - confidence, method="beta")[0])
    hi = float(proportion_confint(wins + ties, n, alpha=1 - confidence, method="beta")[1])
    return (wins + 0.5 * ties) / n, (0.0 if math.isnan(lo) else lo), (1.0 if math.isnan(hi) else hi)


# ---------------------------------------------------------------------------------------------- power


def sd_interval(sd: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Chi-square interval of a standard deviation estimated from n values (n - 1 degrees of freedom): how
    uncertain a seed-to-seed spread is. From 3 seeds the upper end is 6.3 x the estimate; from 2, 32 x."""
    if n < 2 or math.isnan(sd):
        return math.nan, math.nan
    df = n - 1
    tail = (1 - confidence) / 2
    return (sd * math.sqrt(df / float(sps.chi2.ppf(1 - tail, df))),
            sd * math.sqrt(df / float(sps.chi2.ppf(tail, df))))


def minimal_detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean difference a two-sided paired t-test over n seeds at level alpha detects with `power`,
    given the seed-to-seed standard deviation sd of the differences (statsmodels TTestPower). NaN when n < 2."""
    from statsmodels.stats.power import TTestPower

    if n < 2 or math.isnan(sd) or not sd > 0:
        return math.nan
    effect = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(np.asarray(effect).item()) * sd


def seeds_needed(diff: float, sd: float, alpha: float = ALPHA, power: float = POWER,
                 max_seeds: int = 100_000) -> float:
    """Seeds a paired t-test at level alpha needs to detect a true difference `diff` with `power`, at seed-to-seed
    sd of the differences. inf when diff is 0 (or more than max_seeds would be needed); NaN without an sd."""
    from statsmodels.stats.power import TTestPower

    if math.isnan(diff) or math.isnan(sd) or not sd > 0:
        return math.nan
    if diff == 0:
        return math.inf
    effect = abs(diff) / sd
    test = TTestPower()

    def enough(n: int) -> bool:
        return test.power(effect_size=effect, nobs=n, alpha=alpha, alternative="two-sided") >= power

    if not enough(max_seeds):
        return math.inf
    n = 2
    while not enough(n):
        n = n * 2 if n < 64 else n + max(1, n // 8)
        if n > max_seeds:
            return math.inf
    low = max(2, n // 2)  # the doubling overshoots: step back to the smallest n that reaches the power
    while low < n:
        mid = (low + n) // 2
        if enough(mid):
            n = mid
        else:
            low = mid + 1
    return float(n)


def power_summary(sd: float, n: int, detect: float, alpha: float = ALPHA, power: float = POWER,
                  confidence: float = 0.95) -> dict:
    """What a comparison over n seeds can detect, at the level its verdict uses (alpha: Holm's first step,
    ALPHA / tests in the family), with the uncertainty of the sd estimated from those n seeds.

    mdd: smallest difference detectable with `power` by n seeds at this sd; mdd_range: the same at the ends of
    the sd's chi-square interval. seeds_needed: seeds to detect a true difference `detect` (set by the user, not
    the observed one: power at the observed effect says nothing the p-value did not), with its range.
    """
    lo_sd, hi_sd = sd_interval(sd, n, confidence)
    return {
        "alpha": alpha, "power": power, "detect": detect, "sd_range": [lo_sd, hi_sd],
        "mdd": minimal_detectable_difference(sd, n, alpha, power),
        "mdd_range": [minimal_detectable_difference(lo_sd, n, alpha, power),
                      minimal_detectable_difference(hi_sd, n, alpha, power)],
        "seeds_needed": seeds_needed(detect, sd, alpha, power),
        "seeds_needed_range": [seeds_needed(detect, lo_sd, alpha, power), seeds_needed(detect, hi_sd, alpha, power)],
    }


def seed_comparison(d: Sequence[float], alpha: float = ALPHA,
                    bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict:
    """Every seed-level number of one comparison from its per-seed differences d (positive = A better).

    estimate (mean of d), sd, n_seeds, the paired t-interval, the verdict's p (t-test, or sign-flip on a tie)
    with both tests' p and the smallest sign-flip p the seeds allow, and P(A better) with its exact interval.
    Power is added by the caller once the family (the Holm level) is known: `power_summary`.
    """
    d = _clean(d)
    n = len(d)
    lo, hi, why = t_interval(d, 1 - alpha, bounds)
    p, test = verdict_p(d)
    p_better, pb_lo, pb_hi = prob_of_improvement(d, 1 - alpha)
    return {
        "n_seeds": n, "estimate": float(d.mean()) if n else math.nan,
        "sd": float(d.std(ddof=1)) if n >= 2 else math.nan,
        "t_low": lo, "t_high": hi, "t_note": why,
        "p": p, "p_test": test, "p_t": paired_t_test(d), "p_sign_flip": sign_flip_p(d) if n >= 2 else math.nan,
        "p_min": min_sign_flip_p(n) if n >= 2 else math.nan,
        "p_better": p_better, "p_better_low": pb_lo, "p_better_high": pb_hi,
    }
