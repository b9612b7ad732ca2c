"""`ebslab export RUN_DIR --out DIR`: a folder that `transformers` loads without ebslab, plus a model card.

DIR holds the encoder's config (with id2label / label2id and `auto_map`), modeling_ebslab.py (the head, see
ebslab/serving/hf_modeling.py for why it cannot be a stock class), safetensors weights, the tokenizer (model_max_length =
the run's data.max_length) and README.md. The folder is built beside DIR, reloaded and checked against
`ebslab predict`, and only then renamed into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ebslab.core.errors import UserError
from ebslab.core.tables import md_table
from ebslab.core.runfolder import read_metrics, read_summary
from ebslab.core.config import resolved_dict
from ebslab.serving.export_args import MARKER
from ebslab.serving.predict import LoadedRun, load_run, predict_texts

MODELING_FILE = "modeling_ebslab.py"
CLASS_NAME = "EbslabForSequenceClassification"
MAX_PROB_DIFF = 1e-5
MAX_ONNX_DIFF = 1e-4
# reloaded export vs predict: short, long, odd and empty-ish inputs exercise padding and truncation
CHECK_TEXTS = ["A wonderful film, I loved every minute of it.", "Dull. Terrible acting and a plot with holes.",
               "ok", "It was " + "very " * 200 + "long.", "Ni bueno ni malo: un film correct, sans plus.", " "]
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
IMDB_CITATION = """@inproceedings{maas-etal-2011-learning,
  title = {Learning Word Vectors for Sentiment Analysis},
  author = {Maas, Andrew L. and Daly, Raymond E. and Pham, Peter T. and Huang, Dan and Ng, Andrew Y. and Potts, Christopher},
  booktitle = {Proceedings of the 49th Annual Meeting of the Association for Computational Linguistics: Human Language Technologies},
  year = {2011},
  address = {Portland, Oregon, USA},
  publisher = {Association for Computational Linguistics},
  pages = {142--150},
  url = {http://www.aclweb.org/anthology/P11-1015}
}"""


def ebslab_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ebslab")
    except PackageNotFoundError:
        return "unknown"


def display_labels(run: LoadedRun) -> list[str]:
    """Each class id's name for the pipeline: what the data calls it (IMDB: neg, pos), else the label value."""
    from ebslab.inputs.data import class_names

    return class_names(run.cfg.data, run.label_names) or run.label_names


def hf_config(run: LoadedRun) -> Any:
    encoder = run.bundle.model.encoder
    config = copy.deepcopy(encoder.config)
    labels = display_labels(run)
    config.num_labels = len(labels)
    config.id2label = {i: name for i, name in enumerate(labels)}
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.architectures = [CLASS_NAME]
    config.auto_map = {"AutoModelForSequenceClassification": f"{MODELING_FILE[:-3]}.{CLASS_NAME}"}
    config.ebslab_pooling = run.cfg.model.pooling
    config.ebslab_head_dropout = run.cfg.model.dropout
    config.ebslab_model_inputs = list(run.bundle.model_inputs)
    return config


def _modeling_class() -> type:
    from ebslab.serving import hf_modeling

    return hf_modeling.EbslabForSequenceClassification


def _checkpoint_metrics(run: LoadedRun) -> tuple[dict | None, dict | None]:
    """(val, test) metrics of the exported checkpoint, from the run folder."""
    summary = read_summary(run.run_dir)
    if summary is None:
        return None, None
    if run.checkpoint == "best":
        return summary.get("val_best"), summary.get("test_best")
    val = None
    for rec in read_metrics(run.run_dir):
        if rec.get("event") == "eval":
            val = {k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith("val/")}
    return val, summary.get("test_last")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _local_name(value: str | None) -> str | None:
    """A path as an export may carry it: its last part only (no absolute local path leaves the machine)."""
    return Path(value).name if value else value


def public_config(run: LoadedRun) -> dict[str, Any]:
    """The resolved config for the card: out.dir, data.path and a local model.name reduced to their names."""
    config = resolved_dict(run.cfg) | {"derived": run.derived}
    config = json.loads(json.dumps(config, default=str))
    config["out"]["dir"] = _local_name(config["out"]["dir"])
    config["data"]["path"] = _local_name(config["data"]["path"])
    if Path(run.cfg.model.name).exists():
        config["model"]["name"] = _local_name(run.cfg.model.name)
    return config


REMOTE_CODE_NOTE = """Loading with it runs this folder's `{modeling}` in your Python process, with your permissions. It imports only torch and transformers; an export you did not make
yourself should be read first (any line added to that file runs at load), or pinned to a revision you have read."""

PIPELINE_NOTE = """Each `pipeline(...)` load logs "The model 'EbslabForSequenceClassification' is not supported for
text-classification. Supported models are [...]": that check knows only the stock heads; the pipeline runs this
head as it runs theirs (the export was reloaded through `AutoModelForSequenceClassification` and checked against
`ebslab predict` before it was written). `transformers.logging.set_verbosity(transformers.logging.CRITICAL)`
before the call hides it."""


@dataclasses.dataclass(frozen=True)
class CardFacts:
    """What several parts of the card say: where the data and the encoder come from, the split, and the exported
    checkpoint's metrics."""

    imdb: bool
    dataset_id: str | None
    dataset_name: str
    model_name: str
    base: str | None  # the encoder's hub id, None for a tiny test model or a local folder
    split_text: str
    pooled: str
    val: dict | None
    test: dict | None

    @classmethod
    def of(cls, run: LoadedRun) -> CardFacts:
        cfg = run.cfg
        val, test = _checkpoint_metrics(run)
        imdb = not cfg.data.path and cfg.data.name == "imdb"
        local_model = Path(cfg.model.name).exists()
        base = MINILM_HUB_ID if cfg.model.name == "minilm" else (
            None if cfg.model.name.startswith("tiny-") or local_model else cfg.model.name)
        return cls(imdb=imdb,
                   dataset_id="stanfordnlp/imdb" if imdb else (cfg.data.name if not cfg.data.path else None),
                   dataset_name="IMDB" if imdb else (_local_name(cfg.data.path) or cfg.data.name),
                   model_name=_local_name(cfg.model.name) if local_model else cfg.model.name, base=base,
                   split_text=":".join(f"{f:g}" for f in cfg.data.split),
                   pooled="the dataset's train and test splits pooled" if imdb else "all its rows",
                   val=val, test=test)

    def evaluated(self) -> tuple[tuple[str, dict | None], ...]:
        return ("validation", self.val), ("test", self.test)


def model_card(run: LoadedRun, out_name: str) -> Any:
    """The export's README.md: hub metadata (with the model-index of the checkpoint's metrics), then how to load
    it, the data, the training, the evaluation and the full resolved config."""
    from huggingface_hub import ModelCard

    facts = CardFacts.of(run)
    body = "".join((_card_intro(run, out_name, facts), _card_use(run), _card_data(run, facts),
                    _card_training(run), _card_evaluation(run, facts), _card_config(run)))
    if facts.imdb:
        body += f"\n## Citation (IMDB)\n\n```bibtex\n{IMDB_CITATION}\n```\n"
    return ModelCard(f"---\n{_card_metadata(run, out_name, facts).to_yaml()}\n---\n{body}")


def _card_metadata(run: LoadedRun, out_name: str, facts: CardFacts) -> Any:
    from huggingface_hub import ModelCardData

    return ModelCardData(model_name=out_name, base_model=facts.base,
                         datasets=[facts.dataset_id] if facts.dataset_id else None,
                         library_name="transformers", pipeline_tag="text-classification",
                         tags=["ebslab", "text-classification", "custom_code"],
                         eval_results=_eval_results(run, facts) or None)


def _eval_results(run: LoadedRun, facts: CardFacts) -> list[Any]:
    """One model-index entry per numeric metric of each split, named by ebslab's re-split and its n."""
    from huggingface_hub import EvalResult

    # the figures are on ebslab's own seeded re-split of the pooled data, not the dataset's official splits
    seed = run.cfg.data.split_seed
    split_names = {split: f"ebslab re-split {split} ({facts.split_text} of {facts.pooled}, seed {seed})"
                   for split in ("validation", "test")}
    results = []
    for split, metrics in facts.evaluated():
        n = (metrics or {}).get("n")
        for name, value in (metrics or {}).items():
            if name == "n" or not isinstance(value, (int, float)) or value != value:
                continue
            results.append(EvalResult(task_type="text-classification", task_name="Text Classification",
                                      dataset_type=facts.dataset_id or "custom", dataset_name=facts.dataset_name,
                                      dataset_split=f"{split_names[split]}, n={n}" if n else split_names[split],
                                      metric_type=name, metric_name=f"{split} {name}" + (f" (n={n})" if n else ""),
                                      metric_value=float(value)))
    return results


def _card_intro(run: LoadedRun, out_name: str, facts: CardFacts) -> str:
    return f"""
# {out_name}

A text classifier fine-tuned with ebslab {ebslab_version()} from `{facts.model_name}`
({'`' + facts.base + '`' if facts.base else 'a local or randomly initialised encoder'}), exported from the run folder
`{run.run_dir.name}` at its **{run.checkpoint}** checkpoint.
"""


def _card_use(run: LoadedRun) -> str:
    labels = display_labels(run)
    label_text = ", ".join(f"{i} = `{n}`" + (f" (label value `{v}`)" if n != v else "")
                           for i, (n, v) in enumerate(zip(labels, run.label_names)))
    return f"""
## Use

```python
from transformers import pipeline
clf = pipeline("text-classification", model="PATH/TO/THIS/FOLDER", trust_remote_code=True)
clf(["a text"], top_k=None, truncation=True)
```

`trust_remote_code=True` is needed: the head (dropout + linear on the `{run.cfg.model.pooling}` pooled vector, no
pooler) is not any stock `...ForSequenceClassification` head; it is defined in `{MODELING_FILE}` in this folder.
{REMOTE_CODE_NOTE.format(modeling=MODELING_FILE)}

Pass `truncation=True`: the model was trained on the first {run.cfg.data.max_length} tokens (the tokenizer's
`model_max_length`).

{PIPELINE_NOTE}

Labels: {label_text}.
"""


def _card_data(run: LoadedRun, facts: CardFacts) -> str:
    data = run.cfg.data
    return f"""
## Data

Dataset: {facts.dataset_name}; columns `{data.text_column}` / `{data.label_column}`; split {facts.split_text}
(stratified, seed {data.split_seed}){f", first {data.limit} examples of the seeded shuffle" if data.limit else ""};
max_length {data.max_length}.
"""


def _card_training(run: LoadedRun) -> str:
    cfg, derived = run.cfg, run.derived
    ebs_line = (f"effective_batch {cfg.batch.effective} = micro {derived.get('micro')} x accum_steps "
                f"{derived.get('accum_steps')} x world_size {derived.get('world_size')}")
    lr_line = (f"lr {derived.get('lr')} ({cfg.optim.lr_scaling} scaling of {cfg.optim.lr} from base_batch "
               f"{cfg.optim.base_batch}), {cfg.optim.name}, weight_decay {cfg.optim.weight_decay}, "
               f"clip_norm {cfg.optim.clip_norm}, schedule {cfg.sched.name} (warmup {derived.get('warmup_steps')} "
               f"of {derived.get('total_steps')} steps)")
    precision = derived.get("precision") or cfg.train.precision
    return f"""
## Training

- {ebs_line}
- {lr_line}
- pooling `{cfg.model.pooling}`, head dropout {cfg.model.dropout}, encoder dropout
  {cfg.model.encoder_dropout if cfg.model.encoder_dropout is not None else "pretrained default"}
- {derived.get('epochs')} epoch(s), {derived.get('num_train')} train examples, precision {precision}
- seeds: train.seed {cfg.train.seed}, data.split_seed {cfg.data.split_seed}
"""


def _card_evaluation(run: LoadedRun, facts: CardFacts) -> str:
    """The checkpoint's metrics as a table, and what split they are on."""
    keys = sorted(k for k in (facts.test or facts.val or {}) if k != "n")
    rows = [(split, *(_fmt(metrics.get(k)) for k in keys)) for split, metrics in facts.evaluated() if metrics]
    metrics_md = (md_table(["split", *keys], rows) if keys
                  else "No evaluation was recorded in the run folder.")
    counts = " and ".join(f"{s} n={m['n']}" for s, m in facts.evaluated() if m and m.get("n"))
    return f"""
## Evaluation at the exported checkpoint

{metrics_md}

These figures are on ebslab's own seeded re-split of the data ({facts.split_text} of {facts.pooled}, seed
{run.cfg.data.split_seed}{f", {counts} examples" if counts else ""}), not on the dataset's official `test` split: they
are comparable with other ebslab runs on the same split, not with leaderboard numbers.

`ece`: expected calibration error (15 equal-width bins of the predicted class's probability).
"""


def _card_config(run: LoadedRun) -> str:
    return f"""
## Full resolved config

```yaml
{_yaml(public_config(run))}```
"""


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def check_reload(folder: Path, run: LoadedRun) -> float:
    """Load `folder` the way users will (AutoModel + trust_remote_code) and return the largest probability
    difference against ebslab predict on CHECK_TEXTS."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    expected = predict_texts(run, CHECK_TEXTS, progress=False)
    with torch.inference_mode():
        encoded = tokenizer(CHECK_TEXTS, truncation=True, padding=True, return_tensors="pt")
        got = model(**encoded).logits.float().softmax(-1).numpy()
    return float(np.abs(got - expected).max())


def _require_onnx() -> Any:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise UserError("--onnx needs onnx, onnxscript and onnxruntime: pip install 'ebslab[onnx]'") from None
    return onnxruntime


class _LogitsOnly(torch.nn.Module):
    """Named tensor inputs, logits out: the signature an ONNX graph needs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def export_onnx(folder: Path, model: torch.nn.Module, tokenizer: Any, inputs: list[str]) -> float:
    """folder/model.onnx through torch's own exporter (torch.onnx, dynamo), batch and length dynamic; returns the
    largest probability difference of ONNX Runtime against the PyTorch model on CHECK_TEXTS."""
    import warnings

    onnxruntime = _require_onnx()

    inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs]
    example = tokenizer(CHECK_TEXTS[:2], truncation=True, padding=True, return_tensors="pt")
    args = tuple(example[k] if k in example else torch.zeros_like(example["input_ids"]) for k in inputs)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=tokenizer.model_max_length)
    wrapped = _LogitsOnly(model.eval())
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, args, str(folder / "model.onnx"), dynamo=True, input_names=inputs,
                              output_names=["logits"], dynamic_shapes={k: {0: batch, 1: length} for k in inputs})
    except Exception as e:  # the exporter's failures come in many classes
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"ONNX export of this model failed ({type(e).__name__}: {first}); export without --onnx") \
            from None
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    encoded = tokenizer(CHECK_TEXTS, truncation=True, padding=True, return_tensors="pt")
    feed = [encoded[k] if k in encoded else torch.zeros_like(encoded["input_ids"]) for k in inputs]
    got = torch.from_numpy(session.run(None, {k: t.numpy() for k, t in zip(inputs, feed)})[0]).softmax(-1)
    with torch.inference_mode():
        expected = wrapped(*feed).float().softmax(-1)
    return float((got - expected).abs().max())


