"""Reliability: a run killed at any moment resumes to the same numbers; signals stop cleanly; a full disk keeps the
last good checkpoint; nothing is ever unpickled.

The SIGKILL tests start `ebslab train` as a subprocess (SIGTERM and SIGINT go to a run in this process), wait
until step k (random) is in metrics.jsonl, kill or signal it, resume it, and compare with an uninterrupted run:
weights, summary, and every step line to 1e-6. Dropout is on (0.1 in the head and in the encoder), so a resume
that does not restore the RNG states gives other numbers.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import CHANCE_SEED, hang_after
import torch
import yaml
from safetensors.torch import load_file

import ebslab.loop.callbacks
import ebslab.loop.checkpoint as ckpt
from ebslab.cli import main
from ebslab.core.errors import StorageError
from ebslab.core.files import atomic_write_json
from ebslab.core.runfolder import read_jsonl as read_metrics
from ebslab.loop.tracking import JsonlTracker, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]
# 75 examples -> 59 train: 4 windows of 16 per epoch, the last one short (11); 8 steps in all
RUN = ["model.name=tiny-bert", "data.limit=75", "data.max_length=32", "batch.effective=16", "batch.micro=8",
       "train.epochs=2", "model.dropout=0.1", "model.encoder_dropout=0.1", "optim.lr=1e-3",
       "checkpoint.every_steps=1"]
TOTAL_STEPS = 8
STEPS_PER_EPOCH = 4
TOL = 1e-6
STEP_KEYS = ("step", "epoch", "micro_step", "train/loss", "train/acc", "lr", "grad_norm")
EVAL_KEYS = ("step", "train/loss", "train/acc", "val/loss", "val/acc", "val/ece", "test/loss", "test/acc")
SUMMARY_KEYS = ("status", "best_step", "best_epoch", "steps", "micro_steps", "samples")


# ------------------------------------------------------------------------------------------------ helpers


def _records(run_dir: Path, event: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == event]


def _max_weight_diff(a: Path, b: Path) -> float:
    wa = load_file(str(a / "checkpoints" / "last" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def assert_same_run(ref: Path, other: Path, context: str) -> float:
    """Same weights, summary, step lines and eval lines as the uninterrupted run; returns the largest difference."""
    largest = _max_weight_diff(ref, other)
    assert largest <= TOL, f"{context}: weights differ by {largest}"
    ref_steps, steps = _records(ref, "step"), _records(other, "step")
    assert [r["step"] for r in steps] == list(range(1, TOTAL_STEPS + 1)), f"{context}: step lines lost/duplicated"
    for a, b in zip(ref_steps, steps):
        for key in STEP_KEYS:
            assert b[key] == pytest.approx(a[key], abs=TOL), f"{context}: step {a['step']} {key}"
            largest = max(largest, abs(a[key] - b[key]))
    ref_evals, evals = _records(ref, "eval"), _records(other, "eval")
    assert [r["step"] for r in evals] == [r["step"] for r in ref_evals] == [STEPS_PER_EPOCH, TOTAL_STEPS]
    for a, b in zip(ref_evals, evals):
        for key in EVAL_KEYS:
            assert b[key] == pytest.approx(a[key], abs=TOL), f"{context}: eval at step {a['step']} {key}"
    s_ref = json.loads((ref / "summary.json").read_text())
    s = json.loads((other / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert s[key] == s_ref[key], f"{context}: summary {key}"
    for part in ("val_best", "test_best", "test_last"):
        for key, value in s_ref[part].items():
            assert s[part][key] == pytest.approx(value, abs=TOL), f"{context}: summary {part}.{key}"
    return largest


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, here and in the subprocesses: the same numerics everywhere, and on a busy machine a
    tiny model runs 10x faster than with threads spinning at OpenMP barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _start(args: list[str], log_dir: Path) -> subprocess.Popen:
    log_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "ebslab", "train", *args],
                            stdout=open(log_dir / "stdout.txt", "w"), stderr=open(log_dir / "stderr.txt", "w"),
                            env=_env(), cwd=ROOT)


def _wait_for(proc: subprocess.Popen, ready, log_dir: Path, timeout: float = 120) -> None:
    deadline = time.time() + hang_after(timeout)
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the signal was sent:\n"
                        + (log_dir / "stderr.txt").read_text()[-3000:])
        if time.time() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.005)


def _step_reached(run_dir: Path, k: int):
    return lambda: any(r["step"] >= k for r in _records(run_dir, "step"))


def _resume(run_dir: Path) -> None:
    assert main(["train", "--resume", str(run_dir)]) == 0


TRAIN_ORDER: list[int] = []  # train-split rows of every micro-batch of the reference run, in order


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    import ebslab.loop.train

    out = tmp_path_factory.mktemp("reference")
    collate = ebslab.loop.train.collate

    def recording(split, idx, *args):
        if len(split) > 20:  # the train split (val and test hold 8 rows each)
            TRAIN_ORDER.extend(int(i) for i in idx)
        return collate(split, idx, *args)

    ebslab.loop.train.collate = recording
    try:
        assert main(["train", *RUN, f"out.dir={out}", "out.name=ref"]) == 0
    finally:
        ebslab.loop.train.collate = collate
    run = out / "ref"
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    assert derived["total_steps"] == TOTAL_STEPS and derived["steps_per_epoch"] == STEPS_PER_EPOCH
    assert derived["num_train"] % 16 != 0, "the last window of an epoch must be short"
    return run


# ------------------------------------------------------------------------------------------------ kill / resume


def test_each_epoch_follows_its_own_order(reference):
    """Resume restarts an epoch's order from (seed, epoch): the uninterrupted loop must use the same order (it
    once kept epoch 0's order for every epoch, which only a kill in epoch 2 showed)."""
    from ebslab.inputs.data import epoch_order

    n = yaml.safe_load((reference / "config.yaml").read_text())["derived"]["num_train"]
    expected = [int(i) for e in range(TOTAL_STEPS // STEPS_PER_EPOCH) for i in epoch_order(n, 1, e)]
    assert TRAIN_ORDER == expected


def _checkpointed_steps(every: int) -> list[int]:
    return [s for s in range(1, TOTAL_STEPS + 1) if s % every == 0 or s % STEPS_PER_EPOCH == 0]


@pytest.mark.timeout(300)
# torch every 3 (a rollback past unsaved steps) in every run of the suite; the other two with `make test-slow`
@pytest.mark.parametrize("backend,every", [pytest.param("torch", 1, marks=pytest.mark.slow),
                                           pytest.param("accelerate", 1, marks=pytest.mark.slow), ("torch", 3)])
def test_sigkill_at_a_random_step_then_resume_gives_the_same_run(backend, every, reference, tmp_path, chance):
    # wait for step k (its line is logged after the previous step's checkpoint is complete), then kill after a
    # random delay: the kill lands in step k's checkpoint write or anywhere in the steps after it
    first = _checkpointed_steps(every)[0] + 1
    k = max(first, int(os.environ.get("EBSLAB_TEST_KILL_STEP") or chance.randint(first, TOTAL_STEPS - 3)))
    run = tmp_path / "killed"
    args = [*RUN, f"train.backend={backend}", f"checkpoint.every_steps={every}", f"out.dir={tmp_path}",
            "out.name=killed"]
    proc = _start(args, tmp_path / "log")
    _wait_for(proc, _step_reached(run, k), tmp_path / "log")
    # into step k's checkpoint write, or into the next step; longer delays let a fast 8-step run finish first
    delay = chance.uniform(0, 0.05)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before the kill"
    killed_at = max(r["step"] for r in _records(run, "step"))
    assert not (run / "summary.json").exists()
    saved = ckpt.resolve_checkpoint(run / "checkpoints" / "last")
    assert saved is not None
    rollback = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert rollback in [s for s in _checkpointed_steps(every) if s <= killed_at][-2:]

    _resume(run)
    diff = assert_same_run(reference, run, f"{backend}, every_steps={every}, killed after step {killed_at} (k={k}, "
                                           f"EBSLAB_TEST_SEED={CHANCE_SEED})")
    print(f"[kill/resume] EBSLAB_TEST_SEED={CHANCE_SEED} backend={backend} every_steps={every} k={k}: killed {delay * 1000:.0f} ms later, after "
          f"step {killed_at} was logged; resumed from step {rollback}; largest difference {diff:.3g}")


def _train_signalled_at(sig: signal.Signals, run: Path, k: int, args: list[str]) -> int:
    """`ebslab train` in this process, sent a real `sig` from a thread once step k is logged (no interpreter
    start-up: on a slow CI host that is minutes per process)."""
    done = threading.Event()

    def send() -> None:
        while not done.is_set():
            if _step_reached(run, k)():
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        return main(["train", *args, f"out.dir={run.parent}", f"out.name={run.name}"])
    finally:
        done.set()
        thread.join()


@pytest.mark.timeout(300)
def test_sigterm_finishes_the_step_checkpoints_and_exits_143_then_resumes(reference, tmp_path, monkeypatch,
                                                                            capsys, chance):
    k = chance.randint(2, TOTAL_STEPS - 4)
    print(f"[sigterm] k={k}")
    run = tmp_path / "term"
    assert _train_signalled_at(signal.SIGTERM, run, k, RUN) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SIGTERM" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    last_logged = max(r["step"] for r in _records(run, "step"))
    assert k <= last_logged < TOTAL_STEPS
    state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
    # the step that was running when the signal came was finished and is in the checkpoint
    assert state["step"] == summary["steps"] == last_logged
    assert state["epoch"] == last_logged // STEPS_PER_EPOCH
    assert state["window"] == last_logged % STEPS_PER_EPOCH
    assert state["micro_step"] == _records(run, "step")[-1]["micro_step"]

    # the test has teeth: the same resume without restoring the RNG states gives other numbers (dropout is on)
    blind = tmp_path / "blind"
    shutil.copytree(run, blind)
    with monkeypatch.context() as m:
        m.setattr(ckpt, "set_rng_state", lambda state: None)
        _resume(blind)
    assert _max_weight_diff(reference, blind) > 1e-4

    _resume(run)
    assert json.loads((run / "summary.json").read_text())["status"] != "interrupted"
    assert_same_run(reference, run, f"SIGTERM after step {last_logged}")


@pytest.mark.timeout(300)
def test_the_noise_scale_averages_survive_a_stop_and_resume(reference, tmp_path, monkeypatch):
    """RUN is micro 8 x accum 2: the gradient noise scale is on. Stopped in the last half of training (steps 5..8,
    the summary's), the resumed run logs the uninterrupted run's gns/b_simple (a moving average over every step
    before) and writes its summary gns (sums over the last half), because the callback's state is in the
    checkpoint. Without it both would restart at the resume."""
    run = tmp_path / "gns"
    assert _train_signalled_at(signal.SIGTERM, run, 6, RUN) == 143
    stopped_at = max(r["step"] for r in _records(run, "step"))
    assert 6 <= stopped_at < TOTAL_STEPS
    saved = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())["callbacks"]
    assert len(saved["GradientNoiseScale"]["half_sums"]) == 3

    # the test has teeth: the same resume with the callbacks' state dropped gives other numbers
    blind = tmp_path / "blind"
    shutil.copytree(run, blind)
    with monkeypatch.context() as m:
        m.setattr(ebslab.loop.callbacks.Callbacks, "load_state_dict", lambda self, states: None)
        _resume(blind)
    _resume(run)
    ref_steps, steps = _records(reference, "step"), _records(run, "step")
    assert [r["step"] for r in steps] == list(range(1, TOTAL_STEPS + 1))
    for a, b in zip(ref_steps, steps):
        for key in ("gns/grad_sq", "gns/trace", "gns/b_simple"):
            assert (a[key] is None) == (b[key] is None), (a["step"], key)
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key, a[key], b[key])
    ref_gns, gns = (json.loads((r / "summary.json").read_text())["gns"] for r in (reference, run))
    assert gns["steps"] == ref_gns["steps"] == 4 and gns["skipped_windows"] == ref_gns["skipped_windows"]
    for key in ("grad_sq", "trace"):
        assert gns[key] == pytest.approx(ref_gns[key], rel=1e-6), key
    blind_gns = json.loads((blind / "summary.json").read_text())["gns"]
    assert blind_gns["steps"] == TOTAL_STEPS - stopped_at < 4
    blind_b = [r["gns/b_simple"] for r in _records(blind, "step")][stopped_at:]
    assert blind_b != pytest.approx([r["gns/b_simple"] for r in ref_steps][stopped_at:], rel=1e-3)


