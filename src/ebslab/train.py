"""THE training loop. `train()` reads top to bottom: set up, then for each window of `effective_batch` examples
one optimizer step whose gradient is that of

        (sum of per-example losses in the window) / (number of examples in the window)

however the window is cut into micro-batches and spread over processes. Evaluation, checkpoints and logging
hang off the step counter; nothing in here depends on which backend runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ebslab import checkpoint as ckpt
from ebslab.backends import Backend, make_backend
from ebslab.config import Config, Derived, UserError, derive, load_config, resolved_dict
from ebslab.data import DataBundle, collate, epoch_order, length_grouped, load_data, shard_window, windows
from ebslab.evaluate import EvalResult, evaluate, improves, save_predictions
from ebslab.models import ModelBundle, build_model, load_tokenizer
from ebslab.optim import build_optimizer, build_scheduler
from ebslab.tracking import NullTracker, check_trackers, open_trackers, truncate_metrics

COLLAPSE_MARGIN = 0.02  # val acc within 2 points of the majority-class rate counts as collapsed


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
    since_eval: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, correct, count
    best_val: dict[str, float] | None = None
    best_step: int = -1
    best_epoch: int = -1
    evals_without_gain: int = 0
    ever_above_majority: bool = False
    collapse_warned: bool = False
    last_eval_step: int = -1
    last_val_acc: float | None = None
    scaler: dict[str, Any] | None = None  # fp16 loss scale (GPU), so a resumed run skips the same steps


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


def resolve_micro(cfg: Config, world_size: int, saved_derived: dict | None = None) -> int:
    if cfg.batch.micro != "auto":
        return int(cfg.batch.micro)
    saved = (saved_derived or {}).get("micro")
    if isinstance(saved, int):  # a resumed run keeps the micro-batch it started with (free memory may differ now)
        return saved
    from ebslab.autobatch import largest_micro

    return largest_micro(cfg, world_size)


# ------------------------------------------------------------------------------------------------------------


RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"out.dir/out.name '{run_dir}' is a file; choose another out.name")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not any((run_dir / m).exists() for m in RUN_MARKERS):
            # --overwrite deletes runs, never a folder that merely shares the name (out.name=Documents ...)
            raise UserError(f"'{run_dir}' is a non-empty folder that is not an ebslab run; choose another "
                            "out.dir/out.name (--overwrite only replaces run folders)")
        if not overwrite:
            raise UserError(f"run folder '{run_dir}' already holds a run; pass --overwrite to replace it, "
                            f"--resume {run_dir} to continue it, or set out.name")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def load_run_config(run_dir: Path) -> tuple[Config, dict]:
    path = run_dir / "config.yaml"
    if not path.is_file() or not (run_dir / "metrics.jsonl").exists():
        raise UserError(f"'{run_dir}' is not an ebslab run folder (no config.yaml / metrics.jsonl)")
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"'{path}' is not a valid ebslab config (not a YAML mapping); restore it or start a new run")
    return load_config(saved), saved.get("derived", {})


def train(cfg: Config, resume_dir: Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """One run into its folder. Returns the summary (also written to summary.json)."""
    started = time.time()
    backend = make_backend(cfg.train)
    seed_everything(cfg.train.seed)
    if cfg.batch.micro != "auto":  # fail in a second, not after loading and tokenizing the data
        derive(cfg, num_train=1, world_size=backend.world_size)

    # --- data, model, derived values: every user error surfaces here, before a run folder exists
    tokenizer = load_tokenizer(cfg.model.name)
    data = load_data(cfg.data, tokenizer)
    bundle = build_model(cfg.model, data.num_labels, cfg.train.seed, tokenizer, cfg.data.max_length)
    saved_derived = load_run_config(resume_dir)[1] if resume_dir is not None else None
    micro = resolve_micro(cfg, backend.world_size, saved_derived)
    derived = derive(cfg, len(data.train), backend.world_size, micro)
    check_trackers(cfg.track)
    run_dir = resume_dir or cfg.run_dir
    if resume_dir is not None:
        _check_resumable(run_dir, saved_derived, derived)
    elif backend.is_main:
        prepare_run_dir(run_dir, overwrite)
    backend.barrier()

    if cfg.train.compile:
        bundle.model.compile()  # in place: state-dict keys, unwrap and no_sync stay as without compile
    model, optimizer = backend.prepare(bundle.model, build_optimizer(bundle.model, cfg.optim, derived))
    scheduler = build_scheduler(optimizer, cfg.sched, derived)
    state = TrainerState()
    if resume_dir is not None:
        last = ckpt.resolve_checkpoint(run_dir / "checkpoints" / "last")
        if last is None:
            raise UserError(f"'{run_dir}' has no complete checkpoint to resume from; start it again with "
                            "--overwrite")
        ckpt.check_config(last, resolved_dict(cfg), run_dir)
        saved_state = ckpt.load_last(last, backend.unwrap(model), optimizer, scheduler, backend.rank)
        try:
            state = TrainerState(**saved_state)
        except TypeError:
            raise UserError(f"'{run_dir}': trainer_state.json does not match this version of ebslab; start "
                            "again with --overwrite") from None
        backend.load_scaler_state(state.scaler)
        started -= state.elapsed_s  # duration_s counts the interrupted sessions too
        if backend.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", state.step)

    if backend.is_main:
        ckpt.atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved_dict(cfg, derived), sort_keys=False))
        ckpt.atomic_write_json(run_dir / "labels.json", {"names": data.label_names,
                                                        "majority_rate": data.majority_rate})
        tracker = open_trackers(cfg.track, run_dir, resolved_dict(cfg, derived))
        print(_startup_text(cfg, derived, data, bundle, backend, run_dir, state), flush=True)
    else:
        tracker = NullTracker()

    def log(record: dict[str, Any]) -> None:
        tracker.log(record)

    # test results kept from the evaluations: "last" (the latest one) and "best" (at the best val metric), so the
    # final test on those weights reuses them instead of scoring the same weights again
    test_at: dict[str, EvalResult] = {}

    def score(split: Any) -> EvalResult:
        # the unwrapped module: DDP's forward would broadcast buffers, a collective a rank with no examples skips
        return evaluate(backend.unwrap(model), split, backend, cfg.eval.batch_size, bundle.pad_id, bundle.model_inputs,
                        data.label_names)

    def run_eval() -> bool:
        """Score val and test, log, keep the best; True asks for early stopping."""
        val, test = score(data.val), score(data.test)
        stop_early = _after_eval(cfg, data, state, derived, val, test, log, clock, backend, model, run_dir)
        test_at["last"] = test
        if state.best_step == state.step:
            test_at["best"] = test
            best_written_at[0] = state.step
        return stop_early

    saved_at_step = [-1]
    best_written_at = [-1]  # the step whose weights this process wrote to best/ (never one from before a resume)

    def save_last() -> None:  # called on every process: the RNG states are gathered from all of them
        if saved_at_step[0] == state.step:
            return  # e.g. a stop right after a step's own checkpoint: nothing new to write
        saved_at_step[0] = state.step
        rng_per_rank = backend.gather_objects(ckpt.rng_state())
        if backend.is_main:
            state.elapsed_s += time.time() - clock[0]
            clock[0] = time.time()
            state.scaler = backend.scaler_state()
            # an epoch end that was also the best: last/ shares best/'s weights file instead of writing it again
            same_weights = run_dir / "checkpoints" / "best" if best_written_at[0] == state.step else None
            ckpt.save_last(run_dir / "checkpoints", backend.unwrap(model), optimizer, scheduler,
                           dataclasses.asdict(state), config=resolved_dict(cfg), rng_per_rank=rng_per_rank,
                           weights_from=same_weights)

    status, message = "completed", None
    clock = [time.time()]
    # sums of the steps the host has not read yet (loss, correct, count, stop): a GPU runs on while they grow
    unread = torch.zeros(4, device=backend.device)
    progress = _progress(derived.total_steps, state.step, backend.is_main)
    model.train()
    try:
        with StopRequest() as stop:
            stopping = False  # agreed by all processes at a step's reduce, never from a local flag alone
            while state.step < derived.total_steps and status == "completed" and not stopping:
                order = epoch_order(len(data.train), cfg.train.seed, state.epoch)
                if cfg.data.group_by_length:
                    order = length_grouped(order, data.train.lengths, cfg.batch.effective, cfg.train.seed,
                                           state.epoch)
                epoch_windows = windows(order, cfg.batch.effective)
                while state.window < len(epoch_windows) and state.step < derived.total_steps:
                    window = epoch_windows[state.window]
                    step_started = time.perf_counter()

                    # ---- one optimizer step over the window
                    lr = scheduler.get_last_lr()[0]
                    micro_batches = shard_window(window, derived.micro, backend.world_size, backend.rank)
                    window_sums = torch.zeros(4, device=backend.device)  # loss sum, correct, count, stop
                    window_count = 0.0  # known on the host: a device tensor made from it would wait for the device
                    for i, mb in enumerate(micro_batches):
                        batch = {k: v.to(backend.device, non_blocking=True) for k, v in
                                 collate(data.train, mb.indices, bundle.pad_id, bundle.model_inputs).items()}
                        labels = torch.from_numpy(data.train.labels[mb.indices]).to(backend.device,
                                                                                    non_blocking=True)
                        weight = float(mb.counts)  # 0 for a stand-in micro-batch (short window, many processes)
                        last_micro = i == len(micro_batches) - 1
                        with contextlib.nullcontext() if last_micro else backend.no_sync(model):
                            with backend.autocast():
                                logits = model(**batch)
                            losses = F.cross_entropy(logits.float(), labels, reduction="none")
                            # DDP averages gradients over processes: x world_size turns that into the window sum
                            backend.backward(losses.sum() * (weight * backend.world_size / len(window)))
                        window_sums[:2] += weight * torch.stack([losses.detach().sum(),
                                                                 (logits.detach().argmax(-1) == labels).sum()])
                        window_count += weight * len(mb.indices)
                        state.micro_step += 1
                    grad_norm = backend.clip(model, optimizer, cfg.optim.clip_norm)
                    backend.step(optimizer)
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                    # ---- bookkeeping: counters, logs, evaluation, checkpoints
                    # a signal on any process stops all of them after the same step (no rank left waiting)
                    window_sums[2].fill_(window_count)  # fill_ with a number: no host-to-device copy to wait for
                    window_sums[3].fill_(float(stop.signal is not None))
                    window_sums = backend.reduce_sum(window_sums)
                    unread += window_sums
                    state.step += 1
                    state.window += 1
                    state.samples += len(window)
                    state.train_time_s += time.perf_counter() - step_started
                    epoch_done = state.window == len(epoch_windows)
                    every = cfg.eval.every_steps
                    eval_due = bool(every and state.step % every == 0) or (not every and epoch_done) or \
                        state.step == derived.total_steps
                    save_due = epoch_done or bool(cfg.checkpoint.every_steps and
                                                  state.step % cfg.checkpoint.every_steps == 0)
                    log_due = state.step % cfg.train.log_every_steps == 0 or epoch_done
                    if not (log_due or eval_due or save_due):
                        progress.update(1)
                        continue  # the host does not wait for the device between log lines

                    # the one host sync: this step's sums and those since the previous read, on every process
                    step_sums, since_read = _to_host(torch.stack([window_sums, unread]))
                    unread.zero_()
                    loss_sum, correct, count, _ = step_sums
                    if log_due:
                        loss = loss_sum / count
                        rate = state.samples / max(state.train_time_s, 1e-9)
                        log({"event": "step", "step": state.step, "epoch": state.step /
                             derived.steps_per_epoch, "micro_step": state.micro_step, "train/loss": loss,
                             "train/acc": correct / count, "lr": lr, "grad_norm": float(grad_norm),
                             "samples_per_s": rate, "elapsed_s": _elapsed(state, clock)})
                        progress.set_postfix(loss=f"{loss:.4f}", sps=f"{rate:.1f}", refresh=False)
                    if not math.isfinite(since_read[0]):
                        status, message = "diverged", f"non-finite train loss by step {state.step}"
                        _warn(log, state.step, "diverged", message + "; stopping the run", backend.is_main)
                        break
                    state.since_eval = [a + b for a, b in zip(state.since_eval, since_read[:3])]
                    stopping = since_read[3] > 0
                    progress.update(1)

                    if eval_due and run_eval():
                        status = "early_stopped"
                    if save_due:
                        if epoch_done:
                            state.epoch, state.window = state.epoch + 1, 0
                        save_last()
                    if stopping or status != "completed" or epoch_done:
                        break  # at an epoch end: the outer loop draws the next epoch's order
            progress.close()
            if stopping:
                save_last()
                summary = _summary(cfg, state, data, "interrupted", f"stopped by {signal.Signals(stop.exit_code - 128).name}", started,
                                   None, None)
                if backend.is_main:
                    ckpt.atomic_write_json(run_dir / "summary.json", summary)
                    tracker.close()
                summary["exit_code"] = stop.exit_code
                backend.close()
                return summary
            if status == "early_stopped":
                status, message = "completed", f"early stopping after {cfg.train.early_stopping_patience} " \
                                                f"evaluations without val-{cfg.eval.select_by} gain"
            if state.last_eval_step != state.step and status != "diverged":
                run_eval()
            if status != "diverged":  # keep the last finite checkpoint, not NaN weights
                save_last()

            # ---- final test on the best and on the last weights
            test_last = None
            test_best = None
            if status != "diverged":
                # not in memory when a resumed run had already evaluated its final step before it stopped
                last_result = test_at["last"] if "last" in test_at else score(data.test)
                _save_predictions(run_dir, "test_last", last_result, backend)
                test_last = last_result.metrics()
                if cfg.eval.test_on in ("best", "both"):
                    best_result = test_at.get("best")
                    if best_result is None:  # the best came before a resume: its test result is not in memory
                        backend.barrier()  # best/ is written by the main process
                        ckpt.load_weights(backend.unwrap(model), run_dir / "checkpoints" / "best")
                        best_result = score(data.test)
                    _save_predictions(run_dir, "test_best", best_result, backend)
                    test_best = best_result.metrics()
            if status == "completed" and _collapsed(state, data):
                status = "collapsed"
                message = (f"val acc {state.last_val_acc:.4f} is at the majority-class rate "
                           f"{data.majority_rate:.4f}" + ("" if state.ever_above_majority else
                                                          " and never rose above it"))
                if not state.collapse_warned:
                    _warn(log, state.step, "collapsed", message, backend.is_main)
            summary = _summary(cfg, state, data, status, message, started, test_best, test_last)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        if backend.is_main and run_dir.exists():
            summary = _summary(cfg, state, data, "failed", f"{type(e).__name__}: {e}", started, None, None)
            ckpt.atomic_write_json(run_dir / "summary.json", summary)
        raise
    if backend.is_main:
        ckpt.atomic_write_json(run_dir / "summary.json", summary)
        tracker.close()
        print(_summary_text(run_dir, summary), flush=True)
    backend.close()
    summary["exit_code"] = 0
    return summary


# ------------------------------------------------------------------------------------------------------------
# Helpers of the loop


def _to_host(tensor: torch.Tensor) -> list:
    """Device to host: the training loop's only wait for the device (a function, so tests can count calls)."""
    return tensor.tolist()


