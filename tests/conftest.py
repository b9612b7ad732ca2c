import contextlib
import io
import json
import os
import random
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


# Kill and signal tests draw the step (and delay) at which they strike, so that over many runs they land
# everywhere; one seed per session, printed, and EBSLAB_TEST_SEED=<it> draws the same again
CHANCE_SEED = int(os.environ.get("EBSLAB_TEST_SEED") or random.SystemRandom().randrange(2**32))


@pytest.fixture
def chance(request) -> random.Random:
    """This test's own generator, from (seed, test id): its draws do not depend on which other tests ran before
    it, so `EBSLAB_TEST_SEED=<printed> pytest -k <the test>` replays a failure of the full suite. Printed in the
    test's captured output (shown with its failure)."""
    print(f"[{request.node.nodeid}] EBSLAB_TEST_SEED={CHANCE_SEED}")
    return random.Random(f"{CHANCE_SEED}:{request.node.nodeid}")


def pytest_report_header(config):
    return f"kill/signal tests: EBSLAB_TEST_SEED={CHANCE_SEED}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # in the failure's report itself: a test that reads capsys consumes what the fixture printed
    report = (yield).get_result()
    if report.failed and "chance" in getattr(item, "fixturenames", ()):
        report.sections.append(("kill/signal draws", f"replay: EBSLAB_TEST_SEED={CHANCE_SEED} python -m pytest "
                                                     f"'{item.nodeid}'"))


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

    from ebslab.experiments import sweep as sw
    from ebslab.loop.checkpoint import LAST_FILES

    script = tmp_path / "fake_train.py"
    script.write_text(f"LAST_FILES = {LAST_FILES!r}\nhang_after = lambda s: s * {TIMEOUT_SCALE!r}\n" + source)
    real = sw.train_command
    monkeypatch.setattr(sw, "train_command", lambda *a, **k: [sys.executable, str(script)] + real(*a, **k)[4:])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return script


@pytest.fixture
def fsync_log(monkeypatch):
    """Records every fsync and rename. `fsync_log.durable(path)`: `path` was last written as ebslab.core.files writes,
    a temporary file fsynced, renamed onto `path`, then its folder fsynced (else a power cut can leave it empty)."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", str(Path(src).resolve()), str(Path(dst).resolve())))
        return real_replace(src, dst, **kw)

    def durable(path) -> bool:
        path = Path(path).resolve()
        renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(path)]
        if not renames:
            return False
        i = renames[-1]
        return ("fsync", events[i][1]) in events[:i] and ("fsync", str(path.parent)) in events[i + 1:]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    log = type("FsyncLog", (), {})()
    log.events, log.durable = events, durable
    return log


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """train.precision=fp16 through the real backend and loop (its GradScaler, unscale, skip), computing in fp32:
    fp16 matmuls on CPU are refused for their speed, and the scaler's arithmetic does not depend on them."""
    import contextlib

    import ebslab.loop.backends.torch as tb

    monkeypatch.setattr(tb, "resolve_precision", lambda precision, device: precision)
    monkeypatch.setattr(tb.TorchBackend, "autocast", lambda self: contextlib.nullcontext())
    return ["train.precision=fp16", "train.device=cpu"]
