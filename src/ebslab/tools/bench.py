"""`ebslab bench [--quick] [--out DIR]`: ebslab's training loop against HF Trainer and a naive loop, side by side.

Two scenarios, all contestants in one process, alternating, after a warm-up (this kind of host drifts):

- `step`: the same model, the same examples in the same order, the same max_length, micro-batch 16 and
  effective batch, N optimizer steps. Contestants: ebslab's loop on its torch and accelerate backends (the real
  `ebslab.loop.train.train`, run folder and all), ebslab with `batch.micro=auto`, HF `Trainer` with equal settings
  (AdamW fused, lr, linear schedule, clip 1.0, sequential order) and a naive hand-written loop (pad to max_length,
  default AdamW, `.item()` every micro-step). Throughput is taken between the end of step 1 and the end of
  step N: the first step (allocations, lazy init) is not timed for anyone. Every contestant is timed by the same
  rule (`StepClock`): the device is synchronized at those two ends only, so a clock never stops before the
  device's work is done, and no contestant is made to wait for the device between them.
- `experiment`: one complete small fine-tuning (2 epochs, val + test every epoch, best checkpoint kept, test on
  best), by ebslab and by HF Trainer the way its docs teach (datasets.map tokenization, eval/save strategy
  epoch, load_best_model_at_end); wall time from start to the final test metrics, cold caches then warm.

tokens/s counts real tokens only (attention-mask ones), never padding. peak_fraction = training FLOP/s / the
device's peak, FLOPs counted as nanoGPT's estimate_mfu does: 6N + 12 L H Q T per real token of an example of T real
tokens (N non-embedding params, L layers, H x Q = hidden width; the second term is attention's), over its peak: on
a GPU its dense bf16 spec peak (SPEC_BF16_PEAK_FLOPS: MFU), on a CPU (or a GPU not in the table) the fp32
2048x2048 matmul rate measured in this run.

The baselines (HF Trainer, the naive loop) are tools.bench_baselines; the settings, device and step clock every
contestant shares, tools.bench_rules; the command's arguments, tools.bench_args.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tabulate import tabulate

from ebslab.core.files import atomic_write_json
from ebslab.tools.bench_args import CONTESTANTS, OPTIONAL_CONTESTANTS
from ebslab.tools.bench_baselines import experiment_trainer, hf_classifier, run_naive, run_trainer
from ebslab.tools.bench_rules import Settings, StepClock, StepData, device, quick_settings

ROW_KEYS = ("scenario", "contestant", "max_length", "samples_per_s", "tokens_per_s", "wall_s", "vs_trainer",
            "peak_fraction", "peak_memory_mb")


# ----------------------------------------------------------------------------------------------------------
# Measurements shared by the scenarios


def matmul_peak(size: int = 2048, trials: int = 8, dev: torch.device | None = None) -> float:
    """Best-of-`trials` FLOP/s of a size x size matmul: fp32 on CPU, bf16 on GPU."""
    dev = dev or device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    reps = 20 if dev.type == "cuda" else 1
    best = 0.0
    for i in range(trials + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if i:  # the first one warms up
            best = max(best, reps * 2 * size ** 3 / dt)
    return best


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' spec sheets, FLOP/s; the first name that occurs in
# torch.cuda.get_device_name() wins, so the longer names come first. MFU is measured against these: a 2048-square
# matmul reaches only ~60% of an H100's spec, so MFU against it would read ~1.6x too high.
SPEC_BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12),
    ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 6000 Ada", 365e12), ("RTX 4090", 165e12),
    ("RTX 3090", 71e12), ("A6000", 155e12), ("MI300X", 1307e12), ("MI250X", 383e12),
)


def spec_peak(device_name: str) -> float | None:
    """The dense bf16 spec peak of a GPU by its name; None for one not in the table."""
    for name, flops in SPEC_BF16_PEAK_FLOPS:
        if name.lower() in device_name.lower():
            return flops
    return None


def device_peak(s_matmul_size: int) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): a GPU's spec peak from the table, else a measured matmul (CPU fp32,
    or a GPU the table does not know)."""
    if device().type == "cuda":
        name = torch.cuda.get_device_name()
        flops = spec_peak(name)
        if flops is not None:
            return flops, f"{name} dense bf16 spec peak"
    kind = "bf16" if device().type == "cuda" else "fp32"
    return matmul_peak(s_matmul_size), f"measured {kind} {s_matmul_size}^2 matmul, best of 8"


