"""The Accelerate backend runs the same loop as the plain torch one and gives the same numbers.

Both runs are made in this process (no interpreter start-up, minutes on a slow host): the torch reference is
conftest.exact_torch_run, and Accelerate's process-wide singletons are reset after its run so that nothing leaks
into other tests.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import EXACT
import yaml


def run_accelerate(tmp_path: Path, name: str) -> tuple[Path, str]:
    from accelerate.state import AcceleratorState, GradientState

    from ebslab.cli import main

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            code = main(["train", *EXACT, "train.backend=accelerate", f"out.dir={tmp_path}", f"out.name={name}"])
    finally:
        # what accelerate's own test cases do between tests: the next Accelerator starts from nothing
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert code == 0, printed.getvalue()[-3000:]
    return tmp_path / name, printed.getvalue()


def steps(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if r["event"] == "step"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def weights(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def weight_rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest element difference over the largest element. (Per tensor it would be noise: a BERT key bias
    gets no gradient in exact arithmetic and sits at ~1e-8.)"""
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a) / max(float(np.abs(a[k]).max()) for k in a)


@pytest.mark.timeout(300)
def test_accelerate_backend_matches_torch_step_by_step(exact_torch_run, tmp_path, monkeypatch):
    torch_run, _ = exact_torch_run
    # what `accelerate launch --gradient_accumulation_steps 4` or a config sets: it must not divide the loss
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    acc_run, out = run_accelerate(tmp_path, "accelerate")
    assert "backend accelerate" in out  # it really went through the Accelerate backend
    derived = yaml.safe_load((acc_run / "config.yaml").read_text())["derived"]
    assert derived["num_train"] % 32 == 1 and derived["accum_steps"] == 4 and derived["world_size"] == 1
    assert derived["precision"] == "fp32"  # train.precision=auto as resolved on the CPU (the report groups by it)

    ref, got = steps(torch_run), steps(acc_run)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 2 * 8 + 1))
    lrs = [r["lr"] for r in ref]
    assert lrs[0] < lrs[3] and lrs[-1] < lrs[5], "warmup then decay: the scheduler steps once per step"
    for a, b in zip(ref, got):
        assert a["micro_step"] == b["micro_step"]
        # grad_norm scales with the gradient: a fixed divisor on the 1-example window would show here
        for key in ("train/loss", "grad_norm", "lr"):
            assert rel(a[key], b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
    assert ref[7]["micro_step"] == 7 * 4 + 1  # the short window is one micro-batch
    assert weight_rel_diff(weights(torch_run), weights(acc_run)) <= 1e-5
    init, last = load_init(), weights(torch_run)
    assert weight_rel_diff({k: last[k] for k in init if k in last}, {k: init[k] for k in init if k in last}) > 1e-3

    s_ref = json.loads((torch_run / "summary.json").read_text())
    s_acc = json.loads((acc_run / "summary.json").read_text())
    assert s_acc["steps"] == s_ref["steps"] == 16
    for key in ("acc", "loss", "n"):
        assert rel(s_ref["test_best"][key], s_acc["test_best"][key]) <= 1e-5


def load_init() -> dict[str, np.ndarray]:
    """The weights before training: a fresh model built with the run's seed."""
    import torch

    from ebslab.core.config import load_config
    from ebslab.inputs.models import build_model, load_tokenizer

    cfg = load_config(None, EXACT)
    model = build_model(cfg.model, 2, cfg.train.seed, load_tokenizer(cfg.model.name)).model
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("backend", ["torch", "accelerate"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_is_refused_on_cpu(tmp_path, capsys, backend, precision):
    from ebslab.cli import main

    code = main(["train", "model.name=tiny-bert", "data.limit=100", f"train.backend={backend}",
                 f"train.precision={precision}", "train.device=cpu", f"out.dir={tmp_path}", "out.name=r"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"train.precision={precision}" in err and "CPU" in err and "fp32" in err  # what, why, the fix
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before any work


@pytest.mark.parametrize("name", ["torch", "accelerate"])
def test_close_waits_for_every_process_before_tearing_down(name, monkeypatch):
    """A process that tears its process group down while a peer is still in a collective aborts it (SIGABRT seen
    once with gloo): both backends meet at a barrier first. The calls are recorded where each backend makes them,
    as a 2-process run of each would need two interpreter start-ups apiece."""
    from accelerate.state import AcceleratorState, GradientState

    import importlib

    from ebslab.loop.backends import make_backend
    from ebslab.core.config import TrainConfig

    torch_backend = importlib.import_module("ebslab.loop.backends.torch")  # `ebslab.loop.backends.torch` is torch itself

    calls: list[str] = []
    backend = make_backend(TrainConfig(backend=name, device="cpu"))
    try:
        if name == "torch":
            backend.world_size = 2  # as under torchrun; the group calls below are the recorded ones
            monkeypatch.setattr(torch_backend.dist, "is_initialized", lambda: True)
            monkeypatch.setattr(torch_backend.dist, "barrier", lambda *a, **k: calls.append("barrier"))
            monkeypatch.setattr(torch_backend.dist, "destroy_process_group", lambda *a: calls.append("teardown"))
        else:
            monkeypatch.setattr(backend.accelerator, "wait_for_everyone", lambda: calls.append("barrier"))
            monkeypatch.setattr(AcceleratorState, "destroy_process_group",
                                lambda self, *a: calls.append("teardown"))
        backend.close()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert calls == ["barrier", "teardown"]
