"""A sweep (or tuner) killed with -9 loses nothing: its runs get a SIGTERM from the kernel (they checkpoint and
stop), and `--resume` waits for any run still going instead of starting it a second time beside itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import hang_after, install_fake_train

from ebslab.experiments import sweep as sw
from ebslab.loop.checkpoint import LAST_FILES
from ebslab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _wait(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.time() + hang_after(timeout)
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(60)
def test_a_run_gets_sigterm_when_the_process_that_started_it_is_killed_with_9(tmp_path):
    """run_process (both executors' and the tuner's way to start `ebslab train`): kill -9 of the starter does not
    leave the run going unnoticed; it gets the SIGTERM that makes ebslab train checkpoint and stop."""
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        folder = Path({str(tmp_path)!r})
        def on_term(*_):
            (folder / "got-sigterm").write_text(str(os.getpid()))
            sys.exit(143)
        signal.signal(signal.SIGTERM, on_term)
        (folder / "child-pid").write_text(str(os.getpid()))
        time.sleep(60)
    """))
    starter = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ebslab.experiments import sweep as sw; "
         f"sw.run_process([sys.executable, {str(child)!r}], {{}}, {str(tmp_path / 'run.log')!r}, None, "
         "on_start=lambda p: None)"], env=_env())
    try:
        _wait(lambda: (tmp_path / "child-pid").exists(), "the run to start")
        pid = int((tmp_path / "child-pid").read_text())
        starter.kill()  # SIGKILL: no handler, no cleanup in the starter
        starter.wait()
        _wait(lambda: (tmp_path / "got-sigterm").exists(), "the run's SIGTERM", timeout=10)
        _wait(lambda: not _alive(pid), "the run to end", timeout=10)
    finally:
        starter.kill()
        if (tmp_path / "child-pid").exists():
            try:
                os.kill(int((tmp_path / "child-pid").read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


FAKE = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    args = sys.argv[1:]
    if args[0] == "--resume":
        run, mode = Path(args[1]), "resumed"
    else:
        kv = dict(a.split("=", 1) for a in args if "=" in a)
        run, mode = Path(kv["out.dir"]) / kv["out.name"], "new"
        run.mkdir(parents=True, exist_ok=True)
    (run / "summary.json").write_text(json.dumps({"status": "completed", "mode": mode, "duration_s": 1.0}))
''')

HOLDER = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    from ebslab.core.locks import FolderLock
    run = Path(sys.argv[1])
    with FolderLock(run, "run"):
        (run / "holding").write_text("")
        sweep_lock = run.parent / ".ebslab.lock"  # the resumed sweep has started: end a moment later
        deadline = time.time() + 300
        while time.time() < deadline and not (sweep_lock.exists() and sweep_lock.read_text()):
            time.sleep(0.05)
        time.sleep(float(sys.argv[2]))
        (run / "summary.json").write_text(json.dumps({"status": "completed", "mode": "orphan",
                                                      "duration_s": 2.0}))
''')


@pytest.mark.timeout(60)
def test_resume_waits_for_a_run_left_going_and_never_starts_it_twice(tmp_path, monkeypatch, capsys):
    install_fake_train(tmp_path, monkeypatch, FAKE)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", "base": {"model.name": "tiny-bert"},
                                    "grid": {"train.seed": [1, 2]}}))
    root = tmp_path / "runs" / "exp"
    orphan = root / "train.seed=1"
    (orphan / "checkpoints" / "last").mkdir(parents=True)
    for name in LAST_FILES:
        (orphan / "checkpoints" / "last" / name).write_bytes(b"w")
    (orphan / "metrics.jsonl").write_text("")
    # the run a killed sweep left: it holds its folder's lock for a while, then finishes on its own
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(orphan), "1"], env=_env())
    try:
        _wait(lambda: (orphan / "holding").exists(), "the orphan to hold its lock")
        assert sw.live_run(orphan)["pid"] == holder.pid
        rc = main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--resume"])
    finally:
        holder.wait(timeout=hang_after(30))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"train.seed=1: still running as pid {holder.pid}" in out
    index = {r["folder"]: r for r in json.loads((root / "sweep.json").read_text())["runs"]}
    assert {k: v["status"] for k, v in index.items()} == {"train.seed=1": "completed", "train.seed=2": "completed"}
    assert index["train.seed=1"]["action"] == "skip"  # it finished while waited for: nothing left to run
    assert json.loads((orphan / "summary.json").read_text())["mode"] == "orphan"  # never started a second time
    assert not (root / "train.seed=1.log").exists()
    assert json.loads((root / "train.seed=2" / "summary.json").read_text())["mode"] == "new"
    assert sw.live_run(orphan) is None


# ------------------------------------------------------------------------------------------------ the real thing

RUN = {"model.name": "tiny-bert", "data.limit": 75, "data.max_length": 32, "batch.effective": 16,
       "batch.micro": 8, "train.epochs": 2, "model.dropout": 0.1, "model.encoder_dropout": 0.1, "optim.lr": 1e-3,
       "checkpoint.every_steps": 1}
TOTAL_STEPS = 8


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return [r["step"] for r in map(json.loads, filter(None, lines)) if r.get("event") == "step"]


