"""`make gpu-check`: the five-minute check of ebslab's GPU paths, one table at the end.

Offline: base-size encoders with random weights (BertConfig(), RoBERTa and ModernBERT at their base sizes) are
built locally with the packaged MiniLM vocabulary, and trained on the local IMDB rows. Each check is one row:
what ran, the numbers, and `ok` / `FAIL`. Nothing here is a test of the loss rule (the CPU suite pins that); it
catches what only a GPU shows: host syncs, kernels, precision, memory, launchers.

Run: `python -m ebslab.tools.gpucheck [--out DIR] [--steps N]`. Without CUDA it exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ebslab.core import runfolder
from ebslab.core.tables import md_table

MODELS = ("bert", "roberta", "modernbert")
LENGTHS = (128, 512)


@dataclass
class Row:
    check: str
    result: str  # the measured numbers, short
    ok: bool | None  # None: measured, no pass/fail rule

    @property
    def verdict(self) -> str:
        return "-" if self.ok is None else ("ok" if self.ok else "FAIL")


def table(rows: list[Row]) -> str:
    """The check's one table, in markdown (it goes into docs/performance.md as printed)."""
    markdown = md_table(["check", "result", "verdict"], [(r.check, r.result, r.verdict) for r in rows])
    failed = sum(r.ok is False for r in rows)
    return f"{markdown}\n\n{len(rows)} checks, {failed} failed"


@dataclass
class Syncs:
    """Host syncs over a whole run, by where they came from: the training steps, the evaluations (val + test
    scoring, the final test included), the checkpoints (weights and state copied to the host); `reads` = the steps
    at which the loop reads the device by design (log, evaluation and checkpoint steps)."""

    steps: int = 0
    reads: int = 0
    training: int = 0
    evaluations: int = 0
    in_evaluation: int = 0
    in_checkpoint: int = 0

    @property
    def total(self) -> int:
        return self.training + self.in_evaluation + self.in_checkpoint

    @property
    def ok(self) -> bool:
        """A training step syncs only where the loop reads by design: once, or twice with a callback's read of the
        same step (the noise scale); any other sync would be one per step."""
        return self.training <= 2 * self.reads

    def text(self) -> str:
        per_eval = f"{self.in_evaluation / self.evaluations:.0f}" if self.evaluations else "-"
        per_step = self.training / max(self.steps, 1)
        return (f"host syncs {self.total}: {self.training} in {self.steps} steps ({per_step:.2f}/step, {self.reads} "
                f"reads), {per_eval} per evaluation, {self.in_checkpoint} in checkpoints")


def throughput_row(name: str, summary: dict[str, Any], wall_s: float, syncs: Syncs | None) -> Row:
    """Logged rate (summary) against samples over the wall time from the fit's start to its last host read (no
    evaluation in between): honest when they agree within 15%."""
    logged = summary.get("train_samples_per_s") or 0.0
    wall = summary["samples"] / wall_s if wall_s > 0 else 0.0
    ok = summary["status"] in ("completed", "collapsed") and wall > 0 and abs(logged / wall - 1) <= 0.15
    text = f"{logged:.0f} samples/s logged, {wall:.0f} wall"
    if syncs is not None:
        text += f", {syncs.text()}"
        ok = ok and syncs.ok
    return Row(name, text, ok)


