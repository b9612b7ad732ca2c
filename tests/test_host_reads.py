"""When the host waits for the device, pinned on a CPU with a slow fake device: every read of a tensor's value on
the host (`.item()`, `bool()`, `float()`, `.tolist()`, `.numpy()`) sleeps as if it waited for a GPU far behind,
and is counted against the step, evaluation or checkpoint it came from. Between log points a training step must
read nothing; a log point reads once (the loop's one read; the noise scale's read of the same step is its second).
"""

import json
import sys
import time
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import read_jsonl

# no dropout, so runs with different read intervals compute the same numbers; 256 examples = 8 full windows of
# 32 in 2 epochs, an epoch end between log points of 3
BASE = ["model.dropout=0", "model.encoder_dropout=0", "data.limit=320", "train.epochs=2", "optim.clip_norm=1.0"]
TIMING = ("elapsed_s", "samples_per_s")


class SlowDevice(TorchDispatchMode):
    """Counts host reads and makes each one wait `delay` seconds. A read is charged to the phase it came from:
    `evaluation` (ebslab/loop/evaluate.py on the stack), `checkpoint` (ebslab/loop/checkpoint.py or the trainer's
    save_last: the callbacks' state goes into it), `finish` (after the loop),
    else the training step the loop is in (`steps_done + 1`, advanced by the `on_step` callback)."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = delay
        self.steps_done = 0
        self.fit_done = False  # set when the loop has ended: the final evaluation, test and summary follow
        self.reads: Counter = Counter()  # (phase, step) -> host reads
        self.waited = 0.0

    def read(self) -> None:
        frame, phase = sys._getframe(1), "step"
        while frame.f_code.co_filename == __file__ or any(
                part in frame.f_code.co_filename for part in ("torch/_dynamo/", "torch/_compile.py")):
            frame = frame.f_back
        if "/torch/optim/" in frame.f_code.co_filename.replace("\\", "/"):
            return  # a non-fused optimizer's `step` counters: host tensors (not capturable), not a device read
        while frame is not None:
            name = frame.f_code.co_filename.replace("\\", "/")
            if name.endswith("ebslab/loop/evaluate.py"):
                phase = "evaluation"
                break
            if name.endswith("ebslab/loop/checkpoint.py") or frame.f_code.co_name == "save_last":
                phase = "checkpoint"
                break
            frame = frame.f_back
        if phase == "step" and self.fit_done:
            phase = "finish"
        self.reads[phase, self.steps_done + 1] += 1
        if self.delay:
            time.sleep(self.delay)
            self.waited += self.delay

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), bool(), float(), int()
            self.read()
        return func(*args, **(kwargs or {}))

    def step_reads(self) -> dict[int, int]:
        return {step: n for (phase, step), n in self.reads.items() if phase == "step"}


@pytest.fixture
def slow_device(monkeypatch):
    """A SlowDevice active from the fit's start to its summary (set-up is outside it)."""
    from ebslab.loop.callbacks import ProgressBar

    device = SlowDevice()
    for name in ("tolist", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, **k: device.read() or _real(self, *a, **k))
    start, step, end = ProgressBar.on_fit_start, ProgressBar.on_step, ProgressBar.on_fit_end
    active = []

    def on_fit_start(self, trainer):
        start(self, trainer)
        device.__enter__()
        active.append(device)

    def on_step(self, trainer, record):
        step(self, trainer, record)
        device.steps_done = trainer.state.step

    def on_fit_end(self, trainer, summary):
        end(self, trainer, summary)
        if active:
            active.pop().__exit__(None, None, None)

    monkeypatch.setattr(ProgressBar, "on_fit_start", on_fit_start)
    monkeypatch.setattr(ProgressBar, "on_step", on_step)
    monkeypatch.setattr(ProgressBar, "on_fit_end", on_fit_end)
    import ebslab.loop.train as loop

    finish = loop.Trainer.finish

    def finishing(self):
        device.fit_done = True
        return finish(self)

    monkeypatch.setattr(loop.Trainer, "finish", finishing)
    yield device
    if active:  # a run that raised before its summary
        active.pop().__exit__(None, None, None)


