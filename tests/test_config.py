"""The config tree's checks: which values each type takes, every bound's one-line message, and which of several
problems is reported first. Each case pins the exact line ebslab has always printed, so a change in the validating
library (or in its lax rules) cannot slip by."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebslab.core.config import VALID_KEYS, Config, build_config, load_config, validate
from ebslab.core.errors import UserError

SPLIT_SUM = ("data.split [0.5, 0.3, 0.3] sums to 1.1, not 1; give fractions of the data (e.g. [0.8, 0.1, 0.1])")

# Every bound and cross-key check in the order ebslab checks them: (values that break it, the line it prints).
BOUNDS = [
    ({"data.max_length": 0}, "data.max_length must be > 0"),
    ({"optim.lr": 0}, "optim.lr must be > 0"),
    ({"optim.base_batch": -32}, "optim.base_batch must be > 0"),
    ({"batch.effective": 0}, "batch.effective must be > 0"),
    ({"batch.micro": 0}, "batch.micro must be > 0 or auto"),
    ({"batch.auto_cap": 0}, "batch.auto_cap must be > 0"),
    ({"batch.auto_cpu_tokens": -1}, "batch.auto_cpu_tokens must be > 0"),
    ({"train.epochs": 0}, "train.epochs must be > 0 (or set train.max_steps)"),
    ({"train.max_steps": -1}, "train.max_steps must be >= 0"),
    ({"train.early_stopping_patience": -1}, "train.early_stopping_patience must be >= 0"),
    ({"train.log_every_steps": 0}, "train.log_every_steps must be > 0 or auto"),
    ({"eval.every_steps": -1}, "eval.every_steps must be >= 0"),
    ({"eval.every_examples": -1}, "eval.every_examples must be >= 0"),
    ({"eval.every_steps": 5, "eval.every_examples": 64},
     "eval.every_steps and eval.every_examples are both set; keep one (the other = 0)"),
    ({"eval.batch_size": 0}, "eval.batch_size must be > 0"),
    ({"eval.select_by": "accuracy"},
     "eval.select_by must be one of acc, loss, ece, f1, mcc, auroc, brier, got 'accuracy'"),
    ({"checkpoint.every_steps": -1}, "checkpoint.every_steps must be >= 0"),
    ({"model.dropout": 1.0}, "model.dropout must be in [0, 1)"),
    ({"model.encoder_dropout": -0.1}, "model.encoder_dropout must be in [0, 1) or null"),
    ({"sched.warmup_ratio": 1}, "sched.warmup_ratio must be in [0, 1)"),
    ({"optim.weight_decay": -0.01}, "optim.weight_decay must be >= 0"),
    ({"optim.clip_norm": -1}, "optim.clip_norm must be >= 0 (0 = off)"),
    ({"optim.betas": [0.9, 1.0]}, "optim.betas must be two numbers in [0, 1)"),
    ({"data.split": [0.8, 0.2]},
     "data.split must be three positive fractions train, val, test (e.g. [0.8, 0.1, 0.1])"),
    ({"data.split": [0.5, 0.3, 0.3]}, SPLIT_SUM),
    ({"data.text_column": "label"},
     "data.text_column and data.label_column are both 'label'; the text and the label must be two columns"),
    ({"out.name": "../elsewhere"},
     "out.name '../elsewhere' must stay inside out.dir: a relative path without '..', control characters or a "
     "leading '/' or '~'"),
    ({"data.limit": 0}, "data.limit must be > 0 or null"),
    ({"data.min_class_fraction": 1}, "data.min_class_fraction must be in [0, 1) (0 = off)"),
    ({"train.seed": 2**32}, "train.seed must be in [0, 2**32)"),
    ({"data.split_seed": -1}, "data.split_seed must be in [0, 2**32)"),
    ({"track": ["wandb"]}, "track must include jsonl (the run folder's metrics.jsonl)"),
]


def refusal(values: dict) -> str:
    with pytest.raises(UserError) as e:
        build_config(values)
    return str(e.value)


@pytest.mark.parametrize("values,message", BOUNDS, ids=[m[:40] for _, m in BOUNDS])
def test_every_bound_prints_its_line(values, message):
    assert refusal(values) == message


@pytest.mark.parametrize("values,message", [
    ({"data.max_length": -8}, "data.max_length must be > 0"),
    ({"optim.lr": -1e-3}, "optim.lr must be > 0"),
    ({"optim.lr": math.nan}, "optim.lr must be > 0"),
    ({"optim.lr": "-1e-4"}, "optim.lr must be > 0"),
    ({"model.dropout": -0.1}, "model.dropout must be in [0, 1)"),
    ({"model.dropout": math.nan}, "model.dropout must be in [0, 1)"),
    ({"model.encoder_dropout": 1}, "model.encoder_dropout must be in [0, 1) or null"),
    ({"optim.weight_decay": -math.inf}, "optim.weight_decay must be >= 0"),
    ({"optim.betas": [0.9]}, "optim.betas must be two numbers in [0, 1)"),
    ({"optim.betas": [0.9, 0.99, 0.999]}, "optim.betas must be two numbers in [0, 1)"),
    ({"optim.betas": [-0.1, 0.99]}, "optim.betas must be two numbers in [0, 1)"),
    ({"data.split": [0.8, 0.2, 0.0]},
     "data.split must be three positive fractions train, val, test (e.g. [0.8, 0.1, 0.1])"),
    ({"data.split": [0.25, 0.25, 0.25, 0.25]},
     "data.split must be three positive fractions train, val, test (e.g. [0.8, 0.1, 0.1])"),
    ({"train.epochs": -1, "train.max_steps": 0}, "train.epochs must be > 0 (or set train.max_steps)"),
    ({"train.seed": -1}, "train.seed must be in [0, 2**32)"),
    ({"data.split_seed": 2**32}, "data.split_seed must be in [0, 2**32)"),
    ({"data.limit": -5}, "data.limit must be > 0 or null"),
    ({"out.name": "/abs"}, "out.name '/abs' must stay inside out.dir: a relative path without '..', control "
                           "characters or a leading '/' or '~'"),
    ({"out.name": "."}, "out.name '.' must stay inside out.dir: a relative path without '..', control "
                        "characters or a leading '/' or '~'"),
    ({"track": "tensorboard"}, "track must include jsonl (the run folder's metrics.jsonl)"),
    ({"data.label_column": "text"},
     "data.text_column and data.label_column are both 'text'; the text and the label must be two columns"),
])
def test_both_sides_of_each_bound(values, message):
    assert refusal(values) == message


@pytest.mark.parametrize("values", [
    {"train.epochs": 0, "train.max_steps": 10}, {"model.dropout": 0}, {"model.encoder_dropout": None},
    {"sched.warmup_ratio": 0.999}, {"optim.lr": math.inf}, {"data.split": [0.6, 0.2, 0.2]},
    {"eval.every_examples": 64}, {"train.seed": 2**32 - 1}, {"data.limit": None}, {"out.name": "a/b"},
    {"track": ["tensorboard", "jsonl"]}, {"batch.micro": "auto"}, {"train.log_every_steps": 1},
    {"optim.betas": [0, 0.5]}, {"data.min_class_fraction": 0},
])
def test_values_on_the_right_side_of_each_bound(values):
    cfg = build_config(values)
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        got = getattr(getattr(cfg, section) if section else cfg, name)
        assert got == value or (isinstance(value, float) and math.isnan(value))


def _keys(values: dict) -> set[str]:
    return set(values) | ({"train.max_steps"} if "train.epochs" in values else set())


PAIRS = [(a, b) for a, b in itertools.combinations(range(len(BOUNDS)), 2)
         if not _keys(BOUNDS[a][0]) & _keys(BOUNDS[b][0])]


def test_of_several_broken_bounds_the_first_checked_is_reported():
    # every pair of checks on different keys, given in both orders: the line is always the earlier check's
    assert len(PAIRS) > 400
    for a, b in PAIRS:
        first, second = BOUNDS[a][0], BOUNDS[b][0]
        assert refusal({**second, **first}) == BOUNDS[a][1], (a, b)
        assert refusal({**first, **second}) == BOUNDS[a][1], (a, b)


# ------------------------------------------------------------------------------------------------ types


def typed(key: str, value):
    section, _, name = key.rpartition(".")
    cfg = build_config({key: value})
    return getattr(getattr(cfg, section) if section else cfg, name)


@pytest.mark.parametrize("key,given,kept", [
    ("train.epochs", 3, 3), ("train.epochs", 3.0, 3), ("train.seed", 1e3, 1000),                 # int
    ("optim.lr", 1, 1.0), ("optim.lr", 2e-5, 2e-5), ("optim.lr", "1e-4", 1e-4),                  # float
    ("optim.lr", "3", 3.0), ("optim.eps", "nan", math.nan), ("optim.lr", ".5", 0.5),
    ("model.name", "tiny-bert", "tiny-bert"), ("model.name", 7, "7"), ("model.name", 1.5, "1.5"),  # str
    ("out.dir", 1e-4, "0.0001"),
    ("data.drop_empty", True, True), ("train.compile", False, False),                          # bool
    ("model.pooling", "mean", "mean"), ("optim.lr_scaling", "sqrt", "sqrt"),                    # Literal
    ("model.encoder_dropout", None, None), ("model.encoder_dropout", 0, 0.0),                   # X | None
    ("data.path", None, None), ("data.path", 12, "12"), ("train.gns", None, None), ("train.gns", True, True),
    ("data.limit", 50.0, 50),
    ("batch.micro", "auto", "auto"), ("batch.micro", 8, 8), ("batch.micro", 8.0, 8),            # int | auto
    ("train.log_every_steps", "auto", "auto"),
    ("track", "jsonl", ["jsonl"]), ("track", ("jsonl", "wandb"), ["jsonl", "wandb"]),             # lists
    ("optim.betas", (0.5, 0.6), [0.5, 0.6]), ("optim.betas", ["0.5", 1e-1], [0.5, 0.1]),
    ("data.split", ["0.5", 0.25, 0.25], [0.5, 0.25, 0.25]),
])
def test_accepted_values_and_what_they_become(key, given, kept):
    got = typed(key, given)
    assert type(got) is type(kept)
    assert got == kept or (isinstance(kept, float) and math.isnan(got) and math.isnan(kept))
    if isinstance(got, list):
        assert [type(v) for v in got] == [type(v) for v in kept]


@pytest.mark.parametrize("key,given,message", [
    ("train.epochs", 2.5, "config key 'train.epochs' must be int, got 2.5"),
    ("train.epochs", True, "config key 'train.epochs' must be int, got True"),
    ("train.epochs", "2", "config key 'train.epochs' must be int, got '2'"),
    ("train.epochs", None, "config key 'train.epochs' must be int, got None"),
    ("train.epochs", [2], "config key 'train.epochs' must be int, got [2]"),
    ("train.epochs", math.inf, "config key 'train.epochs' must be int, got inf"),
    ("optim.lr", True, "config key 'optim.lr' must be float, got True"),
    ("optim.lr", "abc", "config key 'optim.lr' must be float, got 'abc'"),
    ("optim.lr", None, "config key 'optim.lr' must be float, got None"),
    ("optim.lr", {"base": 1}, "config key 'optim.lr' must be float, got {'base': 1}"),
    ("model.name", True, "config key 'model.name' must be str, got True"),
    ("model.name", None, "config key 'model.name' must be str, got None"),
    ("model.name", b"bytes", "config key 'model.name' must be str, got b'bytes'"),
    ("model.name", list(range(20)), "config key 'model.name' must be str, got [0, 1, 2, 3, 4, 5, ...]"),
    ("data.drop_empty", 1, "config key 'data.drop_empty' must be bool, got 1"),
    ("data.drop_empty", "true", "config key 'data.drop_empty' must be bool, got 'true'"),
    ("model.pooling", "max", "config key 'model.pooling' must be 'cls' | 'mean', got 'max'"),
    ("model.pooling", "MEAN", "config key 'model.pooling' must be 'cls' | 'mean', got 'MEAN'"),
    ("model.pooling", b"cls", "config key 'model.pooling' must be 'cls' | 'mean', got b'cls'"),
    ("optim.lr_scaling", 1, "config key 'optim.lr_scaling' must be 'none' | 'linear' | 'sqrt', got 1"),
    ("model.encoder_dropout", "abc", "config key 'model.encoder_dropout' must be float or null, got 'abc'"),
    ("model.encoder_dropout", False, "config key 'model.encoder_dropout' must be float or null, got False"),
    ("train.gns", 1, "config key 'train.gns' must be bool or null, got 1"),
    ("data.limit", 0.5, "config key 'data.limit' must be int or null, got 0.5"),
    ("out.name", True, "config key 'out.name' must be str or null, got True"),
    ("batch.micro", "8", "config key 'batch.micro' must be int or 'auto', got '8'"),
    ("batch.micro", True, "config key 'batch.micro' must be int or 'auto', got True"),
    ("batch.micro", "Auto", "config key 'batch.micro' must be int or 'auto', got 'Auto'"),
    ("track", "foo", "config key 'track' must be 'jsonl' | 'tensorboard' | 'wandb', got 'foo'"),
    ("track", ["jsonl", None], "config key 'track' must be 'jsonl' | 'tensorboard' | 'wandb', got None"),
    ("track", {"a": 1}, "config key 'track' must be 'jsonl' | 'tensorboard' | 'wandb', got {'a': 1}"),
    ("optim.betas", 0.9, "config key 'optim.betas' must be list, got 0.9"),
    ("optim.betas", None, "config key 'optim.betas' must be list, got None"),
    ("optim.betas", [0.9, "x"], "config key 'optim.betas' must be float, got 'x'"),
    ("optim.betas", [0.9, 0.99, True], "config key 'optim.betas' must be float, got True"),
    ("optim.betas", [2.0, "x"], "config key 'optim.betas' must be float, got 'x'"),
    ("data.split", "0.8", "config key 'data.split' must be list, got '0.8'"),
    ("data.split", [0.8, "a", "b"], "config key 'data.split' must be float, got 'a'"),
])
def test_refused_values_name_the_key_the_type_and_the_value(key, given, message):
    assert refusal({key: given}) == message


def test_unknown_keys_and_wrong_types_are_reported_in_the_order_given_and_before_bounds():
    assert refusal({"train.epochs": "abc", "train.epoch": 2}) == "config key 'train.epochs' must be int, got 'abc'"
    assert refusal({"train.epoch": 2, "train.epochs": "abc"}) == ("unknown config key 'train.epoch'; did you mean "
                                                                 "'train.epochs'?")
    assert refusal({"optim.lr": 0, "model.pooling": "max"}).startswith("config key 'model.pooling' must be")
    assert refusal({"optim.lr": 0, "optim.lrr": 1}) == "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"
    assert refusal({"optim.betas": [0.9, "x"], "optim.lr": "y"}) == "config key 'optim.betas' must be float, got 'x'"
    assert refusal({"optim": 5}) == "unknown config key 'optim'; did you mean 'optim.lr'?"


def test_defaults_are_valid_and_the_tree_keeps_its_shape():
    cfg = build_config({})
    assert cfg == Config() and cfg.to_dict() == Config().to_dict()
    validate(cfg)
    nested = {"optim": {"lr": 1e-4, "betas": [0.8, 0.9]}, "batch": {"micro": "auto"}, "track": ["jsonl"]}
    cfg = load_config(nested, ["train.epochs=2", "optim.lr=2e-4"])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.batch.micro, cfg.train.epochs) == (2e-4, [0.8, 0.9], "auto", 2)
    assert load_config(cfg.to_dict()) == cfg
    assert list(cfg.to_dict()) == ["model", "data", "batch", "optim", "sched", "train", "eval", "checkpoint", "out",
                                   "track"]


def test_validate_refuses_a_tree_changed_in_code():
    cfg = Config()
    cfg.optim.lr = 0.0
    with pytest.raises(UserError, match=r"^optim\.lr must be > 0$"):
        validate(cfg)


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.binary(max_size=3)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                      | st.sets(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
                      max_leaves=6)


@settings(max_examples=300, deadline=None, database=None)
@given(st.dictionaries(st.sampled_from(VALID_KEYS), VALUES, max_size=5))
def test_any_value_gives_a_config_or_one_line_of_ebslab_words(values):
    try:
        build_config(values)
    except UserError as e:
        message = str(e)
        assert "\n" not in message and "pydantic" not in message and "validation error" not in message.lower()
        assert message.startswith(tuple(values)) or message.startswith(("config key '", "data.text_column and"))