def real_tokens(attention_mask: Any) -> int:
    """Real (non-padding) tokens of a batch: the ones of its attention mask."""
    return int(torch.as_tensor(attention_mask).sum().item())


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a model."""

    non_embedding_params: int
    layers: int
    width: int  # hidden size = attention heads x head size

    @classmethod
    def of(cls, bundle: Any) -> ModelShape:
        config = bundle.model.encoder.config
        return cls(bundle.non_embedding_params, config.num_hidden_layers, config.hidden_size)


def train_flops(shape: ModelShape, tokens: float, sq_tokens: float) -> float:
    """Training FLOPs (forward + backward) of examples with `tokens` real tokens in all and `sq_tokens` = the sum
    over examples of (real tokens)^2: per token 6N (the weight matmuls) + 12 L H Q T (attention scores and their
    weighted sum over the example's T tokens), as nanoGPT's estimate_mfu. 6N alone is ~11% low for BERT-base at
    512 tokens. (ModernBERT's sliding-window layers attend to fewer than T tokens: an upper bound there.)"""
    return 6 * shape.non_embedding_params * tokens + 12 * shape.layers * shape.width * sq_tokens


def peak_fraction(flops_per_s: float, peak_flops: float) -> float:
    return flops_per_s / peak_flops if peak_flops else float("nan")


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory above the level at entry: GPU allocator peak, or resident set size sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2 ** 20
        else:
            self._base = _rss_mb()
            self._peak = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, _rss_mb())

    def __exit__(self, *_: Any) -> None:
        if torch.cuda.is_available():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20 - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, _rss_mb()) - self._base


@contextlib.contextmanager
def quiet(log: Path):
    """Send what a contestant prints (start-up text, progress bars, HF warnings) to a log file."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


@contextlib.contextmanager
def _environ(name: str, value: str):
    """os.environ[name] = value inside the block, as it was after it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@dataclass(frozen=True)
class Measured:
    """What one contestant's run returned, and what it cost."""

    value: Any
    wall_s: float
    cpu_s: float
    peak_mb: float


def _measure(log: Path, run: Callable[[], Any]) -> Measured:
    """`run()` with what it prints sent to `log`: its wall and CPU seconds and its peak memory."""
    t0, c0 = time.perf_counter(), time.process_time()
    with PeakMemory() as mem, quiet(log):
        value = run()
    return Measured(value, time.perf_counter() - t0, time.process_time() - c0, mem.peak_mb)


# ----------------------------------------------------------------------------------------------------------
# The data every contestant sees


def ebslab_config(s: Settings, max_length: int, out_dir: Path, name: str, steps: int | None = None,
                  **extra: Any) -> Any:
    """ebslab's config for `steps` optimizer steps (default `s.steps`) on just enough data for them."""
    from ebslab.core.config import load_config

    steps = steps or s.steps
    limit = math.ceil(steps * s.effective / 0.8) + 10  # the 8:1:1 split leaves >= N windows to train on
    values = {"model.name": s.model, "data.max_length": max_length, "data.limit": limit,
              "batch.effective": s.effective, "batch.micro": s.micro, "optim.lr": s.lr, "optim.clip_norm": 1.0,
              "sched.name": "linear", "train.max_steps": steps, "train.seed": s.seed, "eval.test_on": "last",
              "out.dir": str(out_dir), "out.name": name, "train.precision": "bf16" if device().type == "cuda"
              else "fp32"}
    if s.data_path:
        values["data.path"] = s.data_path
    values.update(extra)
    return load_config(values)


