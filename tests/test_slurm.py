"""`--executor slurm`: runs as Slurm jobs through submitit.

Fast: the options as sbatch lines, and the submission, requeue and failure logic through submitit's local
executor (EBSLAB_SLURM_CLUSTER=local) with a stand-in for `ebslab train`.
Slow (`make test-slurm`, `make test-slow`): against a real one-node Slurm that scripts/slurm-test-cluster.sh
starts; skipped when `scontrol ping` finds none.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import hang_after, install_fake_train

from ebslab.experiments import slurm
from ebslab.experiments import sweep as sw
from ebslab.experiments import sweep_command
from ebslab.cli import main

submitit = pytest.importorskip("submitit")
ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.name": "tiny-bert", "data.max_length": 32, "data.limit": 120, "train.epochs": 1,
        "batch.effective": 16, "batch.micro": 8, "optim.lr": 1.0e-3}


def write_sweep(folder: Path, data: dict, name: str = "sweep.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_index(folder: Path) -> dict[str, dict]:
    return {r["folder"]: r for r in json.loads((folder / "sweep.json").read_text())["runs"]}


def sweep_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sweep_command.add_arguments(parser)
    return parser.parse_args(["sweep.yaml", *argv])


# ----------------------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("4:00:00", 240), ("1-0", 1440),
                                           ("1-2:30", 1590), ("0-0:0:59", 1)])
def test_time_reads_like_sbatch(text, minutes):
    assert slurm.parse_time(text) == minutes


def test_options_become_the_job_arrays_sbatch_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # a login node's sbatch
    args = sweep_args("--executor", "slurm", "--parallel", "3", "--gpus-per-run", "2", "--cpus-per-run", "8",
                      "--mem", "32G", "--time", "4:00:00", "--partition", "gpu", "--account", "lab",
                      "--sbatch=--qos=high", "--sbatch=--exclusive", "--max-requeues", "5")
    opts = slurm.options_from_args(args)
    assert (opts.procs_per_run, opts.time_min, opts.max_requeues) == (2, 240, 5)  # one process per GPU
    jobs = slurm.SlurmJobs(opts, tmp_path / "slurm", "exp")
    params = dict(jobs.executor._executor.parameters)
    assert jobs.executor._executor.max_num_timeout == 5
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command="python -m submitit.core._submit X", folder=tmp_path, map_count=10,
                               **params)
    for line in ("--array=0-9%3", "--cpus-per-task=8", "--gpus-per-node=2", "--mem=32G", "--time=240",
                 "--partition=gpu", "--account=lab", "--qos=high", "--exclusive", "--requeue",
                 "--signal=USR2@120", "--job-name=exp"):
        assert f"#SBATCH {line}\n" in text, line


@pytest.mark.parametrize("argv, message", [
    (["--time", "soon"], "--time 'soon' is not a Slurm time"),
    (["--sbatch", "qos"], "--sbatch 'qos': give a long sbatch flag"),
    (["--cpus-per-run", "0.5"], "must be whole numbers"),
    (["--max-requeues", "-1"], "--max-requeues must be >= 0"),
])
def test_a_wrong_slurm_option_is_one_line_exit_2_and_no_folder(tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.setenv("EBSLAB_SLURM_CLUSTER", "local")
    path = write_sweep(tmp_path, {"name": "exp", "base": TINY, "grid": {"train.seed": [1]}})
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--executor", "slurm", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_without_sbatch_on_path_the_slurm_executor_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EBSLAB_SLURM_CLUSTER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    path = write_sweep(tmp_path, {"name": "exp", "base": TINY, "grid": {"train.seed": [1]}})
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--executor", "slurm"]) == 2
    assert "sbatch/squeue not found on PATH" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------
# Submission, requeue and failure through submitit's local executor (fast)

FAKE_TRAIN = textwrap.dedent('''
    import json, os, signal, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    if args[0] == "--resume":
        run, mode = Path(args[1]), "resumed"
    else:
        kv = dict(a.split("=", 1) for a in args if "=" in a)
        if kv.get("data.text_column") == "nope":
            print("ebslab: error: column 'nope' not found", file=sys.stderr)
            sys.exit(2)
        run = Path(kv["out.dir"]) / kv["out.name"]
        mode = "overwritten" if "--overwrite" in args else "new"
        (run / "checkpoints" / "last").mkdir(parents=True, exist_ok=True)
        for name in LAST_FILES:
            (run / "checkpoints" / "last" / name).write_bytes(b"w")
        if "train.seed=9" in args:  # a long run: checkpoints on SIGTERM, as `ebslab train` does
            stop = []
            signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
            (run / "pids").write_text(f"{os.getppid()} {os.getpid()}")
            deadline = time.time() + hang_after(60)
            while not stop and time.time() < deadline:
                time.sleep(0.05)
            (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
            print("SIGTERM: stopping after this step")
            sys.exit(143)
    print("training", run.name, "job", os.environ.get("SUBMITIT_LOCAL_JOB_ID"))
    (run / "summary.json").write_text(json.dumps({"status": "completed", "mode": mode, "test_best": {"acc": 0.5},
                                                  "duration_s": 1.0, "pid": os.getpid()}))
''')


@pytest.fixture
def local_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("EBSLAB_SLURM_CLUSTER", "local")
    return install_fake_train(tmp_path, monkeypatch, FAKE_TRAIN)


@pytest.mark.timeout(120)
def test_each_run_is_a_job_and_a_failing_one_never_stops_the_others(tmp_path, local_slurm, capsys):
    path = write_sweep(tmp_path, {"name": "exp", "base": TINY, "grid": {
        "data.text_column": ["text", "nope"], "train.seed": [1, 2]}})
    out = str(tmp_path / "runs")
    assert main(["sweep", str(path), "--out", out, "--executor", "slurm", "--parallel", "2"]) == 1
    root = tmp_path / "runs" / "exp"
    index = read_index(root)
    assert {k: v["status"] for k, v in index.items()} == {
        "data.text_column=text,train.seed=1": "completed", "data.text_column=text,train.seed=2": "completed",
        "data.text_column=nope,train.seed=1": "failed", "data.text_column=nope,train.seed=2": "failed"}
    assert index["data.text_column=nope,train.seed=1"]["message"] == \
        "exit code 2: ebslab: error: column 'nope' not found"
    assert json.loads((root / "sweep.json").read_text())["executor"] == "slurm"
    # each ran in a job of its own (a different process than this one), with its log in the sweep folder
    jobs = json.loads((root / "slurm" / "jobs.json").read_text())
    assert set(jobs) == set(index) and len(set(jobs.values())) == 4
    for folder, job_id in jobs.items():
        log = (root / f"{folder}.log").read_text()
        if "text_column=text" in folder:
            assert f"job {job_id}" in log
            assert json.loads((root / folder / "summary.json").read_text())["pid"] != os.getpid()
    assert "2 completed, 2 failed" in capsys.readouterr().out

    # --resume submits only what is left: the completed runs are skipped, the failed ones (no folder) run again
    assert main(["sweep", str(path), "--out", out, "--executor", "slurm", "--resume"]) == 1
    index = read_index(root)
    assert [index[f]["action"] for f in sorted(index)] == ["new", "new", "skip", "skip"]


@pytest.mark.timeout(120)
def test_a_job_signalled_before_its_time_limit_checkpoints_and_is_requeued_then_resumes(tmp_path, local_slurm):
    """USR2 (Slurm's `--signal` before the time limit) to every process of the job, as Slurm sends it: the run
    ignores it, the job stops the run through SIGTERM (its checkpoint) and requeues itself; the requeued job
    resumes the run."""
    path = write_sweep(tmp_path, {"name": "exp", "base": TINY, "grid": {"train.seed": [9]}})
    root = tmp_path / "runs" / "exp"
    pids = root / "train.seed=9" / "pids"

    def signal_the_job():
        deadline = time.time() + hang_after(60)
        while not pids.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        for pid in pids.read_text().split():
            os.kill(int(pid), signal.SIGUSR2)

    threading.Thread(target=signal_the_job, daemon=True).start()
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--executor", "slurm"]) == 0
    summary = json.loads((root / "train.seed=9" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["mode"] == "resumed"
    log = (root / "train.seed=9.log").read_text()
    assert log.count("=== ebslab sweep") == 2  # the first attempt and the requeued one
    assert "SIGTERM: stopping after this step" in log and "=== exit code 143" in log  # it checkpointed
    assert "time limit near, checkpointed; requeueing" in log
    assert "--resume" in log.split("=== ebslab sweep")[2].splitlines()[1]
    assert read_index(root)["train.seed=9"]["status"] == "completed"


@pytest.mark.timeout(120)
def test_stopping_the_sweep_cancels_its_jobs_and_each_run_checkpoints(tmp_path, local_slurm, capsys):
    path = write_sweep(tmp_path, {"name": "exp", "base": TINY, "grid": {"train.seed": [9]}})
    root = tmp_path / "runs" / "exp"

    def stop_when_started():
        deadline = time.time() + hang_after(60)
        while not (root / "train.seed=9" / "pids").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill SWEEP_PID` (Ctrl-C takes the same path)

    threading.Thread(target=stop_when_started, daemon=True).start()
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--executor", "slurm"]) == 130
    err = capsys.readouterr().err
    assert "cancelling 1 Slurm job(s); each run checkpoints" in err and "continue with --resume" in err
    summary = root / "train.seed=9" / "summary.json"
    deadline = time.time() + hang_after(30)
    while not summary.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads(summary.read_text())["status"] == "interrupted"  # the run got its SIGTERM: checkpointed
    assert read_index(root)["train.seed=9"]["status"] == "interrupted"
    assert sw.resume_action(root / "train.seed=9") == "resume"


@pytest.mark.timeout(120)
def test_a_job_requeued_more_than_max_requeues_times_is_a_failed_run(tmp_path, local_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "4")  # what Slurm sets in a job it requeued 4 times
    path = write_sweep(tmp_path, {"name": "exp", "base": TINY, "grid": {"train.seed": [1]}})
    argv = ["sweep", str(path), "--out", str(tmp_path / "runs"), "--executor", "slurm", "--max-requeues", "3"]
    assert main(argv) == 1
    record = read_index(tmp_path / "runs" / "exp")["train.seed=1"]
    assert record["status"] == "failed"
    assert record["message"].endswith("raised: RuntimeError: requeued 4 times, more than --max-requeues 3; "
                                      "--resume continues the run from its checkpoint")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")  # within the limit: it runs
    assert main([*argv, "--resume"]) == 0


def test_a_job_requeued_after_its_run_finished_leaves_the_runs_own_summary_as_the_result(tmp_path):
    """Slurm's requeue signal can land on the run's last step: the run finishes and writes its summary, then the
    requeued job finds it done. Its result must not carry a start time of its own (the sweep reads a summary as
    the job's only when written after the job began): it read 'exited 0 but wrote no summary.json'."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    submitted = time.time() - 5  # when the sweep queued the job, before the run wrote its summary
    spec = slurm.RunSpec(["py", "-m", "ebslab", "train", f"out.dir={tmp_path}", "out.name=r"], {},
                         str(tmp_path / "r.log"), None)
    result = slurm.TrainJob()(spec)
    assert result["returncode"] == 0 and result["started"] is None
    started = result["started"] or submitted  # what the sweep keeps (run_sweep: job.started)
    assert sw.final_status(run, result["returncode"], started) == ("completed", None)


def test_a_requeued_job_decides_resume_or_overwrite_from_the_run_folder(tmp_path):
    run = tmp_path / "r"
    spec = slurm.RunSpec(["py", "-m", "ebslab", "train", "a=1", f"out.dir={tmp_path}", "out.name=r"], {},
                         str(tmp_path / "r.log"), None)
    assert slurm.node_command(spec, 1, {})[1:] == spec.cmd[1:]  # new
    run.mkdir()  # an attempt that died before its first checkpoint
    assert slurm.node_command(spec, 1, {})[-1] == "--overwrite"
    (run / "checkpoints" / "last").mkdir(parents=True)
    from ebslab.loop.checkpoint import LAST_FILES

    for name in LAST_FILES:
        (run / "checkpoints" / "last" / name).write_bytes(b"w")
    assert slurm.node_command(spec, 1, {})[1:] == ["-m", "ebslab", "train", "--resume", str(run)]
    cmd = slurm.node_command(spec, 2, {"EBSLAB_SLURM_NNODES": "1", "EBSLAB_SLURM_HEAD": "node7"})
    assert cmd[1:8] == ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend"]
    assert cmd[10].startswith("node7:") and cmd[-5:] == ["-m", "ebslab", "train", "--resume", str(run)]


# ----------------------------------------------------------------------------------------------------------
# Against a real Slurm (slow): scripts/slurm-test-cluster.sh start; SLURM_CONF from it


def slurm_up() -> bool:
    try:
        return "UP" in subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def real_slurm(monkeypatch):
    if "SLURM_CONF" not in os.environ and Path("/tmp/ebslab-slurm/slurm.conf").exists():
        monkeypatch.setenv("SLURM_CONF", "/tmp/ebslab-slurm/slurm.conf")
    if not slurm_up():
        pytest.skip("no Slurm here: `scripts/slurm-test-cluster.sh start` (or `make test-slurm`)")
    monkeypatch.delenv("EBSLAB_SLURM_CLUSTER", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(slurm, "POLL_S", 1.0)


def squeue(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T"], capture_output=True, text=True).stdout
    return dict(line.split("|") for line in out.split()).get(job_id, "")


def step_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if r["event"] in ("step", "eval")]


def assert_same_run(a: Path, b: Path) -> None:
    """The same losses, metrics and test results, step by step (times and throughput aside)."""
    la, lb = step_lines(a), step_lines(b)
    assert [(r["event"], r["step"]) for r in la] == [(r["event"], r["step"]) for r in lb]
    for ra, rb in zip(la, lb):
        for key in ("train/loss", "lr", "grad_norm", "val/loss", "val/acc", "test/loss", "test/acc"):
            if key in ra or key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert sa["status"] == sb["status"]
    for part in ("test_best", "test_last"):
        for key in ("acc", "loss"):
            assert sa[part][key] == pytest.approx(sb[part][key], rel=1e-6, abs=1e-9)


# 200 steps (a few seconds on an idle host, minutes under load): long enough that a signal sent once 5 step lines
# exist lands mid-training (at 20 steps an idle host finished the run before the signal arrived)
EXACT = {**TINY, "model.dropout": 0, "model.encoder_dropout": 0, "data.limit": 200, "train.epochs": 20,
         "checkpoint.every_steps": 2}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_four_run_sweep_on_slurm_equals_the_same_sweep_run_locally(tmp_path, real_slurm):
    path = write_sweep(tmp_path, {"name": "four", "base": TINY, "grid": {
        "optim.lr": [1.0e-3, 3.0e-4], "train.seed": [1, 2]}})
    assert main(["sweep", str(path), "--out", str(tmp_path / "slurm"), "--executor", "slurm", "--parallel", "2",
                 "--time", "20"]) == 0
    assert main(["sweep", str(path), "--out", str(tmp_path / "local"), "--parallel", "2"]) == 0
    on_slurm, local = tmp_path / "slurm" / "four", tmp_path / "local" / "four"
    index = read_index(on_slurm)
    assert len(index) == 4 and {r["status"] for r in index.values()} == {r["status"] for r in
                                                                         read_index(local).values()}
    submission = next((on_slurm / "slurm").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-3%2" in submission  # one job array, two tasks at once
    for folder in index:
        assert_same_run(on_slurm / folder, local / folder)
        assert "SLURM_JOB_ID" not in (local / f"{folder}.log").read_text()


def sweep_interrupted_mid_training(tmp_path: Path, name: str, signal_cmd: list[str]) -> tuple[Path, str, str]:
    """A one-run EXACT sweep on Slurm whose job gets `signal_cmd JOB_ID` once 5 step lines exist, is requeued, and
    is released at once (Slurm holds a requeued job back for a while: BeginTime); the sweep must end with exit 0.
    Returns the run folder, the run's log and the job id."""
    path = write_sweep(tmp_path, {"name": name, "base": EXACT, "grid": {"train.seed": [1]}})
    run = tmp_path / "slurm" / name / "train.seed=1"
    done: dict[str, int] = {}
    thread = threading.Thread(target=lambda: done.update(rc=main([
        "sweep", str(path), "--out", str(tmp_path / "slurm"), "--executor", "slurm", "--time", "20"])))
    thread.start()
    deadline = time.time() + hang_after(300)
    while time.time() < deadline and not (run / "metrics.jsonl").exists() or \
            sum('"event": "step"' in x for x in (run / "metrics.jsonl").read_text().splitlines()) < 5:
        time.sleep(0.5)
    job_id = json.loads((tmp_path / "slurm" / name / "slurm" / "jobs.json").read_text())["train.seed=1"]
    assert subprocess.run([*signal_cmd, job_id]).returncode == 0
    while time.time() < deadline and squeue(job_id) != "PENDING":
        time.sleep(0.5)
    # Slurm revokes the killed incarnation's credential at a time in whole seconds: a restart within the second of
    # the requeue is refused ("Killing non-startable batch JobId=N: Job credential revoked" in slurmctld.log) and
    # the job ends FAILED. Slurm's own hold (BeginTime) avoids that; released early, the job must wait a second.
    time.sleep(1.1)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    thread.join(hang_after(600))
    assert done.get("rc") == 0
    return run, (tmp_path / "slurm" / name / "train.seed=1.log").read_text(), job_id


def assert_same_as_an_uninterrupted_run(tmp_path: Path, run: Path) -> None:
    assert main(["train", *[f"{k}={sw.format_value(v)}" for k, v in EXACT.items()], "train.seed=1",
                 f"out.dir={tmp_path / 'local'}", "out.name=ref"]) == 0
    assert_same_run(run, tmp_path / "local" / "ref")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_requeued_mid_training_ends_identical_to_an_uninterrupted_one(tmp_path, real_slurm):
    run, log, _ = sweep_interrupted_mid_training(tmp_path, "rq", ["scontrol", "requeue"])
    assert "SIGTERM: stopping after this step" in log and f"--resume {run}" in log
    assert_same_as_an_uninterrupted_run(tmp_path, run)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_cancelled_job_is_a_failed_run_with_slurms_state_and_the_others_complete(tmp_path, real_slurm, capsys):
    path = write_sweep(tmp_path, {"name": "cx", "base": TINY, "grid": {"train.seed": [1, 2]}})
    root = tmp_path / "slurm" / "cx"
    done: dict[str, int] = {}
    thread = threading.Thread(target=lambda: done.update(rc=main([
        "sweep", str(path), "--out", str(tmp_path / "slurm"), "--executor", "slurm", "--parallel", "2",
        "--time", "20"])))
    thread.start()
    deadline = time.time() + hang_after(300)
    while time.time() < deadline and not (root / "train.seed=2" / "metrics.jsonl").exists():
        time.sleep(0.5)
    job_id = json.loads((root / "slurm" / "jobs.json").read_text())["train.seed=2"]
    assert subprocess.run(["scancel", job_id]).returncode == 0
    thread.join(hang_after(600))
    assert done.get("rc") == 1
    index = read_index(root)
    assert index["train.seed=1"]["status"] in sw.DONE
    cancelled = index["train.seed=2"]
    assert cancelled["status"] == "failed"
    assert cancelled["message"].startswith(f"Slurm job {job_id} CANCELLED: ")
    assert cancelled["message"].endswith(sw.last_line(root / "train.seed=2.log"))
    assert f"failed      train.seed=2  (Slurm job {job_id} CANCELLED" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tune_study_with_slurm_jobs_ends_with_exactly_its_trials(tmp_path, real_slurm):
    # a keyword task the tiny model learns: a collapsed trial is never confirmed, so the runs must learn for the
    # confirmation to have its 2 x 2 runs
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    filler = "the a of and to in is it that was for on with as his at by".split()
    rows = [{"text": " ".join([*rng.choice(filler, 3), key, key]), "label": label}
            for key, label in [("apple", "fruit"), ("stone", "rock")] * 80]
    pd.DataFrame(rows).to_parquet(tmp_path / "keywords.parquet")
    base = {**TINY, "data.limit": None, "data.path": str(tmp_path / "keywords.parquet"), "data.max_length": 16,
            "model.dropout": 0.0, "model.pooling": "mean", "train.epochs": 2}
    study = {"name": "st", "base": base, "space": {"optim.lr": {"float": [2.0e-3, 6.0e-3], "log": True}},
             "objective": "val/acc", "trials": 3, "sampler": "random", "confirm": {"top_k": 2, "seeds": [11, 12]}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    assert main(["tune", str(path), "--out", str(tmp_path / "runs"), "--executor", "slurm", "--parallel", "2",
                 "--time", "20"]) == 0
    root = tmp_path / "runs" / "st"
    index = json.loads((root / "study.json").read_text())
    assert [t["folder"] for t in index["trials"]] == ["trial-0000", "trial-0001", "trial-0002"]
    assert all(t["status"] in ("completed", "collapsed") for t in index["trials"])
    assert len(index["confirm"]["runs"]) == 4 and all(r["status"] in ("completed", "collapsed")
                                                      for r in index["confirm"]["runs"])
    # each was a Slurm job: 7 result files under OUT/NAME/slurm, one per run
    assert len(list((root / "slurm").glob("*/*_result.pkl"))) == 7


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_in_one_slurm_job_through_torchrun(tmp_path, real_slurm):
    path = write_sweep(tmp_path, {"name": "ddp", "base": {**TINY, "train.device": "cpu"},
                                  "grid": {"train.seed": [1]}})
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--executor", "slurm", "--procs-per-run", "2",
                 "--cpus-per-run", "2", "--time", "20"]) == 0
    root = tmp_path / "runs" / "ddp"
    assert read_index(root)["train.seed=1"]["status"] in sw.DONE
    log = (root / "train.seed=1.log").read_text()
    assert "torch.distributed.run --nnodes 1 --nproc-per-node 2" in log
    assert "world_size 2" in log
    cfg = yaml.safe_load((root / "train.seed=1" / "config.yaml").read_text())
    assert cfg["derived"]["world_size"] == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_with_leave_jobs_a_stopped_sweep_leaves_its_job_and_resume_watches_it(tmp_path, real_slurm, capsys):
    path = write_sweep(tmp_path, {"name": "lv", "base": EXACT, "grid": {"train.seed": [1]}})
    root = tmp_path / "runs" / "lv"
    argv = ["sweep", str(path), "--out", str(tmp_path / "runs"), "--executor", "slurm", "--time", "20"]

    def stop_when_started():
        deadline = time.time() + hang_after(300)
        while not (root / "train.seed=1" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # as Ctrl-C

    threading.Thread(target=stop_when_started, daemon=True).start()
    assert main([*argv, "--leave-jobs"]) == 130
    job_id = json.loads((root / "slurm" / "jobs.json").read_text())["train.seed=1"]
    assert f"left 1 Slurm job(s) queued or running ({job_id})" in capsys.readouterr().err
    assert squeue(job_id) == "RUNNING"
    assert main([*argv, "--resume"]) == 0
    assert "watching 1 Slurm job(s) of an earlier start" in capsys.readouterr().out
    assert read_index(root)["train.seed=1"]["status"] in sw.DONE
    assert (root / "train.seed=1.log").read_text().count("=== ebslab sweep") == 1  # never submitted twice
    assert json.loads((root / "slurm" / "jobs.json").read_text())["train.seed=1"] == job_id


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_job_signalled_before_its_time_limit_requeues_itself_and_ends_identical(tmp_path, real_slurm):
    """The signal Slurm sends before the time limit (sbatch --signal=USR2@S, to every process of the job's
    steps), sent now with `scancel --signal=USR2` mid-training: the job checkpoints the run through SIGTERM and
    requeues itself (submitit's `scontrol requeue`); the requeued job resumes the run."""
    run, log, job_id = sweep_interrupted_mid_training(tmp_path, "tl", ["scancel", "--signal=USR2"])
    assert f"time limit near, checkpointed; requeueing job {job_id}" in log
    assert "SIGTERM: stopping after this step" in log and f"--resume {run}" in log
    assert_same_as_an_uninterrupted_run(tmp_path, run)
