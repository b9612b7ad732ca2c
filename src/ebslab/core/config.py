"""The typed config tree: defaults in code, YAML files, dotted overrides, derived values.

Every key a user can set lives in one of the dataclasses below; `load_config` merges a YAML file (or mapping)
and `key=value` overrides into them, checks names, types and bounds before any work starts, and `derive` computes
the values that follow from them (accum_steps, scaled lr, steps, warmup) exactly once.

The tree stays plain dataclasses validated through one `pydantic.TypeAdapter`, not pydantic models, because code
builds and reads sections freely (a test's `ModelConfig(name=...)`, `dataclasses.asdict`) and only what a user
gives needs checking: the field types carry the checks, `build_config` runs them and words every refusal in one
line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Collection, Literal, Union

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, Strict, TypeAdapter, ValidationError, ValidationInfo
from pydantic_core import PydanticCustomError

from ebslab.core.errors import UserError
from ebslab.core.metrics import METRICS
from ebslab.core.tables import md_table


# ----------------------------------------------------------------------------------------------------------
# Field types: what a key accepts. Strict, plus the few conversions config files need, so pydantic's lax rules
# (a "2" for an int, 1 for a bool, a set for a list) never decide what a run trains with.


def _integral(value: Any) -> Any:
    """2.0 -> 2: YAML and JSON write some whole numbers with a dot."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _number(value: Any) -> Any:
    """A number YAML 1.1 read as a string ("1e-4": no dot) -> float."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _text(value: Any) -> Any:
    """7 -> "7": a name or path that YAML read as a number."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _one_or_more(value: Any) -> Any:
    """A single name for a list of names is a one-item list (`track=wandb`); numbers get no such help."""
    value = _listed(value)
    return value if isinstance(value, list) else [value]


def _check(value: Any, ok: bool, message: str) -> Any:
    """`value`, or a refusal in its own line (a check across keys, or one whose line names the value)."""
    if not ok:
        raise PydanticCustomError("config_check", "{message}", {"message": message})
    return value


def _length(n: int) -> AfterValidator:
    def check(items: list) -> list:
        if len(items) != n:
            raise PydanticCustomError("config_length", "needs {n} items", {"n": n})
        return items
    return AfterValidator(check)


Int = Annotated[int, Strict(), BeforeValidator(_integral)]
Float = Annotated[float, Strict(), BeforeValidator(_number)]
Str = Annotated[str, Strict(), BeforeValidator(_text)]
Bool = Annotated[bool, Strict()]
Positive = Field(gt=0)
NonNegative = Field(ge=0)
Fraction = Field(ge=0, lt=1)
Seed = Field(ge=0, lt=2**32)


def _two_columns(label_column: str, info: ValidationInfo) -> str:
    return _check(label_column, info.data.get("text_column") != label_column, "data.text_column and "
                  f"data.label_column are both {short_repr(label_column)}; the text and the label must be two columns")


def _sums_to_one(split: list[float]) -> list[float]:
    return _check(split, abs(sum(split) - 1) <= 1e-6, f"data.split {short_repr(split)} sums to {sum(split):g}, "
                  "not 1; give fractions of the data (e.g. [0.8, 0.1, 0.1])")


def _a_budget(max_steps: int, info: ValidationInfo) -> int:
    # checked on max_steps (validated after epochs), so that a bad value of another train key does not hide it
    return _check(max_steps, info.data.get("epochs", 1) > 0 or max_steps > 0,
                  "train.epochs must be > 0 (or set train.max_steps)")


def _one_eval_clock(every_examples: int, info: ValidationInfo) -> int:
    return _check(every_examples, not (info.data.get("every_steps") and every_examples),
                  "eval.every_steps and eval.every_examples are both set; keep one (the other = 0)")


def _a_metric(name: str) -> str:
    return _check(name, name in METRICS, f"eval.select_by must be one of {', '.join(METRICS)}, got {name!r}")


def _inside_out_dir(name: str) -> str:
    """out.name names a folder inside out.dir: relative, no `..`, no control characters."""
    path = Path(name)
    return _check(name, bool(name.strip()) and name.isprintable() and not path.is_absolute()
                  and not name.startswith("~") and ".." not in path.parts and "\\" not in name
                  and path.parts not in ((), (".",)),
                  f"out.name {short_repr(name)} must stay inside out.dir: a relative path without '..', control "
                  "characters or a leading '/' or '~'")


