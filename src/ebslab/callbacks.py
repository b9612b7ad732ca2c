"""How measurements attach to the training loop without new branches in it.

A `Callback` overrides the hooks it needs; the `Trainer` calls every callback at the same points on every process
(so a callback that asks to stop must decide from values all processes share, e.g. an eval line). Records passed
to `on_step` / `on_eval` are the lines about to be logged: a callback adds keys to them, and the tracker logging,
itself a callback, runs last so those keys reach metrics.jsonl.

A callback that accumulates over steps (moving averages, sums) returns that from `state_dict` and takes it back in
`load_state_dict`: the trainer saves it with its own state in every checkpoint and restores it on resume, so a
resumed run logs what the uninterrupted one would have. It is keyed by class name and saved from the main process.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ebslab.train import Trainer


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

    def state_dict(self) -> dict[str, Any]:
        states = {}
        for cb in self:
            state = cb.state_dict()
            if state is not None:
                states[type(cb).__name__] = state
        return states

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for cb in self:
            if type(cb).__name__ in states:
                cb.load_state_dict(states[type(cb).__name__])


class TrackerLogging(Callback):
    """Step and eval lines to the trackers (metrics.jsonl, TensorBoard, W&B). Last in the list: the lines it
    writes carry the keys every other callback added."""

    def on_step(self, trainer: Trainer, record: dict[str, Any] | None) -> None:
        if record is not None:
            trainer.tracker.log(record)

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        trainer.tracker.log(record)


class ProgressBar(Callback):
    """A tqdm bar on the main process: one tick per step, the logged loss and throughput beside it."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        # in a log file (sweeps, nohup) a redraw per step would be one endless line: redraw every 30 s instead
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=trainer.derived.total_steps, initial=trainer.state.step,
                        disable=not trainer.backend.is_main, unit="step", dynamic_ncols=True, desc="train",
                        file=sys.stderr, mininterval=0.1 if interactive else 30.0)

    def on_step(self, trainer: Trainer, record: dict[str, Any] | None) -> None:
        if record is not None:
            self.bar.set_postfix(loss=f"{record['train/loss']:.4f}", sps=f"{record['samples_per_s']:.1f}",
                                 refresh=False)
        self.bar.update(1)

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
