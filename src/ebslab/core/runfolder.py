"""The one reader of run folders: every other module reads a run's files through here.

A run folder (out.dir/out.name) holds:
- config.yaml: the resolved config, with `derived` (effective batch, accum_steps, the resolved precision, ...);
- labels.json: {"names": [...]}, class id k = names[k];
- metrics.jsonl: one JSON object per line (step, eval, warning events); a run killed mid-write leaves a torn last
  line, which every reader here skips;
- summary.json: the run's status and its final metrics (absent while it runs, or when it was killed);
- predictions/test_{best,last}.parquet: test predictions (index, label, pred, prob, prob_0 ..);
- checkpoints/{last,best}/: weights; last/ also holds trainer_state.json.
Readers are tolerant where a missing or damaged file has a meaning (a run still running, or killed), and say so
with None; the strict ones (a run to resume or serve) raise a one-line UserError.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ebslab.core.config import Config, load_config, load_yaml_text
from ebslab.core.errors import UserError

CONFIG = "config.yaml"
LABELS = "labels.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PREDICTIONS = "predictions"
TRAINER_STATE = "trainer_state.json"


def read_json(path: Path) -> dict | None:
    """A JSON object from a file; None when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        return None
    return obj if isinstance(obj, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """JSON objects, one per line; a torn (unparsable) line, e.g. the last one of a killed run, is skipped."""
    records: list[dict] = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (torn lines skipped); [] before the run logged anything."""
    return read_jsonl(Path(run_dir) / METRICS)


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json; None while it runs, after a kill, or when the file is damaged."""
    return read_json(Path(run_dir) / SUMMARY)


def read_config(run_dir: Path, strict: bool = False) -> dict | None:
    """The run's config.yaml as a mapping, as recorded: a folder from before `derived.precision` was recorded
    reads as the train.precision it asked for (e.g. `auto`). None when it is missing or not a YAML mapping;
    strict: the read's own error (OSError, YAMLError) is raised."""
    run_dir = Path(run_dir)
    try:
        loaded = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8"))
    except (FileNotFoundError, yaml.YAMLError):
        if strict:
            raise
        return None
    if not isinstance(loaded, dict):
        if strict:
            raise ValueError(f"'{run_dir / CONFIG}' is not a YAML mapping")
        return None
    return loaded


def is_run_folder(run_dir: Path) -> bool:
    """A folder that a run started in: config.yaml and metrics.jsonl."""
    run_dir = Path(run_dir)
    return (run_dir / CONFIG).is_file() and (run_dir / METRICS).is_file()


def load_run_config(run_dir: Path) -> tuple[Config, dict]:
    """(the run's Config, its `derived`) for resuming or serving it; a UserError when the folder is not a run's."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not path.is_file() or not (run_dir / METRICS).exists():
        raise UserError(f"'{run_dir}' is not an ebslab run folder (no config.yaml / metrics.jsonl)")
    try:
        saved = load_yaml_text(path.read_text(), f"'{path}'")
    except (yaml.YAMLError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"'{path}' is not a valid ebslab config (not a YAML mapping); restore it or start a new run")
    return load_config(saved), saved.get("derived", {})


def read_labels(run_dir: Path) -> list[str]:
    """The run's class names (labels.json); a UserError when there is no readable one."""
    try:
        return [str(n) for n in json.loads((Path(run_dir) / LABELS).read_text())["names"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"run '{run_dir}' has no readable labels.json; the run did not get past start-up") from None


def read_predictions(run_dir: Path, which: str = "best") -> Any:
    """predictions/test_{which}.parquet as a DataFrame; None when missing or unreadable."""
    import pandas as pd

    try:
        return pd.read_parquet(Path(run_dir) / PREDICTIONS / f"test_{which}.parquet")
    except Exception:  # missing or unreadable file (any pyarrow error): no predictions
        return None


def read_trainer_state(checkpoint_dir: Path) -> dict:
    """A checkpoint's trainer_state.json (step, epoch, best metric, ...); the read's own error when damaged."""
    return json.loads((Path(checkpoint_dir) / TRAINER_STATE).read_text())