def _with_jsonl(track: list[str]) -> list[str]:
    return _check(track, "jsonl" in track, "track must include jsonl (the run folder's metrics.jsonl)")


@dataclass
class ModelConfig:
    """The encoder and the classification head on top of it."""

    name: Str = "minilm"
    """HF hub id or local folder; `minilm` = the packaged all-MiniLM-L6-v2 (offline); `tiny-bert`, `tiny-roberta`,
    `tiny-modernbert` = tiny randomly initialised encoders (tests, smoke runs)."""
    pooling: Literal["cls", "mean"] = "cls"
    """Sentence vector: `cls` (the first token) or `mean` (over real tokens, padding ignored)."""
    dropout: Annotated[Float, Fraction] = 0.1
    """Dropout before the linear head."""
    encoder_dropout: Annotated[Float, Fraction] | None = None
    """Every dropout probability inside the encoder; null keeps the pretrained config's, 0 turns them off
    (exact-equivalence checks)."""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    """Attention kernel: `sdpa` (PyTorch's fused kernels), `flash_attention_2` (needs the flash-attn package and
    a GPU), `eager` (plain matmuls, the reference)."""


@dataclass
class DataConfig:
    """Where the examples come from, how they are split and tokenized."""

    name: Str = "imdb"
    """`imdb` (shipped in the package, read offline) or another HF hub dataset; ignored when `data.path` is set."""
    path: Str | None = None
    """A local parquet/csv/jsonl file, or a folder of such files (concatenated); replaces `data.name`."""
    text_column: Str = "text"
    """Column holding the text."""
    label_column: Annotated[Str, AfterValidator(_two_columns)] = "label"
    """Column holding the label: ints or strings (string labels get ids in sorted order, saved in labels.json)."""
    max_length: Annotated[Int, Positive] = 128
    """Tokens per example (longer texts are truncated); padding is dynamic per micro-batch."""
    split: Annotated[list[Annotated[Float, Positive]], Strict(), BeforeValidator(_listed), _length(3),
                     AfterValidator(_sums_to_one)] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train, val, test fractions of all rows, stratified by label (IMDB: its 25k train + 25k test pooled,
    then split)."""
    split_seed: Annotated[Int, Seed] = 42
    """Seed of the shuffle before the split: the same seed, the same three splits."""
    limit: Annotated[Int, Positive] | None = None
    """Keep only the first N examples of the seeded shuffle, before the split (smoke runs, tests); null = all."""
    drop_empty: Bool = False
    """Drop rows whose text is null or empty (the count is reported) instead of refusing the file."""
    group_by_length: Bool = False
    """Windows of similar-length examples (less padding at long max_length). Changes the example order."""
    min_class_fraction: Annotated[Float, Fraction] = 0.01
    """A label value held by fewer than this fraction of the rows is refused as a likely typo (`1` among
    `positive`/`negative`); lower it (0 = off) for a dataset with genuinely rare classes."""


@dataclass
class BatchConfig:
    """How many examples make one optimizer step, and how they are cut into micro-batches."""

    effective: Annotated[Int, Positive] = 32
    """Examples per optimizer step (EBS) = micro x accum_steps x world_size."""
    micro: Union[Annotated[Int, Positive], Literal["auto"]] = 16
    """Examples per forward/backward on one process; `auto` = the largest that fits, EBS kept."""
    auto_cap: Annotated[Int, Positive] = 64
    """Upper bound for `micro=auto` (the cap on CPU, the first try on GPU)."""
    auto_cpu_tokens: Annotated[Int, Positive] = 2048
    """CPU only: `micro=auto` also keeps micro x data.max_length under this many tokens (larger micro-batches
    run slower on a CPU: docs/performance.md)."""


@dataclass
class OptimConfig:
    """The optimizer and how its learning rate follows the effective batch."""

    name: Literal["adam", "adamw"] = "adamw"
    """`adam` (weight decay as L2 in the gradient) or `adamw` (decoupled decay); no decay on biases and norms."""
    lr: Annotated[Float, Positive] = 5e-5
    """Learning rate at `optim.base_batch`; scaled to batch.effective by `optim.lr_scaling`."""
    base_batch: Annotated[Int, Positive] = 32
    """The effective batch at which `optim.lr` applies unscaled."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """lr at batch.effective = lr x 1 (`none`), x EBS/base_batch (`linear`) or x sqrt(EBS/base_batch) (`sqrt`)."""
    scale_betas_eps: Bool = False
    """With lr_scaling=sqrt: also rescale Adam's betas and eps (Malladi et al. 2022, the SDE scaling rule):
    beta -> 1 - k (1 - beta), eps -> eps / sqrt(k), k = EBS/base_batch."""
    betas: Annotated[list[Annotated[Float, Fraction]], Strict(), BeforeValidator(_listed), _length(2)] = field(
        default_factory=lambda: [0.9, 0.999])
    """Adam's (beta1, beta2)."""
    eps: Float = 1e-8
    """Adam's epsilon."""
    weight_decay: Annotated[Float, NonNegative] = 0.0
    """Weight decay; 0 = off."""
    clip_norm: Annotated[Float, NonNegative] = 0.0
    """Max gradient norm; 0 = off. The pre-clip norm is logged either way."""


