"""Sweeps: grid expansion, folder names, checks before any run, resume decisions, executors, end to end."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import hang_after, install_fake_train
import yaml

from ebslab.experiments import sweep as sw
from ebslab.loop.checkpoint import LAST_FILES
from ebslab.cli import main
from ebslab.core.errors import UserError
from ebslab.core.config import load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.name": "tiny-bert", "data.limit": 64, "train.epochs": 1, "batch.effective": 8, "batch.micro": 8,
        "data.max_length": 32}


def write_sweep(folder: Path, data: dict, name: str = "sweep.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------------------
# Pure functions


def test_expand_grid_is_the_product_in_file_order_seed_included():
    runs = sw.expand_grid({"grid": {"model.name": ["a", "b"], "batch.effective": [64, 256, 1024],
                                    "train.seed": [1, 2]}})
    assert len(runs) == 12
    assert runs[0] == {"model.name": "a", "batch.effective": 64, "train.seed": 1}
    assert runs[1] == {"model.name": "a", "batch.effective": 64, "train.seed": 2}  # the last key varies fastest
    assert runs[-1] == {"model.name": "b", "batch.effective": 1024, "train.seed": 2}
    assert len({tuple(r.values()) for r in runs}) == 12


def test_expand_grid_nested_keys_and_single_values():
    runs = sw.expand_grid({"grid": {"model": {"name": ["a", "b"]}, "train.epochs": [3]}})
    assert runs == [{"model.name": "a", "train.epochs": 3}, {"model.name": "b", "train.epochs": 3}]
    assert sw.expand_grid({"grid": {}}) == [{}]


def test_a_scalar_grid_value_is_refused_in_one_line_exit_2_before_any_folder(tmp_path, capsys):
    """`batch.effective: 16` under grid: (not [16]) was once read as a one-value list by accident of the code;
    a grid lists values, so a scalar is refused with the fix, before the sweep's folder exists."""
    with pytest.raises(UserError, match=r"grid key 'batch.effective' must be a list of values, got 16; "
                                        r"write 'batch.effective: \[16\]', or move it under base:"):
        sw.expand_grid({"grid": {"batch.effective": 16}})
    path = write_sweep(tmp_path, {"name": "scalar", "base": TINY, "grid": {"batch.effective": 16,
                                                                           "train.seed": [1, 2]}})
    rc = main(["sweep", str(path), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "'batch.effective' must be a list of values" in err
    assert not (tmp_path / "runs").exists()


def test_run_folder_name_names_the_varying_keys_filesystem_safe():
    grid = {"model.name": ["minilm", "answerdotai/ModernBERT-base"], "train.epochs": [3],
            "batch.effective": [64, 256], "train.seed": [1, 2]}
    keys = sw.varying_keys(grid)
    assert keys == ["model.name", "batch.effective", "train.seed"]  # train.epochs does not vary
    assert sw.run_folder_name({"model.name": "minilm", "train.epochs": 3, "batch.effective": 256,
                               "train.seed": 1}, keys) == "model.name=minilm,batch.effective=256,train.seed=1"
    name = sw.run_folder_name({"model.name": "answerdotai/ModernBERT-base", "train.epochs": 3,
                               "batch.effective": 64, "train.seed": 2}, keys)
    assert name == "model.name=answerdotai_ModernBERT-base,batch.effective=64,train.seed=2"
    assert sw.run_folder_name({"track": ["jsonl", "wandb"], "optim.lr": 5e-5, "data.limit": None},
                              ["track", "optim.lr", "data.limit"]) == "track=jsonl+wandb,optim.lr=5e-05,data.limit=null"
    # nothing varies: the single run is still named after its keys
    assert sw.varying_keys({"train.seed": [1]}) == ["train.seed"]


def test_long_folder_names_are_shortened_and_stay_distinct():
    keys = ["data.path", "train.seed"]
    a = sw.run_folder_name({"data.path": "x" * 300, "train.seed": 1}, keys)
    b = sw.run_folder_name({"data.path": "x" * 300, "train.seed": 2}, keys)
    assert len(a) <= sw.MAX_NAME and len(b) <= sw.MAX_NAME and a != b
    assert a.startswith("data.path=xxx")


@pytest.mark.parametrize("value", ["answerdotai/ModernBERT-base", "yes", "null", "1e-4", 5e-5, 1e-4, 256, True,
                                   None, ["jsonl", "wandb"], [0.8, 0.1, 0.1], "a b: c", "x" * 120])
def test_format_value_reads_back_as_the_same_value(value):
    text = sw.format_value(value)
    assert "\n" not in text and not text.endswith("...")
    assert parse_override(f"k={text}") == ("k", value)


def test_load_sweep_base_file_relative_to_sweep_folder_then_cwd(tmp_path, monkeypatch):
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "base.yaml").write_text("model: {name: tiny-bert}\ntrain: {epochs: 2}\n")
    s = sw.load_sweep(write_sweep(tmp_path / "sweeps", {"name": "s", "base": "base.yaml",
                                                         "grid": {"train.seed": [1, 2]}}))
    assert s.base_file == (tmp_path / "sweeps" / "base.yaml").resolve()
    # not next to the sweep file: relative to the cwd
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "b2.yaml").write_text("train: {epochs: 4}\n")
    monkeypatch.chdir(tmp_path)
    s2 = sw.load_sweep(write_sweep(tmp_path / "sweeps", {"name": "s", "base": "configs/b2.yaml",
                                                          "grid": {"train.seed": [1]}}, "s2.yaml"))
    assert s2.base_file == (tmp_path / "configs" / "b2.yaml").resolve()
    with pytest.raises(UserError, match="base config 'nope.yaml' not found"):
        sw.load_sweep(write_sweep(tmp_path / "sweeps", {"name": "s", "base": "nope.yaml", "grid": {}}, "s3.yaml"))