def export(run_dir: str | Path, out: str | Path, checkpoint: str = "best", overwrite: bool = False,
           onnx: bool = False) -> Path:
    """The run's `checkpoint` as a folder at `out` that transformers loads alone; built beside it, reloaded and
    checked against ebslab predict (and ONNX Runtime with `onnx`), then renamed into place."""
    from ebslab.loop.checkpoint import AtomicDir

    out = Path(out)
    _check_export_target(out, overwrite)
    if onnx:
        _require_onnx()
    run = load_run(run_dir, checkpoint, ["train.device=cpu"])
    Model = _modeling_class()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars for one small file
    _make_parent(out)
    with AtomicDir(out) as tmp:
        model, tokenizer = _save_model_and_tokenizer(tmp, run, Model)
        model_card(run, out.name).save(str(tmp / "README.md"))
        _save_marker(tmp, run, run_dir, checkpoint)
        _check_against_predict(tmp, run)
        if onnx:
            onnx_diff = export_onnx(tmp, model, tokenizer, list(run.bundle.model_inputs))
            if not onnx_diff <= MAX_ONNX_DIFF:
                raise RuntimeError(f"ONNX Runtime differs from PyTorch by {onnx_diff:.3g} (> {MAX_ONNX_DIFF}); "
                                   "nothing was written")
        _publishable_modes(tmp)
    return out