@dataclass
class SchedConfig:
    """The learning-rate schedule, counted in optimizer steps."""

    name: Literal["constant", "linear", "cosine"] = "constant"
    """`constant`, `linear` (decay to 0 at the last step) or `cosine`."""
    warmup_ratio: Annotated[Float, Fraction] = 0.0
    """Fraction of total optimizer steps spent in linear warmup."""


@dataclass
class TrainConfig:
    """The training budget, seed, loop backend and device."""

    epochs: Int = 1
    """Passes over the train split (ignored when `train.max_steps` is set)."""
    max_steps: Annotated[Int, AfterValidator(_a_budget), NonNegative] = 0
    """A budget in optimizer steps instead of epochs (compare EBS at equal updates); 0 = use epochs."""
    seed: Annotated[Int, Seed] = 1
    """Seed of initialisation, dropout and example order; the order depends only on (seed, epoch)."""
    backend: Literal["torch", "accelerate"] = "torch"
    """`torch` or `accelerate`: the same loop, the same numbers."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 autocast where the device supports it (recent GPUs), fp32 elsewhere (CPU). fp32 on a GPU
    runs its matmuls in TF32. bf16/fp16 are refused on a CPU."""
    early_stopping_patience: Annotated[Int, NonNegative] = 0
    """Evaluations without a gain in the `eval.select_by` metric before stopping; 0 = off."""
    log_every_steps: Union[Annotated[Int, Positive], Literal["auto"]] = "auto"
    """A step line every N optimizer steps: the host waits for the device only at these steps (and at evaluations
    and checkpoints), so stop signals and non-finite checks act there. `auto`: every step on a CPU (a read costs
    nothing there), every 100 steps on a GPU (a read costs at most one step of lost overlap); printed at start-up."""
    compile: Bool = False
    """`torch.compile` the model."""
    device: Str = "auto"
    """`auto` (the GPU of this process's LOCAL_RANK if any, else CPU), `cpu`, `cuda` or `cuda:N`."""
    gns: Bool | None = None
    """Log the gradient noise scale from the micro-batch gradients (`gns/*` step keys, B_simple in the
    summary); null = on when a step has >= 2 of them."""


@dataclass
class EvalConfig:
    """When validation and test are scored, and which checkpoint is tested."""

    every_steps: Annotated[Int, NonNegative] = 0
    """Evaluate val/test every N optimizer steps; 0 = at each epoch end."""
    every_examples: Annotated[Int, NonNegative, AfterValidator(_one_eval_clock)] = 0
    """Evaluate val/test each time this many training examples were seen (at the step that crosses it), so runs
    of different batch.effective are measured at the same points of the data; 0 = off."""
    test_on: Literal["best", "last", "both"] = "both"
    """Test the `best` checkpoint (by val `eval.select_by`), the `last`, or `both`."""
    batch_size: Annotated[Int, Positive] = 64
    """Examples per evaluation batch (length-sorted, inference mode)."""
    select_by: Annotated[Str, AfterValidator(_a_metric)] = "acc"
    """Validation metric that picks the best checkpoint (and that early stopping watches): `acc`, `loss`, `ece`,
    `f1` (macro), `mcc`, `auroc`, `brier`, compared in its direction (loss, ece, brier: lower is better)."""


@dataclass
class CheckpointConfig:
    """How often `checkpoints/last` is saved."""

    every_steps: Annotated[Int, NonNegative] = 0
    """Save `last` every N optimizer steps (and always at each epoch end); 0 = epoch ends only."""


@dataclass
class OutConfig:
    """Where the run folder goes."""

    dir: Str = "runs"
    """Parent folder of run folders (created if missing)."""
    name: Annotated[Str, AfterValidator(_inside_out_dir)] | None = None
    """Run folder = out.dir/out.name; null = a name built from model, EBS, lr and seed."""


