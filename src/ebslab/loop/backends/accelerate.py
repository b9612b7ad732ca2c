"""Hugging Face Accelerate (`accelerate launch`, DDP, mixed precision; DeepSpeed/FSDP are not supported).

Accumulation is NOT delegated to `accelerator.accumulate`: it divides every micro-batch loss by a fixed
accum_steps, which scales a short last window wrongly. The loop applies the loss rule itself and uses
`no_sync` for the micro-steps that must not all-reduce; the Accelerator's accumulation is pinned to 1 step
(whatever the launcher's environment says) so `backward` divides by nothing, and the scheduler is never
prepared (a prepared scheduler steps num_processes times per optimizer step).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from ebslab.loop.backends.base import ddp_options, resolve_precision, scaler_scale, step_or_skip
from ebslab.loop.backends.torch import pick_device
from ebslab.core.errors import UserError


class AccelerateBackend:
    def __init__(self, precision: str = "fp32", device: str = "auto"):
        from accelerate import Accelerator
        from accelerate.state import PartialState
        from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

        # On a machine without CUDA, Accelerate sets up several CPU processes (gloo) only when told `cpu=True`:
        # without it, each process of `accelerate launch --multi_gpu` / torchrun would train alone.
        self.ddp_kwargs = DistributedDataParallelKwargs()  # filled in `prepare`, once the model is known
        cpu = device == "cpu" or (device == "auto" and pick_device("auto", 0).type == "cpu")
        if cpu:
            resolve_precision(precision, torch.device("cpu"))  # refuse before any process group exists
        state = PartialState(cpu=cpu)
        precision = self.precision = resolve_precision(precision, state.device)
        self.accelerator = Accelerator(
            mixed_precision={"fp32": "no"}.get(precision, precision), cpu=cpu,
            # a plugin, not gradient_accumulation_steps=1: that one yields to ACCELERATE_GRADIENT_ACCUMULATION_STEPS
            # (set by `accelerate launch --gradient_accumulation_steps` / a config), and backward would divide by it
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
            kwargs_handlers=[self.ddp_kwargs])
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device
        if self.accelerator.distributed_type.name in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
            raise UserError(f"train.backend=accelerate runs data parallel (DDP) only, not "
                            f"{self.accelerator.distributed_type.name}; launch without a DeepSpeed/FSDP config")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world_size:
            raise UserError(f"the launcher started {launched} processes but Accelerate set up {self.world_size} "
                            f"({self.accelerator.distributed_type}); each would train alone. Launch with "
                            "`accelerate launch --multi_gpu --num_processes N` or torchrun")

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        for key, value in ddp_options(model).items():
            setattr(self.ddp_kwargs, key, value)
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

    def step(self, optimizer: Any, skip: torch.Tensor | None = None) -> None:
        # the AcceleratedOptimizer steps the torch optimizer inside it (through its scaler with fp16, which skips
        # an inf step itself: the loop passes no flag then)
        step_or_skip(optimizer, skip, kernel=optimizer.optimizer)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor.clone(), reduction="sum")

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def scaler_state(self) -> dict[str, Any] | None:
        scaler = self.accelerator.scaler
        return scaler.state_dict() if scaler is not None else None

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        if self.accelerator.scaler is not None and state:
            self.accelerator.scaler.load_state_dict(state)

    def loss_scale(self) -> torch.Tensor | None:
        return scaler_scale(self.accelerator.scaler)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        # as the torch backend: every process arrives before any tears down (rank 0 writes the summary after the
        # last collective, and a peer closing its gloo/NCCL connections under a live one can abort it)
        self.barrier()
        self.accelerator.end_training()  # destroys the process group
