"""How one process talks to its devices and its peers. The training loop sees only this Protocol."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from ebslab.config import TrainConfig, UserError


class Backend(Protocol):
    rank: int
    world_size: int
    device: torch.device

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

    def step(self, optimizer: Any) -> None: ...

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes."""

    def gather_objects(self, obj: Any) -> list[Any]: ...

    def unwrap(self, model: nn.Module) -> nn.Module: ...

    def scaler_state(self) -> dict[str, Any] | None:
        """The fp16 loss scale and its counters (plain numbers), for the checkpoint; None without fp16."""

    def load_scaler_state(self, state: dict[str, Any] | None) -> None: ...

    def barrier(self) -> None: ...

    def close(self) -> None: ...


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    if precision != "fp32" and device.type == "cpu":
        raise UserError(f"train.precision={precision} is refused on CPU: bf16/fp16 matmul on this kind of CPU is "
                        "hundreds of times slower than fp32; use train.precision=fp32 (bf16/fp16 are for GPUs)")


def make_backend(cfg: TrainConfig) -> Backend:
    if cfg.backend == "accelerate":
        from ebslab.backends.accelerate import AccelerateBackend

        return AccelerateBackend(cfg.precision, cfg.device)
    from ebslab.backends.torch import TorchBackend

    return TorchBackend(cfg.precision, cfg.device)
