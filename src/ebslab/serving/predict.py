"""`ebslab predict RUN_DIR INPUT`: labels and class probabilities for new texts, from a run folder only.

The model is rebuilt exactly as training built it (same code path, same first-token shortcut) and scored in the
same length-sorted batches as evaluation, so the run's own test split comes back bit for bit as
predictions/test_best.parquet.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ebslab.core.errors import UserError
from ebslab.core.runfolder import is_run_folder, load_run_config, read_labels
from ebslab.core.config import Config, load_config
from ebslab.inputs.data import DATA_SUFFIXES, TokenizedSplit, read_file, read_path, collate, tokenize
from ebslab.core.files import atomic_write_with
from ebslab.serving.predict_args import PREDICT_OVERRIDES

OUT_SUFFIXES = (".csv", ".parquet", ".jsonl")
PROGRESS_MIN_TEXTS = 2000


@dataclass
class LoadedRun:
    run_dir: Path
    checkpoint: str
    cfg: Config
    derived: dict
    label_names: list[str]
    bundle: Any  # ebslab.inputs.models.ModelBundle, weights of the asked checkpoint loaded, in eval mode
    device: torch.device


def checkpoint_folder(run_dir: Path, checkpoint: str) -> Path:
    from ebslab.loop.checkpoint import resolve_checkpoint

    if checkpoint not in ("best", "last"):
        raise UserError(f"--checkpoint {checkpoint!r} is not a checkpoint; use best or last")
    folder = resolve_checkpoint(run_dir / "checkpoints" / checkpoint) if checkpoint == "last" else None
    if folder is None:  # best/ holds weights only; last/ without its optimizer files still has usable weights
        for candidate in (run_dir / "checkpoints" / checkpoint, run_dir / "checkpoints" / f".{checkpoint}.old"):
            if (candidate / "model.safetensors").is_file():
                folder = candidate
                break
    if folder is None:
        have = sorted(p.name for p in (run_dir / "checkpoints").glob("*") if (p / "model.safetensors").is_file()) \
            if (run_dir / "checkpoints").is_dir() else []
        other = f"; it has: {', '.join(have)} (pass --checkpoint {have[0]})" if have else "; it has no checkpoint"
        raise UserError(f"run '{run_dir}' has no '{checkpoint}' checkpoint{other}")
    return folder


def check_overrides(overrides: list[str] | None) -> None:
    for item in overrides or []:
        if "=" not in item or item.split("=", 1)[0] not in PREDICT_OVERRIDES:
            raise UserError(f"'{item}' cannot be changed at prediction time; only {', '.join(PREDICT_OVERRIDES)} "
                            "(as key=value)")


def load_run(run_dir: str | Path, checkpoint: str = "best", overrides: list[str] | None = None) -> LoadedRun:
    """The run's config, labels and model with the asked checkpoint's weights. Every user error is raised
    before the model is built."""
    from ebslab.loop.backends.torch import pick_device
    from ebslab.loop.checkpoint import load_weights
    from ebslab.inputs.models import build_model, load_tokenizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"'{run_dir}' is not a folder; give an ebslab run folder (out.dir/out.name)")
    cfg, derived = load_run_config(run_dir)
    check_overrides(overrides)
    if overrides:
        saved = {k: v for k, v in cfg.to_dict().items()}
        cfg = load_config(saved, overrides)
    label_names = read_labels(run_dir)
    weights = checkpoint_folder(run_dir, checkpoint)
    device = pick_device(cfg.train.device, 0)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar would precede every prediction's output
    tokenizer = load_tokenizer(cfg.model.name)
    bundle = build_model(cfg.model, len(label_names), cfg.train.seed, tokenizer, cfg.data.max_length)
    try:
        load_weights(bundle.model, weights)
    except (RuntimeError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint '{weights}' does not fit the model of the run's config.yaml ({first})") from None
    bundle.model.to(device).eval()
    return LoadedRun(run_dir=run_dir, checkpoint=checkpoint, cfg=cfg, derived=derived, label_names=label_names,
                     bundle=bundle, device=device)


def tokenized(texts: list[str], run: LoadedRun) -> TokenizedSplit:
    ids, offsets, _ = tokenize(texts, run.bundle.tokenizer, run.cfg.data.max_length)
    n = len(texts)
    return TokenizedSplit(ids=ids, offsets=offsets, labels=np.zeros(n, dtype=np.int64), rows=np.arange(n))


@torch.inference_mode()
def class_probs(run: LoadedRun, split: TokenizedSplit, progress: bool | None = None) -> np.ndarray:
    """(n, K) softmax probabilities in the split's order. Longest first in batches of eval.batch_size, stable:
    the same batches, hence the same padding and the same floats, as evaluation of that split."""
    from tqdm.auto import tqdm

    from ebslab.loop.backends.torch import TorchBackend

    autocast = TorchBackend(run.cfg.train.precision, str(run.device)).autocast
    batch_size, bundle = run.cfg.eval.batch_size, run.bundle
    order = np.argsort(-split.lengths, kind="stable")
    out = np.zeros((len(split), len(run.label_names)), dtype=np.float32)
    show = len(split) >= PROGRESS_MIN_TEXTS if progress is None else progress
    bar = tqdm(total=len(split), desc="predict", unit="text", disable=not show, file=sys.stderr)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(run.device) for k, v in collate(split, idx, bundle.pad_id, bundle.model_inputs).items()}
        with autocast():
            logits = bundle.model(**batch).float()
        out[idx] = logits.softmax(-1).cpu().numpy()
        bar.update(len(idx))
    bar.close()
    return out


# ----------------------------------------------------------------------------------------------------------
# Input and output tables


def text_lines(text: str) -> list[str]:
    """One text per line: split at newlines (\\n, \\r\\n) only. str.splitlines() also splits at U+2028, form
    feeds, \\x1c-\\x1e ..., which a review may hold: output rows would no longer match input lines."""
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder that `path` is in (or is), if any: a folder holding config.yaml and metrics.jsonl."""
    p = Path(path).expanduser().resolve()
    for folder in (p, *p.parents):
        if is_run_folder(folder):
            return folder
    return None


