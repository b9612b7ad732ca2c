"""Absolute checks of the loop against plain PyTorch (not ebslab against ebslab), and its guards."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, read_jsonl
from safetensors.torch import load_file

from ebslab.loop.callbacks import Callback
from ebslab.core.config import load_config
from ebslab.inputs.data import collate, windows
from ebslab.loop.train import seed_dropout, train

NO_DROPOUT = ["model.dropout=0", "model.encoder_dropout=0"]


class PlainWindowGradient(Callback):
    """At chosen steps: the gradient of ONE forward/backward of mean cross-entropy over the whole window (a copy
    of the model before the step), next to the gradient ebslab accumulated over its micro-batches."""

    def __init__(self, at_steps: set[int]):
        self.at_steps, self.seen = at_steps, {}

    def on_before_clip(self, trainer) -> None:
        step = trainer.state.step  # 0-based here: the counter moves after the optimizer step
        if step not in self.at_steps:
            return
        model = trainer.backend.unwrap(trainer.model)
        window = windows(trainer._epoch_order(), trainer.cfg.batch.effective)[trainer.state.window]
        ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)  # the same weights (before the step), a fresh gradient
        batch = collate(trainer.data.train, window, trainer.bundle.pad_id, trainer.bundle.model_inputs)
        labels = torch.from_numpy(trainer.data.train.labels[window])
        loss = F.cross_entropy(model(**batch).float(), labels)  # the mean over the window, nothing else
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        for n, p in model.named_parameters():  # ebslab's own gradient back: the run goes on as it would
            p.grad = ours.get(n)
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
        self.seen[step + 1] = {"size": len(window), "plain": grads, "ours": ours, "loss": loss.item(),
                               "norm": norm}


def test_accumulated_step_is_the_plain_gradient_of_the_window_mean_full_and_short_window(tmp_path):
    # train 200 = 6 x 32 + 8: step 1 is a full window (8 micro-batches of 4), step 7 the short last one (2 of 4)
    cfg = load_config(None, [*TINY, *NO_DROPOUT, "batch.micro=4", "optim.clip_norm=0", f"out.dir={tmp_path}",
                             "out.name=run"])
    probe = PlainWindowGradient({0, 6})
    summary = train(cfg, callbacks=[probe])
    assert summary["steps"] == 7
    logged = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["event"] == "step"}
    assert {s: probe.seen[s]["size"] for s in probe.seen} == {1: 32, 7: 8}
    for step, seen in probe.seen.items():
        scale = max(float(g.abs().max()) for g in seen["plain"].values())
        assert seen["ours"].keys() == seen["plain"].keys()
        for name, g in seen["plain"].items():
            # a divisor of batch.effective instead of the window's size would be 4x off at step 7
            assert float((seen["ours"][name] - g).abs().max()) <= 1e-5 * scale, (step, name)
        assert logged[step]["train/loss"] == pytest.approx(seen["loss"], rel=1e-5)
        assert logged[step]["grad_norm"] == pytest.approx(seen["norm"], rel=1e-4)


class PoisonGradient(Callback):
    """A NaN in one gradient at one step, the loss finite: what an overflow in a backward kernel looks like."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_before_clip(self, trainer) -> None:
        if trainer.state.step + 1 == self.at_step:
            next(p for p in trainer.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


def test_a_non_finite_gradient_marks_the_run_diverged_and_keeps_the_last_finite_checkpoint(tmp_path):
    cfg = load_config(None, [*TINY, "checkpoint.every_steps=1", f"out.dir={tmp_path}", "out.name=run"])
    summary = train(cfg, callbacks=[PoisonGradient(at_step=3)])
    run = tmp_path / "run"
    assert summary["status"] == "diverged"
    assert summary["message"] == "non-finite gradient norm by step 3"
    state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2  # step 3's weights never reached the disk
    weights = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    lines = read_jsonl(run / "metrics.jsonl")
    assert [r["kind"] for r in lines if r["event"] == "warning"] == ["diverged"]
    step3 = next(r for r in lines if r["event"] == "step" and r["step"] == 3)
    assert math.isfinite(step3["train/loss"]) and not math.isfinite(float(step3["grad_norm"]))  # "NaN" in JSON
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"


class PoisonAndWatch(PoisonGradient):
    """PoisonGradient that keeps the weights and Adam's state from just before the poisoned step, and those the
    model holds when the run ends."""

    def on_before_clip(self, trainer) -> None:
        if trainer.state.step + 1 == self.at_step:
            model = trainer.backend.unwrap(trainer.model)
            self.before = {k: v.clone() for k, v in model.state_dict().items()}
            self.adam_before = {k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)}
                                for k, v in trainer.optimizer.state_dict()["state"].items()}
        super().on_before_clip(trainer)

    def on_fit_end(self, trainer, summary) -> None:
        self.after = {k: v.clone() for k, v in trainer.backend.unwrap(trainer.model).state_dict().items()}
        self.adam_after = {k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)}
                           for k, v in trainer.optimizer.state_dict()["state"].items()}


