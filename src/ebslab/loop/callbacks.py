"""How measurements attach to the training loop without new branches in it.

A `Callback` overrides the hooks it needs; the `Trainer` calls every callback at the same points on every process
(so a callback that asks to stop must decide from values all processes share, e.g. an eval line). Records passed
to `on_step` / `on_eval` are the lines about to be logged: a callback adds keys to them, and the tracker logging,
itself a callback, runs last so those keys reach metrics.jsonl.

A callback that accumulates over steps (moving averages, sums) returns that from `state_dict` and takes it back in
`load_state_dict`: the trainer saves it with its own state in every checkpoint and restores it on resume, so a
resumed run logs what the uninterrupted one would have. It is keyed by class name (`Name#2` for a second
instance of one class) and saved from the main process.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

# the training loop (ebslab.loop.train.Trainer) sits above its callbacks: they see it only through its attributes
Trainer = Any


class Callback:
    """No-op base: a callback overrides what it needs."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_micro_backward(self, trainer: Trainer, micro_index: int, num_micro: int, examples: float) -> None:
        """After the backward of one micro-batch; `examples` = real examples in it (0 for a stand-in
        micro-batch). `.grad` holds the running (scaled) window sum; on DDP the last micro-batch's backward is
        the all-reduced one."""

    def on_before_clip(self, trainer: Trainer) -> None:
        """After the window's last backward, before clipping and the optimizer step: `.grad` is the window
        gradient."""

    def on_step(self, trainer: Trainer, record: dict[str, Any] | None) -> None:
        """After the optimizer step and the counters. `record` is the step line about to be logged (add keys to
        it); None when this step is not logged (then do not force a host sync)."""

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After an evaluation; `record` is the eval line about to be logged (add keys). May call
        `trainer.request_stop`."""

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """Add keys to the summary before summary.json is written."""

    def state_dict(self) -> dict[str, Any] | None:
        """What a resumed run needs of this callback, as plain JSON values; None = nothing (the default)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned (called before `on_fit_start` of a resumed run)."""


class Callbacks(list):
    """The trainer's callbacks, called in order: one call in the loop reaches all of them."""

    def on_fit_start(self, trainer: Trainer) -> None:
        for cb in self:
            cb.on_fit_start(trainer)

    def on_micro_backward(self, trainer: Trainer, micro_index: int, num_micro: int, examples: float) -> None:
        for cb in self:
            cb.on_micro_backward(trainer, micro_index, num_micro, examples)

    def on_before_clip(self, trainer: Trainer) -> None:
        for cb in self:
            cb.on_before_clip(trainer)

    def on_step(self, trainer: Trainer, record: dict[str, Any] | None) -> None:
        for cb in self:
            cb.on_step(trainer, record)

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        for cb in self:
            cb.on_eval(trainer, record)

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        for cb in self:
            cb.on_fit_end(trainer, summary)

    def state_keys(self) -> list[str]:
        """Each callback's key in the saved state: its class name, then `Name#2`, `Name#3` for further instances of
        one class in list order, so two instances never share (or overwrite) one state."""
        keys, seen = [], {}
        for cb in self:
            name = type(cb).__name__
            seen[name] = seen.get(name, 0) + 1
            keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return keys

    def state_dict(self) -> dict[str, Any]:
        states = {}
        for key, cb in zip(self.state_keys(), self):
            state = cb.state_dict()
            if state is not None:
                states[key] = state
        return states

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for key, cb in zip(self.state_keys(), self):
            if key in states:
                cb.load_state_dict(states[key])


class TrackerLogging(Callback):
    """Step and eval lines to the trackers (metrics.jsonl, TensorBoard, W&B). Last in the list: the lines it
    writes carry the keys every other callback added."""

    def on_step(self, trainer: Trainer, record: dict[str, Any] | None) -> None:
        if record is not None:
            trainer.tracker.log(record)

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        trainer.tracker.log(record)


def progress_every(total_steps: int) -> int:
    """Steps between two progress lines in a non-interactive run: EBSLAB_PROGRESS_EVERY if set, else about 20
    lines per run (every 5% of the steps)."""
    raw = os.environ.get("EBSLAB_PROGRESS_EVERY", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return max(1, math.ceil(total_steps / 20))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(step: int, total: int, elapsed_s: float, first_step: int, record: dict[str, Any] | None) -> str:
    """`train step 40/100 (40%) loss 0.4522 1.1 samples/s, 7m20s elapsed, ~11m00s left`: one self-contained line
    (a log file or CI shows it as written, no carriage returns). The time left extrapolates this session's pace
    (steps since `first_step`, the step it started or resumed at)."""
    parts = [f"train step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    if record is not None:
        parts.append(f"loss {record['train/loss']:.4f} {record['samples_per_s']:.1f} samples/s")
    done = step - first_step
    timing = f"{_duration(elapsed_s)} elapsed"
    if 0 < done and step < total:
        timing += f", ~{_duration(elapsed_s / done * (total - step))} left"
    return " ".join(parts) + ", " + timing


class ProgressBar(Callback):
    """Progress on the main process. On a terminal: a tqdm bar, one tick per step, the logged loss and throughput
    beside it. Elsewhere (a sweep's log file, CI, nohup): a plain line every `progress_every` steps and at the
    last step, since a bar's carriage-return redraws turn a log into one endless line."""

    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = interactive
        self.bar: Any = None
        self.every = 0
        self.last_record: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.backend.is_main:
            return
        interactive = sys.stderr.isatty() if self.interactive is None else self.interactive
        total = trainer.derived.total_steps
        if interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=trainer.state.step, unit="step", dynamic_ncols=True, desc="train",
                            file=sys.stderr, mininterval=0.1)
        else:
            self.every = progress_every(total)
            self.first_step, self.started = trainer.state.step, time.monotonic()

    def on_step(self, trainer: Trainer, record: dict[str, Any] | None) -> None:
        if record is not None:
            self.last_record = record
        if self.bar is not None:
            if record is not None:
                self.bar.set_postfix(loss=f"{record['train/loss']:.4f}", sps=f"{record['samples_per_s']:.1f}",
                                     refresh=False)
            self.bar.update(1)
        elif self.every:
            step, total = trainer.state.step, trainer.derived.total_steps
            if step % self.every == 0 or step == total:
                print(progress_line(step, total, time.monotonic() - self.started, self.first_step,
                                    self.last_record), file=sys.stderr, flush=True)

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