def step_data(s: Settings, max_length: int, tokenizer: Any, grouped: bool = False) -> StepData:
    """ebslab's own split and epoch-0 order, so the other contestants train on exactly ebslab's windows.
    `grouped`: the windows of `data.group_by_length=true` instead (for its real-token count)."""
    from ebslab.inputs.data import epoch_order, length_grouped, load_data, load_examples

    cfg = ebslab_config(s, max_length, Path("."), "unused")
    data = load_data(cfg.data, tokenizer)
    order = epoch_order(len(data.train), cfg.train.seed, 0)
    if grouped:
        order = length_grouped(order, data.train.lengths, s.effective, cfg.train.seed, 0)
    order = order[:s.steps * s.effective]
    examples = load_examples(cfg.data, "bench data")
    split = data.train
    ids = [split.ids[split.offsets[i]:split.offsets[i + 1]].tolist() for i in order]
    lengths = split.lengths[order]
    return StepData(texts=[examples.texts[split.rows[i]] for i in order], input_ids=ids,
                    labels=split.labels[order].copy(), timed_tokens=int(lengths[s.effective:].sum()),
                    timed_samples=len(order) - s.effective,
                    timed_sq_tokens=int((lengths[s.effective:].astype(np.int64) ** 2).sum()))


def timed_rate(step_ends: list[float], data: StepData) -> tuple[float, float]:
    """(samples/s, real tokens/s) between the end of step 1 and the end of step N (the first and last of
    `step_ends`)."""
    elapsed = step_ends[-1] - step_ends[0]
    return data.timed_samples / elapsed, data.timed_tokens / elapsed


# ----------------------------------------------------------------------------------------------------------
# Step scenario: the contestants


def run_ebslab(s: Settings, max_length: int, out_dir: Path, contestant: str) -> StepClock:
    """The real `ebslab.loop.train.train` with its defaults (`train.log_every_steps=auto`), timed by a callback."""
    from ebslab.loop.callbacks import Callback
    from ebslab.loop.train import train

    clock = StepClock(s.steps)

    class Clock(Callback):
        def on_step(self, trainer: Any, record: dict | None) -> None:
            clock.step_end()

    extra: dict[str, Any] = {}
    if contestant == "ebslab-accelerate":
        extra["train.backend"] = "accelerate"
    if contestant == "ebslab-torch-auto":
        extra["batch.micro"] = "auto"
    if contestant == "ebslab-torch-grouped":
        extra["data.group_by_length"] = True
    if contestant == "ebslab-torch-nogns":
        extra["train.gns"] = False
    cfg = ebslab_config(s, max_length, out_dir, f"{contestant}-L{max_length}", **extra)
    summary = train(cfg, overwrite=True, callbacks=[Clock()])
    if summary["exit_code"]:
        # a Ctrl-C or SIGTERM meant for the bench lands in the run's own stop handler, which ends the run after one
        # step and returns: without this the bench went on and failed with "ran 1 steps, expected N"
        raise KeyboardInterrupt(f"{contestant}: {summary['message']}")
    if summary["status"] not in ("completed", "collapsed"):  # tiny bench runs collapse; that is no error here
        raise RuntimeError(f"{contestant} run {summary['status']}: {summary['message']} (see {cfg.run_dir})")
    return clock


# ----------------------------------------------------------------------------------------------------------
# Experiment scenario


def experiment_splits(s: Settings, folder: Path) -> dict[str, Any]:
    """ebslab's 8:1:1 split of the first `experiment_limit` shuffled reviews, written as parquet for HF."""
    import pandas as pd

    from ebslab.core.config import load_config
    from ebslab.inputs.data import load_examples, split_indices

    cfg = load_config({"data.limit": s.experiment_limit, "data.path": s.data_path})
    examples = load_examples(cfg.data, "bench data")
    parts = split_indices(examples.labels, cfg.data.split, cfg.data.split_seed, cfg.data.limit)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, idx in zip(("train", "validation", "test"), parts):
        files[name] = str(folder / f"{name}.parquet")
        pd.DataFrame({"text": [examples.texts[i] for i in idx], "label": examples.labels[idx]}).to_parquet(
            files[name], index=False)
    return files