@pytest.mark.parametrize("backend", ["torch", "accelerate"])
@pytest.mark.parametrize("log_every, save_every, ends_at", [(1, 1, 3), (5, 2, 4)])
def test_a_non_finite_gradient_skips_the_optimizer_step_and_every_one_until_the_host_reads_it(
        tmp_path, backend, log_every, save_every, ends_at):
    # (5, 2): the host reads the device at steps 2 and 4 only (a checkpoint); step 4's gradient is finite and its
    # step is skipped too, so the run ends with the weights it had before step 3, not one update after a bad one
    cfg = load_config(None, [*TINY, f"train.backend={backend}", "train.device=cpu",
                             f"train.log_every_steps={log_every}", f"checkpoint.every_steps={save_every}",
                             f"out.dir={tmp_path}", "out.name=run"])
    probe = PoisonAndWatch(at_step=3)
    summary = train(cfg, callbacks=[probe])
    assert summary["status"] == "diverged"
    assert summary["message"] == f"non-finite gradient norm by step {ends_at}"
    assert probe.before.keys() == probe.after.keys()
    for name, before in probe.before.items():
        assert torch.equal(probe.after[name], before), name  # bit-equal: the step never ran
    assert probe.adam_after.keys() == probe.adam_before.keys()
    for index, state in probe.adam_before.items():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        for key, before in state.items():
            assert torch.equal(probe.adam_after[index][key], before), (index, key)
    assert float(probe.adam_after[0]["step"]) == 2  # bias correction counts the two good steps only
    checkpoints = list((tmp_path / "run" / "checkpoints").rglob("*.safetensors"))
    assert checkpoints  # step 2 was saved
    for path in checkpoints:
        assert all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values()), path


def _masks(seed: int, rank: int) -> torch.Tensor:
    torch.manual_seed(seed)  # what seed_everything leaves, the same on every process
    seed_dropout(seed, rank)
    return torch.stack([F.dropout(torch.ones(256), 0.5) for _ in range(3)]) > 0


def test_every_process_draws_its_own_dropout_masks_and_a_rerun_the_same():
    ranks = [_masks(7, r) for r in range(3)]
    assert not torch.equal(ranks[0], ranks[1]) and not torch.equal(ranks[1], ranks[2])
    assert torch.equal(_masks(7, 1), ranks[1])  # a rerun (or a resume, which restores the stream) repeats them
    torch.manual_seed(7)
    alone = torch.stack([F.dropout(torch.ones(256), 0.5) for _ in range(3)]) > 0
    assert torch.equal(ranks[0], alone)  # rank 0 (every 1-process run) keeps the stream it always had


@pytest.mark.parametrize("kind", ["fused", "foreach"])  # foreach: the fallback for an optimizer without the flag
def test_step_or_skip_leaves_weights_and_adam_state_where_the_flag_is_one(kind):
    from ebslab.loop.backends import step_or_skip

    weight = torch.nn.Parameter(torch.arange(4.0))
    optimizer = torch.optim.Adam([weight], lr=0.1, **{kind: True})
    for skip, moves in ((0.0, True), (1.0, False), (None, True)):
        weight.grad = torch.ones(4)
        before, state = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
        step_or_skip(optimizer, None if skip is None else torch.tensor(skip))
        assert torch.equal(weight.detach(), before) is not moves, skip
        if not moves:
            assert all(torch.equal(optimizer.state[weight][k], v) for k, v in state.items())
    assert float(optimizer.state[weight]["step"]) == 2
    assert not hasattr(optimizer, "found_inf")  # not left behind for a GradScaler or the next step