@dataclass
class Config:
    """Every key a run reads. Defaults here; a YAML file and `key=value` overrides set what differs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    out: OutConfig = field(default_factory=OutConfig)
    track: Annotated[list[Literal["jsonl", "tensorboard", "wandb"]], Strict(), BeforeValidator(_one_or_more),
                     AfterValidator(_with_jsonl)] = field(default_factory=lambda: ["jsonl"])
    """Where metrics go: `jsonl` (always, the run folder's metrics.jsonl), plus `tensorboard` and/or `wandb`
    (offline without an account: WANDB_MODE=offline)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.out.dir) / (self.out.name or default_run_name(self))


def default_run_name(cfg: Config) -> str:
    model = Path(cfg.model.name).name
    return f"{model}-ebs{cfg.batch.effective}-lr{cfg.optim.lr:g}-seed{cfg.train.seed}"


# ----------------------------------------------------------------------------------------------------------
# Derived values: computed once, printed, saved in config.yaml under `derived`.


@dataclass(frozen=True)
class Derived:
    world_size: int
    micro: int
    accum_steps: int
    lr: float
    betas: tuple[float, float]
    eps: float
    num_train: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    epochs: int
    precision: str | None = None
    """train.precision as the backend resolved it on this device (`auto` -> bf16 or fp32)."""
    log_every_steps: int | None = None
    """train.log_every_steps as resolved on this device (`auto` -> 1 on a CPU, GPU_LOG_EVERY_STEPS on a GPU)."""

    def describe(self, cfg: Config) -> str:
        last = self.num_train % cfg.batch.effective
        budget = (f"max_steps {cfg.train.max_steps}" if cfg.train.max_steps
                  else f"{self.epochs} epoch(s)")
        return "\n".join([
            f"effective_batch {cfg.batch.effective} = micro {self.micro} x accum_steps {self.accum_steps}"
            f" x world_size {self.world_size}",
            f"lr {self.lr:.3g} ({cfg.optim.lr_scaling} scaling of {cfg.optim.lr:g} from base_batch"
            f" {cfg.optim.base_batch})" + (f", betas {self.betas}, eps {self.eps:.3g}"
                                           if cfg.optim.scale_betas_eps else ""),
            f"{self.num_train} train examples => {self.steps_per_epoch} steps/epoch"
            + (f" (last window {last} examples)" if last else ""),
            f"budget {budget} => total steps {self.total_steps}, warmup steps {self.warmup_steps}",
        ])


def scaled_lr(optim: OptimConfig, effective_batch: int) -> float:
    ratio = effective_batch / optim.base_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[optim.lr_scaling]
    return optim.lr * factor


def scaled_betas_eps(optim: OptimConfig, effective_batch: int) -> tuple[tuple[float, float], float]:
    """Malladi et al. 2022: batch x kappa => beta -> 1 - kappa (1 - beta), eps -> eps / sqrt(kappa)."""
    b1, b2 = optim.betas
    if not (optim.scale_betas_eps and optim.lr_scaling == "sqrt"):
        return (b1, b2), optim.eps
    kappa = effective_batch / optim.base_batch
    return (max(0.0, 1 - kappa * (1 - b1)), max(0.0, 1 - kappa * (1 - b2))), optim.eps / math.sqrt(kappa)


# `train.log_every_steps=auto` on a GPU. A host read lets the device run dry: the host waits for the queue to
# drain, then the device waits while the host collates and launches the next step, so one read loses at most one
# step of overlap (the smaller of the host's and the device's step time); one read per 100 steps is under 1%.
GPU_LOG_EVERY_STEPS = 100


def resolve_log_every(value: int | str, device_type: str) -> int:
    """`train.log_every_steps` on this kind of device: `auto` is 1 on a CPU (whose reads wait for nothing),
    GPU_LOG_EVERY_STEPS on an accelerator; a number is kept."""
    if value != "auto":
        return int(value)
    return 1 if device_type == "cpu" else GPU_LOG_EVERY_STEPS