def steps_of(run):
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "step"]


def derived_of(run):
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["derived"]


def test_no_host_read_between_log_points(train_run, slow_device):
    run = train_run(*BASE, "train.gns=false", "train.log_every_steps=3")
    derived = derived_of(run)
    total, per_epoch = derived["total_steps"], derived["steps_per_epoch"]
    assert (total, per_epoch) == (16, 8)
    read_at = [s for s in range(1, total + 1) if s % 3 == 0 or s % per_epoch == 0]
    # exactly one read at each log point (and epoch end, where evaluation and checkpoint follow), none elsewhere
    assert slow_device.step_reads() == {s: 1 for s in read_at}
    assert [r["step"] for r in steps_of(run)] == read_at
    assert {phase for phase, _ in slow_device.reads} == {"step", "evaluation"}


def test_the_noise_scale_reads_only_at_log_points(train_run, slow_device):
    run = train_run(*BASE, "train.log_every_steps=3")  # micro 8 of 32: the noise scale is on
    read_at = [r["step"] for r in steps_of(run)]
    assert all("gns/b_simple" in r for r in steps_of(run))
    assert slow_device.step_reads() == {s: 2 for s in read_at}  # the loop's read, then the noise scale's


def test_auto_is_every_step_on_cpu_with_the_numbers_of_log_every_1(train_run, slow_device, capsys):
    """`auto` (the default) on a CPU reads every step, and logs exactly what `train.log_every_steps=1` logs."""
    default = train_run(*BASE, "train.gns=false")
    out = capsys.readouterr().out
    assert "host reads the device every 1 step (train.log_every_steps=auto on cpu)" in out
    assert derived_of(default)["log_every_steps"] == 1
    assert slow_device.step_reads() == {s: 1 for s in range(1, 17)}
    explicit = train_run(*BASE, "train.gns=false", "train.log_every_steps=1")
    assert "host reads the device every 1 step:" in capsys.readouterr().out
    lines = [[{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run / "metrics.jsonl")]
             for run in (default, explicit)]
    assert lines[0] == lines[1]  # every line, bit for bit
    assert Counter(r["event"] for r in lines[0]) >= Counter(step=16, eval=2)


def test_auto_on_a_gpu_reads_every_100_steps(train_run, monkeypatch):
    from ebslab.core.config import GPU_LOG_EVERY_STEPS, derive, load_config, resolve_log_every

    assert resolve_log_every("auto", "cpu") == 1 and resolve_log_every("auto", "cuda") == GPU_LOG_EVERY_STEPS == 100
    assert resolve_log_every(7, "cuda") == 7 and resolve_log_every(7, "cpu") == 7
    cfg = load_config(None, ["batch.micro=8"])
    assert cfg.train.log_every_steps == "auto"
    assert derive(cfg, 1000, 1, device_type="cuda").log_every_steps == 100
    assert derive(load_config(None, ["batch.micro=8", "train.log_every_steps=5"]), 1000, 1,
                  device_type="cuda").log_every_steps == 5


@pytest.mark.parametrize("value", ["0", "-2", "often"])
def test_bad_log_every_steps_is_a_user_error(train_run, capsys, value):
    train_run(f"train.log_every_steps={value}", expect=2)
    assert "train.log_every_steps" in capsys.readouterr().err


def test_a_stop_signal_is_acted_on_at_the_next_read(train_run, slow_device, monkeypatch):
    """SIGTERM at step 4 with reads every 3 steps: the run stops after step 6, the next read, with a checkpoint."""
    import signal

    from ebslab.loop.callbacks import ProgressBar

    real = ProgressBar.on_step

    def signalling(self, trainer, record):
        real(self, trainer, record)
        if trainer.state.step == 4:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(ProgressBar, "on_step", signalling)
    run = train_run(*BASE, "train.gns=false", "train.log_every_steps=3", expect=128 + signal.SIGTERM)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 6
    assert json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == 6
    assert slow_device.step_reads() == {3: 1, 6: 1}