def _check_export_target(out: Path, overwrite: bool) -> None:
    """`out` is outside every run folder, and replaces only an earlier export, with --overwrite."""
    from ebslab.core.files import check_folder_target
    from ebslab.serving.predict import run_folder_of

    inside = run_folder_of(out)
    if inside is not None:
        raise UserError(f"--out '{out}' is inside the run folder '{inside}' (its checkpoints are what --resume "
                        "and the report read); export elsewhere")
    check_folder_target(out.parent, "--out's parent")
    if out.exists() and not out.is_dir():
        raise UserError(f"export target '{out}' is a file; choose another --out")
    if out.exists() and not overwrite:
        raise UserError(f"export target '{out}' already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"'{out}' is a non-empty folder that is not an ebslab export (no {MARKER}); choose another "
                        "--out (--overwrite only replaces exports)")


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from ebslab.core.files import storage_error

        raise storage_error(out.parent, e) from None


def _save_model_and_tokenizer(folder: Path, run: LoadedRun, Model: type) -> tuple[Any, Any]:
    """The weights under the export's own head class, the tokenizer (model_max_length = the run's max_length) and
    the head's code, saved into `folder`: (model, tokenizer)."""
    model = Model(hf_config(run))
    model.load_state_dict(run.bundle.model.state_dict(), strict=True)
    model.save_pretrained(str(folder))
    tokenizer = copy.deepcopy(run.bundle.tokenizer)
    tokenizer.model_max_length = run.cfg.data.max_length
    tokenizer.save_pretrained(str(folder))
    shutil.copyfile(Path(__file__).with_name("hf_modeling.py"), folder / MODELING_FILE)
    return model, tokenizer


