"""The Trainer's callback interface (ebslab.loop.callbacks), request_stop, the resume of an old-format trainer state,
and the one `flatten` of dotted keys."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
import yaml

from conftest import TINY, read_jsonl
from ebslab.experiments import sweep as sw
from ebslab.loop.callbacks import Callback
from ebslab.core.errors import UserError
from ebslab.core.config import flatten, load_config
from ebslab.core.runfolder import load_run_config
from ebslab.loop.train import TrainerState, TrainSums, train


def _cfg(tmp_path, name, *overrides):
    return load_config(None, [*TINY, *overrides, f"out.dir={tmp_path}", f"out.name={name}"])


def _lines(run, event):
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == event]


class Recorder(Callback):
    """Counts every hook, checks what each one sees, and adds a key to every record it is handed."""

    def __init__(self):
        self.calls = {"fit_start": 0, "before_clip": 0, "fit_end": 0}
        self.micro_calls = 0
        self.num_micro: list[int] = []  # micro-batches per step
        self.micro: list[tuple[int, int, float]] = []  # (micro_index, num_micro, examples) of the current step
        self.window_examples: list[float] = []  # real examples per step, from on_micro_backward
        self.step_records: list[int | None] = []  # step of each on_step record, None for an unlogged step
        self.window_grad_norm: list[float] = []  # |.grad| at on_before_clip

    def on_fit_start(self, trainer):
        self.calls["fit_start"] += 1

    def on_micro_backward(self, trainer, micro_index, num_micro, examples):
        self.micro.append((micro_index, num_micro, examples))
        self.micro_calls += 1

    def on_before_clip(self, trainer):
        self.calls["before_clip"] += 1
        assert [m[0] for m in self.micro] == list(range(len(self.micro)))
        assert {m[1] for m in self.micro} == {len(self.micro)}
        self.window_examples.append(sum(m[2] for m in self.micro))
        self.num_micro.append(len(self.micro))
        self.micro = []
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        self.window_grad_norm.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))

    def on_step(self, trainer, record):
        self.step_records.append(None if record is None else record["step"])
        if record is not None:
            record["recorder/step_seen"] = trainer.state.step

    def on_eval(self, trainer, record):
        record["recorder/eval_seen"] = trainer.state.step

    def on_fit_end(self, trainer, summary):
        self.calls["fit_end"] += 1
        summary["recorder"] = {"steps": trainer.state.step}


def test_callbacks_see_every_micro_batch_step_and_eval_and_their_keys_reach_the_run_folder(tmp_path):
    rec = Recorder()
    cfg = _cfg(tmp_path, "cb", "train.log_every_steps=3", "optim.clip_norm=0.5")
    summary = train(cfg, callbacks=[rec])
    run = tmp_path / "cb"
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    total, per_epoch, accum = derived["total_steps"], derived["steps_per_epoch"], derived["accum_steps"]
    assert rec.calls == {"fit_start": 1, "before_clip": total, "fit_end": 1}
    # one on_step per step; a record exactly at the logged steps (every 3rd and the epoch end)
    logged = [s for s in range(1, total + 1) if s % 3 == 0 or s % per_epoch == 0]
    assert len(rec.step_records) == total and [s for s in rec.step_records if s is not None] == logged
    steps = _lines(run, "step")
    assert [r["step"] for r in steps] == logged and all(r["recorder/step_seen"] == r["step"] for r in steps)
    # the examples of each window: full windows of effective_batch, the short last one of the epoch
    num_train = derived["num_train"]
    assert rec.window_examples == [min(32.0, num_train - 32 * i) for i in range(per_epoch)] * cfg.train.epochs
    # accum_steps micro-batches per full window, ceil(8 / micro) = 1 for the short last one
    assert rec.num_micro == ([accum] * (per_epoch - 1) + [1]) * cfg.train.epochs
    assert summary["micro_steps"] == rec.micro_calls == sum(rec.num_micro)
    # on_before_clip sees the window gradient: its norm is the logged pre-clip grad_norm
    for r in steps:
        assert math.isclose(rec.window_grad_norm[r["step"] - 1], r["grad_norm"], rel_tol=1e-5)
    evals = _lines(run, "eval")
    assert evals and all(e["recorder/eval_seen"] == e["step"] for e in evals)
    assert json.loads((run / "summary.json").read_text())["recorder"] == {"steps": total}


class PruneAtFirstEval(Callback):
    def on_eval(self, trainer, record):
        trainer.request_stop("pruned", f"pruned at step {record['step']} (val acc {record['val/acc']:.4f})")


def test_request_stop_at_the_first_eval_ends_pruned_with_a_last_checkpoint(tmp_path):
    summary = train(_cfg(tmp_path, "p", "train.epochs=2", "eval.every_steps=2"), callbacks=[PruneAtFirstEval()])
    run = tmp_path / "p"
    written = json.loads((run / "summary.json").read_text())
    assert summary["exit_code"] == 0 and written["status"] == "pruned" and summary["status"] == "pruned"
    assert written["steps"] == 2 and written["message"].startswith("pruned at step 2 (val acc ")
    assert [r["step"] for r in _lines(run, "step")] == [1, 2]
    evals = _lines(run, "eval")
    assert [e["step"] for e in evals] == [2]  # no further evaluation after the stop
    state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["window"] == 2
    assert written["test_last"]["acc"] == evals[0]["test/acc"]  # the final test is that of the stopped weights
    assert sw.resume_action(run) == "skip"  # a sweep's --resume treats a pruned run as finished


class InterruptAfter(Callback):
    """The SIGTERM path without a signal: as if one came during step `k`; the run stops after step k + 1."""

    def __init__(self, k):
        self.k = k

    def on_step(self, trainer, record):
        if trainer.state.step == self.k:
            trainer.signals.signal = signal.SIGTERM


def test_a_checkpoint_with_the_old_list_form_of_since_eval_still_resumes(tmp_path):
    reference = train(_cfg(tmp_path, "ref", "train.epochs=2"))
    cut = train(_cfg(tmp_path, "cut", "train.epochs=2"), callbacks=[InterruptAfter(2)])
    assert cut["exit_code"] == 128 + signal.SIGTERM and cut["status"] == "interrupted" and cut["steps"] == 3
    state_file = tmp_path / "cut" / "checkpoints" / "last" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    since = state["since_eval"]
    assert set(since) == {"loss_sum", "correct", "count"} and since["count"] == 3 * 32  # steps 1-3, no eval yet
    # the format written before since_eval had names
    state["since_eval"] = [since["loss_sum"], since["correct"], since["count"]]
    state_file.write_text(json.dumps(state, indent=2))

    cfg, _ = load_run_config(tmp_path / "cut")
    resumed = train(cfg, resume_dir=tmp_path / "cut")
    assert resumed["status"] == reference["status"] and resumed["steps"] == reference["steps"]
    ref_evals, cut_evals = _lines(tmp_path / "ref", "eval"), _lines(tmp_path / "cut", "eval")
    assert [e["step"] for e in cut_evals] == [e["step"] for e in ref_evals]
    for a, b in zip(ref_evals, cut_evals):  # the first eval's train/loss sums steps 1-3 from the old list
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-6)
        assert a["train/acc"] == b["train/acc"] and a["val/acc"] == b["val/acc"]
    assert resumed["test_last"]["loss"] == pytest.approx(reference["test_last"]["loss"], rel=1e-6)


def test_trainer_state_reads_both_forms_of_since_eval_and_refuses_others():
    new = TrainerState.from_dict({"step": 3, "since_eval": {"loss_sum": 2.5, "correct": 40.0, "count": 96.0}})
    old = TrainerState.from_dict({"step": 3, "since_eval": [2.5, 40.0, 96.0]})
    assert new == old and old.since_eval == TrainSums(loss_sum=2.5, correct=40.0, count=96.0)
    with pytest.raises(ValueError):
        TrainerState.from_dict({"since_eval": [1.0, 2.0]})
    with pytest.raises(TypeError):
        TrainerState.from_dict({"step": 1, "no_such_field": 0})


def test_flatten_is_one_rule_for_config_sweep_checkpoint_and_report():
    from ebslab.analysis import runs

    nested = {"optim": {"lr": 1e-4, "name": "adamw"}, "batch.effective": 64, "derived": {"lr": 2e-4}}
    assert flatten(nested) == {"optim.lr": 1e-4, "optim.name": "adamw", "batch.effective": 64}
    assert flatten(nested, skip=()) == {"optim.lr": 1e-4, "optim.name": "adamw", "batch.effective": 64,
                                        "derived.lr": 2e-4}
    # a mapping under a valid key is that key's (wrong) value, reported under its own name
    assert flatten({"optim": {"lr": {"base": 1}}}) == {"optim.lr": {"base": 1}}
    with pytest.raises(UserError, match="optim.lr"):
        load_config({"optim": {"lr": {"base": 1}}})
    assert runs.flatten(nested) == flatten(nested, skip=())  # the report keeps derived.* (it groups by them)
    assert runs.flatten({"track": ["jsonl", "wandb"]}) == {"track": ("jsonl", "wandb")}
    assert sw.flatten is flatten


def test_two_instances_of_one_callback_class_keep_their_own_saved_state():
    from ebslab.loop.callbacks import Callbacks

    class Counter(Callback):
        def __init__(self, n):
            self.n = n

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    saved = Callbacks([Counter(3), Counter(7)]).state_dict()
    assert saved == {"Counter": {"n": 3}, "Counter#2": {"n": 7}}
    restored = Callbacks([Counter(0), Counter(0)])
    restored.load_state_dict(saved)
    assert [cb.n for cb in restored] == [3, 7]
