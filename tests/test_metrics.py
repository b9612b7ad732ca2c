"""ebslab.core.metrics: values computed by hand on small known cases, cross-checked against scikit-learn, and ECE
against simulations whose calibration gap is known."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from ebslab.core.metrics import (METRICS, compute_metrics, expected_calibration_error, higher_is_better,
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


# ---------------------------------------------------------------- in a run: eval lines, summary, predictions


@pytest.fixture(scope="module")
def keywords(tmp_path_factory):
    """3 classes, each text holds its class's keyword twice among filler words: a tiny model learns it in ~10
    steps, after which val acc stays at 1.0 while val loss keeps falling (acc and loss pick different steps)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    filler = "the a of and to in is it that was for on with as his at by".split()
    keys = {"apple": "fruit", "river": "water", "stone": "rock"}
    rows = [{"text": " ".join([*rng.choice(filler, 3), key, key]), "label": keys[key]}
            for key in [*keys] * 80]
    path = tmp_path_factory.mktemp("keywords") / "keywords.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def learning(keywords):
    return ["model.name=tiny-bert", f"data.path={keywords}", "data.max_length=16", "batch.effective=16",
            "batch.micro=16", "optim.lr=3e-3", "model.dropout=0", "model.pooling=mean", "eval.every_steps=3"]


def evals_of(run):
    from conftest import read_jsonl

    return [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "eval"]


def test_a_run_records_every_metric_and_every_class_probability(train_run, keywords):
    import json

    import pandas as pd

    run = train_run(*learning(keywords), "train.max_steps=6", base=[])
    names = json.loads((run / "labels.json").read_text())["names"]
    assert names == ["fruit", "rock", "water"]
    per_class = [f"{kind}_{name}" for name in names for kind in ("precision", "recall")]
    for line in evals_of(run):
        for split in ("val", "test"):
            assert {f"{split}/{m}" for m in (*METRICS, *per_class)} <= set(line)
    s = json.loads((run / "summary.json").read_text())
    for part in ("val_best", "test_best", "test_last"):
        assert set(s[part]) == {*METRICS, *per_class, "n"}
    for which in ("test_best", "test_last"):
        preds = pd.read_parquet(run / "predictions" / f"{which}.parquet")
        probs = preds[["prob_0", "prob_1", "prob_2"]].to_numpy()
        assert list(preds.columns) == ["index", "label", "pred", "prob", "prob_0", "prob_1", "prob_2"]
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
        assert (preds["pred"] == probs.argmax(1)).all() and np.array_equal(preds["prob"], probs.max(1))
        # the summary's numbers are those of the predictions file, recomputed by the same function
        again = compute_metrics(preds["label"].to_numpy(), probs, names)
        assert again == pytest.approx(s[which], nan_ok=True)


def test_select_by_loss_picks_the_lowest_val_loss_and_acc_the_first_highest_acc(train_run, keywords):
    import json

    by_acc, by_loss = (train_run(*learning(keywords), "train.max_steps=12", f"eval.select_by={m}", base=[])
                       for m in ("acc", "loss"))
    evals = evals_of(by_acc)
    same_training = [{k: v for k, v in e.items() if k != "elapsed_s"} for e in evals]
    assert same_training == [{k: v for k, v in e.items() if k != "elapsed_s"} for e in evals_of(by_loss)]
    acc_best = max(evals, key=lambda e: e["val/acc"])["step"]  # max() keeps the first of equal values
    loss_best = min(evals, key=lambda e: e["val/loss"])["step"]
    assert acc_best != loss_best  # the constructed case: acc reaches 1.0 and stays, loss keeps falling
    for run, best in ((by_acc, acc_best), (by_loss, loss_best)):
        s = json.loads((run / "summary.json").read_text())
        line = next(e for e in evals if e["step"] == best)
        assert s["best_step"] == best
        assert s["val_best"]["loss"] == line["val/loss"] and s["test_best"]["acc"] == line["test/acc"]


def test_early_stopping_counts_evaluations_without_gain_in_the_select_by_metric(train_run, keywords):
    import json

    by_acc = train_run(*learning(keywords), "train.max_steps=30", "train.early_stopping_patience=2", base=[])
    evals = evals_of(by_acc)
    first_best = max(range(len(evals)), key=lambda i: evals[i]["val/acc"])
    assert len(evals) == first_best + 3 < 10  # two evaluations after acc stopped rising
    assert json.loads((by_acc / "summary.json").read_text())["message"] == \
        "early stopping after 2 evaluations without val-acc gain"
    by_loss = train_run(*learning(keywords), "train.max_steps=30", "train.early_stopping_patience=2",
                        "eval.select_by=loss", base=[])
    losses = [e["val/loss"] for e in evals_of(by_loss)]
    assert len(losses) == 10 and all(b < a for a, b in zip(losses, losses[1:]))  # loss gained at every one
    assert json.loads((by_loss / "summary.json").read_text())["message"] is None


def test_an_unknown_select_by_is_one_line_and_exit_2(capsys, tmp_path):
    from ebslab.cli import main

    assert main(["train", "model.name=tiny-bert", "eval.select_by=accuracy", f"out.dir={tmp_path}",
                 "out.name=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ebslab: error: eval.select_by must be one of acc, loss, ece, f1, mcc, auroc, brier, "
                   "got 'accuracy'")
    assert not (tmp_path / "x").exists()


def test_improves_follows_the_metric_direction_and_never_prefers_an_undefined_value():
    from ebslab.loop.evaluate import EvalResult, improves

    def result(probs, label=BIN_LABEL):
        return EvalResult(index=np.arange(len(label)), label=label, probs=np.array(probs), label_names=["n", "p"])

    confident = result(np.where(np.eye(2)[BIN_LABEL] == 1, 0.9, 0.1))  # all right, loss -log 0.9
    hesitant = result(np.where(np.eye(2)[BIN_LABEL] == 1, 0.6, 0.4))  # all right, loss -log 0.6
    assert improves(confident, hesitant.metrics(), "loss") and not improves(hesitant, confident.metrics(), "loss")
    assert not improves(confident, hesitant.metrics(), "acc")  # equal acc is no gain
    assert improves(hesitant, None, "brier")
    one_class = result([[0.2, 0.8]] * 3, label=np.array([1, 1, 1]))  # AUROC undefined
    assert one_class.metrics()["auroc"] is None  # JSON-ready: null, not NaN
    assert not improves(one_class, confident.metrics(), "auroc") and improves(confident, one_class.metrics(), "auroc")
