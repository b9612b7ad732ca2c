"""The rules every contestant of `ebslab bench` runs by: the bench's settings, the device, the examples of the
step scenario in training order, and the one step clock (the bench is tools.bench; HF Trainer and the naive loop,
tools.bench_baselines)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ebslab.tools.bench_args import CONTESTANTS


@dataclass
class Settings:
    model: str = "minilm"
    lengths: list[int] = field(default_factory=lambda: [128, 256, 512])
    steps: int = 6
    """Optimizer steps per step-scenario run; steps 2..N are timed."""
    micro: int = 16
    effective: int = 32
    rounds: int = 2
    """Step scenario: each contestant runs this many times per length (alternating); the best round is kept, and
    gns_overhead is the median over rounds of the per-round on/off ratio."""
    contestants: list[str] = field(default_factory=lambda: list(CONTESTANTS))
    auto_lengths: list[int] | None = None
    """Lengths at which ebslab-torch-auto runs (None: all)."""
    experiment: bool = True
    experiment_limit: int = 3000
    experiment_length: int = 128
    experiment_epochs: int = 2
    startup_limit: int | None = None
    """Examples for the cached vs uncached start-up figure (None: all of IMDB; 0: skip)."""
    lr: float = 5e-5
    seed: int = 1
    data_path: str | None = None
    """A local table instead of the shipped IMDB (tests use a small one)."""
    matmul_size: int = 2048
    warmup: bool = True
    profile_steps: int = 4
    """Optimizer steps of ebslab-torch profiled at the first length (0: no profile)."""


def quick_settings() -> Settings:
    """`--quick` (`make bench`): under 10 minutes on a 2-core CPU."""
    return Settings(lengths=[128, 256], steps=3, rounds=1, auto_lengths=[128], experiment_limit=160,
                    startup_limit=5000)


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class StepData:
    """The examples of the step scenario, in training order (window k = rows [k*EBS, (k+1)*EBS))."""

    texts: list[str]
    input_ids: list[list[int]]
    labels: np.ndarray
    timed_tokens: int  # real tokens in windows 2..N
    timed_samples: int
    timed_sq_tokens: int = 0  # sum over the examples of windows 2..N of (real tokens)^2: the attention FLOPs


def synchronize() -> None:
    """Wait until the device has done the work queued so far (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """The one timing rule of the step scenario, the same for every contestant: `step_end()` after each optimizer
    step counts it, and at the end of step 1 and of step N (only there) synchronizes the device and reads the
    clock. A clock read without the synchronize would time only how fast the host queues work; a synchronize at
    every step would stop the host from queueing ahead (HF Trainer's own step clock does that) and charge it."""

    def __init__(self, steps: int, now: Callable[[], float] = time.perf_counter) -> None:
        self.steps = steps
        self.now = now
        self.done = 0
        self.ends: list[float] = []  # clock at the end of step 1 and of step N

    def step_end(self) -> None:
        self.done += 1
        if self.done in (1, self.steps):
            synchronize()
            self.ends.append(self.now())