def test_a_non_finite_gradient_is_acted_on_at_the_next_read_with_the_weights_kept(train_run, slow_device,
                                                                                  monkeypatch):
    """A NaN gradient at step 4 with reads every 3 steps: no step after it changes the weights (the skip is
    decided on the device, no read), and the run ends `diverged` at step 6, the next read."""
    from ebslab.loop.callbacks import Callback
    import ebslab.loop.train as loop

    seen = {}

    class Poison(Callback):
        def on_before_clip(self, trainer):
            if trainer.state.step == 3:  # the window of step 4
                next(trainer.model.parameters()).grad.fill_(float("nan"))

        def on_step(self, trainer, record):
            seen[trainer.state.step] = [p.detach().clone() for p in trainer.model.parameters()]

    real_setup = loop.Trainer.setup

    def setup(self):
        real_setup(self)
        self.add_callback(Poison())

    monkeypatch.setattr(loop.Trainer, "setup", setup)
    run = train_run(*BASE, "train.gns=false", "train.log_every_steps=3", expect=1)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 6
    assert "non-finite gradient norm by step 6" in summary["message"]
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert all(torch.equal(a, b) for a, b in zip(seen[3], seen[step])), step
    assert slow_device.step_reads() == {3: 1, 6: 1}


def test_without_a_fused_optimizer_the_skip_reads_every_step_and_start_up_says_so(train_run, slow_device,
                                                                                monkeypatch, capsys):
    from ebslab.loop import optim

    real = optim.build_optimizer

    def unfused(model, cfg, derived):  # as on a device torch has no fused Adam for
        cls = type(real(model, cfg, derived))
        return cls(optim.param_groups(model, cfg.weight_decay), lr=derived.lr, foreach=True)

    monkeypatch.setattr("ebslab.loop.train.build_optimizer", unfused)
    train_run(*BASE, "train.gns=false", "train.log_every_steps=3")
    out = capsys.readouterr().out
    assert "AdamW has no fused kernel on cpu: skipping a step with a non-finite gradient reads the device every " \
           "step" in out
    reads = slow_device.step_reads()
    assert reads == {s: 1 + (s % 3 == 0 or s % 8 == 0) for s in range(1, 17)}  # the skip's read, every step


def test_fused_optimizer_start_up_says_nothing_of_a_per_step_read(train_run, capsys):
    train_run("train.max_steps=1")
    assert "no fused kernel" not in capsys.readouterr().out


def test_the_slow_device_wait_is_in_the_training_time(train_run, slow_device):
    """Reads every 4 steps on a device 0.2 s behind: the logged rate counts the 4 waits (not the 16 of reading
    every step), and the wall time between reads, not only the time to queue the work."""
    slow_device.delay = 0.2
    run = train_run(*BASE, "train.gns=false", "train.log_every_steps=4")
    summary = json.loads((run / "summary.json").read_text())
    training_waits = sum(slow_device.step_reads().values())
    assert training_waits == 4  # steps 4, 8, 12, 16 (8 and 16 are the epoch ends)
    assert summary["train_time_s"] >= training_waits * 0.2


def test_batches_are_pinned_before_their_non_blocking_copy_to_a_gpu(monkeypatch):
    from ebslab.loop.backends import to_device

    calls, real_to = [], torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            calls.append(("to", str(args[0]), kwargs))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", to)
    to_device(torch.ones(2), torch.device("cuda", 0))
    assert calls == ["pin", ("to", "cuda:0", {"non_blocking": True})]
    calls.clear()
    to_device(torch.ones(2), torch.device("cpu"))
    assert calls == []  # nothing to pin for a CPU run


def test_evaluation_batches_go_through_the_pinned_copy(train_run, monkeypatch):
    import ebslab.loop.evaluate as ev
    from ebslab.loop.backends import to_device

    copied = []
    monkeypatch.setattr(ev, "to_device", lambda t, device: copied.append(t.shape[0]) or to_device(t, device))
    run = train_run(*BASE, "train.max_steps=1")
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "eval"]
    # one evaluation of val and test (32 each, eval.batch_size 64): each of BERT's 3 inputs of each
    assert len(evals) == 1 and copied == [32] * 6
