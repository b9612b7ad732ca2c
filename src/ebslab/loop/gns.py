"""Gradient noise scale from the micro-batch gradients that accumulation computes anyway.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv 1812.06162), Appendix A.1: with G the
true gradient and Sigma the per-example gradient covariance, a mean gradient over b examples has
E|g_b|^2 = |G|^2 + tr(Sigma) / b. Two batch sizes b < B give two equations, hence unbiased estimates of both

    |G|^2     ~ (B |G_B|^2 - b |g_b|^2) / (B - b)
    tr(Sigma) ~ (|g_b|^2 - |G_B|^2) / (1/b - 1/B)

and B_simple = tr(Sigma) / |G|^2, the batch size at which the gradient's noise equals its signal. Here the small
batches are the window's micro-batches and the big one is the window. Micro-batches of unequal sizes (the short
last window) are handled exactly: the b-weighted mean of |g_j|^2 has expectation |G|^2 + tr(Sigma) n / sum(b_j),
so it stands for one small batch of b = sum(b_j) / n.

Both estimates are noisy and the |G|^2 one is often negative on a single step, so B_simple is the ratio of their
moving averages (numerator and denominator averaged separately, as gpt-neox and adaptdl do), never an average of
per-step ratios.

Sampling without replacement (an epoch's windows partition a finite train set of N examples, as ebslab's epochs
do) shifts the expectations by finite-population terms: with S the sample covariance (divisor N - 1), the trace
estimate has expectation tr(S) exactly and the |G|^2 estimate has expectation |G|^2 - tr(S) / N
(see `finite_population_expectations`). The callback corrects that (`finite_population_corrected`): uncorrected,
B_simple reads high by about 1 / (1 - B_simple / N), which matters once B_simple is a sizeable share of the train
set.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ebslab.loop.callbacks import Callback

DEFAULT_BETA = 0.95  # moving-average weight of the previous value: about the last 20 steps


# ------------------------------------------------------------------------------------------------------------
# The estimator, as pure functions (floats, numpy arrays or tensors alike)


def micro_batch_moments(sq_norms: Any, sizes: Any) -> tuple[Any, float]:
    """(b-weighted mean of |g_j|^2, the small batch b = sum(b_j) / n) from micro-batch squared norms |g_j|^2 of
    per-example mean gradients over b_j examples."""
    sizes = np.asarray(sizes, dtype=float)
    sq = np.asarray(sq_norms, dtype=float)
    if sizes.size == 0 or sizes.sum() <= 0:
        raise ValueError("no micro-batch with examples")
    return float((sizes * sq).sum() / sizes.sum()), float(sizes.sum() / sizes.size)


def unbiased_estimates(small_sq: Any, small_batch: float, big_sq: Any, big_batch: float) -> tuple[Any, Any]:
    """(|G|^2, tr(Sigma)) estimates from E|g_b|^2 = |G|^2 + tr(Sigma)/b at the two batch sizes b < B."""
    if not small_batch < big_batch:
        raise ValueError(f"the small batch ({small_batch}) must be smaller than the big one ({big_batch})")
    grad_sq = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
    trace = (small_sq - big_sq) / (1.0 / small_batch - 1.0 / big_batch)
    return grad_sq, trace


def window_estimates(micro_sq_norms: Any, micro_sizes: Any, window_sq_norm: float,
                     window_size: float) -> tuple[float, float]:
    """One step's (|G|^2, tr(Sigma)) from its micro-batch gradients' squared norms and the window gradient's."""
    small_sq, small_batch = micro_batch_moments(micro_sq_norms, micro_sizes)
    return unbiased_estimates(small_sq, small_batch, window_sq_norm, window_size)


def b_simple(mean_grad_sq: float, mean_trace: float) -> float | None:
    """tr(Sigma) / |G|^2 of two averaged estimates; None while the |G|^2 average is not positive (noise won)."""
    if not (math.isfinite(mean_grad_sq) and math.isfinite(mean_trace)) or mean_grad_sq <= 0:
        return None
    return mean_trace / mean_grad_sq


def ema(previous: Any, value: Any, beta: float = DEFAULT_BETA) -> Any:
    return value if previous is None else beta * previous + (1 - beta) * value


def exact_moments(per_example_grads: np.ndarray) -> tuple[float, float]:
    """(|G|^2, tr(S)) of a finite set of per-example gradients (rows): G their mean, S their sample covariance
    (divisor N - 1)."""
    grads = np.asarray(per_example_grads, dtype=float)
    mean = grads.mean(axis=0)
    return float(mean @ mean), float(((grads - mean) ** 2).sum() / (len(grads) - 1))