def experiment_ebslab(s: Settings, out_dir: Path) -> dict[str, Any]:
    from ebslab.core.config import load_config
    from ebslab.loop.train import train

    cfg = load_config({"model.name": s.model, "data.limit": s.experiment_limit,
                       "data.max_length": s.experiment_length, "batch.effective": s.effective,
                       "batch.micro": s.micro, "optim.lr": s.lr, "optim.clip_norm": 1.0, "sched.name": "linear",
                       "train.epochs": s.experiment_epochs, "train.seed": s.seed, "eval.test_on": "best",
                       "train.precision": "bf16" if device().type == "cuda" else "fp32",
                       "out.dir": str(out_dir), "out.name": "ebslab-experiment", "data.path": s.data_path})
    summary = train(cfg, overwrite=True)
    return {"test_acc": summary["test_best"]["acc"]}


# ----------------------------------------------------------------------------------------------------------
# Profile: where ebslab's step time goes

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm")
OUTSIDE_OPS = "(outside aten ops: Python, loop, autograd engine)"


def profile_step(s: Settings, max_length: int, out_dir: Path) -> dict[str, Any]:
    """torch.profiler over `s.profile_steps` optimizer steps of the real `ebslab.loop.train.train` (torch backend),
    self time per op. The profiler advances on every optimizer step (a global post-step hook), so model
    loading, tokenization, step 1 (allocation, lazy init) and the final evaluation are not recorded."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from ebslab.loop.train import train

    # one step waited out, one warm-up step, then the recorded ones
    cfg = ebslab_config(s, max_length, out_dir, f"profile-L{max_length}", steps=s.profile_steps + 2)
    gpu = device().type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=s.profile_steps)) as prof:
        hook = register_optimizer_step_post_hook(lambda *_: prof.step())
        try:
            train(cfg, overwrite=True)
        finally:
            hook.remove()
    from torch.autograd import DeviceType

    # CPU-side events only: on a GPU each kernel is also an event of its own, and its time is already the
    # device time of the aten op that launched it (summing both counts every kernel twice). On a GPU the
    # device's time is the one that matters; the host's only queues kernels.
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    self_time = {e.key: float(e.self_device_time_total if gpu else e.self_cpu_time_total) for e in events}
    # self times partition the recorded time; what is not inside an aten op is Python, the loop, autograd's
    # bookkeeping and the step markers
    total = sum(self_time.values())
    ops = {k: t for k, t in self_time.items() if k.startswith("aten::") and t > 0}
    ops[OUTSIDE_OPS] = total - sum(ops.values())
    shares = sorted(((k, t / total) for k, t in ops.items()), key=lambda kv: -kv[1])
    optimizer_steps = sum(e.count for e in events if e.key.startswith("Optimizer.step#"))
    return {"contestant": "ebslab-torch", "max_length": max_length, "micro": s.micro, "effective": s.effective,
            "optimizer_steps": optimizer_steps, "time": "gpu" if gpu else "cpu", "total_s": round(total / 1e6, 3),
            "matmul_share": round(sum(sh for k, sh in shares if k in MATMUL_OPS), 4),
            "ops": [{"op": k, "share": round(sh, 4)} for k, sh in shares[:15]]}


def profile_line(prof: dict[str, Any]) -> str:
    top = ", ".join(f"{o['op'].removeprefix('aten::')} {o['share']:.0%}" for o in prof["ops"][:6])
    return (f"step profile (ebslab-torch, length {prof['max_length']}, {prof['optimizer_steps']} steps): matmul "
            f"{prof['matmul_share']:.0%} of the self {prof['time']} time; {top}")


# ----------------------------------------------------------------------------------------------------------
# Start-up: tokenization cache


def startup_figures(s: Settings, work: Path) -> dict[str, Any]:
    """Tokenizer + data load, first with an empty token cache, then from it."""
    from ebslab.core.config import load_config
    from ebslab.inputs.data import load_data
    from ebslab.inputs.models import load_tokenizer

    with _environ("EBSLAB_CACHE", str(work / "startup-cache")):
        cfg = load_config({"model.name": s.model, "data.limit": s.startup_limit, "data.path": s.data_path})
        times = []
        for _ in range(2):
            t = time.perf_counter()
            data = load_data(cfg.data, load_tokenizer(s.model))
            times.append(time.perf_counter() - t)
        n = len(data.train) + len(data.val) + len(data.test)
    return {"examples": n, "max_length": cfg.data.max_length, "uncached_s": round(times[0], 3),
            "cached_s": round(times[1], 3), "speedup": round(times[0] / times[1], 1)}


# ----------------------------------------------------------------------------------------------------------
# The bench


def _row(scenario: str, contestant: str, max_length: int, samples_per_s: float, tokens_per_s: float,
         wall_s: float, peak_mb: float, flops_per_token: float, peak_flops: float, **extra: Any) -> dict[str, Any]:
    row = {"scenario": scenario, "contestant": contestant, "max_length": max_length,
           "samples_per_s": round(samples_per_s, 4), "tokens_per_s": round(tokens_per_s, 2),
           "wall_s": round(wall_s, 2), "vs_trainer": None,
           "peak_fraction": round(peak_fraction(flops_per_token * tokens_per_s, peak_flops), 4),
           "peak_memory_mb": round(peak_mb, 1)}
    row.update(extra)
    return row


def _fill_vs_trainer(rows: list[dict[str, Any]]) -> None:
    """Speed relative to HF Trainer in the same scenario, length (and cache state): > 1 is faster."""
    for r in rows:
        ref = [t for t in rows if t["contestant"] == "hf-trainer" and t["scenario"] == r["scenario"]
               and t["max_length"] == r["max_length"] and t.get("cache") == r.get("cache")]
        if ref:
            if r["scenario"] == "step":
                r["vs_trainer"] = round(r["samples_per_s"] / ref[0]["samples_per_s"], 3)
            else:
                r["vs_trainer"] = round(ref[0]["wall_s"] / r["wall_s"], 3)


def gns_overhead(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per max_length: the fraction of a step the gradient noise scale costs, 1 - rate(on) / rate(off), from the
    step rows of ebslab-torch (on when accum_steps >= 2) and ebslab-torch-nogns.

    With the per-round rates of both (`round_samples_per_s`): 1 - the median over rounds of rate(on) / rate(off)
    within a round. The two run back to back in each round, so a load change on a shared host hits both sides of
    one ratio, and the median drops the rounds it hit between them; best-of-rounds of each side would compare
    runs minutes apart."""
    out = {}
    for on in (r for r in rows if r["scenario"] == "step" and r["contestant"] == "ebslab-torch"):
        off = [r for r in rows if r["scenario"] == "step" and r["contestant"] == "ebslab-torch-nogns"
               and r["max_length"] == on["max_length"]]
        if not off:
            continue
        on_rounds, off_rounds = on.get("round_samples_per_s"), off[0].get("round_samples_per_s")
        if on_rounds and off_rounds and len(on_rounds) == len(off_rounds):
            ratio = float(np.median([a / b for a, b in zip(on_rounds, off_rounds)]))
        else:
            ratio = on["samples_per_s"] / off[0]["samples_per_s"]
        out[str(on["max_length"])] = round(1 - ratio, 4)
    return out


