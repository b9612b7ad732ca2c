"""The core runner: exact accumulation, split, models, schedules, run folder, configs."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, TINY, read_jsonl
from ebslab.loop.callbacks import Callback
from ebslab.core.errors import UserError
from ebslab.core.config import Config, OptimConfig, derive, load_config, scaled_betas_eps, scaled_lr
from ebslab.inputs.data import collate, epoch_order, shard_window, split_indices, windows

NO_DROPOUT = ["model.dropout=0", "model.encoder_dropout=0", "train.epochs=2"]
TINY_EXACT = [*TINY, "model.dropout=0", "model.encoder_dropout=0"]


def steps(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["event"] == "step"]


def weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def weight_rel_diff(a, b):
    """||a - b|| / ||a|| over all parameters. (Per tensor is too strict: e.g. attention key biases get a zero
    gradient, since softmax ignores them, and Adam turns the rounding noise in it into lr-sized steps.)"""
    diff = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    return (diff / torch.sqrt(sum((a[k] ** 2).sum() for k in a))).item()


def rel_diff(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


# ---------------------------------------------------------------- the loss rule


def test_accumulation_is_the_large_batch_step_by_step(train_run, monkeypatch):
    import ebslab.loop.train as loop

    fed, real_collate = [], loop.collate  # the examples each training micro-batch really holds, in order
    monkeypatch.setattr(loop, "collate", lambda split, idx, *a: fed[-1].append(np.array(idx)) or
                        real_collate(split, idx, *a))
    runs = {}
    for shape in (32, 8, 4):
        fed.append([])
        runs[shape] = train_run(*NO_DROPOUT, f"batch.micro={shape}")
    cfg = yaml.safe_load((runs[8] / "config.yaml").read_text())["derived"]
    # example order is a function of (seed, epoch) only: every micro-batch size feeds the epoch orders, in order
    order = np.concatenate([epoch_order(cfg["num_train"], seed=1, epoch=e) for e in (0, 1)])
    assert [[len(mb) for mb in per_micro[:6]] for per_micro in fed] == [[32] * 6, [8] * 6, [4] * 6]
    for per_micro in fed:
        assert np.array_equal(np.concatenate(per_micro), order)
    assert cfg["num_train"] % 32 != 0, "the train split must leave a short last window"
    assert cfg["accum_steps"] == 4
    ref = steps(runs[32])
    assert len(ref) == 2 * math.ceil(cfg["num_train"] / 32)
    for shape in (8, 4):
        other = steps(runs[shape])
        assert [r["step"] for r in other] == [r["step"] for r in ref]
        for a, b in zip(ref, other):
            # grad_norm is proportional to the gradient's scale: a wrong divisor on the short window shows here
            for key in ("train/loss", "grad_norm", "lr"):
                assert rel_diff(a[key], b[key]) <= 1e-5, (shape, a["step"], key, a[key], b[key])
        assert other[-1]["micro_step"] == sum(math.ceil(n / shape) for n in
                                               [32] * (cfg["num_train"] // 32) + [cfg["num_train"] % 32]) * 2
        assert weight_rel_diff(weights(runs[32]), weights(runs[shape])) <= 1e-5


# The logged train/loss against the plain mean over the window (a 0.3-3.0 band accepted a 2x error):
# test_loss_rule.test_accumulated_step_is_the_plain_gradient_of_the_window_mean_full_and_short_window


def test_clipping_brings_the_gradient_norm_to_max_norm_and_returns_the_pre_clip_norm():
    from ebslab.loop.backends.torch import TorchBackend

    model = torch.nn.Linear(4, 3)
    for p, scale in zip(model.parameters(), (3.0, 4.0)):
        p.grad = torch.full_like(p, scale)
    before = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])))
    backend = TorchBackend(device="cpu")
    assert float(backend.clip(model, None, 0.5)) == pytest.approx(before)
    after = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert after == pytest.approx(0.5, rel=1e-5)  # clipped to max_norm, direction kept
    assert float(model.bias.grad[0] / model.weight.grad[0, 0]) == pytest.approx(4.0 / 3.0)
    assert float(backend.clip(model, None, 0)) == pytest.approx(0.5, rel=1e-5)  # 0 = off: the norm, no change
    assert float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))) == \
        pytest.approx(0.5, rel=1e-5)


def test_the_host_waits_for_the_device_only_at_log_eval_and_checkpoint_steps(train_run, monkeypatch):
    import ebslab.loop.train as loop

    reads = []
    real = loop._to_host
    monkeypatch.setattr(loop, "_to_host", lambda t: reads.append(1) or real(t))
    dense = train_run(*NO_DROPOUT)
    dense_reads, reads[:] = len(reads), []
    sparse = train_run(*NO_DROPOUT, "train.log_every_steps=3")
    derived = yaml.safe_load((sparse / "config.yaml").read_text())["derived"]
    per_epoch, total = derived["steps_per_epoch"], derived["total_steps"]
    assert per_epoch % 3 != 0, "an epoch end must fall between log steps"
    read_at = [s for s in range(1, total + 1) if s % 3 == 0 or s % per_epoch == 0]
    assert dense_reads == total and len(reads) == len(read_at)
    assert [r["step"] for r in steps(sparse)] == read_at
    by_step = {r["step"]: r for r in steps(dense)}
    for r in steps(sparse):  # a step line is still that step's own window, not an average
        assert rel_diff(r["train/loss"], by_step[r["step"]]["train/loss"]) <= 1e-6
    evals = [[r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "eval"] for run in (dense, sparse)]
    assert len(evals[0]) == len(evals[1]) == 2
    for a, b in zip(*evals):  # the sums kept on the device between reads add up to the same epoch means
        for key in ("train/loss", "train/acc", "val/loss"):
            assert rel_diff(a[key], b[key]) <= 1e-6, key
    assert weight_rel_diff(weights(dense), weights(sparse)) == 0


def test_short_window_is_spread_over_micro_batches_and_processes():
    window = np.arange(10)
    shards = [shard_window(window, micro=4, world_size=2, rank=r) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2  # the same number of micro-steps on every process
    got = sorted(int(i) for s in shards for mb in s if mb.counts for i in mb.indices)
    assert got == list(range(10))  # every example exactly once
    tiny = [shard_window(np.arange(1), micro=4, world_size=2, rank=r) for r in (0, 1)]
    assert [mb.counts for mb in tiny[1]] == [False]  # rank 1 has nothing: a stand-in that carries no weight
    full = shard_window(np.arange(32), micro=8, world_size=1, rank=0)
    assert [len(mb.indices) for mb in full] == [8, 8, 8, 8]


def test_epoch_order_is_a_function_of_seed_and_epoch():
    # that the loop feeds it whatever the micro-batch size: test_accumulation_is_the_large_batch_step_by_step;
    # whatever the world size: test_distributed (losses equal step by step, short last window included)
    assert np.array_equal(epoch_order(100, seed=3, epoch=1), epoch_order(100, seed=3, epoch=1))
    assert not np.array_equal(epoch_order(100, 3, 1), epoch_order(100, 3, 2))
    assert not np.array_equal(epoch_order(100, 3, 1), epoch_order(100, 4, 1))
    assert [len(w) for w in windows(epoch_order(100, 3, 1), 32)] == [32, 32, 32, 4]


# ---------------------------------------------------------------- split


def test_split_is_deterministic_stratified_disjoint_and_8_1_1():
    labels = np.array([0] * 700 + [1] * 300)
    tr, va, te = split_indices(labels, [0.8, 0.1, 0.1], seed=42)
    assert (len(tr), len(va), len(te)) == (800, 100, 100)
    assert len(set(tr) | set(va) | set(te)) == 1000
    assert labels[va].sum() == 30 and labels[te].sum() == 30 and labels[tr].sum() == 240
    again = split_indices(labels, [0.8, 0.1, 0.1], seed=42)
    assert all((x == y).all() for x, y in zip((tr, va, te), again))
    other = split_indices(labels, [0.8, 0.1, 0.1], seed=7)
    assert not (other[0] == tr).all()
    assert tr[:50].std() > 100  # shuffled: not the file order (negatives first)


def test_limit_keeps_a_prefix_of_the_same_shuffle():
    labels = np.array([0, 1] * 500)
    perm = np.random.default_rng(42).permutation(1000)
    tr, va, te = split_indices(labels, [0.8, 0.1, 0.1], seed=42, limit=200)
    assert set(tr) | set(va) | set(te) == set(perm[:200])
    assert (len(tr), len(va), len(te)) == (160, 20, 20)


def test_imdb_split_sizes_on_the_shipped_data():
    import pandas as pd

    from ebslab.inputs.data import SHIPPED_IMDB

    # the package data an installed ebslab reads, and the checkout's data/imdb that configs and docs name, are one
    assert (ROOT / "data/imdb").resolve() == SHIPPED_IMDB == ROOT / "src/ebslab/assets/imdb"
    labels = np.concatenate([pd.read_parquet(ROOT / "data/imdb" / f)["label"].to_numpy()
                             for f in ("train.parquet", "test.parquet")])
    tr, va, te = split_indices(labels, [0.8, 0.1, 0.1], seed=42)
    assert (len(tr), len(va), len(te)) == (40000, 5000, 5000)
    assert labels[te].mean() == 0.5


def test_shipped_imdb_is_read_and_cleaned_once_per_process(monkeypatch):
    from ebslab.inputs import data
    from ebslab.core.config import DataConfig

    with pytest.raises(UserError, match="dataset 'imdb' has no text column 'nope'"):
        data.load_examples(DataConfig(text_column="nope"), "dataset 'imdb'")
    first = data.load_examples(DataConfig(), "dataset 'imdb'")
    assert len(first.texts) == len(first.labels) == 50_000 and first.label_names == ["0", "1"]
    monkeypatch.setattr(data, "_load_imdb", lambda: pytest.fail("the shipped IMDB was read a second time"))
    # limit and max_length act after loading: the same cleaned table serves every run
    assert data.load_examples(DataConfig(limit=64, max_length=16), "dataset 'imdb'") is first
    # a user's own file is read every time: it may have changed between runs
    import pandas as pd

    reads = []
    monkeypatch.setattr(data, "load_table", lambda cfg: reads.append(cfg.path) or pd.DataFrame(
        {"text": ["a", "b"], "label": [0, 1]}))
    for _ in range(2):
        assert data.load_examples(DataConfig(path="x.csv"), "x.csv").texts == ["a", "b"]
    assert reads == ["x.csv", "x.csv"]


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("name,expects_types", [("tiny-bert", True), ("tiny-roberta", False),
                                                ("tiny-modernbert", False)])
def test_model_inputs_follow_the_encoder(name, expects_types):
    from ebslab.core.config import ModelConfig
    from ebslab.inputs.models import build_model, load_tokenizer

    tok = load_tokenizer(name)
    bundle = build_model(ModelConfig(name=name, dropout=0.0, encoder_dropout=0.0), 2, seed=0, tokenizer=tok)
    assert ("token_type_ids" in bundle.model_inputs) == expects_types
    seen = {}
    forward = bundle.model.encoder.forward

    def spy(**kwargs):
        seen.update(kwargs)
        return forward(**kwargs)

    bundle.model.encoder.forward = spy
    from ebslab.inputs.data import TokenizedSplit

    ids = np.array([101, 2023, 102, 101, 102], dtype=np.int32)
    split = TokenizedSplit(ids=ids, offsets=np.array([0, 3, 5]), labels=np.array([0, 1]), rows=np.arange(2))
    logits = bundle.model(**collate(split, np.arange(2), bundle.pad_id, bundle.model_inputs))
    assert logits.shape == (2, 2)
    assert ("token_type_ids" in seen) == expects_types


def test_mean_pooling_ignores_padding():
    from ebslab.core.config import ModelConfig
    from ebslab.inputs.models import build_model, load_tokenizer

    bundle = build_model(ModelConfig(name="tiny-bert", pooling="mean", dropout=0.0, encoder_dropout=0.0), 2,
                         seed=0, tokenizer=load_tokenizer("tiny-bert"))
    model = bundle.model.eval()
    ids = torch.tensor([[101, 2023, 2003, 102]])
    alone = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    padded_ids = torch.tensor([[101, 2023, 2003, 102, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    padded = model(input_ids=padded_ids, attention_mask=mask)
    assert torch.allclose(alone, padded, atol=1e-6)
    # and the masked positions would change a naive mean: pooling is not a plain average
    hidden = model.encoder(input_ids=padded_ids, attention_mask=mask).last_hidden_state
    naive = model.head(hidden.mean(1))
    assert not torch.allclose(naive, padded, atol=1e-4)


@pytest.mark.parametrize("name,applies", [("tiny-bert", True), ("tiny-roberta", True), ("tiny-modernbert", False)])
def test_first_token_only_last_layer_is_the_same_function(name, applies):
    """cls pooling computes the last layer at the first position only: same logits and same gradients as the
    full layer (padding included), and only where the layout is known; mean pooling keeps the full layer."""
    from ebslab.core.config import ModelConfig
    from ebslab.inputs.models import build_model, load_tokenizer

    tok = load_tokenizer(name)
    fast = build_model(ModelConfig(name=name, dropout=0.0, encoder_dropout=0.0), 2, seed=0, tokenizer=tok)
    full = build_model(ModelConfig(name=name, dropout=0.0, encoder_dropout=0.0), 2, seed=0, tokenizer=tok)
    if applies:
        del full.model.encoder.encoder.layer[-1].forward  # back to the class's own full-sequence forward
    assert fast.first_token_only == applies
    assert not build_model(ModelConfig(name=name, pooling="mean"), 2, seed=0, tokenizer=tok).first_token_only
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    if "token_type_ids" in fast.model_inputs:
        batch["token_type_ids"] = torch.zeros_like(ids)
    labels = torch.tensor([0, 1])
    out = {}
    for key, bundle in (("fast", fast), ("full", full)):
        model = bundle.model.train()
        logits = model(**batch)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        out[key] = logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        hidden = model.encoder(**batch).last_hidden_state
        assert hidden.shape[1] == (1 if key == "fast" and applies else ids.shape[1])
    torch.testing.assert_close(out["fast"][0], out["full"][0], rtol=1e-5, atol=1e-6)
    assert out["fast"][1].keys() == out["full"][1].keys()
    for n in out["full"][1]:
        torch.testing.assert_close(out["fast"][1][n], out["full"][1][n], rtol=1e-4, atol=1e-6, msg=n)
    if applies:  # and the saved weights keep the model's own names
        assert fast.model.state_dict().keys() == full.model.state_dict().keys()


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta", "tiny-modernbert"])
def test_tiny_models_train(train_run, name):
    run = train_run(f"model.name={name}", "data.limit=120", "batch.effective=16")
    summary = json.loads((run / "summary.json").read_text())
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    assert summary["steps"] == math.ceil(derived["num_train"] / 16) == derived["total_steps"]
    assert summary["status"] in ("completed", "collapsed")
    assert math.isfinite(summary["test_best"]["loss"])
    first, last = steps(run)[0], steps(run)[-1]
    assert first["train/loss"] != last["train/loss"]  # the weights moved


# ---------------------------------------------------------------- optimization


def test_lr_scaling_rules():
    assert scaled_lr(OptimConfig(lr=1e-4, base_batch=32, lr_scaling="none"), 128) == 1e-4
    assert scaled_lr(OptimConfig(lr=1e-4, base_batch=32, lr_scaling="linear"), 128) == pytest.approx(4e-4)
    assert scaled_lr(OptimConfig(lr=1e-4, base_batch=32, lr_scaling="sqrt"), 128) == pytest.approx(2e-4)
    assert scaled_lr(OptimConfig(lr=5e-5, base_batch=64, lr_scaling="sqrt"), 1024) == pytest.approx(2e-4)
    (b1, b2), eps = scaled_betas_eps(OptimConfig(lr_scaling="sqrt", scale_betas_eps=True, base_batch=32), 64)
    assert (b1, b2) == (pytest.approx(0.8), pytest.approx(0.998)) and eps == pytest.approx(1e-8 / math.sqrt(2))
    assert scaled_betas_eps(OptimConfig(lr_scaling="sqrt"), 64) == ((0.9, 0.999), 1e-8)


@pytest.mark.parametrize("sched,at", [("linear", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}),
                                      ("cosine", {0: 0.0, 10: 1.0, 55: 0.5, 100: 0.0}),
                                      ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 90: 1.0})])
def test_schedules_count_optimizer_steps(sched, at):
    from ebslab.loop.optim import build_optimizer, build_scheduler

    cfg = load_config(None, [f"sched.name={sched}", "sched.warmup_ratio=0.1", "optim.lr=1e-3",
                             "batch.effective=100", "batch.micro=10", "train.epochs=1"])
    derived = derive(cfg, num_train=10000, world_size=1)
    assert (derived.total_steps, derived.warmup_steps, derived.accum_steps) == (100, 10, 10)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg.optim, derived)
    sch = build_scheduler(opt, cfg.sched, derived)
    lrs = []
    for _ in range(101):
        lrs.append(sch.get_last_lr()[0])
        opt.step()
        sch.step()
    for step, frac in at.items():
        assert lrs[step] == pytest.approx(1e-3 * frac, abs=1e-9), (step, lrs[step])


def test_warmup_is_in_steps_not_micro_steps_in_a_run(train_run):
    run = train_run("sched.name=linear", "sched.warmup_ratio=0.5", "batch.micro=4", "optim.lr=1e-3")
    lines = steps(run)
    total = len(lines)
    warm = round(0.5 * total)
    assert lines[0]["lr"] == 0.0 and lines[0]["micro_step"] == 8
    assert lines[warm]["lr"] == pytest.approx(1e-3)
    assert lines[1]["lr"] == pytest.approx(1e-3 / warm)


def test_weight_decay_skips_biases_and_norms():
    from ebslab.loop.optim import param_groups
    from ebslab.core.config import ModelConfig
    from ebslab.inputs.models import build_model, load_tokenizer

    model = build_model(ModelConfig(name="tiny-bert"), 2, 0, load_tokenizer("tiny-bert")).model
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any("LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01


def test_clipping_logs_the_pre_clip_norm(train_run):
    free = steps(train_run(*NO_DROPOUT, "train.epochs=1"))
    clipped = steps(train_run(*NO_DROPOUT, "train.epochs=1", "optim.clip_norm=1e-4"))
    assert clipped[0]["grad_norm"] == pytest.approx(free[0]["grad_norm"], rel=1e-5)  # same first step
    assert clipped[0]["grad_norm"] > 1e-3
    assert clipped[-1]["train/loss"] != pytest.approx(free[-1]["train/loss"], rel=1e-4)


# ---------------------------------------------------------------- run folder and budgets


def test_run_folder_is_complete(train_run):
    run = train_run("train.epochs=2")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    d = cfg["derived"]
    assert d["accum_steps"] == 4 and d["steps_per_epoch"] == math.ceil(d["num_train"] / 32)
    assert d["total_steps"] == 2 * d["steps_per_epoch"]
    records = read_jsonl(run / "metrics.jsonl")
    assert len([r for r in records if r["event"] == "step"]) == d["total_steps"]
    evals = [r for r in records if r["event"] == "eval"]
    assert [e["step"] for e in evals] == [d["steps_per_epoch"], 2 * d["steps_per_epoch"]]
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "elapsed_s"):
        assert key in evals[0]
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] in ("completed", "collapsed") and s["duration_s"] > 0
    assert s["test_best"]["n"] == s["test_last"]["n"] == 25
    assert s["test_last"]["acc"] == pytest.approx(evals[-1]["test/acc"])
    assert s["best_epoch"] in (1, 2)
    assert (run / "checkpoints/best/model.safetensors").exists()
    assert (run / "checkpoints/last/optimizer.safetensors").exists()
    assert json.loads((run / "labels.json").read_text())["names"] == ["0", "1"]
    import pandas as pd

    preds = pd.read_parquet(run / "predictions" / "test_best.parquet")
    assert len(preds) == 25 and (preds["pred"] == preds["label"]).mean() == pytest.approx(s["test_best"]["acc"])


def test_max_steps_budget_and_eval_interval(train_run):
    run = train_run("train.max_steps=5", "eval.every_steps=2", "batch.effective=16")
    evals = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "eval"]
    assert evals == [2, 4, 5]
    assert json.loads((run / "summary.json").read_text())["steps"] == 5


def test_early_stopping_counts_evaluations(train_run):
    run = train_run("train.max_steps=40", "eval.every_steps=1", "batch.effective=8",
                    "train.early_stopping_patience=2", "optim.lr=1e-9")
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "eval"]
    accs = [e["val/acc"] for e in evals]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))
    assert len(evals) == best + 3 < 40  # stopped two evaluations after the last gain


def test_collapse_is_flagged(train_run):
    run = train_run("optim.lr=1e-9", "data.limit=120", "batch.effective=16")
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "collapsed" and "majority" in s["message"]
    assert any(r["event"] == "warning" and r["kind"] == "collapsed" for r in read_jsonl(run / "metrics.jsonl"))


# ---------------------------------------------------------------- config


def test_config_types_and_nearest_key():
    with pytest.raises(UserError, match="did you mean 'batch.effective'"):
        load_config(None, ["batch.efective=64"])
    with pytest.raises(UserError, match="train.epochs.*must be int.*'abc'"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(UserError, match="not divisible"):
        derive(load_config(None, ["batch.effective=100", "batch.micro=16"]), 1000, 1)
    with pytest.raises(UserError, match="micro x world_size = 8 x 2"):
        derive(load_config(None, ["batch.effective=24", "batch.micro=8"]), 1000, 2)
    cfg = load_config(None, ["optim.lr=1e-4", "track=[jsonl,tensorboard]", "batch.micro=auto"])
    assert cfg.optim.lr == 1e-4 and cfg.track == ["jsonl", "tensorboard"] and cfg.batch.micro == "auto"


def test_derived_values_are_printed(train_run, capsys):
    train_run("batch.effective=32", "batch.micro=8")
    out = capsys.readouterr().out
    assert "effective_batch 32 = micro 8 x accum_steps 4 x world_size 1" in out
    assert "steps/epoch" in out and "warmup steps 0" in out
    assert "pooling cls (last layer computed at the first token only)" in out


# sweep and study files are checked by test_sweep / test_tune (test_shipped_study_files_are_valid)
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"sweeps", "tune"} & set(p.parts))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    micro = cfg.batch.micro if cfg.batch.micro != "auto" else 1
    assert cfg.batch.effective % micro == 0


def test_reloading_a_resolved_config_gives_the_same_config(train_run):
    run = train_run()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert load_config(saved).to_dict() == {k: v for k, v in saved.items() if k != "derived"}


# ---------------------------------------------------------------- slow: real model, real data


@pytest.mark.slow
def test_minilm_learns_imdb(train_run):
    run = train_run(base=["model.name=minilm", "data.limit=1500", "data.max_length=128", "batch.effective=16",
                          "batch.micro=16", "optim.lr=1e-4", "sched.name=linear", "sched.warmup_ratio=0.1",
                          "model.pooling=mean", "train.epochs=1", "eval.test_on=last"])
    assert json.loads((run / "summary.json").read_text())["test_last"]["acc"] > 0.75


def test_unknown_model_says_the_hub_is_unreachable(tmp_path, capsys):
    from ebslab.cli import main

    code = main(["train", "model.name=no-such-org/no-such-model", "data.limit=50", f"out.dir={tmp_path}",
                 "out.name=x"])
    err = capsys.readouterr().err
    assert code == 2 and "no-such-org/no-such-model" in err and "HF_HUB_OFFLINE=1" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_divergence_stops_the_run(train_run):
    run = train_run("optim.lr=1e38", "train.epochs=3", expect=1)
    s = json.loads((run / "summary.json").read_text())
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    assert s["status"] == "diverged" and "non-finite" in s["message"]
    assert s["steps"] < derived["total_steps"]  # stopped, not run to the end
    warnings = [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "warning"]
    assert warnings and warnings[0]["kind"] == "diverged" and warnings[0]["step"] == s["steps"]


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path, capsys):
    from ebslab.cli import main

    precious = tmp_path / "Documents"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code = main(["train", "model.name=tiny-bert", "data.limit=60", f"out.dir={tmp_path}", "out.name=Documents",
                 "--overwrite"])
    assert code == 2 and "not an ebslab run" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_indivisible_batch_fails_before_loading_data(tmp_path, capsys, monkeypatch):
    import ebslab.loop.train
    from ebslab.cli import main

    def no_data(*_, **__):
        raise AssertionError("data was loaded before the batch check")

    monkeypatch.setattr(ebslab.loop.train, "load_data", no_data)
    code = main(["train", "batch.effective=30", "batch.micro=8", f"out.dir={tmp_path}"])
    assert code == 2 and "not divisible" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("data.max_length=600", "exceeds what tiny-bert can encode"),
    ("train.device=gpu0", "is not a device"),
])
def test_more_user_errors_are_one_line(tmp_path, capsys, override, message):
    from ebslab.cli import main

    code = main(["train", "model.name=tiny-bert", "data.limit=60", override, f"out.dir={tmp_path}", "out.name=x"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and not (tmp_path / "x").exists()


def test_missing_tracker_package_is_refused_before_the_run_folder(tmp_path, capsys, monkeypatch):
    import importlib.util

    from ebslab.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = main(["train", "model.name=tiny-bert", "data.limit=60", "track=[jsonl,wandb]", f"out.dir={tmp_path}",
                 "out.name=x"])
    assert code == 2 and "wandb package" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_config_path_with_equals_signs_is_a_config(tmp_path, train_run):
    from ebslab.cli import main

    first = train_run()
    folder = tmp_path / "model.name=tiny-bert,train.seed=1"
    folder.mkdir()
    (folder / "config.yaml").write_text((first / "config.yaml").read_text())
    assert main(["train", str(folder / "config.yaml"), f"out.dir={tmp_path}", "out.name=again"]) == 0
    a = json.loads((first / "summary.json").read_text())["test_last"]["acc"]
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["test_last"]["acc"] == a


class Fp16Probe(Callback):
    """Records the loss scale before each step, the weights before `poison_at`, and puts an inf into one (scaled)
    gradient there."""

    def __init__(self, poison_at: int = 0):
        self.poison_at, self.scales, self.before = poison_at, [], None

    def on_before_clip(self, trainer) -> None:
        self.scales.append(trainer.backend.scaler.get_scale())
        if trainer.state.step + 1 == self.poison_at:
            model = trainer.backend.unwrap(trainer.model)
            self.before = {k: v.clone() for k, v in model.state_dict().items()}
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    def on_step(self, trainer, record) -> None:
        if trainer.state.step == self.poison_at:
            model = trainer.backend.unwrap(trainer.model)
            self.after = {k: v.clone() for k, v in model.state_dict().items()}


def test_fp16_unscales_before_clipping_and_logs_the_unscaled_grad_norm(tmp_path, fp16_on_cpu):
    from ebslab.loop.train import train

    base = [*TINY_EXACT, "optim.clip_norm=0.05", f"out.dir={tmp_path}"]  # clipping at every step
    plain = train(load_config(None, [*base, "train.device=cpu", "out.name=fp32"]))
    probe = Fp16Probe()
    scaled = train(load_config(None, [*base, *fp16_on_cpu, "out.name=fp16"]), callbacks=[probe])
    assert plain["steps"] == scaled["steps"] == 7
    assert probe.scales == [65536.0] * 7  # the loss really was scaled, by 2^16, at every step
    ref, got = steps(tmp_path / "fp32"), steps(tmp_path / "fp16")
    assert min(r["grad_norm"] for r in ref) > 0.05  # the clip was active
    for a, b in zip(ref, got):
        # clipping the scaled gradient would log 65536x the norm and step 65536x too short after the unscale
        for key in ("train/loss", "grad_norm"):
            assert rel_diff(a[key], b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
    assert weight_rel_diff(weights(tmp_path / "fp32"), weights(tmp_path / "fp16")) <= 1e-5


def test_fp16_inf_gradient_skips_the_step_lowers_the_scale_and_the_run_goes_on(tmp_path, fp16_on_cpu):
    from ebslab.loop.train import train

    probe = Fp16Probe(poison_at=3)
    summary = train(load_config(None, [*TINY_EXACT, *fp16_on_cpu, "checkpoint.every_steps=1",
                                       f"out.dir={tmp_path}", "out.name=run"]), callbacks=[probe])
    assert summary["status"] != "diverged" and summary["steps"] == 7  # the scaler's business, not a divergence
    assert probe.scales == [65536.0] * 3 + [32768.0] * 4  # halved by the skipped step, kept after
    for name, before in probe.before.items():
        assert torch.equal(probe.after[name], before), name  # the step was skipped
    logged = {r["step"]: r for r in steps(tmp_path / "run")}
    assert not math.isfinite(float(logged[3]["grad_norm"])) and math.isfinite(logged[4]["grad_norm"])
    # the scale the resumed run needs is in the checkpoint (JSON numbers), halved
    state = json.loads((tmp_path / "run" / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] == 32768.0
    from ebslab.loop.backends.torch import TorchBackend

    resumed = TorchBackend("fp16", "cpu")
    resumed.load_scaler_state(state["scaler"])
    assert resumed.scaler.get_scale() == 32768.0


def test_resume_keeps_the_auto_micro_batch(tmp_path):
    from ebslab.loop.train import resolve_micro

    cfg = load_config(None, ["batch.micro=auto", "batch.effective=32"])
    assert resolve_micro(cfg, 1, {"micro": 4}) == 4


def test_test_on_best_reuses_the_evaluation_at_the_best_step(train_run, monkeypatch):
    """The final test on the best weights is the test result already computed when those weights were
    evaluated: no extra pass over the test set. (A resumed run whose best came before the resume scores best/
    again; test_reliability checks that it ends with the same summary as an uninterrupted run.)"""
    import ebslab.loop.train as train_mod
    from ebslab.loop.evaluate import evaluate

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", counting)
    run = train_run("train.max_steps=6", "eval.every_steps=1", "batch.effective=16", "optim.lr=3e-3")
    s = json.loads((run / "summary.json").read_text())
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "eval"]
    assert len(evals) == 6 and len(calls) == 2 * 6  # val + test per evaluation, nothing after
    at_best = next(e for e in evals if e["step"] == s["best_step"])
    assert s["test_best"]["acc"] == at_best["test/acc"] and s["test_best"]["loss"] == at_best["test/loss"]
    assert s["test_last"]["acc"] == evals[-1]["test/acc"]


def test_last_shares_the_best_weights_file_when_both_are_the_same_step(train_run, monkeypatch):
    """One epoch, one evaluation (so it is the best) at the last step: last/ hard-links best/'s weights file
    instead of writing it again; a filesystem without hard links gets a written copy. Both load the same."""
    from safetensors.torch import load_file

    def linked(run):
        best, last = (run / "checkpoints" / name / "model.safetensors" for name in ("best", "last"))
        return best.stat().st_ino == last.stat().st_ino

    def same_weights(run):
        a, b = (load_file(str(run / "checkpoints" / name / "model.safetensors")) for name in ("best", "last"))
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    run = train_run()
    s = json.loads((run / "summary.json").read_text())
    assert s["best_step"] == s["steps"] == 7  # 200 train examples / EBS 32: 7 windows
    assert linked(run) and same_weights(run)

    # two evaluations that score the same (lr 1e-12): the best stays at the first, the last weights are written
    run = train_run("train.epochs=2", "optim.lr=1e-12")
    s = json.loads((run / "summary.json").read_text())
    assert (s["best_step"], s["steps"]) == (7, 14)
    assert not linked(run)

    def no_links(*_):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr("ebslab.loop.checkpoint.os.link", no_links)
    run = train_run()
    assert not linked(run) and same_weights(run)


def test_token_cache_key_changes_with_everything_that_changes_token_ids():
    from tokenizers import normalizers

    from ebslab.inputs.data import _tokenizer_fingerprint, tokenize
    from ebslab.inputs.models import load_tokenizer

    def fresh():
        return load_tokenizer("tiny-bert")

    base = _tokenizer_fingerprint(fresh())
    assert _tokenizer_fingerprint(fresh()) == base  # a rerun hits the cache
    tok = fresh()
    tokenize(["a call leaves its truncation settings behind"], tok, 8)
    assert _tokenizer_fingerprint(tok) == base

    left = fresh()
    left.truncation_side = "left"
    cased = fresh()
    cased.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    special = fresh()
    special.add_special_tokens({"additional_special_tokens": ["[NEW]"]})
    changed = {name: _tokenizer_fingerprint(t) for name, t in
               (("truncation side", left), ("normaliser", cased), ("special tokens", special))}
    assert all(key != base for key in changed.values()), changed
    assert len(set(changed.values())) == 3
    text = ["One two three four five six seven eight nine ten eleven twelve"]
    # and those changes do change the ids: a key that ignored them would serve the wrong ones from the cache
    assert tokenize(text, left, 8)[0].tolist() != tokenize(text, fresh(), 8)[0].tolist()
    assert tokenize(text, cased, 8)[0].tolist() != tokenize(text, fresh(), 8)[0].tolist()