def finite_population_expectations(grad_sq: float, trace: float, num_examples: int) -> tuple[float, float]:
    """Expectations of `unbiased_estimates` when the window is a uniform draw without replacement from N examples
    and the micro-batches partition it. A mean over b of N draws has E|g_b|^2 = |G|^2 + tr(S)/b (N - b)/N, so the
    trace estimate is exact in expectation and the |G|^2 estimate is low by tr(S)/N (sizes cancel)."""
    return grad_sq - trace / num_examples, trace


def finite_population_corrected(grad_sq: Any, trace: Any, num_examples: int) -> tuple[Any, Any]:
    """(|G|^2, tr(S)) estimates unbiased for windows drawn without replacement from N examples: the |G|^2 estimate
    plus tr(S) / N (see `finite_population_expectations`)."""
    return grad_sq + trace / num_examples, trace


# ------------------------------------------------------------------------------------------------------------
# When it is on


def gns_decision(setting: bool | None, accum_steps: int, world_size: int) -> tuple[bool, str]:
    """(on?, the start-up line's reason). `setting` None = automatic."""
    grads = accum_steps * world_size
    if setting is False:
        return False, "off (train.gns=false)"
    if grads < 2:
        why = "off: one micro-batch gradient per step (needs accum_steps x world_size >= 2)"
        return False, why + ("; train.gns=true cannot change that" if setting else "")
    return True, (f"on: {accum_steps} micro-batch gradient(s) per step on each of {world_size} process(es) "
                  "against the window's" + (" (every process's estimate, averaged at the logged steps)"
                                            if world_size > 1 else ""))


# ------------------------------------------------------------------------------------------------------------
# The callback: per-micro-batch squared norms from gradient hooks (no extra forward or backward), everything kept
# on the device and read only on the steps that are logged.


