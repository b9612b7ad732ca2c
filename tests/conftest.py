import contextlib
import io
import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# tiny models: one thread is faster than two fighting over 2 cores, and subprocess runs inherit it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]

# Every timeout in these tests catches a hang, never slowness: CI has run on hosts 10-20x slower than a quiet one
# (steal time; `import torch` took 20-80 s and the suite 31 minutes instead of 3), so all of them, pytest-timeout
# marks and waits on subprocesses alike, are scaled by one factor.
TIMEOUT_SCALE = float(os.environ.get("EBSLAB_TEST_TIMEOUT_SCALE", "10"))


def hang_after(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


def pytest_collection_modifyitems(items):
    for item in items:
        mark = item.get_closest_marker("timeout")
        if mark is not None and mark.args:
            item.add_marker(pytest.mark.timeout(hang_after(mark.args[0])), append=False)


TINY = ["model.name=tiny-bert", "data.max_length=32", "data.limit=250", "train.epochs=1",
        "batch.effective=32", "batch.micro=8", "optim.lr=1e-3"]


@pytest.fixture(scope="session", autouse=True)
def _token_cache(tmp_path_factory):
    os.environ["EBSLAB_CACHE"] = str(tmp_path_factory.mktemp("ebslab-cache"))


# The exact-arithmetic setting that the Accelerate backend and 2-process runs must match step by step: train 225 =
# 7 x 32 + 1, so every epoch ends in a window of ONE example (and rank 1 of 2 runs a stand-in micro-batch); val and
# test have 27 examples each, an odd count that 2 processes cannot split evenly
EXACT = ["model.name=tiny-bert", "data.max_length=32", "data.limit=279", "train.epochs=2",
         "batch.effective=32", "batch.micro=8", "model.dropout=0", "model.encoder_dropout=0",
         "optim.lr=1e-3", "optim.weight_decay=0.01", "optim.clip_norm=1.0",
         "sched.name=linear", "sched.warmup_ratio=0.2", "train.device=cpu"]


@pytest.fixture(scope="session")
def exact_torch_run(tmp_path_factory) -> tuple[Path, str]:
    """`ebslab train EXACT`, torch backend, 1 process, run once in this process (no interpreter start-up): the
    reference for test_backends and test_distributed. Returns the run folder and what it printed."""
    from ebslab.cli import main

    out, printed = tmp_path_factory.mktemp("exact"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", *EXACT, f"out.dir={out}", "out.name=torch"])
    assert code == 0, printed.getvalue()[-3000:]
    return out / "torch", printed.getvalue()


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def train_run(tmp_path):
    """Run `ebslab train` in-process with tiny defaults; returns the run folder."""
    from ebslab.cli import main

    counter = iter(range(1000))

    def run(*overrides, expect=0, base=TINY):
        name = f"run{next(counter)}"
        code = main(["train", *base, *overrides, f"out.dir={tmp_path}", f"out.name={name}"])
        assert code == expect, f"exit code {code}"
        return tmp_path / name

    return run


def install_fake_train(tmp_path, monkeypatch, source: str):
    """Sweeps and studies start `source` (a stand-in for `ebslab train`, given LAST_FILES and hang_after) instead."""
    import sys

    from ebslab import sweep as sw
    from ebslab.checkpoint import LAST_FILES

    script = tmp_path / "fake_train.py"
    script.write_text(f"LAST_FILES = {LAST_FILES!r}\nhang_after = lambda s: s * {TIMEOUT_SCALE!r}\n" + source)
    real = sw.train_command
    monkeypatch.setattr(sw, "train_command", lambda *a, **k: [sys.executable, str(script)] + real(*a, **k)[4:])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return script


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """train.precision=fp16 through the real backend and loop (its GradScaler, unscale, skip), computing in fp32:
    fp16 matmuls on CPU are refused for their speed, and the scaler's arithmetic does not depend on them."""
    import contextlib

    import ebslab.backends.torch as tb

    monkeypatch.setattr(tb, "resolve_precision", lambda precision, device: precision)
    monkeypatch.setattr(tb.TorchBackend, "autocast", lambda self: contextlib.nullcontext())
    return ["train.precision=fp16", "train.device=cpu"]