def _elapsed(state: TrainerState, clock: list[float]) -> float:
    return state.elapsed_s + time.time() - clock[0]


def _warn(log: Any, step: int, kind: str, message: str, main: bool = True) -> None:
    if main:
        print(f"\nWARNING [{kind}] {message}", file=sys.stderr, flush=True)
    log({"event": "warning", "step": step, "kind": kind, "message": message})


def _collapsed(state: TrainerState, data: DataBundle) -> bool:
    return state.last_val_acc is not None and state.last_val_acc <= data.majority_rate + COLLAPSE_MARGIN


def _after_eval(cfg: Config, data: DataBundle, state: TrainerState, derived: Derived, val: EvalResult,
                test: EvalResult, log: Any, clock: list[float], backend: Backend, model: torch.nn.Module,
                run_dir: Path) -> bool:
    """Log the eval line, keep the best checkpoint, watch for collapse. Returns True to stop early."""
    loss_sum, correct, count = state.since_eval
    log({"event": "eval", "epoch": state.step / derived.steps_per_epoch, "step": state.step,
         "train/loss": loss_sum / count if count else None, "train/acc": correct / count if count else None,
         **val.record("val"), **test.record("test"), "elapsed_s": _elapsed(state, clock)})
    state.since_eval = [0.0, 0.0, 0.0]
    state.last_eval_step = state.step
    state.last_val_acc = val.acc
    if val.acc > data.majority_rate + COLLAPSE_MARGIN:
        state.ever_above_majority = True
    elif state.ever_above_majority and not state.collapse_warned:
        state.collapse_warned = True
        _warn(log, state.step, "collapsed", f"val acc fell to {val.acc:.4f}, the majority-class rate "
                                            f"{data.majority_rate:.4f}, at step {state.step}", backend.is_main)
    if improves(val, state.best_val, cfg.eval.select_by):
        state.best_val = val.metrics()
        state.best_step, state.best_epoch = state.step, math.ceil(state.step / derived.steps_per_epoch)
        state.evals_without_gain = 0
        if backend.is_main:
            ckpt.save_best(backend.unwrap(model), run_dir / "checkpoints")
    else:
        state.evals_without_gain += 1
    patience = cfg.train.early_stopping_patience
    return bool(patience and state.evals_without_gain >= patience)