@pytest.mark.timeout(120)
def test_sigint_checkpoints_and_exits_130(tmp_path, capsys, chance):
    run, k = tmp_path / "int", chance.randint(1, 2 * STEPS_PER_EPOCH)
    print(f"[sigint] k={k}")
    code = _train_signalled_at(signal.SIGINT, run, k, [*RUN, "train.epochs=50"])
    err = capsys.readouterr().err
    assert code == 130
    assert "Traceback" not in err and "SIGINT: stopping after this step" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["message"]
    state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == summary["steps"] == max(r["step"] for r in _records(run, "step")) >= k
    assert summary["steps"] < 50 * STEPS_PER_EPOCH


@pytest.mark.slow  # a subprocess with long steps; the first Ctrl-C is in every run (test_sigint_...)
@pytest.mark.timeout(120)
def test_a_second_ctrl_c_exits_at_once(tmp_path, chance):
    # long steps (64 examples of 128 tokens, 8 micro-batches): the second signal lands inside the finishing step
    run, k = tmp_path / "int2", chance.randint(1, 3)
    print(f"[second ctrl-c] k={k}")
    args = [*RUN, "data.limit=300", "data.max_length=128", "batch.effective=64", "train.epochs=50",
            f"out.dir={tmp_path}", "out.name=int2"]
    proc = _start(args, tmp_path / "log")
    _wait_for(proc, _step_reached(run, k), tmp_path / "log")
    proc.send_signal(signal.SIGINT)
    _wait_for(proc, lambda: "stopping after this step" in (tmp_path / "log" / "stderr.txt").read_text(),
              tmp_path / "log")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=hang_after(60)) == 130
    err = (tmp_path / "log" / "stderr.txt").read_text()
    assert "Traceback" not in err
    assert "ebslab: aborted" in err
    assert not (run / "summary.json").exists(), "the second Ctrl-C must not wait for the step and its summary"
    last = ckpt.resolve_checkpoint(run / "checkpoints" / "last")
    assert last is not None and json.loads((last / "trainer_state.json").read_text())["step"] >= 1
    assert not (run / "checkpoints" / ".last.tmp").exists()