def derive(cfg: Config, num_train: int, world_size: int, micro: int | None = None,
           precision: str | None = None, device_type: str = "cpu") -> Derived:
    micro = micro if micro is not None else cfg.batch.micro
    assert isinstance(micro, int), "micro=auto must be resolved before derive()"
    per_step = micro * world_size
    if cfg.batch.effective % per_step:
        raise UserError(
            f"batch.effective={cfg.batch.effective} is not divisible by batch.micro x world_size = {micro} x "
            f"{world_size} = {per_step}; choose batch.effective as a multiple of {per_step}")
    if num_train < 1:
        raise UserError("the train split is empty; raise data.limit or give more data")
    steps_per_epoch = math.ceil(num_train / cfg.batch.effective)
    if cfg.train.max_steps:
        total_steps = cfg.train.max_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        total_steps = steps_per_epoch * cfg.train.epochs
        epochs = cfg.train.epochs
    betas, eps = scaled_betas_eps(cfg.optim, cfg.batch.effective)
    return Derived(
        world_size=world_size, micro=micro, accum_steps=cfg.batch.effective // per_step,
        lr=scaled_lr(cfg.optim, cfg.batch.effective), betas=betas, eps=eps, num_train=num_train,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        warmup_steps=round(cfg.sched.warmup_ratio * total_steps), epochs=epochs, precision=precision,
        log_every_steps=resolve_log_every(cfg.train.log_every_steps, device_type))


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides, checked against the dataclass types.


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


VALID_KEYS = _leaf_keys(Config)


# Words other tools (HF TrainingArguments, Lightning, the literature) use for a key ebslab names otherwise: the
# "did you mean" looks here first, because edit distance alone sends `optim.learning_rate` to `optim.lr_scaling`.
KEY_SYNONYMS: dict[str, str] = {
    "learning_rate": "optim.lr", "learningrate": "optim.lr", "lr_rate": "optim.lr",
    "optimizer": "optim.name", "optimiser": "optim.name",
    "scheduler": "sched.name", "lr_scheduler": "sched.name", "lr_scheduler_type": "sched.name",
    "schedule": "sched.name", "warmup": "sched.warmup_ratio", "warmup_steps": "sched.warmup_ratio",
    "max_grad_norm": "optim.clip_norm", "grad_clip": "optim.clip_norm", "gradient_clipping": "optim.clip_norm",
    "clip": "optim.clip_norm", "decay": "optim.weight_decay", "wd": "optim.weight_decay",
    "batch_size": "batch.effective", "effective_batch": "batch.effective", "effective_batch_size":
        "batch.effective", "ebs": "batch.effective", "global_batch_size": "batch.effective",
    "gradient_accumulation_steps": "batch.effective", "accum_steps": "batch.effective",
    "micro_batch": "batch.micro", "micro_batch_size": "batch.micro", "per_device_train_batch_size": "batch.micro",
    "num_train_epochs": "train.epochs", "num_epochs": "train.epochs", "max_epochs": "train.epochs",
    "patience": "train.early_stopping_patience", "early_stopping": "train.early_stopping_patience",
    "fp16": "train.precision", "bf16": "train.precision", "mixed_precision": "train.precision",
    "dtype": "train.precision", "max_seq_length": "data.max_length", "max_len": "data.max_length",
    "seq_len": "data.max_length", "sequence_length": "data.max_length", "dataset": "data.name",
    "model_name": "model.name", "model_name_or_path": "model.name", "pool": "model.pooling",
    "output_dir": "out.dir", "eval_steps": "eval.every_steps", "eval_batch_size": "eval.batch_size",
    "save_steps": "checkpoint.every_steps", "logging_steps": "train.log_every_steps",
    "batch.size": "batch.effective",
}


def _words(name: str) -> list[str]:
    return [w for w in name.lower().replace("-", "_").split("_") if w]


def suggest_key(key: str) -> str | None:
    """The valid key a user most likely meant by `key`, by meaning before spelling: a known synonym
    (`optim.learning_rate` -> `optim.lr`), then within the same section a name it abbreviates by initials
    (`optim.wd` -> `optim.weight_decay`) or a prefix either way (`train.epoch` -> `train.epochs`), then the
    closest spelling (`batch.efective`), then the same name in another section (`optimizer.lr` -> `optim.lr`)."""
    section, _, tail = key.lower().replace("-", "_").rpartition(".")
    if key in KEY_SYNONYMS:
        return KEY_SYNONYMS[key]
    if tail in KEY_SYNONYMS and KEY_SYNONYMS[tail] in VALID_KEYS:
        return KEY_SYNONYMS[tail]
    same = [k for k in VALID_KEYS if k.rpartition(".")[0] == section] if section else []
    for k in same:
        name = k.rpartition(".")[2]
        if "".join(w[0] for w in _words(name)) == tail and len(_words(name)) > 1:
            return k
    shared = {k: len(os.path.commonprefix([k.rpartition(".")[2], tail])) for k in same}
    prefixed = [k for k, n in shared.items()
                if n >= 2 and (n >= 4 or n in (len(tail), len(k.rpartition(".")[2])))]
    if prefixed:  # the longest shared start wins: `optim.lr_scale` -> `optim.lr_scaling`, not `optim.lr`
        return max(prefixed, key=lambda k: (shared[k], -len(k)))
    near = difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.5)
    if near:
        return near[0]
    for k in VALID_KEYS:  # a typo in the section name: compare the last part alone
        if k.rpartition(".")[2] == tail:
            return k
    return None


