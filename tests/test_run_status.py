"""A run's status describes its whole validation history (the trainer's summary), not its last evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import read_jsonl
from ebslab.core import metrics
from ebslab.loop.evaluate import EvalResult
from ebslab.loop.train import Trainer


def scripted_val(monkeypatch, accs: list[float]) -> None:
    """The validation accuracy of the i-th evaluation is accs[i] (predictions rewritten to get exactly that many
    of the val examples right); test scores are the model's own."""
    real = Trainer.score
    calls = iter(accs)

    def score(self, split):
        result = real(self, split)
        if split is not self.data.val:
            return result
        n, right = len(result.label), round(next(calls) * len(result.label))
        pred = np.where(np.arange(n) < right, result.label, 1 - result.label)
        return EvalResult(index=result.index, label=result.label, probs=np.eye(2)[pred] * 0.8 + 0.1,
                          label_names=result.label_names)

    monkeypatch.setattr(Trainer, "score", score)


# 25 val examples (data.limit=250), majority 13/25 = 0.52: the chance margin is 1.645 x sqrt(0.52 x 0.48 / 25) =
# 0.164, so a run learned when some evaluation beat 0.684. Evaluations at steps 3, 6 and 7 (the last).
@pytest.mark.parametrize("history,status,fell_back,warning", [
    ([0.60, 0.84, 0.52], "completed", True, "fell_back"),   # best then a dip at the end (was: collapsed)
    ([0.52, 0.60, 0.56], "collapsed", False, "collapsed"),  # never learned (was: completed, its last > 0.54)
    ([0.60, 0.80, 0.72], "completed", False, None),         # learned, lower at the end: not a fall back
])
def test_status_from_the_whole_validation_history(train_run, monkeypatch, history, status, fell_back, warning):
    scripted_val(monkeypatch, history)
    run = train_run("eval.every_steps=3")
    summary = json.loads((run / "summary.json").read_text())
    evals = [r["val/acc"] for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "eval"]
    assert evals == pytest.approx(history)
    assert summary["majority_rate"] == pytest.approx(0.52)
    assert summary["collapse_margin"] == pytest.approx(metrics.collapse_margin(0.52, 25))
    assert (summary["status"], summary["fell_back"]) == (status, fell_back)
    assert summary["val_max_acc"] == pytest.approx(max(history))
    assert summary["val_last"]["acc"] == pytest.approx(history[-1])
    assert summary["val_best"]["acc"] == pytest.approx(max(history))
    kinds = [r["kind"] for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "warning"]
    assert kinds == ([warning] if warning else [])