def test_base_mapping_dotted_or_nested_gives_the_same_runs(tmp_path):
    dotted = sw.load_sweep(write_sweep(tmp_path, {"name": "s", "base": {"model.name": "tiny-bert", "train.epochs": 2},
                                                  "grid": {"train.seed": [1, 2]}}, "a.yaml"))
    nested = sw.load_sweep(write_sweep(tmp_path, {"name": "s", "base": {"model": {"name": "tiny-bert"},
                                                                        "train": {"epochs": 2}},
                                                  "grid": {"train.seed": [1, 2]}}, "b.yaml"))
    assert dotted.base_values == nested.base_values == {"model.name": "tiny-bert", "train.epochs": 2}
    cfg = load_config(None, sw.run_overrides(nested, {"train.seed": 2}))
    assert (cfg.model.name, cfg.train.epochs, cfg.train.seed) == ("tiny-bert", 2, 2)


@pytest.mark.parametrize("data, message", [
    ({"name": "s", "grid": {"batch.efective": [1]}}, "did you mean 'batch.effective'"),
    ({"name": "s", "base": {"optim.lrr": 1}, "grid": {}}, "did you mean 'optim.lr'"),
    ({"name": "s", "grid": {"out.name": ["x"]}}, "set by the sweep"),
    ({"name": "s", "grid": {"train.seed": []}}, "empty list"),
    ({"name": "a/b", "grid": {}}, "must be a folder name"),
    ({"name": "s", "grids": {}}, "unknown top-level key"),
])
def test_load_sweep_refuses_bad_files_with_the_reason(tmp_path, data, message):
    with pytest.raises(UserError, match=message):
        sw.load_sweep(write_sweep(tmp_path, data))


