"""`batch.micro=auto`: the largest micro_batch that divides the per-process share of the effective batch and fits.

The effective batch is never touched: only micro_batch (and so accum_steps) changes. Candidates are the divisors
of `batch.effective / world_size` no larger than `batch.auto_cap`, tried largest first.

- GPU: each candidate is probed with the real step at `data.max_length` (the worst case: every example at the
  cap): the run's model with its mask form and precision, forward + backward + the run's (fused) optimizer. What
  the probe cannot see (DDP's gradient buckets, a different length mix, fragmentation) is covered by headroom: a
  candidate whose peak passes `HEADROOM` of the device's memory counts as not fitting. An out-of-memory error,
  cuBLAS's `CUBLAS_STATUS_ALLOC_FAILED` included, backs off to the next one. With several processes every rank
  takes the smallest micro-batch any rank found (free memory differs between GPUs).
- CPU: memory is rarely the limit, but larger micro-batches run slower once their activations leave the
  caches (a 2-core CPU: 16 x 128 and 8 x 256 tokens were the fastest, 32 x 128 10% and 16 x 256 12% slower), so
  the answer is the largest candidate under `batch.auto_cap` with micro x max_length <= `batch.auto_cpu_tokens`
  (at least 1).

`probe` can be injected (tests simulate a memory limit with it): `probe(micro)` returns normally when `micro`
examples fit and raises `torch.OutOfMemoryError` when they do not.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Callable

import torch

from ebslab.core.errors import UserError
from ebslab.core.config import Config

Probe = Callable[[int], None]
HEADROOM = 0.85  # a probed step may use this fraction of the device's memory


class ProbeOutOfMemory(RuntimeError):
    """The probed step fit, but without the headroom training needs."""


def candidates(effective: int, world_size: int, cap: int) -> list[int]:
    """Divisors of effective/world_size that are <= cap, largest first."""
    if effective % world_size:
        raise UserError(f"batch.effective={effective} is not divisible by world_size={world_size}; choose a "
                        f"multiple of {world_size}")
    share = effective // world_size
    return [m for m in range(min(share, cap), 0, -1) if share % m == 0]


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, ProbeOutOfMemory)):
        return True
    # cuBLAS allocates its workspace itself: a full device surfaces as an alloc failure, not an OutOfMemoryError
    message = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in message or "cublas_status_alloc_failed" in message)


def search(options: list[int], probe: Probe | None, max_length: int = 0) -> int:
    """The first (largest) option the probe accepts."""
    for micro in options:
        if probe is None:
            return micro
        try:
            probe(micro)
            return micro
        except Exception as e:  # noqa: BLE001 - only out-of-memory backs off; anything else is a real error
            if not _is_oom(e):
                raise
            print(f"batch.micro=auto: micro {micro} does not fit, trying a smaller one", file=sys.stderr)
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise UserError(f"batch.micro=auto: not even micro {options[-1] if options else 1} fits in memory at "
                    f"data.max_length={max_length}; lower data.max_length or use a larger device")


def check_headroom(peak_bytes: int, capacity_bytes: int) -> None:
    """Raise ProbeOutOfMemory when a probed step used more than HEADROOM of the device."""
    if peak_bytes > HEADROOM * capacity_bytes:
        raise ProbeOutOfMemory(f"the probed step peaked at {peak_bytes / 2**30:.1f} GiB of "
                               f"{capacity_bytes / 2**30:.1f} GiB (more than {HEADROOM:.0%})")


def gpu_probe(cfg: Config, device: torch.device) -> Probe:
    """The training step on the real model with `micro` examples of max_length tokens: the run's model (mask form,
    attention kernel), precision and optimizer (fused where the run's is)."""
    from ebslab.loop.backends import AUTOCAST_DTYPES, resolve_precision
    from ebslab.core.config import derive
    from ebslab.inputs.models import build_model, load_tokenizer
    from ebslab.loop.optim import build_optimizer

    tokenizer = load_tokenizer(cfg.model.name)
    bundle = build_model(cfg.model, 2, cfg.train.seed, tokenizer)
    model = bundle.model.to(device)
    model.train()
    derived = derive(cfg, num_train=cfg.batch.effective, world_size=1, micro=1)
    optimizer = build_optimizer(model, cfg.optim, derived)  # allocates the moment buffers on the first step
    dtype = AUTOCAST_DTYPES.get(resolve_precision(cfg.train.precision, device))
    capacity = torch.cuda.get_device_properties(device).total_memory

    def probe(micro: int) -> None:
        length = cfg.data.max_length
        ids = torch.randint(1000, 2000, (micro, length), device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "token_type_ids" in bundle.model_inputs:
            batch["token_type_ids"] = torch.zeros_like(ids)
        try:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(**batch)
            logits.float().sum().backward()
            optimizer.step()
            torch.cuda.synchronize(device)
            check_headroom(torch.cuda.max_memory_allocated(device), capacity)
        finally:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats(device)

    return probe


def agree_on_smallest(micro: int, world_size: int) -> int:
    """The smallest micro-batch over all processes (each probed its own GPU), so every rank runs the same one."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return micro
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([micro], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def largest_micro(cfg: Config, world_size: int, probe: Probe | None = None) -> int:
    """The micro_batch for `batch.micro=auto`. accum_steps follows as effective / (micro x world_size)."""
    device = cfg.train.device
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    probed = probe is not None or on_gpu
    cap = cfg.batch.auto_cap if probed else min(cfg.batch.auto_cap,
                                                max(1, cfg.batch.auto_cpu_tokens // cfg.data.max_length))
    options = candidates(cfg.batch.effective, world_size, cap)
    if probe is None and on_gpu:
        index = int(device.split(":")[1]) if ":" in device else int(os.environ.get("LOCAL_RANK", "0"))
        probe = gpu_probe(cfg, torch.device("cuda", index))
        try:
            micro = search(options, probe, cfg.data.max_length)
        finally:
            probe = None  # drop the probe model before training builds its own
            gc.collect()
            torch.cuda.empty_cache()
    else:
        micro = search(options, probe, cfg.data.max_length)
    micro = agree_on_smallest(micro, world_size)
    print(f"batch.micro=auto => micro {micro}: the largest divisor of {cfg.batch.effective // world_size} "
          f"(batch.effective / world_size) under batch.auto_cap {cfg.batch.auto_cap}"
          + (f" that fits at max_length {cfg.data.max_length}" if probed else
             f" with micro x max_length {cfg.data.max_length} <= batch.auto_cpu_tokens {cfg.batch.auto_cpu_tokens}"),
          file=sys.stderr)
    return micro