def require_cuda() -> None:
    import torch

    from ebslab.core.errors import UserError

    if not torch.cuda.is_available():
        raise UserError("make gpu-check needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                        "run it on a GPU machine")


def build_local_models(root: Path) -> dict[str, Path]:
    """Base-size random-weight encoders saved with the MiniLM tokenizer: usable as model.name=<folder>."""
    from transformers import AutoModel, BertConfig, ModernBertConfig, RobertaConfig

    from ebslab.inputs.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    vocab = len(tokenizer)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
               eos_token_id=tokenizer.sep_token_id)
    configs = {"bert": BertConfig(vocab_size=vocab),
               "roberta": RobertaConfig(vocab_size=vocab, max_position_embeddings=514, type_vocab_size=1, **ids),
               "modernbert": ModernBertConfig(vocab_size=vocab, **ids, cls_token_id=tokenizer.cls_token_id,
                                              sep_token_id=tokenizer.sep_token_id)}
    paths = {}
    for name, config in configs.items():
        folder = root / name
        if not (folder / "config.json").exists():
            AutoModel.from_config(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        paths[name] = folder
    return paths


def sync_phase(frame: Any) -> str:
    """Where a host sync came from, by the stack it was raised in: `evaluation` (ebslab.loop.evaluate), `checkpoint`
    (ebslab.loop.checkpoint, or the trainer's save_last / save_best: the callbacks' state is copied there), else
    `training`."""
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if path.endswith("ebslab/loop/evaluate.py"):
            return "evaluation"
        if path.endswith("ebslab/loop/checkpoint.py") or frame.f_code.co_name in ("save_last", "save_best"):
            return "checkpoint"
        frame = frame.f_back
    return "training"


def _sync_counter(count: bool) -> Any:
    from ebslab.loop.callbacks import Callback

    class SyncCounter(Callback):
        """Wall time from the fit's start to the last read of the training steps and, when `count`, every host sync
        of the run from the fit's start to its summary (evaluations, checkpoints and the final test included), by
        phase: torch's CUDA sync debug mode warns at each one."""

        def __init__(self) -> None:
            self.syncs = Syncs()
            self.read_steps: set[int] = set()
            self.started = self.last_read = 0.0
            self.counting = False

        def on_fit_start(self, trainer: Any) -> None:
            self.started = time.perf_counter()
            self.counting = count
            if count:
                set_sync_debug_mode("warn")

        def sync(self, frame: Any) -> None:
            if self.counting:
                phase = sync_phase(frame)
                if phase == "training":
                    self.syncs.training += 1
                else:
                    setattr(self.syncs, f"in_{phase}", getattr(self.syncs, f"in_{phase}") + 1)

        def on_step(self, trainer: Any, record: dict | None) -> None:
            self.syncs.steps += 1
            if record is not None:
                self.last_read = time.perf_counter()
                self.read_steps.add(trainer.state.step)

        def on_eval(self, trainer: Any, record: dict) -> None:
            self.syncs.evaluations += 1
            self.read_steps.add(trainer.state.step)  # the loop evaluates only at a step it has read

        def on_fit_end(self, trainer: Any, summary: dict) -> None:
            self.syncs.reads = len(self.read_steps)
            if self.counting:
                set_sync_debug_mode(0)
            self.counting = False

    return SyncCounter()


def set_sync_debug_mode(mode: Any) -> None:
    import torch

    torch.cuda.set_sync_debug_mode(mode)


def _train_in_process(overrides: list[str], count_syncs: bool) -> tuple[dict, float, Syncs | None]:
    import inspect

    from ebslab.core.config import load_config
    from ebslab.loop.train import train

    counter = _sync_counter(count_syncs)
    shown = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" in str(message).lower():
            counter.sync(inspect.currentframe().f_back)  # the frame that warned
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        summary = train(load_config(None, overrides), overwrite=True, callbacks=[counter])
    return summary, counter.last_read - counter.started, counter.syncs if count_syncs else None


def _ebslab(args: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ebslab", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _summary(run: Path) -> dict[str, Any]:
    """The run's summary; a run that wrote none (it crashed) reads as failed with no figures."""
    return runfolder.read_summary(run) or {"status": "failed", "steps": 0, "train_samples_per_s": None}


def run_checks(out: Path, steps: int) -> list[Row]:
    models = build_local_models(out / "models")
    common = ["data.limit=4000", f"train.max_steps={steps}", "batch.effective=32", "batch.micro=32",
              f"train.log_every_steps={steps}", f"out.dir={out}"]  # the last step is logged: its read is timed
    rows: list[Row] = []

    def guarded(name: str, check: Callable[[], Row]) -> None:
        try:
            rows.append(check())
        except Exception as e:  # noqa: BLE001 - one failed check is a FAIL row, the others still run
            rows.append(Row(name, f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}", False))
        print(rows[-1].check, rows[-1].result, rows[-1].verdict, flush=True)

    for model, path in models.items():
        for length in LENGTHS:
            name = f"{model} bf16 L{length}"
            overrides = [*common, f"model.name={path}", f"data.max_length={length}", "train.precision=bf16",
                         f"out.name={model}-{length}"]
            guarded(name, lambda o=overrides, n=name: throughput_row(n, *_train_in_process(o, count_syncs=True)))

    bert = [*common, f"model.name={models['bert']}", "data.max_length=128"]

    def fp16_clip() -> Row:
        summary, wall, _ = _train_in_process([*bert, "train.precision=fp16", "optim.clip_norm=1.0",
                                              "out.name=fp16"], count_syncs=False)
        return Row("bert fp16 + clip_norm 1", f"status {summary['status']}",
                   summary["status"] in ("completed", "collapsed"))

    def accelerate() -> Row:
        done = _ebslab(["train", *bert, "train.backend=accelerate", "out.name=accelerate"], 600)
        summary = _summary(out / "accelerate")
        return Row("accelerate backend", f"exit {done.returncode}, {summary['train_samples_per_s'] or 0:.0f} "
                                         "samples/s", done.returncode == 0)

    def compiled() -> Row:
        done = _ebslab(["train", *bert, "train.compile=true", "out.name=compile"], 600,
                       env={"TORCH_LOGS": "recompiles"})
        recompiles = done.stderr.lower().count("recompiling function")
        return Row("train.compile", f"exit {done.returncode}, {recompiles} recompiles",
                   done.returncode == 0 and recompiles <= 2)

    def auto_micro() -> Row:
        done = _ebslab(["train", *common, f"model.name={models['bert']}", "data.max_length=512",
                        "batch.effective=256", "batch.micro=auto", "train.max_steps=3", "out.name=auto"], 600)
        chosen = [line for line in done.stderr.splitlines() if line.startswith("batch.micro=auto =>")]
        return Row("batch.micro=auto at 512", chosen[0].split(":")[0] if chosen else f"exit {done.returncode}",
                   done.returncode == 0 and bool(chosen))

    def sigterm_resume() -> Row:
        args = ["train", *bert, f"train.max_steps={4 * steps}", "checkpoint.every_steps=5", "out.name=resume"]
        proc = subprocess.Popen([sys.executable, "-m", "ebslab", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and len(runfolder.read_metrics(out / "resume")) < 10:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stopped = proc.wait(timeout=300)
        resumed = _ebslab(["train", "--resume", str(out / "resume")], 600)
        summary = _summary(out / "resume")
        return Row("SIGTERM + resume", f"exit {stopped} then {resumed.returncode}, {summary['steps']} steps",
                   stopped == 128 + signal.SIGTERM and resumed.returncode == 0 and summary["steps"] == 4 * steps)

    def bench() -> Row:
        done = _ebslab(["bench", "--quick", "--out", str(out / "bench")], 900)
        result = json.loads((out / "bench" / "bench.json").read_text())
        rates = {(r["contestant"], r["max_length"]): r for r in result["rows"] if r.get("scenario", "step") == "step"}
        ours = max((r for (c, _), r in rates.items() if c.startswith("ebslab")), key=lambda r: r["samples_per_s"])
        hf = [r for (c, length), r in rates.items() if c.startswith("hf") and length == ours["max_length"]]
        ratio = ours["samples_per_s"] / hf[0]["samples_per_s"] if hf and hf[0]["samples_per_s"] else float("nan")
        return Row("bench vs HF Trainer", f"{ours['samples_per_s']:.0f} samples/s, MFU "
                                          f"{100 * ours['peak_fraction']:.0f}%, {ratio:.2f}x HF",
                   done.returncode == 0 and ratio >= 1.0)

    for name, check in [("bert fp16 + clip_norm 1", fp16_clip), ("accelerate backend", accelerate),
                        ("train.compile", compiled), ("batch.micro=auto at 512", auto_micro),
                        ("SIGTERM + resume", sigterm_resume), ("bench vs HF Trainer", bench)]:
        guarded(name, check)
    return rows


def main(argv: list[str] | None = None) -> int:
    from ebslab.core.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m ebslab.tools.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per training check")
    args = parser.parse_args(argv)
    try:
        require_cuda()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="ebslab-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = run_checks(out, args.steps)
    print("\n" + table(rows), flush=True)
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
