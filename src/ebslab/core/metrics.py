"""Classification metrics as pure functions of (label, probs): numpy and scikit-learn, no torch.

`label` holds class ids (n,), `probs` every class's probability (n, K), column k = class id k. Evaluation,
the run summary and the report all score predictions through these functions, so a number means the same
thing wherever it is read.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

METRICS = ("acc", "loss", "ece", "f1", "mcc", "auroc", "brier")
"""The headline-able metrics: any of them can pick the best checkpoint (`eval.select_by`) or lead a report."""

LOWER_IS_BETTER = frozenset({"loss", "ece", "brier"})
ECE_BINS = 15
PROB_FLOOR = 1e-12
"""Cross-entropy clips the true class's probability here: one confidently wrong example costs at most
-log(1e-12) = 27.6 nats instead of an infinite mean."""


# A run "learned" when its best validation accuracy beats the majority-class rate by more than a classifier that
# learned nothing reaches by chance on n_val examples: the one-sided 95% point of its accuracy,
# z_0.95 x sqrt(p (1 - p) / n_val).
COLLAPSE_LEVEL = 0.05


def _skm():
    # imported on first use: sklearn.metrics takes ~2 s to import, and config.py (every CLI call) needs METRICS
    from sklearn import metrics

    return metrics


def higher_is_better(name: str) -> bool:
    """Direction of a metric of `compute_metrics` (headline or per-class)."""
    if name in LOWER_IS_BETTER:
        return False
    if name in METRICS or name.startswith(("precision_", "recall_")):
        return True
    raise ValueError(f"unknown metric '{name}'; valid: {', '.join(METRICS)}")


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence|, weighted by the bin's share.

    Hand-written: scikit-learn has reliability curves (`calibration_curve`) but no ECE.
    """
    if len(confidence) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def _checked(label: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    label = np.asarray(label).astype(np.int64, copy=False)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or label.shape != (len(probs),):
        raise ValueError(f"expected label (n,) and probs (n, K), got {label.shape} and {probs.shape}")
    if len(label) and (label.min() < 0 or label.max() >= probs.shape[1]):
        raise ValueError(f"labels must be class ids in [0, {probs.shape[1]}), got {label.min()}..{label.max()}")
    return label, probs


def _acc(label: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(1) == label).mean())


def _loss(label: np.ndarray, probs: np.ndarray) -> float:
    # one line by definition; sklearn's log_loss renormalises rows and clips at the dtype's eps instead
    return float(-np.log(np.clip(probs[np.arange(len(label)), label], PROB_FLOOR, 1.0)).mean())


def _ece(label: np.ndarray, probs: np.ndarray) -> float:
    return expected_calibration_error(probs.max(1), (probs.argmax(1) == label).astype(np.float64))


def _f1(label: np.ndarray, probs: np.ndarray) -> float:
    classes = np.arange(probs.shape[1])
    return float(_skm().f1_score(label, probs.argmax(1), labels=classes, average="macro", zero_division=0))


def _mcc(label: np.ndarray, probs: np.ndarray) -> float:
    return float(_skm().matthews_corrcoef(label, probs.argmax(1)))


def _auroc(label: np.ndarray, probs: np.ndarray) -> float:
    num_classes = probs.shape[1]
    if len(np.unique(label)) < num_classes:  # a ranking needs every class present (ovr: each vs the rest)
        return math.nan
    if num_classes == 2:
        return float(_skm().roc_auc_score(label, probs[:, 1]))
    # float32 softmax rows sum to 1 only within ~1e-7: renormalise so sklearn's sum check never trips
    rows = probs / probs.sum(1, keepdims=True)
    return float(_skm().roc_auc_score(label, rows, multi_class="ovr", average="macro", labels=np.arange(num_classes)))


def _brier(label: np.ndarray, probs: np.ndarray) -> float:
    # scale_by_half=False: the multiclass definition (sum over every class) for two classes too
    return float(_skm().brier_score_loss(label, probs, labels=np.arange(probs.shape[1]), scale_by_half=False))


_METRIC_FUNCTIONS = {"acc": _acc, "loss": _loss, "ece": _ece, "f1": _f1, "mcc": _mcc, "auroc": _auroc,
                     "brier": _brier}


def metric_value(name: str, label: np.ndarray, probs: np.ndarray) -> float:
    """One metric of METRICS (bootstrap resamples call this thousands of times: acc costs one argmax)."""
    if name not in _METRIC_FUNCTIONS:
        raise ValueError(f"unknown metric '{name}'; valid: {', '.join(METRICS)}")
    label, probs = _checked(label, probs)
    if len(label) == 0:
        return math.nan
    with warnings.catch_warnings():  # e.g. MCC of a constant prediction: sklearn warns, the value (0) is right
        warnings.simplefilter("ignore")
        return _METRIC_FUNCTIONS[name](label, probs)


def compute_metrics(label: np.ndarray, probs: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """Every metric of METRICS, per-class `precision_<name>` / `recall_<name>`, and `n`.

    NaN where a metric is undefined (AUROC when a class is absent from `label`, everything when n = 0).
    """
    label, probs = _checked(label, probs)
    num_classes = probs.shape[1]
    if len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label names for {num_classes} probability columns")
    out: dict[str, float] = {name: metric_value(name, label, probs) for name in METRICS}
    if len(label):
        precision, recall, _, _ = _skm().precision_recall_fscore_support(
            label, probs.argmax(1), labels=np.arange(num_classes), zero_division=0)
    else:
        precision = recall = np.full(num_classes, math.nan)
    for k, name in enumerate(label_names):
        out[f"precision_{name}"] = float(precision[k])
        out[f"recall_{name}"] = float(recall[k])
    out["n"] = len(label)
    return out


# ---------------------------------------------------------------------------------------------- run status


def collapse_margin(majority_rate: float, n_val: int, level: float = COLLAPSE_LEVEL) -> float:
    """How far above the majority-class rate a validation accuracy must be to show the run learned: the
    one-sided (1 - level) point of a majority-rate classifier's accuracy on n_val examples (normal approximation
    of the binomial). 120 examples at majority 0.525: 0.075; 5,000 at 0.5: 0.012."""
    p = min(max(float(majority_rate), 0.0), 1.0)
    from scipy import stats as sps  # on first use: config (every CLI call) imports this module

    return float(sps.norm.isf(level)) * math.sqrt(p * (1.0 - p) / max(int(n_val), 1))


def run_history(val_accs: Sequence[float], majority_rate: float, n_val: int,
                level: float = COLLAPSE_LEVEL) -> dict:
    """A run's status from its whole validation history (not its last evaluation).

    collapsed: no evaluation ever beat majority_rate + collapse_margin (the run never learned);
    fell_back: it learned, and its last evaluation is back at or below that line. Returns {collapsed, fell_back,
    best, last, margin}; with no evaluation, not collapsed (nothing says it failed to learn).
    """
    accs = [float(a) for a in val_accs if a is not None and not math.isnan(float(a))]
    margin = collapse_margin(majority_rate, n_val, level)
    if not accs:
        return {"collapsed": False, "fell_back": False, "best": math.nan, "last": math.nan, "margin": margin}
    line = majority_rate + margin
    learned = max(accs) > line
    return {"collapsed": not learned, "fell_back": learned and accs[-1] <= line, "best": max(accs),
            "last": accs[-1], "margin": margin}