def _save_predictions(run_dir: Path, name: str, result: EvalResult, backend: Backend) -> None:
    if backend.is_main:
        save_predictions(run_dir, name, result)


def _check_resumable(run_dir: Path, saved: dict, derived: Derived) -> None:
    for key in ("num_train", "accum_steps", "steps_per_epoch", "total_steps", "world_size", "micro"):
        if key in saved and saved[key] != getattr(derived, key):
            raise UserError(f"cannot resume '{run_dir}': {key} was {saved[key]}, now {getattr(derived, key)} "
                            "(data, code or process count changed); start a new run instead")


def _summary(cfg: Config, state: TrainerState, data: DataBundle, status: str, message: str | None,
             started: float, test_best: dict | None, test_last: dict | None) -> dict[str, Any]:
    return {
        "status": status, "message": message,
        "best_epoch": state.best_epoch, "best_step": state.best_step, "steps": state.step,
        "micro_steps": state.micro_step, "samples": state.samples,
        "duration_s": round(time.time() - started, 3),
        "train_time_s": round(state.train_time_s, 3),
        "train_samples_per_s": state.samples / state.train_time_s if state.train_time_s else None,
        "val_best": state.best_val, "test_best": test_best,
        "test_last": test_last if cfg.eval.test_on in ("last", "both") else None,
        "majority_rate": data.majority_rate, "dropped_empty": data.dropped_empty,
    }


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