@pytest.mark.slow  # two real sweeps of two tiny runs each (about a minute on a quiet 2-core host)
@pytest.mark.timeout(300)
def test_kill_9_of_a_real_sweep_then_resume_completes_every_run_once_as_if_uninterrupted(tmp_path, chance):
    from safetensors.torch import load_file

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", "base": RUN, "grid": {"train.seed": [1, 2]}}))
    assert main(["sweep", str(path), "--out", str(tmp_path / "ref")]) == 0

    k = chance.randint(1, TOTAL_STEPS - 2)
    first = tmp_path / "runs" / "exp" / "train.seed=1"
    sweep = subprocess.Popen([sys.executable, "-m", "ebslab", "sweep", str(path), "--out", str(tmp_path / "runs")],
                             env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: bool(_steps(first)) and _steps(first)[-1] >= k, f"step {k} of the first run", timeout=120)
    finally:
        sweep.kill()
        sweep.wait()
    rc = main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--resume"])
    assert rc == 0
    index = json.loads((tmp_path / "runs" / "exp" / "sweep.json").read_text())["runs"]
    ref_index = json.loads((tmp_path / "ref" / "exp" / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in index] == [r["status"] for r in ref_index]  # collapsed: a tiny random model
    assert all(r["status"] in sw.DONE and r["returncode"] == 0 for r in index)
    for seed in (1, 2):
        ref, run = tmp_path / "ref" / "exp" / f"train.seed={seed}", tmp_path / "runs" / "exp" / f"train.seed={seed}"
        assert _steps(run) == list(range(1, TOTAL_STEPS + 1))
        wa = load_file(str(ref / "checkpoints" / "last" / "model.safetensors"))
        wb = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
        assert max((wa[n].double() - wb[n].double()).abs().max().item() for n in wa) <= 1e-6
        s_ref, s = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
        assert s["status"] == s_ref["status"] and s["steps"] == s_ref["steps"] == TOTAL_STEPS
        for part in ("val_best", "test_best", "test_last"):
            assert s[part] == pytest.approx(s_ref[part], abs=1e-6)
    log = (tmp_path / "runs" / "exp" / "train.seed=1.log").read_text()
    # the orphan got its SIGTERM and checkpointed; the resume continued from there, never beside it
    assert "SIGTERM: stopping after this step" in log and "in use by" not in log


@pytest.mark.timeout(120)
def test_tune_resume_waits_for_a_trial_left_going_and_never_starts_it_twice(tmp_path, monkeypatch, capsys):
    """The tuner killed while trial-0002 ran (here: stopped, then its run found still going): --resume waits for
    the run, takes the result it leaves, and never starts `ebslab train` for it a second time."""
    import threading

    from test_tune import FAKE_TRAIN, study_with, write_study

    install_fake_train(tmp_path, monkeypatch, FAKE_TRAIN)
    monkeypatch.setenv("FAKE_HANG_AT", "trial-0002")
    path = write_study(tmp_path, study_with(trials=3, confirm={"top_k": 2, "seeds": [11, 12]}))
    root = tmp_path / "runs" / "st"

    def stop_when_started():
        deadline = time.time() + hang_after(30)
        while not (root / "trial-0002" / "started").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_started, daemon=True).start()
    assert main(["tune", str(path), "--out", str(tmp_path / "runs")]) == 130
    trial = root / "trial-0002"
    assert (trial / "attempts").read_text() == "new 2\n"
    (trial / "summary.json").unlink()
    # its run still going (a killed tuner's orphan): it ends on its own with a result
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.replace(
        '"mode": "orphan",', '"mode": "orphan", "val_best": {"acc": 0.77}, "test_best": {"acc": 0.76},'),
        str(trial), "1"], env=_env())
    try:
        _wait(lambda: (trial / "holding").exists(), "the orphan to hold its lock")
        capsys.readouterr()
        assert main(["tune", str(path), "--out", str(tmp_path / "runs"), "--resume"]) == 0
    finally:
        holder.wait(timeout=hang_after(30))
    assert f"trial-0002: still running as pid {holder.pid}" in capsys.readouterr().out
    assert (trial / "attempts").read_text() == "new 2\n"  # never started again
    index = json.loads((root / "study.json").read_text())
    entry = next(t for t in index["trials"] if t["folder"] == "trial-0002")
    assert entry["status"] == "completed" and entry["value"] == pytest.approx(0.77)


def test_a_failed_runs_message_is_what_it_said_never_a_progress_bar_fragment(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("=== ebslab sweep 2026-01-01\n$ python -m ebslab train\nloading data\n"
                   "\rtrain:   0%|          | 0/8 [00:00<?, ?step/s]\rtrain:  38%|###8      | 3/8 [00:04<00:06]")
    status, message = sw.final_status(tmp_path / "run", -9, time.time(), log)
    assert (status, message) == ("failed", "exit code -9: loading data")
    log.write_text("ebslab: error: run folder 'x' is in use by pid 1\n\rtrain:  38%|###8      | 3/8\n=== exit code 2\n")
    assert sw.final_status(tmp_path / "run", 2, time.time(), log)[1] == \
        "exit code 2: ebslab: error: run folder 'x' is in use by pid 1"
