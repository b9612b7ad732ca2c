"""Backends: how one process talks to its devices and its peers. The Protocol and shared helpers are in `base`;
`torch` (plain PyTorch, DDP) and `accelerate` implement it; `make_backend` picks one from the config."""

from __future__ import annotations

from ebslab.core.config import TrainConfig
from ebslab.loop.backends.base import (AUTOCAST_DTYPES, Backend, ddp_options, inner_optimizer, resolve_precision,
                                       scaler_scale, skip_on_device, step_or_skip, to_device)

__all__ = ["AUTOCAST_DTYPES", "Backend", "ddp_options", "inner_optimizer", "make_backend", "resolve_precision",
           "scaler_scale", "skip_on_device", "step_or_skip", "to_device"]


def make_backend(cfg: TrainConfig) -> Backend:
    if cfg.backend == "accelerate":
        from ebslab.loop.backends.accelerate import AccelerateBackend

        return AccelerateBackend(cfg.precision, cfg.device)
    from ebslab.loop.backends.torch import TorchBackend

    return TorchBackend(cfg.precision, cfg.device)
