"""`ebslab bench` plumbing on tiny-bert with a tiny N: schema, real-token counting, CLI. No MiniLM timing here."""

import argparse
import json
import os
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ebslab.tools import bench, bench_rules  # noqa: E402
from ebslab.core.errors import UserError  # noqa: E402

NUMERIC = ("max_length", "samples_per_s", "tokens_per_s", "wall_s", "peak_fraction", "peak_memory_mb")


def test_real_tokens_counts_the_mask_not_the_padding():
    # lengths 5, 2, 7 padded to 7: 21 slots, 14 real tokens
    mask = torch.tensor([[1] * 5 + [0] * 2, [1] * 2 + [0] * 5, [1] * 7])
    assert bench.real_tokens(mask) == 14
    assert bench.real_tokens(mask.numpy()) == 14


def test_timed_rate_uses_real_tokens_of_steps_two_to_n():
    # 3 steps of 2 examples; step 1 is not timed; timed lengths 3+4+5+6 = 18 real tokens in 2 s
    ids = [[1] * n for n in (10, 11, 3, 4, 5, 6)]
    data = bench.StepData(texts=[""] * 6, input_ids=ids, labels=np.zeros(6, dtype=np.int64),
                          timed_tokens=sum(len(x) for x in ids[2:]), timed_samples=4)
    sps, tps = bench.timed_rate([5.0, 6.0, 7.0], data)
    assert sps == pytest.approx(2.0) and tps == pytest.approx(9.0)


def test_step_data_follows_ebslab_order_and_counts_real_tokens(small_imdb):
    from ebslab.inputs.models import load_tokenizer

    s = bench.Settings(model="tiny-bert", data_path=small_imdb, lengths=[24], steps=3, micro=2, effective=4)
    data = bench.step_data(s, 24, load_tokenizer("tiny-bert"))
    assert len(data.input_ids) == 12 and data.timed_samples == 8
    assert data.timed_tokens == sum(len(x) for x in data.input_ids[4:])
    assert max(len(x) for x in data.input_ids) <= 24
    # IMDB reviews fill a 24-token window: counted tokens < padded slots would show padding sneaking in
    assert data.timed_tokens <= 8 * 24


def test_peak_fraction():
    assert bench.peak_fraction(6e10, 120e9) == pytest.approx(0.5)


def test_flops_count_attention_as_nanogpt():
    """BERT-base (85M non-embedding params, 12 layers of width 768) on one 512-token example: 6N per token plus
    12 L H Q T = 12 x 12 x 768 x 512 per token for attention, about 11% more than 6N alone."""
    from transformers import BertConfig

    config = BertConfig()
    d, L = config.hidden_size, config.num_hidden_layers
    per_layer = 4 * d * d + 4 * d + 2 * d * config.intermediate_size + config.intermediate_size + d + 4 * d
    shape = bench.ModelShape(non_embedding_params=L * per_layer, layers=L, width=d)
    assert shape.non_embedding_params == pytest.approx(85e6, rel=0.01)
    flops = bench.train_flops(shape, 512, 512 ** 2)
    assert flops == 6 * shape.non_embedding_params * 512 + 12 * 12 * 768 * 512 * 512
    assert flops / (6 * shape.non_embedding_params * 512) == pytest.approx(1.11, abs=0.005)
    # two examples of 256 tokens: the same 6N term, half the attention term (each attends over 256 only)
    assert bench.train_flops(shape, 512, 2 * 256 ** 2) == 6 * shape.non_embedding_params * 512 + \
        12 * 12 * 768 * 2 * 256 ** 2


def test_model_shape_of_a_built_model():
    from ebslab.core.config import ModelConfig
    from ebslab.inputs.models import build_model, load_tokenizer

    bundle = build_model(ModelConfig(name="tiny-bert"), 2, 0, load_tokenizer("tiny-bert"))
    shape = bench.ModelShape.of(bundle)
    config = bundle.model.encoder.config
    assert (shape.layers, shape.width) == (config.num_hidden_layers, config.hidden_size)
    assert shape.non_embedding_params == bundle.non_embedding_params > 0


