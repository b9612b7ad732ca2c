"""One writer per folder: a live holder refuses a second sweep / train with its pid; a dead one's lock is taken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, hang_after

from ebslab.cli import main
from ebslab.core.errors import UserError
from ebslab.core.locks import LOCK_NAME, FolderLock

SRC = str(Path(__file__).resolve().parents[1] / "src")
HOLD = ("import sys; from ebslab.core.locks import FolderLock; lock = FolderLock(sys.argv[1], 'test').acquire(); "
        "print('locked', flush=True); sys.stdin.read()")


@pytest.fixture
def holder():
    """A live process holding the lock of a folder until the test ends."""
    procs = []

    def hold(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=hang_after(30))


def test_a_live_holder_is_named_and_a_released_lock_is_free_again(tmp_path):
    with FolderLock(tmp_path / "f", "sweep"):
        with pytest.raises(UserError, match=rf"sweep folder '.*f' is in use by pid {os.getpid()} .*since"):
            FolderLock(tmp_path / "f", "sweep").acquire()  # a second open file: flock refuses it, in-process too
    with FolderLock(tmp_path / "f", "sweep") as again:
        assert json.loads((tmp_path / "f" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert again.fd is None and (tmp_path / "f" / LOCK_NAME).read_text() == ""


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, holder):
    proc = holder(tmp_path / "f")
    with pytest.raises(UserError, match=f"in use by pid {proc.pid} "):
        FolderLock(tmp_path / "f", "run").acquire()
    proc.kill()
    proc.wait(timeout=hang_after(30))
    assert json.loads((tmp_path / "f" / LOCK_NAME).read_text())["pid"] == proc.pid  # its file is still there
    with FolderLock(tmp_path / "f", "run"):
        assert json.loads((tmp_path / "f" / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_second_sweep_on_a_live_sweep_folder_is_one_line_exit_2(tmp_path, holder, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "exp", "base": {"model.name": "tiny-bert"},
                                     "grid": {"train.seed": [1, 2]}}))
    proc = holder(tmp_path / "runs" / "exp")
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "runs"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ebslab: error: sweep folder '{tmp_path / 'runs' / 'exp'}' is in "
                                               f"use by pid {proc.pid} ")
    assert sorted(p.name for p in (tmp_path / "runs" / "exp").iterdir()) == [LOCK_NAME]  # nothing was started


def test_a_second_train_into_a_live_run_folder_is_one_line_exit_2(tmp_path, holder, train_run, capsys):
    run = train_run()
    before = (run / "metrics.jsonl").read_text()
    proc = holder(run)
    assert main(["train", *TINY, f"out.dir={tmp_path}", f"out.name={run.name}", "--overwrite"]) == 2
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == err[-2]  # --overwrite and --resume alike
    assert err[-1].startswith(f"ebslab: error: run folder '{run}' is in use by pid {proc.pid} ")
    assert (run / "metrics.jsonl").read_text() == before  # neither --overwrite nor --resume touched it
