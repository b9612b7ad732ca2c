"""Data parallel on CPU (gloo): 2 processes x micro 8 x accum 2 is 1 process x micro 8 x accum 4, step by step,
through torchrun and through `accelerate launch`; only rank 0 writes the run folder; evaluation counts every
example exactly once."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EXACT, hang_after
import yaml

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(out: Path, name: str, *overrides: str, launcher: list[str] | None = None) -> tuple[Path, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [*(launcher or [sys.executable, "-m"]), "ebslab", "train", *EXACT, *overrides, f"out.dir={out}",
           f"out.name={name}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=hang_after(280))
    # the workers' own lines (a C++ abort's "what():") come before torchrun's long failure summary: keep both
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-15000:]}"
    return out / name, done.stdout


def steps(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if r["event"] == "step"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def weight_rel_diff(a: Path, b: Path) -> float:
    """Largest element difference over the largest element (a BERT key bias gets no gradient in exact
    arithmetic and sits at ~1e-8, so a per-tensor ratio would measure noise)."""
    from safetensors.numpy import load_file

    wa, wb = (load_file(r / "checkpoints" / "last" / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) / max(float(np.abs(wa[k]).max()) for k in wa)


@pytest.fixture(scope="module")
def single(exact_torch_run) -> tuple[Path, dict[str, int]]:
    """The reference: 1 process x micro 8 x accum 4, and the split sizes it printed."""
    run, out = exact_torch_run
    sizes = re.search(r"train (\d+) / val (\d+) / test (\d+)", out)
    assert sizes, out
    return run, dict(zip(("train", "val", "test"), map(int, sizes.groups())))


def check_same_as_single(single: tuple[Path, dict[str, int]], run: Path, out: str, micro: int = 8) -> None:
    ref_run, sizes = single
    assert sizes == {"train": 225, "val": 27, "test": 27}
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    accum = 32 // (2 * micro)
    assert (derived["world_size"], derived["micro"], derived["accum_steps"]) == (2, micro, accum)
    assert f"effective_batch 32 = micro {micro} x accum_steps {accum} x world_size 2" in out

    ref, got = steps(ref_run), steps(run)
    # one line per step: a second process writing metrics.jsonl would double them
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 17))
    for a, b in zip(ref, got):
        for key in ("train/loss", "train/acc", "grad_norm", "lr"):
            assert rel(a[key], b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
    # micro_step counts this process's passes: accum per full window, 1 (a real one or a stand-in) on the short one
    assert [r["micro_step"] for r in got][7::8] == [7 * accum + 1, 2 * (7 * accum + 1)]
    assert weight_rel_diff(ref_run, run) <= 1e-5

    assert out.count("ebslab run ") == 1  # only rank 0 prints the start-up text...
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in ref_run.iterdir() if not p.name.startswith("."))  # ...and writes the same folder
    s_ref, s = (json.loads((r / "summary.json").read_text()) for r in (ref_run, run))
    assert s["status"] == s_ref["status"] and s["steps"] == 16
    assert s["test_best"]["n"] == s["test_last"]["n"] == sizes["test"]  # each test example once
    assert s["val_best"]["n"] == sizes["val"]
    for key in ("acc", "loss"):
        assert rel(s_ref["test_best"][key], s["test_best"][key]) <= 1e-5
        assert rel(s_ref["val_best"][key], s["val_best"][key]) <= 1e-5
    import pandas as pd

    pred = pd.read_parquet(run / "predictions" / "test_best.parquet")
    assert sorted(pred["index"]) == list(range(sizes["test"]))


@pytest.mark.timeout(300)
# against 1 process x micro 8 x accum 4: world size; then world size and micro together (a third process start)
@pytest.mark.parametrize("micro", [8, pytest.param(4, marks=pytest.mark.slow)])
def test_torchrun_two_processes_match_one(single, tmp_path, micro):
    run, out = run_cli(tmp_path, "torchrun", f"batch.micro={micro}",
                       launcher=[str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                                 "-m"])
    assert "backend torch" in out
    check_same_as_single(single, run, out, micro)


@pytest.mark.slow  # the same check as torchrun, through `accelerate launch`
@pytest.mark.timeout(300)
def test_accelerate_launch_two_processes_match_one(single, tmp_path):
    run, out = run_cli(tmp_path, "accelerate", "train.backend=accelerate",
                       launcher=[str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                 "--main_process_port", str(free_port()), "-m"])
    assert "backend accelerate" in out
    check_same_as_single(single, run, out)


def torchrun() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m"]


@pytest.mark.slow  # three 2-process runs
@pytest.mark.timeout(300)
def test_two_process_run_stopped_by_sigterm_resumes_to_the_same_result(tmp_path, chance):
    """Dropout on, so each rank's own RNG stream must come back; SIGTERM must stop both ranks at one step."""
    import signal
    import time

    k = chance.randint(2, 10)  # of 16 steps: torchrun's forwarding has time to land before the run ends
    print(f"[2-process sigterm] k={k}")

    dropout = ["model.dropout=0.1", "model.encoder_dropout=0.1", "checkpoint.every_steps=1"]
    ref, _ = run_cli(tmp_path, "ref", *dropout, launcher=torchrun())

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "stopped"
    proc = subprocess.Popen([*torchrun(), "ebslab", "train", *EXACT, *dropout, f"out.dir={tmp_path}",
                             "out.name=stopped"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + hang_after(200)
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(steps(run)) >= k:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    out, err = proc.communicate(timeout=hang_after(200))
    assert (run / "summary.json").exists(), err[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and k <= summary["steps"] < 16

    resumed = subprocess.run([*torchrun(), "ebslab", "train", "--resume", str(run)], env=env,
                             capture_output=True, text=True, timeout=hang_after(280))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = steps(ref), steps(run)
    assert [r["step"] for r in b] == list(range(1, 17))
    for x, y in zip(a, b):
        assert rel(x["train/loss"], y["train/loss"]) <= 1e-6, (x["step"], x["train/loss"], y["train/loss"])
    assert weight_rel_diff(ref, run) <= 1e-6
