"""Synthetic effective-batch-size studies drawn from the model S(B) = S_min (1 + B_crit / B) with multiplicative
noise per seed and per run, read through evaluations at fixed data points, as the tests of the fit use them."""

from __future__ import annotations

import math

import numpy as np

from ebslab.analysis.ebs_study import StudyRun

# the two study designs: the CPU study of docs/ebs-study.md and the exp2 GPU grid
DOC_DESIGN = {"ebs": (8, 16, 32, 64, 128), "seeds": (1, 2, 3), "eval_every": 200, "e_min": 800.0}
EXP2_DESIGN = {"ebs": (64, 256, 512, 1024), "seeds": (1, 2, 3), "eval_every": 4096, "e_min": 16384.0}


def simulate_runs(rng: np.random.Generator, ebs, seeds, eval_every: int, e_min: float, b_crit: float,
                  run_sd: float = 0.25, seed_sd: float = 0.15, majority: float = 0.5, plateau: float = 0.85,
                  target: float = 0.75, budget_factor: float = 3.0) -> list[StudyRun]:
    """One study: each run needs S = S_min (1 + B_crit / B) x (seed factor) x (run factor) steps to reach
    `target` on a saturating validation curve majority + (plateau - majority)(1 - exp(-step / tau)); it is
    evaluated at the first step past every `eval_every` examples, for a budget of `budget_factor` x the examples
    the largest EBS needs on average."""
    s_min = e_min / b_crit
    budget = budget_factor * s_min * (max(ebs) + b_crit)
    share = -math.log(1 - (target - majority) / (plateau - majority))
    runs = []
    for seed in seeds:
        seed_factor = math.exp(rng.normal(0, seed_sd))
        for b in ebs:
            steps_needed = s_min * (1 + b_crit / b) * seed_factor * math.exp(rng.normal(0, run_sd))
            tau = steps_needed / share
            evals = []
            k = 1
            while k * eval_every <= budget:
                step = math.ceil(k * eval_every / b)
                evals.append((step, step * b, majority + (plateau - majority) * (1 - math.exp(-step / tau))))
                k += 1
            runs.append(StudyRun(name=f"ebs{b}-seed{seed}", effective_batch=b, seed=seed, lr_scaling="none",
                                 lr=1e-4, evals=evals, budget=int(budget), majority_rate=majority, n_val=5000))
    return runs
