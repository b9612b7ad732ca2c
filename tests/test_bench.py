"""`ebslab bench` plumbing on tiny-bert with a tiny N: schema, real-token counting, CLI. No MiniLM timing here."""

import argparse
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ebslab import bench  # noqa: E402
from ebslab.config import UserError  # noqa: E402

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
    from ebslab.models import load_tokenizer

    s = bench.Settings(model="tiny-bert", data_path=small_imdb, lengths=[24], steps=3, micro=2, effective=4)
    data = bench.step_data(s, 24, load_tokenizer("tiny-bert"))
    assert len(data.input_ids) == 12 and data.timed_samples == 8
    assert data.timed_tokens == sum(len(x) for x in data.input_ids[4:])
    assert max(len(x) for x in data.input_ids) <= 24
    # IMDB reviews fill a 24-token window: counted tokens < padded slots would show padding sneaking in
    assert data.timed_tokens <= 8 * 24


def test_peak_fraction():
    assert bench.peak_fraction(10_000_000, 1000.0, 120e9) == pytest.approx(6e10 / 120e9)


@pytest.fixture(scope="module")
def small_imdb(tmp_path_factory):
    """80 IMDB reviews: the shipped 50k-row table is re-read by every contestant, too slow for a fast test."""
    import pandas as pd

    from ebslab.data import SHIPPED_IMDB

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


def test_cli_registers_bench():
    from ebslab.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--out", "somewhere"])
    assert args.quick and args.out == "somewhere" and args.func is bench.run


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
    from ebslab.tracking import read_metrics

    seen = {}
    real = bench.run_ebslab

    def recording(s, max_length, out_dir, contestant):
        ends = real(s, max_length, out_dir, contestant)
        lines = [r for r in read_metrics(out_dir / f"{contestant}-L{max_length}" / "metrics.jsonl")
                 if r.get("event") == "step"]
        seen.setdefault(contestant, []).append((len(ends), sum("gns/b_simple" in r for r in lines)))
        return ends

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

    from ebslab.callbacks import ProgressBar

    real = ProgressBar.on_step

    def signalling(self, trainer, record):
        real(self, trainer, record)
        if trainer.state.step == 1:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(ProgressBar, "on_step", signalling)
    with pytest.raises(KeyboardInterrupt, match="ebslab-torch.*SIGTERM"):
        bench.bench(_small_step_settings(small_imdb, rounds=1, contestants=["ebslab-torch-nogns", "ebslab-torch"]),
                    tmp_path, say=lambda m: None)
