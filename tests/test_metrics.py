"""ebslab.metrics: values computed by hand on small known cases, cross-checked against scikit-learn, and ECE
against simulations whose calibration gap is known."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from ebslab.metrics import (METRICS, compute_metrics, expected_calibration_error, higher_is_better,
                            metric_value)

# binary: predictions 0 1 0 1 1 against labels 0 1 1 0 1 -> TP 2, FN 1, FP 1, TN 1; every confidence in its
# own 1/15-wide ECE bin
BIN_LABEL = np.array([0, 1, 1, 0, 1])
BIN_PROBS = np.array([[0.85, 0.15], [0.3, 0.7], [0.62, 0.38], [0.45, 0.55], [0.1, 0.9]])

# 3 classes: predictions 0 1 2 0 2 2 against labels 0 1 2 2 1 0
TRI_LABEL = np.array([0, 1, 2, 2, 1, 0])
TRI_PROBS = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6],
                      [0.5, 0.2, 0.3], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])


def test_binary_metrics_by_hand():
    m = compute_metrics(BIN_LABEL, BIN_PROBS, ["neg", "pos"])
    assert m["n"] == 5
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["loss"] == pytest.approx(-np.log([0.85, 0.7, 0.38, 0.45, 0.9]).mean())
    # |correct - confidence| per example, one example per bin
    assert m["ece"] == pytest.approx((0.15 + 0.3 + 0.62 + 0.55 + 0.1) / 5)
    # F1 of class 1: P = R = 2/3; of class 0: P = R = 1/2
    assert m["f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3 3 2 2)
    assert m["mcc"] == pytest.approx(1 / 6)
    # positives score 0.7, 0.38, 0.9 against negatives 0.15, 0.55: 5 of the 6 pairs ranked right
    assert m["auroc"] == pytest.approx(5 / 6)
    # sum over both classes of (p - onehot)^2 = 2 (p_true - 1)^2 per example
    assert m["brier"] == pytest.approx(2 * np.mean(np.square([0.15, 0.3, 0.62, 0.55, 0.1])))
    assert m["precision_pos"] == pytest.approx(2 / 3) and m["recall_pos"] == pytest.approx(2 / 3)
    assert m["precision_neg"] == pytest.approx(1 / 2) and m["recall_neg"] == pytest.approx(1 / 2)
    assert set(m) == {*METRICS, "n", "precision_neg", "recall_neg", "precision_pos", "recall_pos"}


def test_three_class_metrics_by_hand():
    m = compute_metrics(TRI_LABEL, TRI_PROBS, ["a", "b", "c"])
    assert m["acc"] == pytest.approx(0.5)
    assert m["loss"] == pytest.approx(-np.log([0.7, 0.5, 0.6, 0.3, 0.1, 0.3]).mean())
    # predicted counts 2 1 3, true counts 2 2 2, 3 correct
    assert [m[f"precision_{c}"] for c in "abc"] == pytest.approx([1 / 2, 1, 1 / 3])
    assert [m[f"recall_{c}"] for c in "abc"] == pytest.approx([1 / 2, 1 / 2, 1 / 2])
    assert m["f1"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 5) / 3)
    # Gorodkin's R_K: (c s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)) = (18 - 12) / sqrt(22 x 24)
    assert m["mcc"] == pytest.approx(6 / math.sqrt(22 * 24))
    # one-vs-rest AUCs 7/8, 4/8, 4.5/8 (one tie at 0.3 counts a half)
    assert m["auroc"] == pytest.approx((7 / 8 + 4 / 8 + 4.5 / 8) / 3)
    assert m["brier"] == pytest.approx((0.14 + 0.38 + 0.26 + 0.78 + 1.46 + 0.74) / 6)


def test_against_scikit_learn_on_random_predictions():
    rng = np.random.default_rng(0)
    for num_classes in (2, 4):
        label = rng.integers(0, num_classes, 300)
        probs = rng.dirichlet(np.ones(num_classes), 300).astype(np.float32)  # as softmax leaves them
        m = compute_metrics(label, probs, [str(k) for k in range(num_classes)])
        pred = probs.argmax(1)
        assert m["acc"] == pytest.approx(skm.accuracy_score(label, pred))
        rows = probs / probs.sum(1, keepdims=True, dtype=np.float64)  # log_loss warns on float32 row sums
        assert m["loss"] == pytest.approx(skm.log_loss(label, rows, labels=range(num_classes)), rel=1e-6)
        assert m["f1"] == pytest.approx(skm.f1_score(label, pred, average="macro"))
        assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(label, pred))
        onehot = np.eye(num_classes)[label]
        assert m["brier"] == pytest.approx(np.square(probs - onehot).sum(1).mean(), rel=1e-6)
        if num_classes == 2:
            assert m["auroc"] == pytest.approx(skm.roc_auc_score(label, probs[:, 1]))
            assert m["brier"] == pytest.approx(2 * skm.brier_score_loss(label, probs[:, 1]), rel=1e-6)
        else:
            ovr = [skm.roc_auc_score(label == k, probs[:, k]) for k in range(num_classes)]
            assert m["auroc"] == pytest.approx(np.mean(ovr), rel=1e-6)
        for name in METRICS:
            assert metric_value(name, label, probs) == pytest.approx(m[name])


def test_auroc_is_nan_when_a_class_is_absent_and_loss_is_clipped():
    label = np.array([0, 0, 2])  # class 1 never occurs
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    m = compute_metrics(label, probs, ["x", "y", "z"])
    assert math.isnan(m["auroc"])
    assert math.isnan(compute_metrics(np.array([1, 1]), BIN_PROBS[:2], ["neg", "pos"])["auroc"])
    # the second example gives its true class probability 0: clipped at 1e-12, not an infinite mean
    assert m["loss"] == pytest.approx((0 - np.log(1e-12) - np.log(0.5)) / 3)
    assert m["recall_y"] == 0.0 and m["precision_y"] == 0.0  # zero_division=0, no warning as a value


def test_empty_split_gives_nan_and_n_zero():
    m = compute_metrics(np.zeros(0, dtype=int), np.zeros((0, 2)), ["0", "1"])
    assert m["n"] == 0 and all(math.isnan(m[k]) for k in m if k != "n")


def test_direction_and_bad_inputs():
    assert [higher_is_better(m) for m in METRICS] == [True, False, False, True, True, True, False]
    assert higher_is_better("recall_pos") and higher_is_better("precision_0")
    with pytest.raises(ValueError, match="unknown metric 'accuracy'; valid: acc, loss"):
        higher_is_better("accuracy")
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        metric_value("auc", BIN_LABEL, BIN_PROBS)
    with pytest.raises(ValueError, match=r"class ids in \[0, 2\)"):
        compute_metrics(np.array([0, 2]), BIN_PROBS[:2], ["0", "1"])
    with pytest.raises(ValueError, match="3 label names for 2"):
        compute_metrics(BIN_LABEL, BIN_PROBS, ["a", "b", "c"])


def test_ece_against_simulations_with_a_known_gap():
    """Correct with probability = confidence: ECE ~ 0 (only sampling noise). Correct with probability
    confidence - 0.1: ECE ~ 0.1, the simulated overconfidence."""
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.55, 1.0, 40_000)
    calibrated = (rng.uniform(size=confidence.size) < confidence).astype(float)
    overconfident = (rng.uniform(size=confidence.size) < confidence - 0.1).astype(float)
    assert expected_calibration_error(confidence, calibrated) < 0.015
    assert expected_calibration_error(confidence, overconfident) == pytest.approx(0.1, abs=0.015)