def _warm_up(s: Settings, tokenizer: Any) -> None:
    """A fresh host runs 2-3x slower for its first minutes: touch memory and the matmul kernels first."""
    model = hf_classifier(s.model).to(device())
    ids = torch.randint(1000, 2000, (s.micro, 128), device=device())
    t = time.perf_counter()
    while time.perf_counter() - t < 10:
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()


def _silence_libraries() -> None:
    """transformers' load reports and progress bars write to the stderr captured at import: turn them off."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


@dataclass(frozen=True)
class BenchSetup:
    """What every scenario shares: the settings, the model's tokenizer and shape, the device's peak, the scratch
    folder, the log a contestant's output goes to, and where progress lines go."""

    s: Settings
    tokenizer: Any
    shape: ModelShape
    peak: float
    peak_source: str
    work: Path
    log: Path
    say: Callable[[str], None]


def bench(s: Settings, out: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every scenario `s` asks for, in one process; the result is also written to out/bench.json."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _silence_libraries()
    started = time.perf_counter()
    setup = _set_up(s, out, say)
    result = _result_head(setup)
    rows = result["rows"]
    rows.extend(step_scenario(setup))
    if s.experiment:
        rows.extend(experiment_scenario(setup))
    if s.profile_steps:
        result["profile"] = _profile_section(setup)
    if s.startup_limit != 0:
        result["startup"] = _startup_section(setup)
    _fill_vs_trainer(rows)
    result["gns_overhead"] = gns_overhead(rows)
    result["total_s"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out / "bench.json", result)
    shutil.rmtree(setup.work, ignore_errors=True)
    return result


def _set_up(s: Settings, out: Path, say: Callable[[str], None]) -> BenchSetup:
    """The scratch folder, the tokenizer and model shape, a warm host (if asked) and the device's peak."""
    from ebslab.inputs.models import build_model, load_tokenizer
    from ebslab.core.config import ModelConfig

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=out))
    tokenizer = load_tokenizer(s.model)
    shape = ModelShape.of(build_model(ModelConfig(name=s.model), 2, 0, tokenizer))
    if s.warmup:
        say("warming up ...")
        _warm_up(s, tokenizer)
    peak, peak_source = device_peak(s.matmul_size)
    say(f"peak ({peak_source}): {peak / 1e9:.1f} GFLOP/s; {s.model}: {shape.non_embedding_params / 1e6:.1f}M "
        "non-embedding params")
    return BenchSetup(s, tokenizer, shape, peak, peak_source, work, out / "bench.log", say)


