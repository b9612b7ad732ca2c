"""Evaluation: every class's probability for every example of a split, and the metrics of `ebslab.core.metrics`.

Each process scores a disjoint share of the split (no padded duplicates), the shares are gathered, so every
example counts exactly once whatever the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ebslab.loop.backends import Backend, to_device
from ebslab.inputs.data import TokenizedSplit, collate
from ebslab.core.files import atomic_write_with
from ebslab.core.metrics import compute_metrics, higher_is_better


@dataclass
class EvalResult:
    index: np.ndarray  # position in the split
    label: np.ndarray
    probs: np.ndarray  # (n, K): column k = class id k
    label_names: list[str]
    scores: dict[str, float] = field(init=False)  # compute_metrics' dict, NaN where undefined

    def __post_init__(self) -> None:
        self.scores = compute_metrics(self.label, self.probs, self.label_names)

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def prob(self) -> np.ndarray:
        """Probability of the predicted class."""
        return self.probs[np.arange(len(self.index)), self.pred]

    @property
    def n(self) -> int:
        return len(self.index)

    @property
    def acc(self) -> float:
        return self.scores["acc"]

    @property
    def loss(self) -> float:
        return self.scores["loss"]

    @property
    def ece(self) -> float:
        return self.scores["ece"]

    def metrics(self) -> dict[str, Any]:
        """Every metric, ready for JSON: an undefined one (AUROC with a class absent) is None, not NaN."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in self.scores.items()}

    def record(self, split: str) -> dict[str, Any]:
        """The eval line's part for this split: `val/acc`, `val/f1`, ... (`n` stays in the summary)."""
        return {f"{split}/{k}": v for k, v in self.metrics().items() if k != "n"}


def improves(result: EvalResult, best: dict[str, Any] | None, metric: str) -> bool:
    """Whether `result` beats the best validation metrics so far on `metric` (`eval.select_by`), in the
    metric's direction. An undefined value never beats a defined one; anything beats an undefined best."""
    if best is None:
        return True
    new, old = result.scores[metric], best.get(metric)
    if math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old if higher_is_better(metric) else new < old


def save_predictions(run_dir: Path, name: str, result: EvalResult) -> None:
    """predictions/NAME.parquet: index, label, pred, prob (of pred) and prob_0 .. prob_{K-1}, written atomically."""
    folder = run_dir / "predictions"
    folder.mkdir(exist_ok=True)
    columns = {"index": result.index, "label": result.label, "pred": result.pred, "prob": result.prob}
    columns.update({f"prob_{k}": result.probs[:, k] for k in range(result.probs.shape[1])})
    atomic_write_with(folder / f"{name}.parquet", lambda tmp: pd.DataFrame(columns).to_parquet(tmp, index=False),
                      run_dir)


@torch.inference_mode()
def evaluate(model: nn.Module, split: TokenizedSplit, backend: Backend, batch_size: int, pad_id: int,
             model_inputs: tuple[str, ...], label_names: list[str] | None = None) -> EvalResult:
    """Score `split`; `label_names` (the data bundle's, class id k = names[k]) default to "0", "1", ..."""
    was_training = model.training
    model.eval()
    # longest first, in batches of similar length: padding is the waste at eval time, and order is free here
    order = np.argsort(-split.lengths, kind="stable")[backend.rank::backend.world_size]
    parts = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: to_device(v, backend.device)  # pinned on a GPU, as training's: the copy does not block
                 for k, v in collate(split, idx, pad_id, model_inputs).items()}
        with backend.autocast():
            logits = model(**batch).float()
        parts.append(logits.softmax(-1))  # stays on the device: no wait per batch
    model.train(was_training)
    num_classes = parts[0].shape[1] if parts else len(label_names or ()) or 2
    scored = torch.cat(parts).cpu().numpy() if parts else np.zeros((0, num_classes), np.float32)  # one copy
    gathered = backend.gather_objects((order, scored))
    index = np.concatenate([g[0] for g in gathered])
    # a process with no examples (more processes than examples) sends no rows, maybe not even K columns
    probs = np.concatenate([g[1] for g in gathered if len(g[1])] or [scored])
    keep = np.argsort(index)
    index, probs = index[keep].astype(np.int64), probs[keep]
    names = list(label_names) if label_names is not None else [str(k) for k in range(probs.shape[1])]
    return EvalResult(index=index, label=split.labels[index], probs=probs, label_names=names)
