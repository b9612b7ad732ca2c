"""Hugging Face Accelerate (`accelerate launch`, DeepSpeed/FSDP configs, mixed precision).

Accumulation is NOT delegated to `accelerator.accumulate`: it divides every micro-batch loss by a fixed
accum_steps, which scales a short last window wrongly. The loop applies the loss rule itself and uses
`no_sync` for the micro-steps that must not all-reduce; the Accelerator keeps gradient_accumulation_steps=1
so `backward` divides by nothing, and the scheduler is never prepared (a prepared scheduler steps
num_processes times per optimizer step).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ebslab.backends import check_precision


class AccelerateBackend:
    def __init__(self, precision: str = "fp32", device: str = "auto"):
        from accelerate import Accelerator
        from accelerate.state import PartialState

        state = PartialState(cpu=device == "cpu")
        check_precision(precision, state.device)
        self.accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision),
                                       cpu=device == "cpu", gradient_accumulation_steps=1)
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        model, optimizer = self.accelerator.prepare(model, optimizer)
        return model, optimizer

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self.accelerator.no_sync(model)

    def clip(self, model: nn.Module, optimizer: Any, max_norm: float) -> torch.Tensor:
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
        return norm if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))

    def step(self, optimizer: Any) -> None:
        optimizer.step()

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor.clone(), reduction="sum")

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        self.accelerator.end_training()