class GradientNoiseScale(Callback):
    """Adds `gns/grad_sq`, `gns/trace` (this step's estimates) and `gns/b_simple` (ratio of their moving averages)
    to the logged step lines and `gns` (B_simple over the last half of training) to the summary.

    A hook on every trainable parameter sees the gradient of one micro-batch's backward before it is added to
    .grad (and, on DDP, before the all-reduce): by the loss rule that is g_j scaled by world_size b_j / B. The
    hooks keep a reference to each; after the micro-batch's backward one foreach norm (`torch._foreach_norm`)
    reads them all, instead of one norm kernel per parameter. (Differencing the accumulated .grad gives the same
    numbers but writes a copy of every gradient per micro-batch.) The window gradient is .grad before clipping.
    Each process's estimate is unbiased on its own (its micro-batches against the all-reduced window); every
    process's enters: the moving averages and the last half's sums are linear in the estimates, so each process
    keeps its own and they are averaged (summed) over the processes only on the logged steps and at the end, with
    no collective on the other steps. The |G|^2 estimate is corrected for windows drawn without replacement from
    the N train examples (`finite_population_corrected`).

    A window whose estimates are not finite (fp16: the scaler's overflowing step, which it skips) is logged as
    null and left out of the moving averages and the summary, decided on the device: one inf would otherwise
    stay in the averages for the rest of the run.
    """

    def __init__(self, beta: float = DEFAULT_BETA) -> None:
        self.beta = beta
        self.params: list[torch.Tensor] = []
        self.handles: list[Any] = []
        self.skipped_windows = 0
        self._parts: list[torch.Tensor] = []  # this micro-batch's per-parameter gradients, from the hooks
        self._reset_window()
        self._step_estimates: torch.Tensor | None = None
        self._ema: torch.Tensor | None = None
        self._half_sums: torch.Tensor | None = None  # [sum |G|^2, sum tr(Sigma), finite steps] over the last half

    def _reset_window(self) -> None:
        self._weighted_sq: torch.Tensor | float = 0.0  # sum_j |delta_j|^2 / b_j over the micro-batches used
        self._examples = 0.0
        self._used = 0

    def _hook(self, grad: torch.Tensor) -> None:
        self._parts.append(grad.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_windows": self.skipped_windows,
                "ema": None if self._ema is None else self._ema.tolist(),
                "half_sums": None if self._half_sums is None else self._half_sums.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_windows = int(state["skipped_windows"])
        # float64 lists from JSON round-trip exactly; on_fit_start moves them to the gradients' device
        self._ema, self._half_sums = (None if state[k] is None else torch.tensor(state[k], dtype=torch.float64)
                                      for k in ("ema", "half_sums"))

    def on_fit_start(self, trainer: Any) -> None:
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        device = self.params[0].device if self.params else torch.device("cpu")
        self._ema, self._half_sums = (None if t is None else t.to(device) for t in (self._ema, self._half_sums))
        self.world_size = trainer.backend.world_size
        self.handles = [p.register_hook(self._hook) for p in self.params]

    def on_micro_backward(self, trainer: Any, micro_index: int, num_micro: int, examples: float) -> None:
        if micro_index == 0:
            self._reset_window()
        parts, self._parts = self._parts, []
        if examples > 0 and parts:  # a stand-in micro-batch adds nothing to .grad and is no sample
            delta_sq = torch.stack(torch._foreach_norm(parts)).double().square().sum()
            self._weighted_sq = self._weighted_sq + delta_sq / examples
            self._examples += examples
            self._used += 1

    def on_before_clip(self, trainer: Any) -> None:
        self._step_estimates = None
        window = float(_window_examples(trainer))
        if self._used == 0 or self._examples / self._used >= window:
            self.skipped_windows += 1  # e.g. a short last window of one micro-batch: nothing to compare
            return
        scale = window / self.world_size
        small_sq = self._weighted_sq * (scale * scale / self._examples)
        window_sq = _sq_norm([p.grad for p in self.params if p.grad is not None])
        loss_scale = trainer.backend.loss_scale()
        if loss_scale is not None:  # fp16: the hooks and .grad saw the gradients times the scaler's scale
            loss_scale_sq = loss_scale.double().square()
            small_sq, window_sq = small_sq / loss_scale_sq, window_sq / loss_scale_sq
        grad_sq, trace = finite_population_corrected(
            *unbiased_estimates(small_sq, self._examples / self._used, window_sq, window), trainer.derived.num_train)
        estimates = self._step_estimates = torch.stack([grad_sq, trace])
        finite = torch.isfinite(estimates).all()
        if self._ema is None:
            self._ema = estimates
        else:  # an average that has no finite value yet starts at this step's
            started = torch.where(torch.isfinite(self._ema), ema(self._ema, estimates, self.beta), estimates)
            self._ema = torch.where(finite, started, self._ema)

    def on_step(self, trainer: Any, record: dict | None) -> None:
        estimates = self._step_estimates
        if estimates is not None and trainer.state.step > trainer.derived.total_steps / 2:
            finite = torch.isfinite(estimates).all()
            counted = torch.cat([torch.where(finite, estimates, 0.0), finite.double().reshape(1)])
            self._half_sums = counted if self._half_sums is None else self._half_sums + counted
        if record is None:
            return
        if self.world_size > 1:  # every process takes part, with or without an estimate this step
            device = self.params[0].device if self.params else torch.device("cpu")
            missing = torch.full((2,), math.nan, dtype=torch.float64, device=device)
            local = torch.cat([missing if estimates is None else estimates,
                               missing if self._ema is None else self._ema])
            values = _finite_mean_over_processes(trainer.backend, local)
        elif estimates is None:
            return
        else:
            values = torch.cat([estimates, self._ema])
        grad_sq, trace, ema_grad_sq, ema_trace = values.tolist()
        if not (math.isfinite(grad_sq) or math.isfinite(trace) or math.isfinite(ema_grad_sq)):
            return
        record["gns/grad_sq"] = grad_sq if math.isfinite(grad_sq) else None
        record["gns/trace"] = trace if math.isfinite(trace) else None
        record["gns/b_simple"] = b_simple(ema_grad_sq, ema_trace)

    def on_fit_end(self, trainer: Any, summary: dict) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        sums = self._half_sums
        if self.world_size > 1:  # every process's windows count
            device = self.params[0].device if self.params else torch.device("cpu")
            sums = trainer.backend.reduce_sum(torch.zeros(3, dtype=torch.float64, device=device)
                                              if sums is None else sums)
        sum_grad_sq, sum_trace, n = (0.0, 0.0, 0) if sums is None else sums.tolist()
        if not n:
            summary["gns"] = {"b_simple": None, "steps": 0, "skipped_windows": self.skipped_windows}
            return
        n = int(n)
        summary["gns"] = {"b_simple": b_simple(sum_grad_sq / n, sum_trace / n), "grad_sq": sum_grad_sq / n,
                          "trace": sum_trace / n, "steps": n // self.world_size, "over": "last half of training",
                          "skipped_windows": self.skipped_windows}


def _finite_mean_over_processes(backend: Any, values: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean over the processes whose value is finite (nan where none is)."""
    finite = torch.isfinite(values)
    sums = backend.reduce_sum(torch.cat([torch.where(finite, values, 0.0), finite.double()]))
    total, count = sums[:len(values)], sums[len(values):]
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def _sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    # squared norms in float64: the trace estimate is a small difference of two of them
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


def _window_examples(trainer: Any) -> int:
    """Examples in the current window, all processes together: the effective batch, or the epoch's remainder."""
    derived, effective = trainer.derived, trainer.cfg.batch.effective
    if trainer.state.window == derived.steps_per_epoch - 1:
        return derived.num_train - (derived.steps_per_epoch - 1) * effective
    return effective