def unknown_key(key: str) -> UserError:
    near = suggest_key(key)
    hint = f"; did you mean '{near}'?" if near else f"; valid keys: {', '.join(VALID_KEYS)}"
    return UserError(f"unknown config key '{key}'{hint}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 3
MAX_YAML_BYTES = 1 << 20
"""A config, sweep or study file (or an override) larger than this is refused: they are a few hundred bytes."""
MAX_YAML_NODES = 100_000
"""Values a YAML document may expand to, aliases counted each time they are used (an alias bomb expands to
billions from a few lines)."""


def short_repr(value: Any) -> str:
    """A value as a message shows it: at most a few items per level and about 80 characters per leaf, whatever
    its size (a message never formats a whole document)."""
    return _SHORT.repr(value)


def check_yaml_size(data: Any, what: str) -> Any:
    """`data` (as yaml.safe_load gave it), or a UserError when it expands to more than MAX_YAML_NODES values."""
    count, todo = 0, [data]
    while todo:
        node = todo.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise UserError(f"{what} expands to more than {MAX_YAML_NODES:,} values (YAML aliases repeating a "
                            "block?); a config needs a few dozen: remove the repetition")
        if isinstance(node, dict):
            todo.extend(node.keys())
            todo.extend(node.values())
        elif isinstance(node, (list, tuple)):
            todo.extend(node)
    return data


def load_yaml_text(text: str, what: str) -> Any:
    """yaml.safe_load of a config, sweep or study document, bounded: MAX_YAML_BYTES, then MAX_YAML_NODES."""
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{what} is {len(text):,} characters, over the {MAX_YAML_BYTES:,} a config may have; is "
                        "it the right file?")
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{what} nests too deeply (thousands of levels); a config has a few") from None
    return check_yaml_size(data, what)


def flatten(mapping: dict, prefix: str = "", skip: Collection[str] = ("derived",)) -> dict[str, Any]:
    """Nested or dotted mapping -> {dotted key: value}: {"optim": {"lr": 1}} and {"optim.lr": 1} give the same.
    The one flattening of config keys (config files, overrides, sweep grids, checkpoints, reports).

    A mapping under a valid key stays its value (a type error named by its key, not keys made up from it).
    Dotted keys in `skip` are left out: by default `derived`, which ebslab writes and never reads back."""
    flat: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if key in skip:
            continue
        if isinstance(v, dict) and key not in VALID_KEYS:
            flat.update(flatten(v, key + ".", skip))
        else:
            flat[key] = v
    return flat


@functools.cache
def default_flat() -> dict[str, Any]:
    """{dotted key: default} of every config key, built once. Read it, never change it: a key that a run's config
    lacks (ebslab added it later) had this value for that run (resume checks, report grouping)."""
    return flatten(Config().to_dict())


