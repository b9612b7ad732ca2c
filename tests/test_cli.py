"""The command line's own costs: building the parser imports none of the heavy libraries, and every command is
still there, with the arguments its module declares."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ebslab import cli

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "transformers", "pandas", "optuna", "matplotlib", "scipy", "datasets")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_building_the_parser_imports_no_heavy_library():
    done = _python("import json, sys\nfrom ebslab.cli import build_parser\nbuild_parser()\n"
                   f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_a_heavy_library_is_seen_when_it_is_imported():
    """The check above can fail: a command module importing torch shows in sys.modules."""
    done = _python("import json, sys\nimport ebslab.tools.bench\n"
                   f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))")
    assert done.returncode == 0, done.stderr
    assert "torch" in json.loads(done.stdout)


def test_ebslab_help_lists_the_seven_commands():
    done = subprocess.run([sys.executable, "-m", "ebslab", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    commands = done.stdout.split("commands:")[1].split("examples:")[0]
    listed = [line.split()[0] for line in commands.splitlines() if line[:4] == "    " and line[4:5].isalpha()]
    assert listed == ["train", "sweep", "report", "bench", "predict", "export", "tune"]


@pytest.mark.parametrize("name, runner", sorted(cli.RUNNERS.items()))
def test_a_command_runs_its_runner_module(monkeypatch, name, runner):
    import importlib

    module = importlib.import_module(runner)
    monkeypatch.setattr(module, "run", lambda args: 5)
    args, _ = cli.build_parser().parse_known_args([name, "x", "y", "--out", "o"])
    assert args.func(args) == 5


def test_a_missing_runner_module_is_an_error(monkeypatch):
    monkeypatch.setattr(cli, "RUNNERS", {**cli.RUNNERS, "bench": "ebslab.tools.no_such_bench"})
    with pytest.raises(ModuleNotFoundError, match="ebslab.tools.no_such_bench"):
        cli.build_parser()
