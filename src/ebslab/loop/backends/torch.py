"""Plain PyTorch: one process, or torchrun + DistributedDataParallel (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ebslab.loop.backends.base import AUTOCAST_DTYPES, ddp_options, resolve_precision, scaler_scale, step_or_skip
from ebslab.core.errors import UserError


def pick_device(device: str, local_rank: int, world_size: int = 1) -> torch.device:
    if device.startswith("cuda:") and world_size > 1:  # checked first: the same answer on a machine without CUDA
        raise UserError(f"train.device={device} with {world_size} processes would put every process on one GPU; "
                        "use train.device=cuda or auto (each process takes the GPU of its LOCAL_RANK)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={device} but no CUDA device is visible; use train.device=auto or cpu")
    if device == "cuda":  # one GPU per process: torchrun's LOCAL_RANK picks it
        return torch.device("cuda", local_rank)
    if device != "auto":
        try:
            return torch.device(device)
        except RuntimeError:
            raise UserError(f"train.device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class TorchBackend:
    def __init__(self, precision: str = "fp32", device: str = "auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = pick_device(device, local_rank, self.world_size)
        precision = self.precision = resolve_precision(precision, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":  # binds the NCCL communicator to this rank's GPU at once
                dist.init_process_group("nccl", device_id=self.device)
            else:
                dist.init_process_group("gloo")
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        model.to(self.device)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_options(model))
        return model, optimizer

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) \
            else contextlib.nullcontext()

    def clip(self, model: nn.Module, optimizer: Any, max_norm: float) -> torch.Tensor:
        if self.scaler:
            self.scaler.unscale_(optimizer)
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))

    def step(self, optimizer: Any, skip: torch.Tensor | None = None) -> None:
        if self.scaler:  # it skips a step with an inf/NaN gradient itself, and lowers the scale
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            step_or_skip(optimizer, skip)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def scaler_state(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler else None

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)

    def loss_scale(self) -> torch.Tensor | None:
        return scaler_scale(self.scaler)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            # every process arrives before any tears its connections down: rank 0 still writes the summary
            # after the last collective, and a peer closing a gloo pair under a live one can abort it
            dist.barrier()
            dist.destroy_process_group()