def as_trained(config: dict[str, Any]) -> dict[str, Any]:
    """A run's resolved config (config.yaml) -> {dotted key: value} as it trained, `derived` left out: a key it
    lacks (ebslab added it later) at its default, and train.precision as the backend resolved it where
    derived.precision records that (`auto` on a CPU trained in fp32, as an explicit fp32 does)."""
    trained = {**default_flat(), **flatten(config)}
    precision = (config.get("derived") or {}).get("precision")
    if precision:
        trained["train.precision"] = precision
    return trained


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not key=value (e.g. batch.effective=256)")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml_text(raw, f"override '{key.strip()}'") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml_file(path: str | Path, kind: str) -> tuple[Any, Path]:
    """A config, sweep or study file's data and resolved path; a missing, oversized or unparsable file is one line
    naming `kind`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{kind} file '{path}' does not exist")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise UserError(f"{kind} file '{path}' is {p.stat().st_size:,} bytes, over the {MAX_YAML_BYTES:,} a {kind} "
                        "may have; is it the right file?")
    try:
        return load_yaml_text(p.read_text(), f"{kind} file '{path}'"), p.resolve()
    except yaml.YAMLError as e:
        raise UserError(f"{kind} file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None


def read_yaml(path: str | Path) -> dict:
    data = read_yaml_file(path, "config")[0] or {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def build_config(values: dict[str, Any]) -> Config:
    """Dotted {key: value} -> Config, refusing unknown keys, wrong types and impossible values in one line: an
    unknown key or a wrong type in the order given, else the first broken bound in BOUND_TEXT's order."""
    given = {k: v for k, v in values.items() if k in VALID_KEYS}
    tree: dict[str, Any] = {}
    for key, value in {**default_flat(), **given}.items():  # every key given: checks across keys see defaults
        *sections, name = key.split(".")
        node = tree
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = value
    try:
        cfg, wrong_type, out_of_bounds = _tree_type().validate_python(tree), {}, {}
    except ValidationError as e:
        cfg, (wrong_type, out_of_bounds) = None, _refusals(e, given)
    for key in values:
        if key not in VALID_KEYS:
            raise unknown_key(key)
        if key in wrong_type:
            raise UserError(wrong_type[key])
    if out_of_bounds:
        raise UserError(out_of_bounds[min(out_of_bounds, key=list(BOUND_TEXT).index)])
    return cfg


@functools.cache
def _tree_type() -> TypeAdapter:
    return TypeAdapter(Config)


# A value outside its field's bounds is refused as `<key> <text>`; a check across keys words its own line. When
# several fail, the first key in this order is reported (the order ebslab has always checked them in).
BOUND_TEXT: dict[str, str | None] = {
    "data.max_length": "must be > 0",
    "optim.lr": "must be > 0",
    "optim.base_batch": "must be > 0",
    "batch.effective": "must be > 0",
    "batch.micro": "must be > 0 or auto",
    "batch.auto_cap": "must be > 0",
    "batch.auto_cpu_tokens": "must be > 0",
    "train.max_steps": "must be >= 0",  # and, first, train.epochs > 0 unless max_steps is set
    "train.early_stopping_patience": "must be >= 0",
    "train.log_every_steps": "must be > 0 or auto",
    "eval.every_steps": "must be >= 0",
    "eval.every_examples": "must be >= 0",  # and, next, not together with eval.every_steps
    "eval.batch_size": "must be > 0",
    "eval.select_by": None,
    "checkpoint.every_steps": "must be >= 0",
    "model.dropout": "must be in [0, 1)",
    "model.encoder_dropout": "must be in [0, 1) or null",
    "sched.warmup_ratio": "must be in [0, 1)",
    "optim.weight_decay": "must be >= 0",
    "optim.clip_norm": "must be >= 0 (0 = off)",
    "optim.betas": "must be two numbers in [0, 1)",
    "data.split": "must be three positive fractions train, val, test (e.g. [0.8, 0.1, 0.1])",  # then its sum
    "data.label_column": None,
    "out.name": None,
    "data.limit": "must be > 0 or null",
    "data.min_class_fraction": "must be in [0, 1) (0 = off)",
    "train.seed": "must be in [0, 2**32)",
    "data.split_seed": "must be in [0, 2**32)",
    "track": None,
}
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "config_length",
                 "config_check"}