class FakeDevice:
    """A device that runs behind the host: the host queues a step in `host_s`, the device then needs `device_s`
    for it, starting when both the step is queued and the previous one is done. Time is virtual (exact)."""

    def __init__(self):
        self.host = self.device_free = 0.0
        self.syncs = 0

    def queue_step(self, host_s, device_s):
        self.host += host_s
        self.device_free = max(self.device_free, self.host) + device_s

    def synchronize(self):
        self.syncs += 1
        self.host = max(self.host, self.device_free)


def test_step_clock_times_a_slow_device_between_the_ends_of_step_1_and_step_n(monkeypatch):
    """Host 0.02 s, device 0.06 s per step, 5 steps: steps 2..5 cost 4 x 0.06 s of device time, plus the 0.02 s the
    device waits for step 2 to be queued after step 1's synchronize (one refill, the same for every contestant).
    A clock without the synchronize would say 4 x 0.02 (queueing only), one that synchronizes every step 4 x 0.08
    (no overlap of host and device)."""
    device = FakeDevice()
    monkeypatch.setattr(bench_rules, "synchronize", device.synchronize)
    clock = bench.StepClock(5, now=lambda: device.host)
    for _ in range(5):
        device.queue_step(0.02, 0.06)
        clock.step_end()
    assert clock.done == 5 and device.syncs == 2 and len(clock.ends) == 2
    assert clock.ends[1] - clock.ends[0] == pytest.approx(4 * 0.06 + 0.02)
    # the same device timed the other two ways, for contrast
    for sync_every_step, expected in ((False, 4 * 0.02), (True, 4 * 0.08)):
        device, ends = FakeDevice(), []
        for _ in range(5):
            device.queue_step(0.02, 0.06)
            if sync_every_step:
                device.synchronize()
            ends.append(device.host)
        assert ends[-1] - ends[0] == pytest.approx(expected)


@pytest.fixture(scope="module")
def small_imdb(tmp_path_factory):
    """80 IMDB reviews: the shipped 50k-row table is re-read by every contestant, too slow for a fast test."""
    import pandas as pd

    from ebslab.inputs.data import SHIPPED_IMDB

    table = pd.read_parquet(SHIPPED_IMDB / "train.parquet")
    path = tmp_path_factory.mktemp("bench-data") / "small.parquet"
    pd.concat([table.head(40), table.tail(40)]).to_parquet(path, index=False)
    return str(path)