def _save_marker(folder: Path, run: LoadedRun, run_dir: str | Path, checkpoint: str) -> None:
    (folder / MARKER).write_text(json.dumps({  # the run folder's name only: no local path leaves the machine
        "run": Path(run_dir).resolve().name, "checkpoint": checkpoint, "ebslab_version": ebslab_version(),
        "labels": run.label_names, "label_names": display_labels(run),
        "data_fingerprint": run.derived.get("data_fingerprint")}, indent=2))


def _check_against_predict(folder: Path, run: LoadedRun) -> None:
    diff = check_reload(folder, run)
    if not diff <= MAX_PROB_DIFF:
        raise RuntimeError(f"the exported model differs from ebslab predict by {diff:.3g} (> {MAX_PROB_DIFF}); "
                           "nothing was written")


def _publishable_modes(folder: Path) -> None:
    """Every file readable by all (0644 under the usual umask), as the tokenizer's files are: safetensors writes
    its file 0600, which a web server or a shared model folder cannot serve."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask | 0o444)
        elif f.is_dir():
            f.chmod(0o777 & ~umask | 0o555)


def run(args: argparse.Namespace) -> int:
    out = export(args.run_dir, args.out, args.checkpoint, args.overwrite, args.onnx)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {args.run_dir} ({args.checkpoint}) to {out} ({size / 1e6:.1f} MB); load it with "
          f"pipeline('text-classification', model='{out}', trust_remote_code=True)", file=sys.stderr)
    return 0