def _refusals(error: ValidationError, given: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """pydantic's errors -> ({key: its wrong-type line}, {key: its out-of-bounds line}).

    A key's errors are grouped by value (the key's, or one list item's): a value is of a wrong type when none of
    the types it may have took it (a union tries each), out of bounds when one took it and then a bound refused it
    (`batch.micro=0` is an int, below 1). The first list item of a wrong type is the one named."""
    by_value: dict[tuple[str, int | None], list[dict]] = {}
    for e in error.errors(include_url=False):
        loc = e["loc"]
        key = loc[0] if loc[0] in VALID_KEYS else f"{loc[0]}.{loc[1]}"
        rest = loc[len(key.split(".")):]
        by_value.setdefault((key, rest[0] if rest and isinstance(rest[0], int) else None), []).append(e)
    wrong_type: dict[str, str] = {}
    out_of_bounds: dict[str, str] = {}
    for (key, index), errors in by_value.items():
        bound = next((e for e in errors if e["type"] in _BOUND_ERRORS), None)
        if bound is None and key not in wrong_type:
            tp, value = _key_type(key), given.get(key)
            if index is not None:
                tp, value = typing.get_args(tp)[0], errors[0]["input"]
            wrong_type[key] = f"config key '{key}' must be {_type_name(tp)}, got {short_repr(value)}"
        elif bound is not None and key not in out_of_bounds:
            out_of_bounds[key] = (bound["ctx"]["message"] if bound["type"] == "config_check"
                                  else f"{key} {BOUND_TEXT[key]}")
    return wrong_type, out_of_bounds


def load_config(base: str | Path | dict | None = None, overrides: list[str] | dict | None = None) -> Config:
    values: dict[str, Any] = {}
    if isinstance(base, dict):
        values.update(flatten(base))
    elif base is not None:
        values.update(flatten(read_yaml(base)))
    if isinstance(overrides, dict):
        values.update(flatten(overrides))
    else:
        for text in overrides or []:
            key, value = parse_override(text)
            values[key] = value
    return build_config(values)


def validate(cfg: Config) -> None:
    """Refuse a tree whose values break a type or a bound (one changed in code, not read by build_config)."""
    build_config(flatten(cfg.to_dict()))


def resolved_dict(cfg: Config, derived: Derived | None = None) -> dict[str, Any]:
    out = cfg.to_dict()
    if derived is not None:
        d = dataclasses.asdict(derived)
        d["betas"] = list(d["betas"])
        out["derived"] = d
    return out


# ----------------------------------------------------------------------------------------------------------
# The reference: docs/config.md is generated from the dataclasses above, so it cannot drift from them.


def field_docs() -> dict[str, str]:
    """{dotted key: its docstring} for every key, and {section: its class docstring}, read from this module's
    source (a dataclass field's docstring is the string literal right after it)."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    docs: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        node = classes[cls.__name__]
        if prefix:
            docs[prefix.rstrip(".")] = inspect.cleandoc(ast.get_docstring(node) or "")
        hints = typing.get_type_hints(cls)
        body = node.body
        for i, stmt in enumerate(body):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            name = stmt.target.id
            if dataclasses.is_dataclass(hints[name]):
                walk(hints[name], f"{prefix}{name}.")
                continue
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[prefix + name] = " ".join(inspect.cleandoc(nxt.value.value).split())

    walk(Config, "")
    return docs


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_text(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_text(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _key_type(key: str) -> Any:
    cls: Any = Config
    *sections, name = key.split(".")
    for s in sections:
        cls = typing.get_type_hints(cls)[s]
    return typing.get_type_hints(cls)[name]


def reference_markdown() -> str:
    """docs/config.md: every config key with its type, default and meaning, section by section."""
    docs, defaults = field_docs(), default_flat()
    missing = [k for k in VALID_KEYS if not docs.get(k)]
    if missing:
        raise RuntimeError(f"config keys without a docstring in config.py: {', '.join(missing)}")

    def default(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
        return f"`{text.removesuffix(chr(10) + '...').strip()}`"

    md = ["# Configuration reference", "",
          "<!-- generated by `python -m ebslab.core.config --reference > docs/config.md` from the docstrings in "
          "src/ebslab/core/config.py; edit those, not this file -->", "",
          "Every run reads these keys. Defaults are below; a YAML config file sets what differs (nested, "
          "`optim: {lr: 1.0e-4}`, or dotted, `optim.lr: 1.0e-4`), and `key=value` arguments after it override "
          "the file (`ebslab train configs/demo.yaml optim.lr=1e-4 track=[jsonl,wandb]`; each value is read "
          "as YAML). An unknown key or a wrong type stops the run before any work, naming the nearest valid key. "
          "The values a run derives from these (accum_steps, the scaled lr, steps per epoch, total and warmup "
          "steps, the resolved precision) are printed at start-up and saved under `derived` in the run's "
          "config.yaml.", ""]
    sections: dict[str, list[str]] = {}
    for key in VALID_KEYS:
        sections.setdefault(key.split(".")[0] if "." in key else "", []).append(key)
    for section, keys in sections.items():
        title = f"## `{section}`: {docs[section].rstrip('.')}" if section else "## Top level"
        rows = [[f"`{key}`", _type_text(_key_type(key)), default(defaults[key]), docs[key]] for key in keys]
        md += [title, "", md_table(["key", "type", "default", "meaning"], rows), ""]
    return "\n".join(md)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ebslab.core.config",
                                     description="Print the config reference (docs/config.md) as markdown.")
    parser.add_argument("--reference", action="store_true", help="print every key's type, default and meaning")
    if parser.parse_args().reference:
        print(reference_markdown(), end="")
    else:
        parser.print_help()