def test_every_invalid_combination_is_listed_before_any_run_exit_2(tmp_path, capsys):
    path = write_sweep(tmp_path, {"name": "bad", "base": TINY, "grid": {
        "batch.effective": [8, 12], "model.pooling": ["cls", "max"], "train.seed": [1]}})
    rc = main(["sweep", str(path), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "3 problem(s) in 4 combination(s)" in err
    assert "batch.effective=12,model.pooling=cls: batch.effective=12 is not divisible by batch.micro=8" in err
    assert "batch.effective=8,model.pooling=max: config key 'model.pooling' must be" in err
    assert "batch.effective=12,model.pooling=max:" in err
    assert "batch.effective=8,model.pooling=cls:" not in err  # the valid one is not listed
    assert not (tmp_path / "runs").exists()  # nothing started, not even the index


def test_clashing_folder_names_are_refused(tmp_path):
    s = sw.parse_sweep({"name": "s", "grid": {"data.path": ["a/b", "a_b"]}})
    with pytest.raises(UserError, match="same folder name"):
        sw.validate_sweep(s)


# ----------------------------------------------------------------------------------------------------------
# Resume decisions on fake run folders


def fake_run(folder: Path, status: str | None, checkpoint: bool, old_checkpoint: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {name: tiny-bert}\n")
    (folder / "metrics.jsonl").write_text("")
    if status is not None:
        (folder / "summary.json").write_text(json.dumps({"status": status}))
    if checkpoint or old_checkpoint:
        last = folder / "checkpoints" / (".last.old" if old_checkpoint else "last")
        last.mkdir(parents=True)
        for name in LAST_FILES:
            (last / name).write_bytes(b"x")
    return folder


@pytest.mark.parametrize("status, checkpoint, expected", [
    ("completed", True, "skip"), ("collapsed", True, "skip"), ("diverged", False, "skip"), ("pruned", True, "skip"),
    ("interrupted", True, "resume"), (None, True, "resume"),
    ("failed", True, "retry"), ("failed", False, "retry"), (None, False, "retry"), ("interrupted", False, "retry"),
])
def test_resume_action(tmp_path, status, checkpoint, expected):
    assert sw.resume_action(fake_run(tmp_path / "r", status, checkpoint)) == expected


def test_resume_action_new_torn_summary_and_previous_checkpoint(tmp_path):
    assert sw.resume_action(tmp_path / "missing") == "new"
    run = fake_run(tmp_path / "r", None, False, old_checkpoint=True)  # killed between the two renames
    assert sw.resume_action(run) == "resume"
    (run / "summary.json").write_text('{"status": "compl')  # unreadable: not a finished run
    assert sw.resume_action(run) == "resume"
    empty_last = fake_run(tmp_path / "r2", None, False)
    (empty_last / "checkpoints" / "last").mkdir(parents=True)  # no weights inside: nothing to resume from
    assert sw.resume_action(empty_last) == "retry"
    (empty_last / "checkpoints" / "last" / "model.safetensors").write_bytes(b"x")  # weights, no optimizer
    assert sw.resume_action(empty_last) == "retry"


def test_plan_refuses_an_existing_sweep_without_resume(tmp_path):
    s = sw.parse_sweep({"name": "s", "base": TINY, "grid": {"train.seed": [1, 2]}})
    fake_run(tmp_path / "s" / "train.seed=1", "completed", True)
    with pytest.raises(UserError, match="add --resume"):
        sw.plan(s, tmp_path)
    jobs = sw.plan(s, tmp_path, resume=True)
    assert [(j.folder, j.action, j.status) for j in jobs] == [("train.seed=1", "skip", "completed"),
                                                              ("train.seed=2", "new", "pending")]
    assert sw.plan(s, tmp_path / "elsewhere")[0].action == "new"


def test_train_command_and_env_per_action(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = tmp_path / "base.yaml"
    base.write_text("model: {name: tiny-bert}\n")
    s = sw.parse_sweep({"name": "exp", "base": str(base), "grid": {
        "model.name": ["org/m1", "m2"], "track": [["jsonl", "wandb"]], "train.seed": [1, 2]}})
    job = sw.plan(s, tmp_path / "runs")[0]
    assert job.folder == "model.name=org_m1,train.seed=1"
    cmd = sw.train_command(s, job)
    assert cmd[:5] == [sys.executable, "-m", "ebslab", "train", str(base.resolve())]
    assert cmd[5:] == ["model.name=org/m1", "track=[jsonl, wandb]", "train.seed=1",
                       f"out.dir={tmp_path / 'runs' / 'exp'}", "out.name=model.name=org_m1,train.seed=1"]
    # what `ebslab train` reads from that command line is the run's config, in the run's folder
    cfg = load_config(cmd[4], cmd[5:])
    assert (cfg.model.name, cfg.track, cfg.train.seed) == ("org/m1", ["jsonl", "wandb"], 1)
    assert cfg.run_dir == job.run_dir
    job.action = "retry"
    assert sw.train_command(s, job)[-1] == "--overwrite"
    job.action = "resume"
    assert sw.train_command(s, job)[3:] == ["train", "--resume", str(job.run_dir)]
    smoke = sw.train_command(s, sw.plan(s, tmp_path / "runs", smoke=True)[0], smoke=True)
    assert {"train.epochs=1", "train.max_steps=0", "data.limit=64"} <= set(smoke)
    assert f"out.dir={tmp_path / 'runs' / 'exp-smoke'}" in smoke

    env = sw.job_env(s, job)
    assert env["WANDB_PROJECT"] == "exp"
    assert env["WANDB_RUN_GROUP"] == "model.name=org/m1,track=jsonl+wandb"  # the seeds of a setting together
    assert env["WANDB_NAME"] == "model.name=org_m1,train.seed=1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert str(ROOT / "src") in env["PYTHONPATH"].split(os.pathsep) or "site-packages" in sw.__file__


# ----------------------------------------------------------------------------------------------------------
# The runner with a stand-in for `ebslab train` (fast; the real one is below)

FAKE_TRAIN = textwrap.dedent('''
    import json, os, shutil, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    if args[0] == "--resume":
        run = Path(args[1])
        mode = "resumed"
        if (run / "crash_on_resume").exists():  # dies hard: no new summary.json
            sys.exit(137)
    else:
        kv = dict(a.split("=", 1) for a in args if "=" in a)
        if kv.get("data.text_column") == "nope":
            print("ebslab: error: column 'nope' not found", file=sys.stderr)
            sys.exit(2)
        run = Path(kv["out.dir"]) / kv["out.name"]
        if run.exists():
            if "--overwrite" not in args:
                sys.exit(2)
            shutil.rmtree(run)
        mode = "overwritten" if "--overwrite" in args else "new"
        (run / "checkpoints" / "last").mkdir(parents=True)
        for name in LAST_FILES:
            (run / "checkpoints" / "last" / name).write_bytes(b"w")
        (run / "metrics.jsonl").write_text("")
        if "train.seed=9" in args:  # a long run, stopped by the sweep: count the SIGINTs it gets
            import signal
            sigints = []
            signal.signal(signal.SIGINT, lambda *_: sigints.append(time.time()))
            (run / "started").write_text("")
            deadline = time.time() + hang_after(30)
            while time.time() < deadline and not (sigints and time.time() > sigints[0] + 1.0):
                time.sleep(0.05)
            (run / "summary.json").write_text(json.dumps({"status": "interrupted", "sigints": len(sigints)}))
            sys.exit(130)
    env = {k: os.environ.get(k) for k in ("WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME", "HF_HUB_OFFLINE")}
    (run / "env.json").write_text(json.dumps(env))
    print("training", run.name)
    status = "diverged" if "optim.lr=10.0" in args else "completed"
    (run / "summary.json").write_text(json.dumps({"status": status, "mode": mode, "test_best": {"acc": 0.5},
                                                  "duration_s": 1.0}))
''')


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    return install_fake_train(tmp_path, monkeypatch, FAKE_TRAIN)


def read_index(folder: Path) -> dict[str, dict]:
    return {r["folder"]: r for r in json.loads((folder / "sweep.json").read_text())["runs"]}


def test_a_failing_run_never_stops_the_others(tmp_path, fake_train, capsys):
    path = write_sweep(tmp_path, {"name": "exp", "base": TINY, "grid": {
        "data.text_column": ["text", "nope"], "optim.lr": [5e-5, 10.0], "train.seed": [1]}})
    rc = main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--parallel", "2"])
    out = capsys.readouterr().out
    assert rc == 1
    root = tmp_path / "runs" / "exp"
    index = read_index(root)
    assert {k: v["status"] for k, v in index.items()} == {
        "data.text_column=text,optim.lr=5e-05": "completed", "data.text_column=text,optim.lr=10.0": "diverged",
        "data.text_column=nope,optim.lr=5e-05": "failed", "data.text_column=nope,optim.lr=10.0": "failed"}
    assert index["data.text_column=nope,optim.lr=5e-05"]["returncode"] == 2
    assert index["data.text_column=nope,optim.lr=5e-05"]["message"] == \
        "exit code 2: ebslab: error: column 'nope' not found"  # the run's own last line
    assert index["data.text_column=text,optim.lr=5e-05"]["overrides"] == {
        "data.text_column": "text", "optim.lr": 5e-05, "train.seed": 1}
    for folder in index:  # one log per run, holding the run's own output
        log = (root / f"{folder}.log").read_text()
        assert ("column 'nope' not found" in log) == ("nope" in folder)
    env = json.loads((root / "data.text_column=text,optim.lr=5e-05" / "env.json").read_text())
    assert env == {"WANDB_PROJECT": "exp", "WANDB_RUN_GROUP": "data.text_column=text,optim.lr=5e-05",
                   "WANDB_NAME": "data.text_column=text,optim.lr=5e-05", "HF_HUB_OFFLINE": "1"}
    assert "2 failed" in out and "1 completed" in out and "1 diverged" in out
    assert not [p.name for p in root.iterdir() if ".tmp" in p.name]  # the index was replaced, never left half-written


def test_resume_skips_done_resumes_interrupted_and_retries_failed(tmp_path, fake_train):
    path = write_sweep(tmp_path, {"name": "exp", "base": TINY, "grid": {"train.seed": [1, 2, 3, 4]}})
    out = str(tmp_path / "runs")
    assert main(["sweep", str(path), "--out", out]) == 0
    root = tmp_path / "runs" / "exp"
    (root / "train.seed=2" / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    (root / "train.seed=3" / "summary.json").write_text(json.dumps({"status": "failed"}))
    (root / "train.seed=4" / "summary.json").unlink()
    shutil.rmtree(root / "train.seed=4" / "checkpoints")  # died before its first checkpoint
    done = root / "train.seed=1" / "summary.json"
    before = (done.read_bytes(), done.stat().st_mtime_ns)

    assert main(["sweep", str(path), "--out", out]) == 2  # without --resume: refused, nothing touched
    assert main(["sweep", str(path), "--out", out, "--resume"]) == 0
    modes = {f"train.seed={i}": json.loads((root / f"train.seed={i}" / "summary.json").read_text())["mode"]
             for i in range(1, 5)}
    assert modes == {"train.seed=1": "new", "train.seed=2": "resumed", "train.seed=3": "overwritten",
                     "train.seed=4": "overwritten"}
    assert (done.read_bytes(), done.stat().st_mtime_ns) == before
    index = read_index(root)
    assert [index[f"train.seed={i}"]["action"] for i in range(1, 5)] == ["skip", "resume", "retry", "retry"]
    assert all(r["status"] == "completed" for r in index.values())
    assert (root / "train.seed=2.log").read_text().count("=== ebslab sweep") == 2  # appended, not replaced
    assert (root / "train.seed=1.log").read_text().count("=== ebslab sweep") == 1


def test_a_stale_summary_does_not_hide_a_crash(tmp_path, fake_train):
    path = write_sweep(tmp_path, {"name": "exp", "base": TINY, "grid": {"train.seed": [1]}})
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs")]) == 0
    run = tmp_path / "runs" / "exp" / "train.seed=1"
    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    os.utime(run / "summary.json", (1e9, 1e9))  # written by an earlier attempt
    (run / "crash_on_resume").write_text("")
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--resume"]) == 1
    record = read_index(tmp_path / "runs" / "exp")["train.seed=1"]
    assert (record["action"], record["status"], record["returncode"]) == ("resume", "failed", 137)


def test_stopping_the_sweep_interrupts_its_runs_once_then_resume(tmp_path, fake_train, capsys, monkeypatch):
    sent: list[tuple[int, int]] = []
    send_signal = subprocess.Popen.send_signal
    monkeypatch.setattr(subprocess.Popen, "send_signal",
                        lambda self, sig: (sent.append((self.pid, sig)), send_signal(self, sig))[1])
    path = write_sweep(tmp_path, {"name": "exp", "base": TINY, "grid": {"train.seed": [9, 1]}})
    root = tmp_path / "runs" / "exp"

    def stop_when_started():
        deadline = time.time() + hang_after(30)
        while not (root / "train.seed=9" / "started").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill SWEEP_PID` (Ctrl-C takes the same path)

    threading.Thread(target=stop_when_started, daemon=True).start()
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs")]) == 130
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the sweep's handler is gone again
    summary = json.loads((root / "train.seed=9" / "summary.json").read_text())
    assert summary == {"status": "interrupted", "sigints": 1}
    assert [sig for _, sig in sent] == [signal.SIGINT]  # once: a second SIGINT means "abort now, no checkpoint"
    index = read_index(root)
    assert (index["train.seed=9"]["status"], index["train.seed=1"]["status"]) == ("interrupted", "pending")
    assert "continue with --resume" in capsys.readouterr().err

    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--resume"]) == 0
    index = read_index(root)
    assert [index[f]["action"] for f in ("train.seed=9", "train.seed=1")] == ["resume", "new"]
    assert json.loads((root / "train.seed=9" / "summary.json").read_text())["mode"] == "resumed"


def test_smoke_goes_to_its_own_folder(tmp_path, fake_train):
    path = write_sweep(tmp_path, {"name": "exp", "base": {**TINY, "train.epochs": 5, "train.max_steps": 100},
                                  "grid": {"train.seed": [1, 2]}})
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--smoke"]) == 0
    log = (tmp_path / "runs" / "exp-smoke" / "train.seed=1.log").read_text()
    assert "train.epochs=1 " in log and "train.max_steps=0 " in log and "data.limit=64 " in log
    assert json.loads((tmp_path / "runs" / "exp-smoke" / "sweep.json").read_text())["smoke"] is True
    assert not (tmp_path / "runs" / "exp").exists()
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs")]) == 0  # the real grid is not blocked


# ----------------------------------------------------------------------------------------------------------
# Shipped sweep files


@pytest.mark.parametrize("name, runs", [("exp1-hparams", 384), ("exp2-ebs", 288), ("cpu-minilm", 6),
                                       ("cpu-ebs-study", 15)])
def test_shipped_sweep_files_are_valid(name, runs):
    s = sw.load_sweep(ROOT / "configs" / "sweeps" / f"{name}.yaml")
    assert s.name == name
    assert len(sw.validate_sweep(s)) == runs
    assert "train.seed" in s.grid
    if name == "cpu-minilm":  # sized for ~10 minutes on 2 CPU cores (6 runs: 9 min 51 s measured)
        cfg = load_config(None, sw.run_overrides(s, sw.expand_grid(s)[0]))
        train_examples = round(cfg.data.limit * cfg.data.split[0]) * cfg.train.epochs * runs
        assert cfg.model.name == "minilm" and 4500 <= train_examples <= 6000


# ----------------------------------------------------------------------------------------------------------
# End to end with the real `ebslab train` on tiny-bert


def tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.timeout(300)  # three interpreter start-ups, two of them side by side
def test_e2e_failing_run_leaves_the_other_complete_then_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = write_sweep(tmp_path, {"name": "e2e", "base": {**TINY, "track": ["jsonl", "tensorboard", "wandb"]},
                                  "grid": {"data.text_column": ["text", "nope"], "train.seed": [1]}})
    out = str(tmp_path / "runs")
    assert main(["sweep", str(path), "--out", out, "--parallel", "2"]) == 1
    root = tmp_path / "runs" / "e2e"
    good, bad = root / "data.text_column=text", root / "data.text_column=nope"
    index = read_index(root)
    assert index[good.name]["status"] in sw.DONE and index[bad.name]["status"] == "failed"
    assert index[bad.name]["returncode"] == 2
    assert "nope" in (root / f"{bad.name}.log").read_text()
    summary = json.loads((good / "summary.json").read_text())
    assert summary["status"] in sw.DONE and summary["test_best"]["acc"] is not None
    assert glob.glob(str(good / "tensorboard" / "events.out.tfevents.*"))
    from test_tracking import _wandb_records
    (run,) = [r.run for r in _wandb_records(good) if r.WhichOneof("record_type") == "run"]
    # the names the sweep gave the run: project = sweep, group = overrides without the seed, name = folder
    assert (run.project, run.run_group, run.display_name) == ("e2e", "data.text_column=text", good.name)

    before = tree(good)
    capsys.readouterr()
    assert main(["sweep", str(path), "--out", out, "--resume"]) == 1  # the bad one fails again
    assert tree(good) == before  # skipped: every file byte-identical, mtime unchanged
    assert (root / f"{bad.name}.log").read_text().count("=== ebslab sweep") == 2
    assert read_index(root)[good.name]["action"] == "skip"


@pytest.mark.slow  # four real runs; resume/retry logic is in every run (test_resume_skips_done_resumes_...)
@pytest.mark.timeout(120)
def test_e2e_resume_continues_interrupted_and_retries_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_sweep(tmp_path, {"name": "e2e", "base": TINY, "grid": {"train.seed": [1, 2]}})
    out = str(tmp_path / "runs")
    assert main(["sweep", str(path), "--out", out, "--parallel", "2"]) == 0
    root = tmp_path / "runs" / "e2e"
    first = {i: json.loads((root / f"train.seed={i}" / "summary.json").read_text()) for i in (1, 2)}
    (root / "train.seed=1" / "summary.json").unlink()  # killed after its last checkpoint: resumable
    (root / "train.seed=2" / "summary.json").write_text(json.dumps({"status": "failed"}))
    (root / "train.seed=2" / "marker").write_text("old")
    assert main(["sweep", str(path), "--out", out, "--resume", "--parallel", "2"]) == 0
    index = read_index(root)
    assert [index[f"train.seed={i}"]["action"] for i in (1, 2)] == ["resume", "retry"]
    assert "--resume" in (root / "train.seed=1.log").read_text().split("=== ebslab sweep")[-1]
    assert not (root / "train.seed=2" / "marker").exists()  # --overwrite: a fresh run folder
    again = {i: json.loads((root / f"train.seed={i}" / "summary.json").read_text()) for i in (1, 2)}
    for i in (1, 2):  # same seed, same data: the same run, whether resumed at its end or started over
        assert again[i]["status"] in sw.DONE
        assert again[i]["steps"] == first[i]["steps"]
        assert again[i]["test_last"]["acc"] == pytest.approx(first[i]["test_last"]["acc"])


def test_ray_executor_without_ray_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where ray is not installed
    path = write_sweep(tmp_path, {"name": "noray", "base": TINY, "grid": {"train.seed": [1]}})
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--executor", "ray"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ebslab: error: --executor ray needs ray: pip install 'ebslab[ray]' (or use --executor local)")


@pytest.mark.slow  # a Ray cluster and two real runs; `make test-slow` installs ray
@pytest.mark.timeout(300)
def test_e2e_ray_executor_two_runs(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_sweep(tmp_path, {"name": "ray", "base": TINY, "grid": {"train.seed": [1, 2]}})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rc = main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--executor", "ray",
                   "--cpus-per-run", "1"])
    finally:
        ray.shutdown()
    assert rc == 0
    root = tmp_path / "runs" / "ray"
    index = read_index(root)
    assert set(index) == {"train.seed=1", "train.seed=2"}
    assert all(r["status"] in sw.DONE and r["returncode"] == 0 for r in index.values())
    assert json.loads((root / "sweep.json").read_text())["executor"] == "ray"
    for i in (1, 2):
        cfg = yaml.safe_load((root / f"train.seed={i}" / "config.yaml").read_text())
        assert cfg["train"]["seed"] == i
        assert (root / f"train.seed={i}.log").read_text().strip().endswith("=== exit code 0")


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head with token authentication, started for this test and stopped by pid (never `ray stop`, which
    would stop every Ray cluster of this user on the machine). Yields (address, token)."""
    pytest.importorskip("ray")
    import re
    import secrets

    import tempfile

    # a short folder: Ray's unix sockets live under it, and a socket path is limited to 107 bytes
    token, temp = secrets.token_hex(16), Path(tempfile.mkdtemp(prefix="ebslab-ray-", dir="/tmp"))
    env = {**os.environ, "HOME": str(tmp_path / "head-home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    started = subprocess.run([ray_cli, "start", "--head", "--port=0", "--num-cpus=1", "--include-dashboard=false",
                              "--disable-usage-stats", f"--temp-dir={temp}"], env=env, capture_output=True,
                             text=True, timeout=hang_after(60))
    assert started.returncode == 0, started.stderr[-3000:]
    address = re.search(r"ray start --address='([^']+)'", started.stdout + started.stderr).group(1)
    try:
        yield address, token
    finally:
        for proc in Path("/proc").iterdir():  # the head's processes: the ones whose command names its temp dir
            try:
                if proc.name.isdigit() and str(temp) in (proc / "cmdline").read_text():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # a Ray head (~20 s) and a refused connection (~20 s of Ray's retries)
@pytest.mark.timeout(300)
def test_ray_cluster_unreachable_or_unauthenticated_is_one_line_then_the_token_connects(
        tmp_path, monkeypatch, capsys, fake_train, ray_head):
    address, token = ray_head
    path = write_sweep(tmp_path, {"name": "cluster", "base": TINY, "grid": {"train.seed": [1]}})
    sweep = ["sweep", str(path), "--out", str(tmp_path / "runs"), "--executor", "ray", "--resume"]
    monkeypatch.setenv("HOME", str(tmp_path / "driver-home"))  # no ~/.ray/auth_token of this user's
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)

    with socket_closed_port() as port:
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        assert main(sweep) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ebslab: error: cannot reach the Ray cluster at RAY_ADDRESS="
                                               f"127.0.0.1:{port} (")

    monkeypatch.setenv("RAY_ADDRESS", address)  # reachable, but this process has no token
    assert main(sweep) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("ebslab:")]
    assert err == [f"ebslab: error: could not connect to the Ray cluster at RAY_ADDRESS={address} (Failed to "
                   f"connect to Ray cluster at {address}); {sw.RAY_AUTH_HINT}"]

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)  # what the README tells a driver to set
    # Ray caches the auth mode and token per process: reset them, as Ray's own auth tests do, so this process
    # starts over as a driver that was given the token would
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()
    assert main(sweep) == 0
    assert read_index(tmp_path / "runs" / "cluster")["train.seed=1"]["status"] == "completed"


@contextlib.contextmanager
def socket_closed_port():
    """A local port nothing listens on (bound, then closed)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield port


def _sweep_args(executor: str, argv: list[str]):
    import argparse

    from ebslab.experiments import sweep_command

    parser = argparse.ArgumentParser()
    sweep_command.add_arguments(parser)
    return parser.parse_args(["grid.yaml", "--executor", executor, *argv])


def test_the_executor_is_picked_once_by_name_and_says_where_the_runs_go(monkeypatch):
    from ebslab.experiments import sweep_command

    monkeypatch.setenv("EBSLAB_SLURM_CLUSTER", "local")  # no sbatch needed on this machine

    picked = {name: sweep_command.pick_executor(_sweep_args(name, argv)) for name, argv in
              (("local", ["--parallel", "3"]), ("ray", ["--cpus-per-run", "2", "--gpus-per-run", "0.5"]),
               ("slurm", ["--cpus-per-run", "2", "--gpus-per-run", "1", "--parallel", "4"]))}
    assert {name: e.name for name, e in picked.items()} == {"local": "local", "ray": "ray", "slurm": "slurm"}
    assert picked["local"].describe() == "local x 3"
    assert picked["ray"].describe() == "ray (2 cpu, 0.5 gpu per run)"
    assert picked["slurm"].describe() == "slurm (2 cpu, 1 gpu, 60 min per run; 4 at once)"


def test_local_and_ray_wait_for_a_run_left_going_slurm_leaves_it_to_its_job_watch(tmp_path):
    """`--resume`: a run folder whose lock is still held is waited for on local and Ray (the plan is made again
    from what it left); the Slurm executor returns at once (it watches the run's job instead)."""
    from ebslab.core.locks import FolderLock
    from ebslab.experiments import slurm

    run = tmp_path / "r1"
    other = tmp_path / "r2"
    other.mkdir()
    executors = [sw.LocalExecutor(1), sw.RayExecutor(0, 1), slurm.SlurmSweepExecutor(slurm.SlurmOptions())]
    waited = []
    for executor in executors:
        lock = FolderLock(run, "run").acquire()
        release = threading.Timer(0.3, lock.release)
        release.start()
        started = time.time()
        waited.append((executor.adopt_left_runs([run, other]), time.time() - started >= 0.25))
        release.join()
        lock.release()
    assert waited == [([run], True), ([run], True), ([], False)]


def test_the_sweep_table_is_the_runs_in_columns(tmp_path):
    """The end-of-sweep table: status left, test acc and time right-aligned, the folder last, unpadded."""
    done = tmp_path / "lr=0.0001"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"status": "completed", "test_best": {"acc": 0.91234}}))
    jobs = [sw.Job(0, "lr=0.0001", {}, done, tmp_path / "a.log", "g", status="completed", duration_s=125.4),
            sw.Job(1, "lr=1", {}, tmp_path / "lr=1", tmp_path / "b.log", "g", action="skip", status="failed")]
    runner = sw.SweepRunner(sw.Sweep("s", {"lr": [0.0001, 1]}), jobs, tmp_path, False, "local")
    assert runner.table() == ("status            test acc  time  run\n"
                              "completed           0.9123  125s  lr=0.0001\n"
                              "failed (skipped)         -     -  lr=1\n"
                              f"sweep 's': 2 run(s): 1 completed, 1 failed; index {tmp_path / 'sweep.json'}")