def _result_head(setup: BenchSetup) -> dict[str, Any]:
    """bench.json before the scenarios: no rows yet, the peak, the device, the settings and the model's shape."""
    return {"rows": [], "matmul_peak_flops": setup.peak, "peak_source": setup.peak_source, "device": str(device()),
            "settings": dataclasses.asdict(setup.s), "non_embedding_params": setup.shape.non_embedding_params,
            "layers": setup.shape.layers, "width": setup.shape.width}


# ----------------------------------------------------------------------------------------------------------
# The step scenario's rows


def step_scenario(setup: BenchSetup) -> list[dict[str, Any]]:
    """Per max_length, one row per contestant: its best of `s.rounds` rounds, with every round's rate."""
    contestants = [c for c in setup.s.contestants if c in CONTESTANTS + OPTIONAL_CONTESTANTS]
    rows: list[dict[str, Any]] = []
    for li, length in enumerate(setup.s.lengths):
        rows.extend(_step_rows_at_length(setup, contestants, li, length))
    return rows


def _step_rows_at_length(setup: BenchSetup, contestants: list[str], li: int, length: int) -> list[dict[str, Any]]:
    s = setup.s
    data = step_data(s, length, setup.tokenizer)
    real = data.timed_tokens / (data.timed_samples * length)
    setup.say(f"step: max_length {length}, {s.steps} steps of {s.effective} (micro {s.micro}), "
              f"{real:.0%} of the timed tokens are real")
    best: dict[str, dict[str, Any]] = {}
    per_round: dict[str, list[float]] = {}
    for rnd in range(s.rounds):
        for contestant in _rotated(contestants, li + rnd):
            if contestant == "ebslab-torch-auto" and s.auto_lengths is not None and length not in s.auto_lengths:
                continue
            row, sps = _step_row(setup, contestant, length, data)
            per_round.setdefault(contestant, []).append(round(sps, 4))
            if contestant not in best or sps > best[contestant]["samples_per_s"]:
                best[contestant] = row
    for c in best:
        best[c]["round_samples_per_s"] = per_round[c]
    return [best[c] for c in contestants if c in best]


def _rotated(contestants: list[str], turn: int) -> list[str]:
    """The contestants with the one at `turn` (mod their number) first: who goes first rotates."""
    first = turn % len(contestants)
    return contestants[first:] + contestants[:first]