def read_input(source: str, text_column: str) -> pd.DataFrame:
    """INPUT as a table with a string column `text_column`: csv/parquet/jsonl, a folder of them, a plain text
    file (one text per line), or '-' (stdin, one text per line)."""
    if source == "-":
        lines = text_lines(sys.stdin.read())
        table, what = pd.DataFrame({text_column: lines}), "stdin"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"input '{source}' does not exist; give a csv/parquet/jsonl/txt file, a folder or -")
        what = f"input '{source}'"
        if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
            if path.stat().st_size and b"\0" in path.read_bytes()[:4096]:
                raise UserError(f"{what} is neither csv/parquet/jsonl nor plain text; give one of those")
            lines = text_lines(path.read_bytes().decode("utf-8", errors="replace"))
            table = pd.DataFrame({text_column: lines})
        elif path.is_file():
            if path.stat().st_size == 0:
                raise UserError(f"{what} is empty; give at least one text")
            table = read_file(path)
        else:
            table = read_path(str(path))
    if text_column not in table.columns:
        cols = ", ".join(map(str, table.columns)) or "none"
        raise UserError(f"{what} has no text column '{text_column}' (columns: {cols}); pass --text-column NAME")
    if len(table) == 0:
        raise UserError(f"{what} is empty; give at least one text")
    missing = table[text_column].isna().to_numpy()
    if missing.any():
        raise UserError(f"{what}: {int(missing.sum())} row(s) have no text (first at row {np.flatnonzero(missing)[0]}); "
                        "fix or drop them")
    return table.reset_index(drop=True)


def attach(table: pd.DataFrame, probs: np.ndarray, label_names: list[str]) -> pd.DataFrame:
    """The input rows, then `pred` (label name) and one `prob_<label>` column per class (label id order)."""
    out = table.copy()
    names = np.asarray(label_names, dtype=object)
    out["pred"] = names[probs.argmax(1)]
    for k, name in enumerate(label_names):
        out[f"prob_{name}"] = probs[:, k]
    return out


def check_out_path(out: str | None, source: str | None = None, overwrite: bool = False) -> None:
    """--out: a new file (an existing one only with --overwrite), never the input, never inside a run folder."""
    if out is None:
        return
    path = Path(out)
    if path.suffix.lower() not in OUT_SUFFIXES:
        raise UserError(f"--out '{out}' must end in {', '.join(OUT_SUFFIXES)} (the extension picks the format)")
    run = run_folder_of(path)
    if run is not None:
        raise UserError(f"--out '{out}' is inside the run folder '{run}', whose files ebslab reads back (report, "
                        "resume); write the predictions elsewhere")
    if source not in (None, "-") and path.exists() and path.resolve() == Path(source).expanduser().resolve():
        raise UserError(f"--out '{out}' is the input file; give another --out")
    if not path.parent.is_dir():
        raise UserError(f"--out '{out}': folder '{path.parent}' does not exist; create it first")
    if path.is_dir():
        raise UserError(f"--out '{out}' is a folder; give a file name ending in {', '.join(OUT_SUFFIXES)}")
    if path.exists() and not overwrite:
        raise UserError(f"--out '{out}' already exists; pass --overwrite to replace it, or choose another --out")


def write_table(table: pd.DataFrame, out: str | None) -> None:
    if out is None:
        buffer = io.StringIO()
        table.to_csv(buffer, index=False)
        sys.stdout.write(buffer.getvalue())
        sys.stdout.flush()
        return
    path = Path(out)
    suffix = path.suffix.lower()

    def write(tmp: Path) -> None:
        if suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        elif suffix == ".jsonl":
            table.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            table.to_csv(tmp, index=False)

    atomic_write_with(path, write)


def predict_texts(run: LoadedRun, texts: list[str], progress: bool | None = None) -> np.ndarray:
    return class_probs(run, tokenized(texts, run), progress)


# ----------------------------------------------------------------------------------------------------------
# CLI


def run(args: argparse.Namespace) -> int:
    check_out_path(args.out, args.input, args.overwrite)
    check_overrides(args.overrides)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"'{run_dir}' is not a folder; give an ebslab run folder (out.dir/out.name)")
    cfg, _ = load_run_config(run_dir)
    checkpoint_folder(run_dir, args.checkpoint)
    table = read_input(args.input, args.text_column or cfg.data.text_column)
    loaded = load_run(run_dir, args.checkpoint, args.overrides)
    column = args.text_column or cfg.data.text_column
    probs = predict_texts(loaded, table[column].astype(str).tolist())
    write_table(attach(table, probs, loaded.label_names), args.out)
    if args.out:
        print(f"wrote {len(table)} predictions to {args.out}", file=sys.stderr)
    return 0