def test_stop_request_handler_first_signal_sets_flag_second_raises():
    from ebslab.loop.train import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.signal == signal.SIGTERM and stop.exit_code == 143
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------------------------------ full disk


@pytest.mark.timeout(300)
def test_full_disk_gives_one_line_and_keeps_the_last_good_checkpoint(reference, tmp_path, monkeypatch, capsys):
    real_save = ckpt.save_file
    calls = {"last": 0}

    def full_disk(tensors, filename, *a, **kw):
        if ".last.tmp" in filename and filename.endswith("model.safetensors"):
            calls["last"] += 1
            # the 4th weights file written for last/: after step 5 (step 4 ends epoch 1 with a new best, so its
            # last/ hard-links best/'s file instead of writing one): half a file, then the disk is full
            if calls["last"] == 4:
                with open(filename, "wb") as f:
                    f.write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(tensors, filename, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_file", full_disk)
        code = main(["train", *RUN, f"out.dir={tmp_path}", "out.name=full"])
    err = capsys.readouterr().err
    assert code == 2
    lines = re.findall(r"ebslab: .*", err)  # (after the progress bar's last \r)
    assert len(lines) == 1 and "No space left on device" in lines[0] and "--resume" in lines[0], err
    assert "Traceback" not in err
    run = tmp_path / "full"
    last = run / "checkpoints" / "last"
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 4
    best = run / "checkpoints" / "best"
    assert (last / "model.safetensors").stat().st_ino == (best / "model.safetensors").stat().st_ino
    assert not (run / "checkpoints" / ".last.tmp").exists()
    load_file(str(last / "model.safetensors"))  # intact

    _resume(run)  # space freed: the run goes on from step 4 (a linked weights file) as if nothing happened
    assert_same_run(reference, run, "full disk at step 5")


def test_full_disk_while_writing_a_summary_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"status": "completed"})

    def no_space(*_a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "replace", no_space)
    with pytest.raises(StorageError, match="No space left on device"):
        atomic_write_json(path, {"status": "failed"})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


