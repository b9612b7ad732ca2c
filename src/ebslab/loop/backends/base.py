"""The Backend Protocol (how one process talks to its devices and its peers; the training loop sees only this) and
the helpers its implementations share."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from ebslab.core.errors import UserError


class Backend(Protocol):
    rank: int
    world_size: int
    device: torch.device
    precision: str  # the one in use: train.precision=auto resolved for this device

    @property
    def is_main(self) -> bool: ...

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """Move to device, wrap for data parallelism. The scheduler stays outside: it steps once per step."""

    def autocast(self) -> AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def no_sync(self, model: nn.Module) -> AbstractContextManager:
        """Accumulate locally: no gradient all-reduce for this micro-step."""

    def clip(self, model: nn.Module, optimizer: Any, max_norm: float) -> torch.Tensor:
        """Clip to max_norm (0 = no clipping); return the pre-clip global norm."""

    def step(self, optimizer: Any, skip: torch.Tensor | None = None) -> None:
        """One optimizer step; where `skip` (a 0-d float32 tensor on the device, exactly 0. or 1.) is 1, the
        weights and the optimizer state stay as they were. With fp16 the loss scaler decides instead."""

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes."""

    def gather_objects(self, obj: Any) -> list[Any]: ...

    def unwrap(self, model: nn.Module) -> nn.Module: ...

    def scaler_state(self) -> dict[str, Any] | None:
        """The fp16 loss scale and its counters (plain numbers), for the checkpoint; None without fp16."""

    def load_scaler_state(self, state: dict[str, Any] | None) -> None: ...

    def loss_scale(self) -> torch.Tensor | None:
        """The factor this window's backward multiplied the loss by (fp16's GradScaler scale), a 0-d tensor on the
        device, so gradients read before `clip` unscales them can be divided by it without a host read; None
        when the loss is not scaled."""

    def barrier(self) -> None: ...

    def close(self) -> None: ...


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: `auto` is bf16 where the device computes in it natively, else fp32. A GPU fp32 run
    also gets TF32 matmuls (about 8x the fp32 rate on Ampere and later, at a 10-bit mantissa inside the matmul)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and device.type == "cpu":
        raise UserError(f"train.precision={precision} is refused on CPU: bf16/fp16 matmul on this kind of CPU is "
                        "hundreds of times slower than fp32; use train.precision=auto or fp32 (bf16/fp16 are for "
                        "GPUs)")
    if precision == "fp32" and device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (cuDNN convolutions allow TF32 by default)
    return precision


def ddp_options(model: nn.Module) -> dict[str, Any]:
    """DistributedDataParallel's arguments. `find_unused_parameters` costs a graph walk on every synced step (and
    a warning on every rank), so it is on only when the model reports weights its forward never uses; these
    encoders change no buffer in training (no broadcast), and gradients live in DDP's buckets (no copy)."""
    unused = getattr(model, "unused_parameter_names", None)
    return {"find_unused_parameters": bool(unused()) if callable(unused) else True,
            "gradient_as_bucket_view": True, "broadcast_buffers": False}


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer itself: Accelerate's AcceleratedOptimizer wraps one in `.optimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


def skip_on_device(optimizer: Any) -> bool:
    """Whether `step_or_skip` decides on the device: true for fused Adam/AdamW (the kernel takes the flag as
    GradScaler hands it its own); false for an optimizer without a fused kernel on this device, where the skip is a
    host read every step (the start-up text says so)."""
    return bool(getattr(inner_optimizer(optimizer), "_step_supports_amp_scaling", False))


def step_or_skip(optimizer: Any, skip: torch.Tensor | None, kernel: Any = None) -> None:
    """`optimizer.step()`, a no-op where `skip` is 1, decided on the device: no host read per step (the loop reads
    the device only every log line). Fused Adam/AdamW (`kernel`, the torch optimizer inside a wrapper) take the
    flag as GradScaler hands them theirs: the kernel returns untouched where it is 1 and the step count is taken
    back by it, so weights, moments and bias correction are exactly as before the step. Without a fused kernel
    the flag is read on the host, every step (`skip_on_device` is false; the start-up text says so)."""
    kernel = inner_optimizer(optimizer) if kernel is None else kernel
    if skip is None:
        optimizer.step()
    elif skip_on_device(kernel):
        kernel.found_inf = skip
        try:
            optimizer.step()
        finally:
            del kernel.found_inf
    elif not skip.item():  # no fused kernel (Adam/AdamW on a device torch has none for): a host read per step
        optimizer.step()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch to the device. A non-blocking copy to a GPU is asynchronous only from pinned host memory (from
    pageable memory the host waits for it), so batches are pinned first there."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def scaler_scale(scaler: Any) -> torch.Tensor | None:
    """A GradScaler's current scale as the device tensor it keeps (`get_scale()` would read it to the host); None
    without a scaler or before its first `scale()`."""
    return getattr(scaler, "_scale", None) if scaler is not None else None
