"""Evaluation: loss, accuracy, expected calibration error, per-example predictions.

Each process scores a disjoint share of the split (no padded duplicates), the sums are added across processes,
so every example counts exactly once whatever the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ebslab.backends import Backend
from ebslab.data import TokenizedSplit, collate

ECE_BINS = 15


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence|, weighted by the bin's share."""
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


@dataclass
class EvalResult:
    loss: float
    acc: float
    ece: float
    n: int
    index: np.ndarray  # position in the split
    label: np.ndarray
    pred: np.ndarray
    prob: np.ndarray  # probability of the predicted class

    def metrics(self) -> dict[str, float]:
        return {"acc": self.acc, "loss": self.loss, "ece": self.ece, "n": self.n}


@torch.inference_mode()
def evaluate(model: nn.Module, split: TokenizedSplit, backend: Backend, batch_size: int, pad_id: int,
             model_inputs: tuple[str, ...]) -> EvalResult:
    was_training = model.training
    model.eval()
    # longest first, in batches of similar length: padding is the waste at eval time, and order is free here
    order = np.argsort(-split.lengths, kind="stable")[backend.rank::backend.world_size]
    parts = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(backend.device, non_blocking=True)
                 for k, v in collate(split, idx, pad_id, model_inputs).items()}
        with backend.autocast():
            logits = model(**batch).float()
        probs = logits.softmax(-1)
        labels = torch.from_numpy(split.labels[idx]).to(backend.device, non_blocking=True)
        losses = F.cross_entropy(logits, labels, reduction="none")
        conf, pred = probs.max(-1)
        parts.append(torch.stack([losses, pred.float(), conf]))  # on the device: no wait per batch (pred < 2**24)
    model.train(was_training)
    scored = torch.cat(parts, 1).cpu().numpy() if parts else np.zeros((3, 0))  # the one device-to-host copy
    local = (order, *scored)
    gathered = backend.gather_objects(local)
    index, losses, pred, conf = (np.concatenate([g[i] for g in gathered]) for i in range(4))
    keep = np.argsort(index)
    index, losses, pred, conf = index[keep].astype(np.int64), losses[keep], pred[keep].astype(np.int64), conf[keep]
    label = split.labels[index]
    correct = (pred == label).astype(np.float64)
    return EvalResult(loss=float(losses.mean()), acc=float(correct.mean()),
                      ece=expected_calibration_error(conf, correct), n=len(index), index=index, label=label,
                      pred=pred, prob=conf)