def _startup_text(cfg: Config, derived: Derived, data: DataBundle, bundle: ModelBundle, backend: Backend,
                  run_dir: Path, state: TrainerState) -> str:
    cache = "from cache" if data.from_cache else "tokenized"
    pooling = cfg.model.pooling + (" (last layer computed at the first token only)" if bundle.first_token_only
                                   else "")
    head = [f"ebslab run {run_dir}" + (f" (resuming at step {state.step})" if state.step else ""),
            f"model {cfg.model.name} ({bundle.non_embedding_params / 1e6:.1f}M non-embedding params), "
            f"pooling {pooling}, "
            f"device {backend.device}, precision {cfg.train.precision}, backend {cfg.train.backend}",
            f"data {cfg.data.path or cfg.data.name}: train {len(data.train)} / val {len(data.val)} / test "
            f"{len(data.test)}, {data.num_labels} classes, max_length {cfg.data.max_length} ({cache} in "
            f"{data.tokenize_s:.1f} s)" + (f", dropped {data.dropped_empty} empty" if data.dropped_empty else "")]
    if cfg.data.group_by_length:
        head.append("data.group_by_length=true: windows hold similar lengths (the example order differs from "
                    "the default)")
    return "\n".join(head + [derived.describe(cfg)])


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # in a log file (sweeps, nohup) a redraw per step would be one endless line: redraw every 30 s instead
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="train", file=sys.stderr, mininterval=0.1 if interactive else 30.0)
