"""THE training loop. `Trainer.fit()` reads top to bottom: for each window of `effective_batch` examples one
optimizer step whose gradient is that of

        (sum of per-example losses in the window) / (number of examples in the window)

however the window is cut into micro-batches and spread over processes. Evaluation, checkpoints and logging
hang off the step counter; nothing in here depends on which backend runs it. Measurements (the noise scale,
pruning, profiling) attach as callbacks (ebslab.loop.callbacks), never as branches in the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import signal
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ebslab.loop import checkpoint as ckpt
from ebslab.loop.backends import Backend, inner_optimizer, make_backend, skip_on_device, to_device
from ebslab.loop.callbacks import Callback, Callbacks, ProgressBar, TrackerLogging
from ebslab.core.errors import UserError
from ebslab.core.config import Config, Derived, derive, resolved_dict
from ebslab.inputs.data import (DataBundle, MicroBatch, collate, data_fingerprint, data_source, epoch_order,
                         fingerprint_changes, length_grouped, load_data, load_examples, shard_window, windows)
from ebslab.loop.evaluate import EvalResult, evaluate, improves, save_predictions
from ebslab.core.files import atomic_write_json, atomic_write_text, check_folder_target
from ebslab.loop.gns import GradientNoiseScale, gns_decision
from ebslab.core.locks import LOCK_NAME, FolderLock
from ebslab.core.metrics import collapse_margin, run_history
from ebslab.inputs.models import ModelBundle, build_model, load_tokenizer
from ebslab.loop.optim import build_optimizer, build_scheduler
from ebslab.core.runfolder import load_run_config, read_summary
from ebslab.loop.tracking import NullTracker, Tracker, check_trackers, open_trackers, truncate_metrics



@dataclass
class TrainSums:
    """Sums over the training windows since the last evaluation: the eval line's train/loss and train/acc."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0


# The loop's device-side sums, one slot each, read by the host in one transfer (by name: SUMS.index)
SUMS = ("loss", "correct", "count", "stop", "bad_grad")
LOSS, CORRECT, COUNT, STOP, BAD_GRAD = (SUMS.index(name) for name in SUMS)


@dataclass
class TrainerState:
    """Everything a resumed run needs besides tensors: counters, position in the epoch, best so far."""

    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    window: int = 0  # next window of `epoch`
    samples: int = 0
    train_time_s: float = 0.0
    elapsed_s: float = 0.0
    since_eval: TrainSums = field(default_factory=TrainSums)
    best_val: dict[str, float] | None = None
    best_step: int = -1
    best_epoch: int = -1
    evals_without_gain: int = 0
    ever_above_majority: bool = False  # some evaluation beat the majority-class rate + collapse_margin
    collapse_warned: bool = False  # the "fell_back" warning was given
    last_eval_step: int = -1
    last_val_acc: float | None = None
    max_val_acc: float | None = None
    last_val: dict[str, float] | None = None
    scaler: dict[str, Any] | None = None  # fp16 loss scale (GPU), so a resumed run skips the same steps
    callbacks: dict[str, Any] = field(default_factory=dict)  # Callbacks.state_dict(): their averages and sums

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainerState:
        """From trainer_state.json; checkpoints written before `since_eval` had names hold [loss sum, correct,
        count]. Raises TypeError or ValueError for a state this version cannot read."""
        if not isinstance(saved, dict):
            raise TypeError(f"a mapping, not {type(saved).__name__}")
        since = saved.get("since_eval", {})
        if isinstance(since, list):
            since = dict(zip(("loss_sum", "correct", "count"), since, strict=True))
        if not isinstance(since, dict):
            raise TypeError(f"since_eval: a mapping, not {type(since).__name__}")
        for name, value in since.items():
            _check_type(f"since_eval.{name}", value, float)
        hints = typing.get_type_hints(cls)
        for name, value in saved.items():
            if name != "since_eval" and name in hints:
                _check_type(name, value, hints[name])
        return cls(**{**saved, "since_eval": TrainSums(**since)})



def _check_type(name: str, value: Any, tp: Any) -> None:
    """TypeError unless `value` (read from JSON) has the type `tp` of a TrainerState field."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        ok = isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        if ok and args and args[1] is float:
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values())
    else:
        ok = True
    if not ok:
        raise TypeError(f"{name}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} "
                        f"{str(value)[:40]!r}")


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit. A second Ctrl-C exits at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:
            if signum == signal.SIGINT:  # a person pressing Ctrl-C twice means it
                raise KeyboardInterrupt
            return  # launchers (torchrun, SLURM) may repeat SIGTERM: keep finishing the step
        self.signal = signum
        again = " (Ctrl-C again to abort now)" if signum == signal.SIGINT else ""
        print(f"\n{signal.Signals(signum).name}: stopping after this step{again}", file=sys.stderr, flush=True)

    def __exit__(self, *_: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal or signal.SIGTERM)  # no local signal: another process got a SIGTERM


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_dropout(seed: int, rank: int) -> None:
    """Each process its own dropout masks: seeded by (seed, rank), so rank 1 of a 2-process run does not repeat
    rank 0's masks on a micro-batch of the same shape. Rank 0's stream is left as it is (a 1-process run is unchanged). Only
    dropout draws from torch's global generator after set-up: data order and initialisation have their own."""
    if rank:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def resolve_micro(cfg: Config, world_size: int, saved_derived: dict | None = None) -> int:
    if cfg.batch.micro != "auto":
        return int(cfg.batch.micro)
    saved = (saved_derived or {}).get("micro")
    if isinstance(saved, int):  # a resumed run keeps the micro-batch it started with (free memory may differ now)
        return saved
    from ebslab.loop.autobatch import largest_micro

    return largest_micro(cfg, world_size)