def test_bench_json_schema_on_tiny_bert(tmp_path, small_imdb):
    s = bench.Settings(model="tiny-bert", data_path=small_imdb, lengths=[16], steps=2, micro=2, effective=4, rounds=1,
                       experiment=True, experiment_limit=30, experiment_length=16, experiment_epochs=1,
                       startup_limit=40, matmul_size=64, warmup=False, profile_steps=2)
    result = bench.bench(s, tmp_path, say=lambda m: None)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == result["rows"]
    assert saved["matmul_peak_flops"] > 0
    rows = saved["rows"]
    step = [r for r in rows if r["scenario"] == "step"]
    assert {r["contestant"] for r in step} == set(bench.CONTESTANTS)
    exp = [r for r in rows if r["scenario"] == "experiment"]
    assert sorted((r["contestant"], r["cache"]) for r in exp) == [
        ("ebslab-torch", "cold"), ("ebslab-torch", "warm"), ("hf-trainer", "cold"), ("hf-trainer", "warm")]
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r)
        assert r["scenario"] in ("step", "experiment") and r["contestant"] in bench.CONTESTANTS
        for key in NUMERIC:
            assert isinstance(r[key], (int, float)) and np.isfinite(r[key]), (key, r)
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0
        assert r["vs_trainer"] is not None and r["vs_trainer"] > 0
        # tokens/s never exceeds samples/s x max_length: padding is not counted
        assert r["tokens_per_s"] <= r["samples_per_s"] * r["max_length"] + 0.1
    assert all(r["vs_trainer"] == 1.0 for r in rows if r["contestant"] == "hf-trainer")
    assert saved["startup"]["examples"] == 40 and saved["startup"]["cached_s"] > 0
    # the profile records exactly the asked optimizer steps (not step 1, not set-up, not the final evaluation)
    prof = saved["profile"]
    assert prof["optimizer_steps"] == 2 and prof["max_length"] == 16
    shares = [o["share"] for o in prof["ops"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-3
    assert {"aten::addmm", "aten::mm"} & {o["op"] for o in prof["ops"]}  # linear layers, forward and backward
    assert 0 < prof["matmul_share"] < 1
    assert "ebslab-torch" in bench.table(saved) and "step profile" in bench.table(saved)
    assert not any(p.name.startswith("work-") for p in tmp_path.iterdir())  # scratch folders removed


def _args(**kw):
    base = dict(quick=True, out="x", model=None, lengths=None, steps=None, contestants=None, no_experiment=False,
                rounds=None, no_startup=False, experiment_limit=None, no_profile=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cli_settings_and_errors():
    q = bench.settings_from_args(_args())
    assert q.lengths == [128, 256] and q.model == "minilm"
    s = bench.settings_from_args(_args(quick=False, lengths="128,512", steps=4, contestants="naive,hf-trainer",
                                       no_experiment=True))
    assert s.lengths == [128, 512] and s.steps == 4 and s.contestants == ["naive", "hf-trainer"]
    assert not s.experiment and s.profile_steps > 0
    assert bench.settings_from_args(_args(no_profile=True)).profile_steps == 0
    for bad in (dict(steps=1), dict(lengths="12x"), dict(contestants="lightning")):
        with pytest.raises(UserError):
            bench.settings_from_args(_args(**bad))


def test_cli_registers_bench(monkeypatch):
    from ebslab.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--out", "somewhere"])
    ran = []
    monkeypatch.setattr(bench, "run", lambda a: ran.append(a) or 7)  # the parser holds bench.run by module name
    assert args.quick and args.out == "somewhere" and args.func(args) == 7 and ran == [args]


def test_gns_overhead_from_the_on_and_off_rows():
    """ebslab-torch has the noise scale on (accum 2), ebslab-torch-nogns off: overhead = 1 - on / off per length."""
    rows = [{"scenario": "step", "contestant": "ebslab-torch", "max_length": 64, "samples_per_s": 19.0},
            {"scenario": "step", "contestant": "ebslab-torch-nogns", "max_length": 64, "samples_per_s": 20.0},
            {"scenario": "step", "contestant": "ebslab-torch", "max_length": 128, "samples_per_s": 9.0}]
    assert bench.gns_overhead(rows) == {"64": 0.05}
    s = bench.settings_from_args(_args(contestants="ebslab-torch,ebslab-torch-nogns"))
    assert s.contestants == ["ebslab-torch", "ebslab-torch-nogns"]
    assert "nogns" not in " ".join(bench.CONTESTANTS)  # on request only: the full bench stays as long as it was


def test_gns_overhead_is_the_median_of_per_round_ratios():
    """Per-round pairs (0.9, 1.9, 0.475): median 0.9, overhead 10%; best-of-rounds of each side would say 5%."""
    rows = [{"scenario": "step", "contestant": "ebslab-torch", "max_length": 64, "samples_per_s": 19.0,
             "round_samples_per_s": [9.0, 19.0, 9.5]},
            {"scenario": "step", "contestant": "ebslab-torch-nogns", "max_length": 64, "samples_per_s": 20.0,
             "round_samples_per_s": [10.0, 10.0, 20.0]}]
    assert bench.gns_overhead(rows) == {"64": 0.1}


def _small_step_settings(small_imdb, **kw):
    base = dict(model="tiny-bert", data_path=small_imdb, lengths=[16], steps=3, micro=2, effective=4, rounds=2,
                contestants=["ebslab-torch", "ebslab-torch-nogns"], experiment=False, startup_limit=0,
                matmul_size=64, warmup=False, profile_steps=0)
    base.update(kw)
    return bench.Settings(**base)


def test_nogns_contestant_runs_every_step_and_gives_the_overhead(tmp_path, small_imdb, monkeypatch, fsync_log):
    from ebslab.core.runfolder import read_jsonl as read_metrics

    seen = {}
    real = bench.run_ebslab

    def recording(s, max_length, out_dir, contestant):
        clock = real(s, max_length, out_dir, contestant)
        lines = [r for r in read_metrics(out_dir / f"{contestant}-L{max_length}" / "metrics.jsonl")
                 if r.get("event") == "step"]
        seen.setdefault(contestant, []).append((clock.done, sum("gns/b_simple" in r for r in lines)))
        return clock

    monkeypatch.setattr(bench, "run_ebslab", recording)
    result = bench.bench(_small_step_settings(small_imdb), tmp_path, say=lambda m: None)
    # 2 rounds each, 3 steps each; accum 2 puts the noise scale on every step line of ebslab-torch, none of nogns
    assert seen == {"ebslab-torch": [(3, 3), (3, 3)], "ebslab-torch-nogns": [(3, 0), (3, 0)]}
    step = {r["contestant"]: r for r in result["rows"] if r["scenario"] == "step"}
    assert set(step) == {"ebslab-torch", "ebslab-torch-nogns"}
    on, off = step["ebslab-torch"]["round_samples_per_s"], step["ebslab-torch-nogns"]["round_samples_per_s"]
    assert len(on) == len(off) == 2 and step["ebslab-torch"]["samples_per_s"] == max(on)
    assert result["gns_overhead"] == {"16": round(1 - float(np.median([a / b for a, b in zip(on, off)])), 4)}
    assert "gradient noise scale overhead" in bench.table(result)
    assert json.loads((tmp_path / "bench.json").read_text())["gns_overhead"] == result["gns_overhead"]
    assert fsync_log.durable(tmp_path / "bench.json")


def test_a_signal_during_a_contestant_stops_the_bench(tmp_path, small_imdb, monkeypatch):
    """A SIGTERM meant for the bench is caught by the run's own stop handler, which ends that run after one step and
    returns: the bench must stop, not go on to fail with 'ran 1 steps, expected 3'."""
    import signal

    from ebslab.loop.callbacks import ProgressBar

    real = ProgressBar.on_step

    def signalling(self, trainer, record):
        real(self, trainer, record)
        if trainer.state.step == 1:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(ProgressBar, "on_step", signalling)
    with pytest.raises(KeyboardInterrupt, match="ebslab-torch.*SIGTERM"):
        bench.bench(_small_step_settings(small_imdb, rounds=1, contestants=["ebslab-torch-nogns", "ebslab-torch"]),
                    tmp_path, say=lambda m: None)


def test_every_contestant_is_timed_by_the_same_rule_on_a_slow_device(tmp_path, small_imdb, monkeypatch):
    """Each contestant of the step scenario synchronizes the device exactly twice, at the ends of step 1 and of
    step N, and its timed window holds the wait at step N's end: a device 0.3 s behind at every synchronize shows
    in every contestant's time, once (HF Trainer's step clock used to synchronize at every step)."""
    from ebslab.inputs.models import load_tokenizer

    delay = 0.3
    syncs = []
    monkeypatch.setattr(bench_rules, "synchronize", lambda: syncs.append(1) or time.sleep(delay))
    s = _small_step_settings(small_imdb, steps=3)
    tokenizer = load_tokenizer("tiny-bert")
    data = bench.step_data(s, 16, tokenizer)
    runs = {"ebslab-torch": lambda: bench.run_ebslab(s, 16, tmp_path, "ebslab-torch"),
            "ebslab-accelerate": lambda: bench.run_ebslab(s, 16, tmp_path, "ebslab-accelerate"),
            "hf-trainer": lambda: bench.run_trainer(s, data, tokenizer, tmp_path / "hf"),
            "naive": lambda: bench.run_naive(s, data, tokenizer, 16)}
    for name, run in runs.items():
        syncs.clear()
        clock = run()
        assert (clock.done, len(clock.ends), len(syncs)) == (3, 2, 2), name
        elapsed = clock.ends[1] - clock.ends[0]
        assert delay <= elapsed < 2 * delay + 5, (name, elapsed)  # step N's wait is in it, step 1's is not