def _step_row(setup: BenchSetup, contestant: str, length: int, data: StepData) -> tuple[dict[str, Any], float]:
    """(row, unrounded samples/s) of one timed run of `contestant` at `length`."""
    s = setup.s
    run = _measure(setup.log, lambda: _run_step_contestant(setup, contestant, length, data))
    clock = run.value
    if clock.done != s.steps:
        raise RuntimeError(f"{contestant} ran {clock.done} steps, expected {s.steps}")
    timed = step_data(s, length, setup.tokenizer, grouped=True) if contestant == "ebslab-torch-grouped" else data
    sps, tps = timed_rate(clock.ends, timed)
    per_token = train_flops(setup.shape, timed.timed_tokens, timed.timed_sq_tokens) / timed.timed_tokens
    row = _row("step", contestant, length, sps, tps, run.wall_s, run.peak_mb, per_token, setup.peak,
               cpu_s=round(run.cpu_s, 1))
    setup.say(f"  {contestant:18} {sps:7.2f} samples/s  {tps:8.0f} tokens/s  ({run.wall_s:.0f} s wall, "
              f"{run.cpu_s:.0f} s CPU)")
    return row, sps


def _run_step_contestant(setup: BenchSetup, contestant: str, length: int, data: StepData) -> StepClock:
    if contestant.startswith("ebslab"):
        return run_ebslab(setup.s, length, setup.work, contestant)
    if contestant == "hf-trainer":
        return run_trainer(setup.s, data, setup.tokenizer, setup.work / "hf-step")
    return run_naive(setup.s, data, setup.tokenizer, length)


# ----------------------------------------------------------------------------------------------------------
# The experiment scenario's rows


@dataclass(frozen=True)
class ExperimentSize:
    """The experiment's train split and what its epochs train on, for the rates and the FLOP count."""

    train_examples: int
    samples: int
    tokens: int
    flops_per_token: float


def experiment_scenario(setup: BenchSetup) -> list[dict[str, Any]]:
    """One complete small fine-tuning each by ebslab and HF Trainer, with cold caches, then again warm."""
    s = setup.s
    files = experiment_splits(s, setup.work / "experiment-data")
    size = _experiment_size(setup, files["train"])
    setup.say(f"experiment: {s.experiment_limit} reviews ({size.train_examples} train), max_length "
              f"{s.experiment_length}, {s.experiment_epochs} epochs, val+test every epoch, test on best")
    runs = (("cold", "ebslab-torch"), ("cold", "hf-trainer"), ("warm", "hf-trainer"), ("warm", "ebslab-torch"))
    with _environ("EBSLAB_CACHE", str(setup.work / "ebslab-cache")):
        return [_experiment_row(setup, contestant, cache, files, size) for cache, contestant in runs]


def _experiment_size(setup: BenchSetup, train_file: str) -> ExperimentSize:
    import pandas as pd

    s = setup.s
    train_texts = pd.read_parquet(train_file)["text"].tolist()
    lengths = [len(x) for x in setup.tokenizer(train_texts, truncation=True, max_length=s.experiment_length,
                                                return_attention_mask=False)["input_ids"]]
    per_token = train_flops(setup.shape, sum(lengths), sum(n * n for n in lengths)) / sum(lengths)
    return ExperimentSize(train_examples=len(train_texts), samples=len(train_texts) * s.experiment_epochs,
                          tokens=sum(lengths) * s.experiment_epochs, flops_per_token=per_token)


def _experiment_row(setup: BenchSetup, contestant: str, cache: str, files: dict[str, Any],
                    size: ExperimentSize) -> dict[str, Any]:
    s = setup.s
    if contestant == "ebslab-torch":
        run = _measure(setup.log, lambda: experiment_ebslab(s, setup.work / "exp-ebslab"))
    else:
        run = _measure(setup.log, lambda: experiment_trainer(s, files, setup.work / "exp-hf",
                                                             setup.work / "hf-datasets-cache"))
    test_acc = run.value["test_acc"]
    row = _row("experiment", contestant, s.experiment_length, size.samples / run.wall_s, size.tokens / run.wall_s,
               run.wall_s, run.peak_mb, size.flops_per_token, setup.peak, cache=cache, cpu_s=round(run.cpu_s, 1),
               test_acc=round(test_acc, 4))
    setup.say(f"  {contestant:18} {cache}: {run.wall_s:6.1f} s wall, {run.cpu_s:.0f} s CPU, test acc "
              f"{test_acc:.4f}")
    return row


