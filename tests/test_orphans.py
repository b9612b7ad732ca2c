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

from ebslab import sweep as sw
from ebslab.checkpoint import LAST_FILES
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
        [sys.executable, "-c", "import sys; from ebslab import sweep as sw; "
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
    from ebslab.locks import FolderLock
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