# ------------------------------------------------------------------------------------------------ atomic folders


def _write(folder: Path, step: int) -> None:
    for name in ckpt.LAST_FILES:
        (folder / name).write_text(json.dumps({"step": step}))


def test_atomic_dir_keeps_the_previous_checkpoint_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "checkpoints" / "last"
    target.parent.mkdir()
    with ckpt.AtomicDir(target) as tmp:
        _write(tmp, 1)
    with pytest.raises(RuntimeError):  # a crash while writing the next one
        with ckpt.AtomicDir(target) as tmp:
            _write(tmp, 2)
            raise RuntimeError("killed")
    assert json.loads((ckpt.resolve_checkpoint(target) / "trainer_state.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]


def test_a_kill_between_the_two_renames_is_survived(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last"
    target.parent.mkdir()
    with ckpt.AtomicDir(target) as tmp:
        _write(tmp, 1)
    old = target.with_name(".last.old")
    os.replace(target, old)  # the state a kill leaves between `last -> .last.old` and `.last.tmp -> last`
    assert ckpt.resolve_checkpoint(target) == old
    # the next save must not drop .last.old (the only good copy) before its own folder is in place
    real_replace = os.replace

    def killed_at_the_rename(src, dst):
        if Path(src).name == ".last.tmp":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        with ckpt.AtomicDir(target) as tmp:
            _write(tmp, 2)
    monkeypatch.undo()
    good = ckpt.resolve_checkpoint(target)
    assert good is not None and json.loads((good / "trainer_state.json").read_text()) == {"step": 1}
    with ckpt.AtomicDir(target) as tmp:
        _write(tmp, 3)
    assert ckpt.resolve_checkpoint(target) == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]


def test_a_second_ctrl_c_while_a_checkpoint_is_committed_leaves_the_previous_one_and_no_partial_folder(
        tmp_path, monkeypatch):
    """The second Ctrl-C can land while the finishing step's checkpoint is fsynced: the previous checkpoint stays
    the good one and the partial .last.tmp is removed (it was left behind, a checkpoint's size of dead files)."""
    target = tmp_path / "checkpoints" / "last"
    target.parent.mkdir()
    with ckpt.AtomicDir(target) as tmp:
        _write(tmp, 1)

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        with ckpt.AtomicDir(target) as tmp:
            _write(tmp, 2)
    monkeypatch.undo()
    assert json.loads((ckpt.resolve_checkpoint(target) / "trainer_state.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]


def test_an_incomplete_last_folder_is_not_taken_for_a_checkpoint(tmp_path):
    target = tmp_path / "last"
    target.mkdir()
    (target / "model.safetensors").write_text("x")  # no optimizer / trainer state
    assert ckpt.resolve_checkpoint(target) is None


# ------------------------------------------------------------------------------------------------ state round trip


def test_every_rng_optimizer_and_scheduler_state_survives_the_round_trip(tmp_path):
    import numpy as np

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step(), sched.step(), opt.zero_grad()
    random.random(), np.random.rand(), np.random.randn()  # numpy holds a cached gaussian now
    ckpt.save_last(tmp_path, model, opt, sched, {"step": 3, "window": 1}, config={"a": {"b": 1}})
    draws = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3), model(torch.ones(2, 4)))
    expected_opt, expected_lr = opt.state_dict(), sched.get_last_lr()

    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert ckpt.load_last(tmp_path / "last", model2, opt2, sched2) == {"step": 3, "window": 1}
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3), model2(torch.ones(2, 4)))
    assert again[:3] == draws[:3]
    assert torch.equal(again[3], draws[3]) and torch.equal(again[4], draws[4])  # dropout mask included
    assert sched2.get_last_lr() == expected_lr and opt2.param_groups[0]["betas"][0] == 0.8
    for (k, a), (_, b) in zip(expected_opt["state"].items(), opt2.state_dict()["state"].items()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and torch.equal(a["step"], b["step"])
    assert {p.name for p in (tmp_path / "last").iterdir()} == {*ckpt.LAST_FILES, "config.json"}


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_lines_are_flushed_and_a_torn_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    t = JsonlTracker(path)
    for step in (1, 2, 3):
        t.log({"event": "step", "step": step, "train/loss": 0.5})
        assert len(path.read_text().splitlines()) == step  # on disk before close
    with open(path, "a") as f:
        f.write('{"event": "step", "st')  # killed mid-write
    truncate_metrics(path, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert all(json.loads(line) for line in path.read_text().splitlines())


# ------------------------------------------------------------------------------------------------ no pickle


def test_nothing_is_ever_unpickled():
    offenders = []
    for path in (ROOT / "src" / "ebslab").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\b(pickle|cPickle|dill|joblib|cloudpickle)\b", code) and "import" in code:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if "allow_pickle=True" in code or "pd.read_pickle" in code or "torch.serialization" in code:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if re.search(r"torch\.load\(", code) and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == []


def test_checkpoints_hold_only_safetensors_and_json(reference):
    files = [p for p in (reference / "checkpoints").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {*ckpt.LAST_FILES, "config.json"}
    for p in files:
        assert p.suffix in (".safetensors", ".json"), p
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            load_file(str(p))
    state = json.loads((reference / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["window"]) == (TOTAL_STEPS, 2, 0)


def test_full_disk_while_logging_metrics_is_one_line_with_the_way_back(tmp_path):
    from ebslab.core.runfolder import read_jsonl as read_metrics
    from ebslab.loop.tracking import JsonlTracker

    tracker = JsonlTracker(tmp_path / "metrics.jsonl")
    tracker.log({"event": "step", "step": 1})

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            pass

    tracker.file = FullDisk()
    with pytest.raises(StorageError, match=r"metrics.jsonl' \(No space left on device \[ENOSPC\]\).*--resume"):
        tracker.log({"event": "step", "step": 2})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_metrics_truncation_predictions_sweep_index_and_report_are_fsynced_then_renamed(tmp_path, fsync_log):
    import numpy as np

    from ebslab.experiments import sweep as sw
    from ebslab.loop.evaluate import EvalResult, save_predictions
    from ebslab.analysis.report import build_report
    from test_report import make_run

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"event": "step", "step": s}) + "\n" for s in (1, 2, 3)))
    truncate_metrics(metrics, 2)
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2]

    save_predictions(tmp_path, "test_best", EvalResult(index=np.arange(4), label=np.array([0, 1, 1, 0]),
                                                       probs=np.full((4, 2), 0.5), label_names=["0", "1"]))

    sweep = sw.parse_sweep({"name": "exp", "base": {"model.name": "tiny-bert"}, "grid": {"train.seed": [1, 2]}})
    root = sw.sweep_dir(tmp_path / "runs", sweep)
    sw.SweepRunner(sweep, sw.plan(sweep, tmp_path / "runs"), root, False, "local").write_index()

    for seed in (1, 2):
        make_run(tmp_path / "done", f"s{seed}", seed=seed)
    build_report([tmp_path / "done" / "s1", tmp_path / "done" / "s2"], tmp_path / "report")

    figures = sorted((tmp_path / "report").glob("*.png"))
    assert figures  # the report's plots are among the files checked

    from ebslab.analysis.figures import pyplot, save

    fig, _ = pyplot().subplots()
    save(fig, tmp_path / "alone.pdf", dpi=50)  # the format follows the suffix through the temporary file
    assert (tmp_path / "alone.pdf").read_bytes().startswith(b"%PDF")

    written = [metrics, tmp_path / "predictions" / "test_best.parquet", root / "sweep.json",
               tmp_path / "report" / "report.md", tmp_path / "report" / "report.json", *figures,
               tmp_path / "alone.pdf"]
    assert [p for p in written if not fsync_log.durable(p)] == []
    # the checker has teeth: a file written in place is not durable
    (tmp_path / "plain.txt").write_text("x")
    assert not fsync_log.durable(tmp_path / "plain.txt")