# ----------------------------------------------------------------------------------------------------------
# The sections after the scenarios


def _profile_section(setup: BenchSetup) -> dict[str, Any]:
    with quiet(setup.log):
        prof = profile_step(setup.s, setup.s.lengths[0], setup.work)
    setup.say(profile_line(prof))
    return prof


def _startup_section(setup: BenchSetup) -> dict[str, Any]:
    st = startup_figures(setup.s, setup.work)
    setup.say(f"start-up (tokenizer + data, {st['examples']} examples): uncached {st['uncached_s']:.2f} s, "
              f"cached {st['cached_s']:.2f} s ({st['speedup']}x)")
    return st


# ----------------------------------------------------------------------------------------------------------
# The table


def table(result: dict[str, Any]) -> str:
    rows = [(r["scenario"], r["contestant"], r.get("cache", ""), r["max_length"], f"{r['samples_per_s']:.2f}",
             f"{r['tokens_per_s']:.0f}", f"{r['wall_s']:.1f}",
             "-" if r["vs_trainer"] is None else f"{r['vs_trainer']:.2f}", f"{100 * r['peak_fraction']:.1f}%",
             f"{r['peak_memory_mb']:.0f}") for r in result["rows"]]
    lines = [tabulate(rows, headers=("scenario", "contestant", "cache", "len", "samples/s", "tokens/s", "wall_s",
                                     "vs_HF", "peak%", "mem_MB"),
                      tablefmt="simple", colalign=("left",) * 3 + ("right",) * 7, disable_numparse=True)]
    lines.append(f"peak {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s ({result.get('peak_source', 'measured')}) "
                 f"on {result['device']}; "
                 f"bench took {result['total_s']:.0f} s")
    if result.get("gns_overhead"):
        lines.append("gradient noise scale overhead (1 - median over rounds of ebslab-torch / ebslab-torch-nogns "
                     "samples/s): " +
                     ", ".join(f"{100 * v:.1f}% at {k}" for k, v in result["gns_overhead"].items()))
    if "profile" in result:
        lines.append(profile_line(result["profile"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# CLI


def settings_from_args(args: argparse.Namespace) -> Settings:
    from ebslab.core.errors import UserError

    s = quick_settings() if args.quick else Settings()
    if args.model:
        s.model = args.model
    if args.lengths:
        try:
            s.lengths = [int(x) for x in args.lengths.split(",")]
        except ValueError:
            raise UserError(f"--lengths '{args.lengths}' must be comma-separated integers, e.g. 128,256") from None
    if args.steps is not None:
        if args.steps < 2:
            raise UserError("--steps must be >= 2 (step 1 is not timed)")
        s.steps = args.steps
    if args.contestants:
        names = args.contestants.split(",")
        bad = [n for n in names if n not in CONTESTANTS + OPTIONAL_CONTESTANTS]
        if bad:
            raise UserError(f"unknown contestant '{bad[0]}'; choose from "
                            f"{', '.join(CONTESTANTS + OPTIONAL_CONTESTANTS)}")
        s.contestants = names
    if getattr(args, "rounds", None):
        s.rounds = args.rounds
    if getattr(args, "no_startup", False):
        s.startup_limit = 0
    if args.no_experiment:
        s.experiment = False
    if getattr(args, "no_profile", False):
        s.profile_steps = 0
    if getattr(args, "experiment_limit", None):
        if args.experiment_limit < 30:
            raise UserError("--experiment-limit must be >= 30 (val and test need examples of both classes)")
        s.experiment_limit = args.experiment_limit
    return s


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = bench(settings_from_args(args), Path(args.out), say=lambda m: print(m, flush=True))
    print()
    print(table(result))
    print(f"wrote {Path(args.out) / 'bench.json'}")
    return 0