# ------------------------------------------------------------------------------------------------------------


RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> FolderLock:
    """An empty run folder, locked for this process (two `ebslab train` into one folder: the second refuses)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"out.dir/out.name '{run_dir}' is a file; choose another out.name")
    existing = run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir())
    if existing and not any((run_dir / m).exists() for m in RUN_MARKERS):
        # --overwrite deletes runs, never a folder that merely shares the name (out.name=Documents ...)
        raise UserError(f"'{run_dir}' is a non-empty folder that is not an ebslab run; choose another "
                        "out.dir/out.name (--overwrite only replaces run folders)")
    lock = FolderLock(run_dir, "run").acquire()  # before --overwrite deletes what a live run is writing
    if existing:
        if not overwrite:
            lock.release()
            raise UserError(f"run folder '{run_dir}' already holds a run; pass --overwrite to replace it, "
                            f"--resume {run_dir} to continue it, or set out.name")
        for child in run_dir.iterdir():
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    return lock


def train(cfg: Config, resume_dir: Path | None = None, overwrite: bool = False,
          callbacks: Sequence[Callback] | None = None) -> dict[str, Any]:
    """One run into its folder. Returns the summary (also written to summary.json) with its `exit_code`."""
    trainer = Trainer(cfg, resume_dir, overwrite, callbacks)
    try:
        trainer.setup()
        try:
            with trainer.signals:
                trainer.fit()
                return trainer.finish()
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:
            trainer.write_failed(e)
            raise
    finally:
        if trainer.lock is not None:
            trainer.lock.release()


class Trainer:
    """One run: `setup()` builds everything (every user error surfaces there, before a run folder exists),
    `fit()` runs the loop, `finish()` tests the best and last weights and writes the summary. Measurements attach
    as callbacks (ebslab.loop.callbacks); the tracker logging is one of them, always the last."""

    def __init__(self, cfg: Config, resume_dir: Path | None = None, overwrite: bool = False,
                 callbacks: Sequence[Callback] | None = None):
        self.started = time.time()
        self.cfg = cfg
        self.resume_dir = resume_dir
        self.overwrite = overwrite
        self.callbacks = Callbacks([*(callbacks or ()), ProgressBar(), TrackerLogging()])
        self.signals = StopRequest()
        self.state = TrainerState()
        self.end: tuple[str, str | None] | None = None  # (status, message) once the loop must end
        self.interrupted = False  # a signal, agreed by all processes at a step's reduce
        # test results kept from the evaluations: "last" (the latest one) and "best" (at the best val metric),
        # so the final test on those weights reuses them instead of scoring the same weights again
        self.test_at: dict[str, EvalResult] = {}
        self.saved_at_step = -1  # the step last written to checkpoints/last
        self.best_written_at = -1  # the step whose weights this process wrote to best/ (never one before a resume)
        self.clock = time.time()  # since the last checkpoint: state.elapsed_s holds the time before it
        self.read_clock = time.perf_counter()  # the last host read, evaluation or checkpoint (fit's train time)
        self.unread: torch.Tensor  # fit's device sums (SUMS) of the steps the host has not read: a GPU runs on
        self.watch_grad = True  # a non-finite gradient ends the run (not with fp16: its scaler skips such steps)
        self.backend: Backend
        self.data: DataBundle
        self.bundle: ModelBundle
        self.derived: Derived
        self.run_dir: Path
        self.model: torch.nn.Module
        self.optimizer: Any
        self.scheduler: Any
        self.tracker: Tracker = NullTracker()
        self.lock: FolderLock | None = None  # the run folder's, held by the main process
        self.gns_reason = "off"  # set by setup(): the start-up line says whether and why
        self.fingerprint: tuple[str, dict] = ("", {})  # the data's (data_fingerprint), set by setup()
        self.saved_derived: dict | None = None  # a resumed run's config.yaml `derived`, set by setup()

    def add_callback(self, callback: Callback) -> None:
        """Attach a callback before the progress bar and the tracker logging, so its keys are logged."""
        self.callbacks.insert(len(self.callbacks) - 2, callback)

    def request_stop(self, status: str, message: str | None) -> None:
        """End `fit` after the current step with a last checkpoint; the summary gets `status` (e.g. `pruned`).
        Call it on every process alike. The first request wins."""
        if self.end is None:
            self.end = (status, message)

    # --------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Named steps, in order; every user error surfaces before the run folder step creates anything."""
        self._setup_backend()
        tokenizer = self._setup_data()
        self._setup_model(tokenizer)
        self._setup_run_folder()
        self._setup_training()
        self._write_run_files()

    def _setup_backend(self) -> None:
        """The backend; on --resume, the lock (a run still going says so) and a finished run's refusal."""
        cfg, resume_dir = self.cfg, self.resume_dir
        check_folder_target(resume_dir or cfg.run_dir, "--resume" if resume_dir else "out.dir/out.name")
        backend = self.backend = make_backend(cfg.train)
        if resume_dir is not None:  # first: a run still going says so (the lock), a finished one has nothing to do
            if backend.is_main:
                self.lock = FolderLock(resume_dir, "run").acquire()
            _check_unfinished(resume_dir)
        seed_everything(cfg.train.seed)
        if cfg.batch.micro != "auto":  # fail in a second, not after loading and tokenizing the data
            derive(cfg, num_train=1, world_size=backend.world_size)

    def _setup_data(self) -> Any:
        """The examples (a wrong path or column fails before any model), the tokenizer and the tokenized splits."""
        cfg = self.cfg
        examples = load_examples(cfg.data, data_source(cfg.data))
        tokenizer = load_tokenizer(cfg.model.name)
        self.data = load_data(cfg.data, tokenizer, examples)
        return tokenizer

    def _setup_model(self, tokenizer: Any) -> None:
        """The model, the derived values (micro-batch, accum_steps, steps, precision) and the data's fingerprint."""
        cfg, backend, data = self.cfg, self.backend, self.data
        self.bundle = build_model(cfg.model, data.num_labels, cfg.train.seed, tokenizer, cfg.data.max_length)
        self.saved_derived = load_run_config(self.resume_dir)[1] if self.resume_dir is not None else None
        micro = resolve_micro(cfg, backend.world_size, self.saved_derived)
        self.derived = derive(cfg, len(data.train), backend.world_size, micro, backend.precision,
                              backend.device.type)
        self.fingerprint = data_fingerprint(cfg.data, data.label_names)
        check_trackers(cfg.track)

    def _setup_run_folder(self) -> None:
        """A new run's folder (locked), or the checks that the resumed folder's data and config still fit."""
        cfg, backend, resume_dir = self.cfg, self.backend, self.resume_dir
        run_dir = self.run_dir = resume_dir or cfg.run_dir
        if resume_dir is not None:
            _check_same_data(run_dir, self.saved_derived, self.fingerprint)
            _check_resumable(run_dir, self.saved_derived, self.derived)
        elif backend.is_main:
            self.lock = prepare_run_dir(run_dir, self.overwrite)
        backend.barrier()
        seed_dropout(cfg.train.seed, backend.rank)  # after the initialisation; a resume restores the stream

    def _setup_training(self) -> None:
        """Optimizer, scheduler, the resumed state, and the measurements (callbacks) with their saved state."""
        cfg, backend, bundle, derived, resume_dir = self.cfg, self.backend, self.bundle, self.derived, self.resume_dir
        if cfg.train.compile:
            bundle.model.compile()  # in place: state-dict keys, unwrap and no_sync stay as without compile
        self.model, self.optimizer = backend.prepare(bundle.model, build_optimizer(bundle.model, cfg.optim, derived))
        self.scheduler = build_scheduler(self.optimizer, cfg.sched, derived)
        if resume_dir is not None:
            self._resume()
        gns_on, self.gns_reason = gns_decision(cfg.train.gns, derived.accum_steps, backend.world_size)
        if gns_on:
            self.add_callback(GradientNoiseScale())
        self.callbacks.load_state_dict(self.state.callbacks)  # a resumed run's; a new run's is empty

    def _write_run_files(self) -> None:
        """config.yaml (with derived.precision as the backend resolved it), labels.json, the trackers."""
        backend, data, run_dir, cfg = self.backend, self.data, self.run_dir, self.cfg
        if backend.is_main:
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(self.resolved(), sort_keys=False))
            atomic_write_json(run_dir / "labels.json", {"names": data.label_names,
                                                       "majority_rate": data.majority_rate})
            self.tracker = open_trackers(cfg.track, run_dir, self.resolved())
            print(_startup_text(self), flush=True)
        for message in data.warnings:
            self.warn("data", message)

    def resolved(self) -> dict[str, Any]:
        """config.yaml: the config, the derived values and the data's fingerprint (`derived.data_fingerprint`,
        with its parts in `derived.data_fingerprint_parts` for the message that refuses a resume on other data)."""
        out = resolved_dict(self.cfg, self.derived)
        out["derived"]["data_fingerprint"], out["derived"]["data_fingerprint_parts"] = self.fingerprint
        return out

    def _resume(self) -> None:
        last = ckpt.resolve_checkpoint(self.run_dir / "checkpoints" / "last")
        if last is None:
            raise UserError(f"'{self.run_dir}' has no complete checkpoint to resume from; start it again with "
                            "--overwrite")
        ckpt.check_config(last, resolved_dict(self.cfg), self.run_dir)
        saved_state = ckpt.load_last(last, self.backend.unwrap(self.model), self.optimizer, self.scheduler,
                                     self.backend.rank)
        try:
            self.state = TrainerState.from_dict(saved_state)
        except (TypeError, ValueError) as e:
            raise UserError(f"'{self.run_dir}': trainer_state.json is damaged or from another version of ebslab "
                            f"({str(e)[:120]}); start again with --overwrite") from None
        self.backend.load_scaler_state(self.state.scaler)
        self.started -= self.state.elapsed_s  # duration_s counts the interrupted sessions too
        if self.backend.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)

    # --------------------------------------------------------------------------------------------------------

    def fit(self) -> None:
        """Optimizer steps until the budget is spent, a stop is requested, the run diverges or a signal came."""
        state, total_steps = self.state, self.derived.total_steps
        self.start_fit()
        while state.step < total_steps and self.end is None and not self.interrupted:
            epoch_windows = windows(self._epoch_order(), self.cfg.batch.effective)
            while state.window < len(epoch_windows) and state.step < total_steps:
                window = epoch_windows[state.window]
                sums, grad_norm, lr = self.step_over_window(window)
                sums = self.count_step(sums, len(window))
                epoch_done = state.window == len(epoch_windows)
                log_due, eval_due, save_due = self._due(epoch_done, len(window))
                if not (log_due or eval_due or save_due):
                    self.callbacks.on_step(self, None)
                    continue  # the host does not wait for the device between log lines

                step_sums, since_read, grad_norm_value = self.read_device_sums(sums, grad_norm)
                record = self.step_record(step_sums, lr, grad_norm_value) if log_due else None
                self.callbacks.on_step(self, record)  # the tracker logging, last, writes the line
                if self.stop_if_diverged(since_read):
                    break
                self.add_to_since_eval(since_read)
                self.interrupted = since_read["stop"] > 0
                if eval_due:
                    self.evaluate()
                if save_due:
                    self.save_step(epoch_done)
                self.read_clock = time.perf_counter()
                if self.interrupted or self.end is not None or epoch_done:
                    break  # at an epoch end: the outer loop draws the next epoch's order

    def start_fit(self) -> None:
        """The clocks, the unread device sums and the model in training mode; the callbacks' on_fit_start."""
        self.clock = time.time()
        # training time is wall time between host reads (a GPU runs ahead of the host: a clock that stops before the
        # read counts only the time to queue the work); evaluation and checkpoints restart it
        self.read_clock = time.perf_counter()
        self.unread = torch.zeros(len(SUMS), device=self.backend.device)
        # fp16's scaler skips a step with an inf/NaN gradient and lowers the scale, as designed: not a divergence
        self.watch_grad = self.cfg.train.precision != "fp16"
        self.callbacks.on_fit_start(self)
        self.model.train()

    def step_over_window(self, window: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over the window: its micro-batches' backward, clip, step. Returns the window's sums
        on the device (this process's; `count` filled), the gradient norm (on the device) and the step's lr."""
        backend, state = self.backend, self.state
        lr = self.scheduler.get_last_lr()[0]
        micro_batches = shard_window(window, self.derived.micro, backend.world_size, backend.rank)
        window_sums = torch.zeros(len(SUMS), device=backend.device)
        window_count = 0.0  # known on the host: a device tensor made from it would wait for the device
        for i, mb in enumerate(micro_batches):
            examples = self.micro_batch_step(mb, len(window), i == len(micro_batches) - 1, window_sums)
            window_count += examples
            state.micro_step += 1
            self.callbacks.on_micro_backward(self, i, len(micro_batches), examples)
        grad_norm = self.clip_and_step(window_sums)
        window_sums[COUNT].fill_(window_count)  # fill_ with a number: no host-to-device copy to wait for
        return window_sums, grad_norm, lr

    def micro_batch_step(self, mb: MicroBatch, window_examples: int, last_micro: bool,
                         window_sums: torch.Tensor) -> float:
        """THE LOSS RULE: forward, per-example losses, backward of their sum x weight x world_size / examples in the
        window, so the window's gradient is its mean loss's however it is cut; gradients are synchronised across
        processes only at the window's last micro-batch. Adds the loss and correct sums to `window_sums`; returns
        the examples the micro-batch counts for (0 for a stand-in)."""
        backend, data, bundle, model = self.backend, self.data, self.bundle, self.model
        batch = {k: to_device(v, backend.device) for k, v in
                 collate(data.train, mb.indices, bundle.pad_id, bundle.model_inputs).items()}
        labels = to_device(torch.from_numpy(data.train.labels[mb.indices]), backend.device)
        weight = float(mb.counts)  # 0 for a stand-in micro-batch (short window, many processes)
        with contextlib.nullcontext() if last_micro else backend.no_sync(model):
            with backend.autocast():
                logits = model(**batch)
            losses = F.cross_entropy(logits.float(), labels, reduction="none")
            scale = weight * backend.world_size / window_examples  # window mean; undoes DDP's averaging over processes
            backend.backward(losses.sum() * scale)
        window_sums[LOSS:CORRECT + 1] += weight * torch.stack([losses.detach().sum(),
                                                               (logits.detach().argmax(-1) == labels).sum()])
        return weight * len(mb.indices)

    def clip_and_step(self, window_sums: torch.Tensor) -> torch.Tensor:
        """Clip, the optimizer step (skipped on the device for a non-finite gradient), the scheduler step, zero the
        gradients. Returns the gradient norm (on the device); sets `window_sums`' bad_grad flag."""
        backend, optimizer = self.backend, self.optimizer
        self.callbacks.on_before_clip(self)
        grad_norm = backend.clip(self.model, optimizer, self.cfg.optim.clip_norm)
        skip = None
        if self.watch_grad:  # on the device: read with the other sums, the run ends before a checkpoint
            window_sums[BAD_GRAD] = (~torch.isfinite(grad_norm)).float()
            # this step and every one until the host reads the flag leave the weights as they were
            skip = (self.unread[BAD_GRAD] + window_sums[BAD_GRAD] > 0).float()
        backend.step(optimizer, skip)
        self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def count_step(self, window_sums: torch.Tensor, window_examples: int) -> torch.Tensor:
        """The step's sums over all processes, added to the unread ones; the step, window and sample counters.
        Returns the summed sums."""
        state = self.state
        # a signal on any process stops all of them after the same step (no rank left waiting)
        window_sums[STOP].fill_(float(self.signals.signal is not None))
        window_sums = self.backend.reduce_sum(window_sums)
        self.unread += window_sums
        state.step += 1
        state.window += 1
        state.samples += window_examples
        return window_sums

    def read_device_sums(self, window_sums: torch.Tensor, grad_norm: torch.Tensor) -> tuple[dict, dict, float]:
        """The one host read of a log, evaluation or checkpoint step, on every process: this step's sums, those
        since the previous read (then zeroed) and the gradient norm. Stops the training-time clock."""
        step_values, since_values, (grad_norm_value, *_) = _to_host(
            torch.stack([window_sums, self.unread,
                         grad_norm.detach().float().to(self.unread.device).expand(len(self.unread))]))
        self.state.train_time_s += time.perf_counter() - self.read_clock
        self.unread.zero_()
        return dict(zip(SUMS, step_values)), dict(zip(SUMS, since_values)), grad_norm_value

    def step_record(self, step_sums: dict[str, float], lr: float, grad_norm: float) -> dict[str, Any]:
        """The metrics line of the step just taken."""
        state = self.state
        return {"event": "step", "step": state.step, "epoch": state.step / self.derived.steps_per_epoch,
                "micro_step": state.micro_step, "train/loss": step_sums["loss"] / step_sums["count"],
                "train/acc": step_sums["correct"] / step_sums["count"], "lr": lr, "grad_norm": grad_norm,
                "samples_per_s": state.samples / max(state.train_time_s, 1e-9), "elapsed_s": self.elapsed()}

    def stop_if_diverged(self, since_read: dict[str, float]) -> bool:
        """A non-finite gradient norm or train loss since the previous read ends the run as `diverged`."""
        if since_read["bad_grad"] > 0 or not math.isfinite(since_read["loss"]):
            what = "gradient norm" if since_read["bad_grad"] > 0 else "train loss"
            self.end = ("diverged", f"non-finite {what} by step {self.state.step}")
            self.warn("diverged", self.end[1] + "; stopping the run")
            return True
        return False

    def add_to_since_eval(self, since_read: dict[str, float]) -> None:
        """The sums since the previous read into those since the last evaluation (its train/loss, train/acc)."""
        since = self.state.since_eval
        since.loss_sum += since_read["loss"]
        since.correct += since_read["correct"]
        since.count += since_read["count"]

    def save_step(self, epoch_done: bool) -> None:
        """The checkpoint of the step just taken; at an epoch end it resumes at the next epoch's first window."""
        state = self.state
        if epoch_done:
            state.epoch, state.window = state.epoch + 1, 0
        self.save_last()

    def _epoch_order(self) -> np.ndarray:
        """Example order of the current epoch: a function of (seed, epoch) only, never of micro or world size."""
        cfg, state = self.cfg, self.state
        order = epoch_order(len(self.data.train), cfg.train.seed, state.epoch)
        if cfg.data.group_by_length:
            order = length_grouped(order, self.data.train.lengths, cfg.batch.effective, cfg.train.seed, state.epoch)
        return order

    def _due(self, epoch_done: bool, window_examples: int) -> tuple[bool, bool, bool]:
        """(log, evaluate, save) at the step just taken (over `window_examples` examples)."""
        cfg, step, samples = self.cfg, self.state.step, self.state.samples
        every, every_examples = cfg.eval.every_steps, cfg.eval.every_examples
        # eval.every_examples: at the step whose window crosses a multiple, so every EBS meets the same data points
        crossed = bool(every_examples) and samples // every_examples > (samples - window_examples) // every_examples
        eval_due = bool(every and step % every == 0) or crossed or \
            (not (every or every_examples) and epoch_done) or step == self.derived.total_steps
        save_due = epoch_done or bool(cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
        log_due = step % self.derived.log_every_steps == 0 or epoch_done
        return log_due, eval_due, save_due

    # --------------------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """The final evaluation and checkpoint, the test on the best and on the last weights, the summary."""
        if self.interrupted:
            self.save_last()
            code = self.signals.exit_code
            return self._write_summary(self._summary("interrupted", f"stopped by {signal.Signals(code - 128).name}"),
                                       code)
        status, message = self.end or ("completed", None)  # read before the final evaluation: it ends nothing
        test_best = test_last = None
        if status != "diverged":  # keep the last finite checkpoint, not NaN weights
            if self.state.last_eval_step != self.state.step:
                self.evaluate()
            self.save_last()
            test_best, test_last = self._final_test()
        history = _history(self.state, self.data)
        if status == "completed" and history["collapsed"]:
            status = "collapsed"
            message = (f"val acc never rose above {self.data.majority_rate + history['margin']:.4f} (the majority-class "
                       f"rate {self.data.majority_rate:.4f} + {history['margin']:.4f}, what chance reaches on "
                       f"{len(self.data.val)} val examples); best {history['best']:.4f}")
            self.warn("collapsed", message)
        elif status == "completed" and history["fell_back"]:
            message = (f"learned (best val acc {history['best']:.4f}), then fell back to {history['last']:.4f} at the "
                       f"last evaluation (majority-class rate {self.data.majority_rate:.4f})")
        return self._write_summary(self._summary(status, message, test_best, test_last), 0)

    def _final_test(self) -> tuple[dict | None, dict]:
        # not in memory when a resumed run had already evaluated its final step before it stopped
        last_result = self.test_at["last"] if "last" in self.test_at else self.score(self.data.test)
        _save_predictions(self.run_dir, "test_last", last_result, self.backend)
        test_best = None
        if self.cfg.eval.test_on in ("best", "both"):
            best_result = self.test_at.get("best")
            if best_result is None:  # the best came before a resume: its test result is not in memory
                self.backend.barrier()  # best/ is written by the main process
                ckpt.load_weights(self.backend.unwrap(self.model), self.run_dir / "checkpoints" / "best")
                best_result = self.score(self.data.test)
            _save_predictions(self.run_dir, "test_best", best_result, self.backend)
            test_best = best_result.metrics()
        return test_best, last_result.metrics()

    def _write_summary(self, summary: dict[str, Any], exit_code: int) -> dict[str, Any]:
        self.callbacks.on_fit_end(self, summary)
        if self.backend.is_main:
            atomic_write_json(self.run_dir / "summary.json", summary)
            self.tracker.close()
            if exit_code == 0:
                print(_summary_text(self.run_dir, summary), flush=True)
        self.backend.close()
        summary["exit_code"] = exit_code
        return summary

    def write_failed(self, error: Exception) -> None:
        """An unexpected error after set-up: the summary says `failed` and why (the error is raised on)."""
        if self.backend.is_main and self.run_dir.exists():
            summary = self._summary("failed", f"{type(error).__name__}: {error}")
            atomic_write_json(self.run_dir / "summary.json", summary)

    def _summary(self, status: str, message: str | None, test_best: dict | None = None,
                 test_last: dict | None = None) -> dict[str, Any]:
        state = self.state
        return {
            "status": status, "message": message,
            "best_epoch": state.best_epoch, "best_step": state.best_step, "steps": state.step,
            "micro_steps": state.micro_step, "samples": state.samples,
            "duration_s": round(time.time() - self.started, 3),
            "train_time_s": round(state.train_time_s, 3),
            "train_samples_per_s": state.samples / state.train_time_s if state.train_time_s else None,
            "val_best": state.best_val, "test_best": test_best,
            "test_last": test_last if self.cfg.eval.test_on in ("last", "both") else None,
            "majority_rate": self.data.majority_rate, "dropped_empty": self.data.dropped_empty,
            # the status over the whole validation history (run_history): fell_back = learned, then back
            # at the majority-class rate at the last evaluation (the run stays `completed`)
            "fell_back": _history(state, self.data)["fell_back"], "val_last": state.last_val,
            "val_max_acc": state.max_val_acc, "collapse_margin": _history(state, self.data)["margin"],
        }

    # --------------------------------------------------------------------------------------------------------

    def score(self, split: Any) -> EvalResult:
        # the unwrapped module: DDP's forward would broadcast buffers, a collective a rank with no examples skips
        return evaluate(self.backend.unwrap(self.model), split, self.backend, self.cfg.eval.batch_size,
                        self.bundle.pad_id, self.bundle.model_inputs, self.data.label_names)

    def evaluate(self) -> None:
        """Score val and test, log, keep the best; early stopping is a stop request."""
        val, test = self.score(self.data.val), self.score(self.data.test)
        if self._after_eval(val, test):
            self.request_stop("completed", f"early stopping after {self.cfg.train.early_stopping_patience} "
                                           f"evaluations without val-{self.cfg.eval.select_by} gain")
        self.test_at["last"] = test
        if self.state.best_step == self.state.step:
            self.test_at["best"] = test
            self.best_written_at = self.state.step

    def _after_eval(self, val: EvalResult, test: EvalResult) -> bool:
        """Log the eval line, keep the best checkpoint, watch for collapse. Returns True to stop early."""
        state, data = self.state, self.data
        since = state.since_eval
        record = {"event": "eval", "epoch": state.step / self.derived.steps_per_epoch, "step": state.step,
                  "samples": state.samples,
                  "train/loss": since.loss_sum / since.count if since.count else None,
                  "train/acc": since.correct / since.count if since.count else None,
                  **val.record("val"), **test.record("test"), "elapsed_s": self.elapsed()}
        self.callbacks.on_eval(self, record)  # the tracker logging, last, writes the line
        state.since_eval = TrainSums()
        state.last_eval_step = state.step
        # (a checkpoint from before max_val_acc: its last evaluation is the best known)
        state.max_val_acc = max(a for a in (state.max_val_acc, state.last_val_acc, val.acc) if a is not None)
        state.last_val_acc, state.last_val = val.acc, val.metrics()
        if val.acc > data.majority_rate + collapse_margin(data.majority_rate, len(data.val)):
            state.ever_above_majority = True
        elif state.ever_above_majority and not state.collapse_warned:
            state.collapse_warned = True
            self.warn("fell_back", f"val acc fell to {val.acc:.4f}, the majority-class rate "
                                   f"{data.majority_rate:.4f}, at step {state.step} (best so far "
                                   f"{state.max_val_acc:.4f})")
        if improves(val, state.best_val, self.cfg.eval.select_by):
            state.best_val = val.metrics()
            state.best_step, state.best_epoch = state.step, math.ceil(state.step / self.derived.steps_per_epoch)
            state.evals_without_gain = 0
            if self.backend.is_main:
                ckpt.save_best(self.backend.unwrap(self.model), self.run_dir / "checkpoints")
        else:
            state.evals_without_gain += 1
        patience = self.cfg.train.early_stopping_patience
        return bool(patience and state.evals_without_gain >= patience)

    def save_last(self) -> None:
        """Checkpoint to resume from. Called on every process: the RNG states are gathered from all of them."""
        state, backend = self.state, self.backend
        if self.saved_at_step == state.step:
            return  # e.g. a stop right after a step's own checkpoint: nothing new to write
        self.saved_at_step = state.step
        rng_per_rank = backend.gather_objects(ckpt.rng_state())
        if backend.is_main:
            state.elapsed_s += time.time() - self.clock
            self.clock = time.time()
            state.scaler = backend.scaler_state()
            state.callbacks = self.callbacks.state_dict()
            # an epoch end that was also the best: last/ shares best/'s weights file instead of writing it again
            same_weights = self.run_dir / "checkpoints" / "best" if self.best_written_at == state.step else None
            ckpt.save_last(self.run_dir / "checkpoints", backend.unwrap(self.model), self.optimizer, self.scheduler,
                           dataclasses.asdict(state), config=resolved_dict(self.cfg), rng_per_rank=rng_per_rank,
                           weights_from=same_weights)

    def elapsed(self) -> float:
        return self.state.elapsed_s + time.time() - self.clock

    def warn(self, kind: str, message: str) -> None:
        """A warning on stderr (main process) and as a `warning` line in the run's metrics."""
        if self.backend.is_main:
            print(f"\nWARNING [{kind}] {message}", file=sys.stderr, flush=True)
        self.tracker.log({"event": "warning", "step": self.state.step, "kind": kind, "message": message})




# ------------------------------------------------------------------------------------------------------------
# Helpers of the loop


def _to_host(tensor: torch.Tensor) -> list:
    """Device to host: the training loop's only wait for the device (a function, so tests can count calls)."""
    return tensor.tolist()


def _history(state: TrainerState, data: DataBundle) -> dict[str, Any]:
    """run_history of the run so far: collapsed = no evaluation beat the majority-class rate by more than
    chance does on this val set; fell_back = it did, and the last evaluation is back at that rate."""
    accs = [a for a in (state.max_val_acc, state.last_val_acc) if a is not None]  # the best, then the last
    return run_history(accs, data.majority_rate, len(data.val))


def _save_predictions(run_dir: Path, name: str, result: EvalResult, backend: Backend) -> None:
    if backend.is_main:
        save_predictions(run_dir, name, result)


FINISHED = ("completed", "collapsed", "diverged", "pruned")


def _check_unfinished(run_dir: Path) -> None:
    """`--resume` of a run that finished: nothing to resume (it would test the weights again and rewrite the
    run's files)."""
    status = (read_summary(run_dir) or {}).get("status")
    if status in FINISHED:
        raise UserError(f"run '{run_dir}' already finished (status {status}): there is nothing to resume; its "
                        "results are in summary.json (start it again with `ebslab train ... --overwrite`)")


def _check_same_data(run_dir: Path, saved: dict, fingerprint: tuple[str, dict]) -> None:
    """Refuse to resume on data other than the run started with (a run folder from before fingerprints: unknown,
    allowed)."""
    digest, parts = fingerprint
    if not saved.get("data_fingerprint") or saved["data_fingerprint"] == digest:
        return
    saved_parts = saved.get("data_fingerprint_parts")
    changes = fingerprint_changes(saved_parts, parts) if isinstance(saved_parts, dict) else []
    raise UserError(f"cannot resume '{run_dir}': its data changed since it started ("
                    + ("; ".join(changes) or "fingerprint differs") + "); restore the data it trained on, or start "
                    "a new run on the new data")


def _check_resumable(run_dir: Path, saved: dict, derived: Derived) -> None:
    for key in ("num_train", "accum_steps", "steps_per_epoch", "total_steps", "world_size", "micro"):
        if key in saved and saved[key] != getattr(derived, key):
            raise UserError(f"cannot resume '{run_dir}': {key} was {saved[key]}, now {getattr(derived, key)} "
                            "(data, code or process count changed); start a new run instead")


def _fmt(metrics: dict | None, key: str) -> str:
    return "-" if not metrics or metrics.get(key) is None else f"{metrics[key]:.4f}"


def _summary_text(run_dir: Path, s: dict[str, Any]) -> str:
    rows = [("val (best)", s["val_best"]), ("test @ best", s["test_best"]), ("test @ last", s["test_last"])]
    lines = [f"\nrun {run_dir}: {s['status']}" + (f" ({s['message']})" if s["message"] else ""),
             f"steps {s['steps']}, best at step {s['best_step']} (epoch {s['best_epoch']}), "
             f"{s['duration_s']:.0f} s, {s['train_samples_per_s'] or 0:.1f} train samples/s",
             f"{'':12}  {'acc':>7}  {'loss':>7}  {'ece':>7}"]
    lines += [f"{name:12}  {_fmt(m, 'acc'):>7}  {_fmt(m, 'loss'):>7}  {_fmt(m, 'ece'):>7}" for name, m in rows]
    return "\n".join(lines)


def _startup_text(trainer: Trainer) -> str:
    cfg, derived, data, bundle, backend = trainer.cfg, trainer.derived, trainer.data, trainer.bundle, trainer.backend
    run_dir, state = trainer.run_dir, trainer.state
    cache = "from cache" if data.from_cache else "tokenized"
    pooling = cfg.model.pooling + (" (last layer computed at the first token only)" if bundle.first_token_only
                                   else "")
    head = [f"ebslab run {run_dir}" + (f" (resuming at step {state.step})" if state.step else ""),
            f"model {cfg.model.name} ({bundle.non_embedding_params / 1e6:.1f}M non-embedding params), "
            f"pooling {pooling}, "
            f"device {backend.device}, precision {backend.precision}"
            + (" (train.precision=auto)" if cfg.train.precision == "auto" else "")
            + f", attention {bundle.model.encoder.config._attn_implementation}, backend {cfg.train.backend}",
            f"data {cfg.data.path or cfg.data.name}: train {len(data.train)} / val {len(data.val)} / test "
            f"{len(data.test)}, {data.num_labels} classes, max_length {cfg.data.max_length} ({cache} in "
            f"{data.tokenize_s:.1f} s)" + (f", dropped {data.dropped_empty} empty" if data.dropped_empty else ""),
            "classes " + ", ".join(f"{name} {n}" for name, n in zip(data.label_names, data.class_counts))]
    if cfg.data.group_by_length:
        head.append("data.group_by_length=true: windows hold similar lengths (the example order differs from "
                    "the default)")
    return "\n".join(head + [derived.describe(cfg), _host_read_text(trainer),
                             f"gradient noise scale {trainer.gns_reason}"])


def _host_read_text(trainer: Trainer) -> str:
    """When the host waits for the device: the resolved `train.log_every_steps`, and whether skipping a step with a
    non-finite gradient needs a read of its own every step (an optimizer without a fused kernel)."""
    cfg, every, device = trainer.cfg, trainer.derived.log_every_steps, trainer.backend.device
    why = f" (train.log_every_steps=auto on {device.type})" if cfg.train.log_every_steps == "auto" else ""
    text = (f"host reads the device every {every} step{'s' if every != 1 else ''}{why}: step lines, stop signals "
            "and non-finite checks at those steps, evaluations and checkpoints")
    if not skip_on_device(trainer.optimizer):  # with fp16 too: GradScaler reads its inf flag for such an optimizer
        text += (f"; {type(inner_optimizer(trainer.optimizer)).__name__} has no fused kernel on "
                 f"{device.type}: skipping a step with a non-finite gradient reads the device every step")
    return text