def test_full_disk_while_writing_predictions_keeps_the_old_file_and_names_the_resume(tmp_path, monkeypatch):
    import numpy as np
    import pandas as pd

    from ebslab.loop.evaluate import EvalResult, save_predictions

    def result(label):
        return EvalResult(index=np.arange(2), label=np.array(label), probs=np.full((2, 2), 0.5),
                          label_names=["0", "1"])

    save_predictions(tmp_path, "test_best", result([0, 1]))
    monkeypatch.setattr(os, "replace", lambda *_a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(StorageError) as e:
        save_predictions(tmp_path, "test_best", result([1, 0]))
    monkeypatch.undo()
    path = tmp_path / "predictions" / "test_best.parquet"
    assert str(e.value) == (f"could not write '{path}' (No space left [ENOSPC]); the previous checkpoint is intact: "
                            f"free space, then continue with `ebslab train --resume {tmp_path}`")
    assert pd.read_parquet(path)["label"].tolist() == [0, 1]
    assert [p.name for p in path.parent.iterdir()] == ["test_best.parquet"]  # no temp file left


# ------------------------------------------------------------------------------------------------ a real full disk


def _mount_tmpfs(where: Path, size: int) -> bool:
    """A tmpfs of `size` bytes at `where` (root only); False where it cannot be mounted."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(where: Path) -> None:
    """Write until the filesystem is full."""
    fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs, filled: every write on it fails with ENOSPC as a real full disk does."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 1 << 20):
        pytest.skip("needs root to mount a tmpfs (the injected full disk is tested above)")
    try:
        _fill(disk)
        yield disk
    finally:
        _umount(disk)


def _one_error_line(err: str) -> str:
    lines = re.findall(r"ebslab: .*", err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.timeout(300)
def test_a_real_full_disk_while_checkpointing_is_one_line_exit_2_then_resume_is_exact(reference, tmp_path,
                                                                                       monkeypatch, capsys):
    """safetensors reports a full disk as SafetensorError ("... (os error 28)"), not OSError: it was a traceback,
    exit 1 and status failed. A tmpfs with room for one checkpoint but not two (root); else the same error,
    injected where safetensors raises it."""
    last = reference / "checkpoints" / "last"
    checkpoint = sum(f.stat().st_size for f in last.iterdir())
    disk = tmp_path / "disk"
    # step 1's last/ fits; step 2's (written beside it before the swap) does not
    mounted = _mount_tmpfs(disk, int(checkpoint * 1.6) + (256 << 10))
    try:
        with monkeypatch.context() as m:
            if not mounted:
                real_save, calls = ckpt.save_file, []

                def full(tensors, filename, *a, **kw):
                    calls.append(filename)
                    if len(calls) == 3:  # step 2's weights
                        raise ckpt.SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")
                    return real_save(tensors, filename, *a, **kw)

                m.setattr(ckpt, "save_file", full)
            code = main(["train", *RUN, f"out.dir={disk}", "out.name=full"])
        line = _one_error_line(capsys.readouterr().err)
        assert code == 2
        run = disk / "full"
        assert "No space left on device [ENOSPC]" in line and f"ebslab train --resume {run}" in line, line
        assert not (run / "summary.json").exists()  # not "failed": interrupted, resumable
        state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
        assert state["step"] == 1
        assert not (run / "checkpoints" / ".last.tmp").exists()
        if mounted:  # space freed
            assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)]).returncode == 0
        _resume(run)
        assert_same_run(reference, run, "full disk at step 2")
    finally:
        if mounted:
            _umount(disk)


def test_predict_report_and_export_on_a_full_disk_are_one_line_exit_2_and_leave_nothing(reference, full_disk,
                                                                                         capsys):
    texts = full_disk.parent / "in.txt"
    texts.write_text("a good film\na bad one\n")
    for argv in (["predict", str(reference), str(texts), "--out", str(full_disk / "p.csv")],
                 ["report", str(reference), "--out", str(full_disk / "report")],
                 ["export", str(reference), "--out", str(full_disk / "export")]):
        code = main(argv)
        line = _one_error_line(capsys.readouterr().err)
        assert code == 2 and "No space left on device" in line, (argv[0], line)
        left = sorted(p.name for p in full_disk.iterdir() if p.name != "filler")
        assert left in ([], ["report"]), (argv[0], left)  # report: at most its (empty) folder
        assert not any(full_disk.rglob("*.tmp*")), argv[0]


def test_an_export_on_a_disk_too_small_for_its_weights_is_one_line_exit_2(reference, tmp_path, capsys):
    """config.json fits, model.safetensors does not: safetensors' own SafetensorError, not an OSError (it was a
    traceback)."""
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, 256 << 10):
        pytest.skip("needs root to mount a tmpfs")
    try:
        code = main(["export", str(reference), "--out", str(disk / "export")])
        line = _one_error_line(capsys.readouterr().err)
        assert code == 2 and "No space left on device [ENOSPC]" in line and str(disk / "export") in line, line
        assert list(disk.iterdir()) == []  # the temporary folder went with the error
    finally:
        _umount(disk)
