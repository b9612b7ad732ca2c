"""Data: load a table, split it 8:1:1 (stratified, seeded), tokenize once (cached on disk), cut windows.

The example order of an epoch depends only on (seed, epoch). A window is the `effective_batch` examples of one
optimizer step; how a window is cut into micro-batches and spread over processes never changes which examples
it holds, which is what makes (micro 32 x accum 1) and (2 processes x micro 8 x accum 2) the same step.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ebslab.core.config import DataConfig, short_repr
from ebslab.core.errors import UserError

# package data, so that an installed ebslab (not only a source checkout) has its default dataset offline;
# the checkout's data/imdb is a link to this folder
SHIPPED_IMDB = Path(__file__).resolve().parents[1] / "assets" / "imdb"
DATA_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


# ----------------------------------------------------------------------------------------------------------
# Loading a table


def read_file(path: Path) -> pd.DataFrame:
    kind = DATA_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"data file '{path}' is not parquet, csv or jsonl; give one of those")
    if path.stat().st_size == 0:
        raise UserError(f"data file '{path}' is empty")
    try:
        if kind == "parquet":
            table = pd.read_parquet(path)
        elif kind == "csv":
            table = pd.read_csv(path)
        else:
            table = pd.read_json(path, lines=True)
    except Exception as e:  # pyarrow / pandas parse errors come in many classes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"data file '{path}' could not be read as {kind} ({first}); is it corrupt?") from None
    table.attrs["warnings"] = _duplicated_columns(path, kind)
    return table


def _duplicated_columns(path: Path, kind: str) -> list[str]:
    """pandas renames a repeated csv column (`label`, `label.1`) and a repeated JSON key keeps its last value,
    both silently: the user may be training on a column they did not mean."""
    try:
        if kind == "csv":
            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                names = next(csv.reader(f), [])
        elif kind == "jsonl":
            with open(path, encoding="utf-8", errors="replace") as f:
                first = f.readline()
            names = [k for k, _ in json.loads(first, object_pairs_hook=lambda pairs: pairs)]
        else:
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
    except Exception:  # a header this cannot read was read by pandas: the warning is best effort
        return []
    repeated = sorted({n for n in names if names.count(n) > 1})
    how = {"csv": "pandas renamed the later ones to NAME.1, NAME.2 ...",
           "jsonl": "the last value of a repeated key is the one read"}.get(kind, "pandas keeps one of them")
    return [f"data file '{path}' has the column {n!r} {names.count(n)} times ({how}); rename the columns so "
            "each is unique" for n in repeated]


def read_path(path_text: str) -> pd.DataFrame:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise UserError(f"data.path '{path_text}' does not exist; give a parquet/csv/jsonl file or a folder of them")
    if path.is_file():
        return read_file(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise UserError(f"data.path '{path_text}' holds no .parquet, .csv or .jsonl file")
    # A folder's files (train/val/test or shards) are pooled and re-split 8:1:1 (the IMDB protocol ebslab grew from).
    tables = [read_file(f) for f in files]
    table = pd.concat(tables, ignore_index=True)
    table.attrs["warnings"] = [w for t in tables for w in t.attrs.get("warnings", [])]
    return table


def _load_imdb() -> pd.DataFrame:
    if (SHIPPED_IMDB / "train.parquet").exists():
        return pd.concat([pd.read_parquet(SHIPPED_IMDB / f"{s}.parquet") for s in ("train", "test")],
                         ignore_index=True)
    return _load_hub("stanfordnlp/imdb", ["train", "test"])


IMDB_CLASS_NAMES = ["neg", "pos"]
"""The IMDB label ids' names (stanfordnlp/imdb's ClassLabel; the shipped files: 0 = negative, 1 = positive)."""
_HUB_CLASS_NAMES: dict[tuple[str, str], list[str]] = {}
"""(hub dataset, label column) -> its ClassLabel names, when the dataset declares them (set by _load_hub)."""
_HUB_FINGERPRINTS: dict[str, str] = {}
"""Hub dataset name -> the `datasets` fingerprints of the splits read (set by _load_hub, read by data_fingerprint)."""


def _load_hub(name: str, splits: list[str] | None = None) -> pd.DataFrame:
    try:
        import datasets

        ds = datasets.load_dataset(name)
    except Exception as e:
        raise UserError(f"dataset '{name}' could not be loaded from the Hugging Face hub ({type(e).__name__}); "
                        "offline? give a local file with data.path") from None
    names = splits or [s for s in ds.keys() if s != "unsupervised"]
    _HUB_FINGERPRINTS[name] = "+".join(f"{s}:{getattr(ds[s], '_fingerprint', '?')}" for s in names)
    for column, feature in getattr(ds[names[0]], "features", {}).items():
        if isinstance(getattr(feature, "names", None), list):
            _HUB_CLASS_NAMES[(name, column)] = [str(n) for n in feature.names]
    return pd.concat([ds[s].to_pandas() for s in names], ignore_index=True)


def load_table(cfg: DataConfig) -> pd.DataFrame:
    if cfg.path:
        return read_path(cfg.path)
    if cfg.name == "imdb":
        return _load_imdb()
    return _load_hub(cfg.name)


# ----------------------------------------------------------------------------------------------------------
# Fingerprint: what a run trained on, so that a resume on other data is refused


def data_files(cfg: DataConfig) -> list[Path]:
    """The files a data config reads (data.path's file or its folder's data files; the shipped IMDB's)."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if path.is_file():
            return [path]
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES) \
            if path.is_dir() else []
    if cfg.name == "imdb" and (SHIPPED_IMDB / "train.parquet").exists():
        return [SHIPPED_IMDB / "train.parquet", SHIPPED_IMDB / "test.parquet"]
    return []


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def class_names(cfg: DataConfig, label_names: list[str]) -> list[str] | None:
    """What each class is, where the data says so: IMDB's neg / pos, a hub dataset's ClassLabel names. `label_names`
    are the values found in the label column (class id k = label_names[k]); None where the data names nothing."""
    if cfg.path:
        return None
    if cfg.name == "imdb" and cfg.label_column == "label":
        declared = IMDB_CLASS_NAMES
    else:
        declared = _HUB_CLASS_NAMES.get((cfg.name, cfg.label_column))
    if not declared or not all(n.isdigit() and int(n) < len(declared) for n in label_names):
        return None
    return [declared[int(n)] for n in label_names]


def data_fingerprint(cfg: DataConfig, label_names: list[str]) -> tuple[str, dict[str, Any]]:
    """(hex digest, its parts): sha256 of the data files' content (or the hub dataset's fingerprint), the split,
    split_seed, limit, the text and label columns and the sorted label set. Where the files are does not count:
    the same data moved elsewhere has the same fingerprint."""
    files = data_files(cfg)
    if files:
        content = {f.name: _file_digest(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files}
    else:
        hub = "stanfordnlp/imdb" if cfg.name == "imdb" else cfg.name
        content = {"hub": _HUB_FINGERPRINTS.get(hub, f"{hub} (fingerprint unknown)")}
    parts = {"content": content, "split": [float(f) for f in cfg.split], "split_seed": cfg.split_seed,
             "limit": cfg.limit, "text_column": cfg.text_column, "label_column": cfg.label_column,
             "labels": sorted(str(n) for n in label_names)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints' parts, in words (for the message refusing a resume)."""
    changes = []
    old, new = saved.get("content") or {}, now.get("content") or {}
    if old != new:
        edited = sorted(k for k in set(old) & set(new) if old[k] != new[k])
        gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        said = [f"content of {', '.join(edited[:3])}" + (" ..." if len(edited) > 3 else "")] if edited else []
        said += [f"file(s) gone: {', '.join(gone[:3])}"] if gone else []
        said += [f"file(s) added: {', '.join(added[:3])}"] if added else []
        changes.append("; ".join(said) or "the dataset")
    for key in ("split", "split_seed", "limit", "text_column", "label_column"):
        if key in saved and saved[key] != now.get(key):
            changes.append(f"data.{key} {short_repr(saved[key])} -> {short_repr(now.get(key))}")
    if "labels" in saved and saved["labels"] != now.get("labels"):
        changes.append(f"label set {short_repr(saved['labels'])} -> {short_repr(now.get('labels'))}")
    return changes


# ----------------------------------------------------------------------------------------------------------
# Cleaning and labels


@dataclass
class Examples:
    texts: list[str]
    labels: np.ndarray  # int64 class ids
    label_names: list[str]
    dropped_empty: int = 0
    warnings: list[str] = field(default_factory=list)
    """Things in the data that look wrong but may be meant: printed at start and logged as warning lines."""


def clean(table: pd.DataFrame, cfg: DataConfig, source: str) -> Examples:
    for role, col in (("text", cfg.text_column), ("label", cfg.label_column)):
        if col not in table.columns:
            cols = ", ".join(map(str, table.columns))
            raise UserError(f"{source} has no {role} column '{col}' (columns: {cols}); "
                            f"set data.{role}_column=<name>")
    if len(table) == 0:
        raise UserError(f"{source} has no rows")
    text = table[cfg.text_column]
    empty = text.isna() | (text.astype(str).str.strip() == "")
    dropped = 0
    if empty.any():
        where = np.flatnonzero(empty.to_numpy())
        if not cfg.drop_empty:
            raise UserError(f"{source}: {len(where)} row(s) have a null or empty text (first at row {where[0]}); "
                            "fix the data or set data.drop_empty=true to drop them")
        table, dropped = table[~empty.to_numpy()], len(where)
        if len(table) == 0:
            raise UserError(f"{source}: all {dropped} row(s) have a null or empty text; no rows are left to train on")
    labels = table[cfg.label_column]
    if labels.isna().any():
        where = np.flatnonzero(labels.isna().to_numpy())
        raise UserError(f"{source}: {len(where)} row(s) have no label (NaN, first at row {where[0]}); "
                        "fix or drop them")
    values = labels.to_numpy()
    found = list(table.attrs.get("warnings", []))
    if np.issubdtype(values.dtype, np.number) and np.all(np.mod(values, 1) == 0):
        keys = values.astype(np.int64)
    else:  # string (or mixed) labels: ids in sorted order, mapping saved in labels.json
        found += _mixed_label_types(values, cfg.label_column, source)
        keys = values.astype(str)
    classes, counts = np.unique(keys, return_counts=True)
    names = [str(c) for c in classes]
    if len(classes) < 2:
        raise UserError(f"{source}: column '{cfg.label_column}' holds a single class ({names[0]!r}); "
                        "classification needs at least two")
    rare = [(n, int(c)) for n, c in zip(names, counts) if c < cfg.min_class_fraction * len(keys)]
    if rare:
        listed = ", ".join(f"{short_repr(n)} ({c} row{'s' if c > 1 else ''})" for n, c in rare[:5]) + (
            f" and {len(rare) - 5} more" if len(rare) > 5 else "")
        raise UserError(f"{source}: label(s) {listed} hold under data.min_class_fraction="
                        f"{cfg.min_class_fraction:g} of the {len(keys)} rows, a likely typo in column "
                        f"'{cfg.label_column}'; fix those rows, or set data.min_class_fraction="
                        f"{min(c for _, c in rare) / len(keys) / 2:.2g} (0 = off) if the class is meant")
    return Examples(texts=table[cfg.text_column].astype(str).tolist(),
                    labels=np.searchsorted(classes, keys).astype(np.int64), label_names=names,
                    dropped_empty=dropped, warnings=found)


def _is_number(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float, np.number)):
        return True
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def _mixed_label_types(values: np.ndarray, column: str, source: str) -> list[str]:
    """`1` among `positive` / `negative` (a csv edited by hand, two files pooled) becomes a class of its own."""
    distinct = pd.unique(values)
    numbers = [v for v in distinct if _is_number(v)]
    if not numbers or len(numbers) == len(distinct):
        return []
    words = [v for v in distinct if not _is_number(v)]
    show = lambda vs: ", ".join(repr(str(v)) for v in vs[:5]) + (" ..." if len(vs) > 5 else "")  # noqa: E731
    return [f"{source}: column '{column}' mixes numeric labels ({show(numbers)}) with text labels "
            f"({show(words)}); each distinct value is a class of its own"]


def load_examples(cfg: DataConfig, source: str) -> Examples:
    """`clean(load_table(cfg))`. The shipped IMDB (package data, never written) is read and cleaned once per
    process: 50k reviews took longer to read and check than a tiny model's whole run, and tests, the bench and
    autobatch make many runs in one process. Callers treat the result as read-only."""
    if not cfg.path and cfg.name == "imdb" and (SHIPPED_IMDB / "train.parquet").exists():
        return _shipped_imdb_examples(cfg.text_column, cfg.label_column, cfg.drop_empty, cfg.min_class_fraction,
                                      source)
    return clean(load_table(cfg), cfg, source)


@functools.lru_cache(maxsize=4)
def _shipped_imdb_examples(text_column: str, label_column: str, drop_empty: bool, min_class_fraction: float,
                           source: str) -> Examples:
    cfg = DataConfig(text_column=text_column, label_column=label_column, drop_empty=drop_empty,
                     min_class_fraction=min_class_fraction)
    return clean(_load_imdb(), cfg, source)


# ----------------------------------------------------------------------------------------------------------
# Split


def split_indices(labels: np.ndarray, fractions: list[float], seed: int,
                  limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/val/test over a seeded shuffle. `limit` keeps a prefix of that same shuffle first.

    Each split keeps the shuffled order (so IMDB's negatives-first file order never leaks into training)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    if limit is not None:
        order = order[:limit]
    total = sum(fractions)
    f_val, f_test = fractions[1] / total, fractions[2] / total
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(order))
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(labels[order]):
        members = order[labels[order] == c]
        n_test, n_val = round(len(members) * f_test), round(len(members) * f_val)
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test:n_test + n_val])
        parts[0].append(members[n_test + n_val:])
    out = []
    for p in parts:
        idx = np.concatenate(p)
        out.append(idx[np.argsort(rank[idx], kind="stable")])
    return out[0], out[1], out[2]


# ----------------------------------------------------------------------------------------------------------
# Tokenization (cached)


@dataclass
class TokenizedSplit:
    """Ragged token ids (flat + offsets), labels, and the row each example came from in the cleaned table."""

    ids: np.ndarray  # int32, all examples back to back
    offsets: np.ndarray  # int64, len n+1
    labels: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, idx: np.ndarray) -> TokenizedSplit:
        lengths = self.lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate([self.ids[self.offsets[i]:self.offsets[i + 1]] for i in idx]) if len(idx) \
            else np.zeros(0, dtype=np.int32)
        return TokenizedSplit(ids=ids, offsets=offsets, labels=self.labels[idx], rows=self.rows[idx])


def cache_dir() -> Path:
    return Path(os.environ.get("EBSLAB_CACHE", Path.home() / ".cache" / "ebslab"))


# where the tokenizer was loaded from, not how it tokenizes: the same tokenizer in two folders shares a cache entry
_LOCATION_KWARGS = {"name_or_path", "vocab_file", "merges_file", "tokenizer_file", "is_local", "local_files_only",
                    "cache_dir", "_commit_hash", "backend"}


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Everything that changes token ids: the fast tokenizer's full serialized state (vocabulary, normaliser,
    pre-tokenizer, post-processor, added tokens), the side it truncates, its special tokens and init options."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # transformers leaves the last call's truncation and padding in the backend; this module's call sets them
        # from max_length (in the key) and truncation_side (below), so they are not part of the tokenizer
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:  # a slow (Python) tokenizer has no serialized state: its vocabulary and options stand for it
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    init = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k not in _LOCATION_KWARGS}
    settings = {"truncation_side": getattr(tokenizer, "truncation_side", None),
                "special_tokens": getattr(tokenizer, "special_tokens_map", {}),
                "special_ids": getattr(tokenizer, "all_special_ids", []), "init": init}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Returns (flat ids, offsets, from_cache). Keyed by the texts themselves, the tokenizer and max_length."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    key = f"{h.hexdigest()[:24]}-{_tokenizer_fingerprint(tokenizer)}-L{max_length}"
    path = cache_dir() / "tokens" / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return z["ids"], z["offsets"], True
        except Exception:
            pass  # a damaged cache entry is rebuilt
    encoded = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for e in encoded for t in e), dtype=np.int32, count=int(offsets[-1]))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, ids=ids, offsets=offsets)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs time
    return ids, offsets, False


@dataclass
class DataBundle:
    train: TokenizedSplit
    val: TokenizedSplit
    test: TokenizedSplit
    label_names: list[str]
    majority_rate: float  # of the val split: what a collapsed model scores
    dropped_empty: int
    tokenize_s: float
    from_cache: bool
    class_counts: list[int] = field(default_factory=list)
    """Rows per class (label id order) in the kept data, all splits: printed at start."""
    warnings: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def data_source(cfg: DataConfig) -> str:
    return f"data.path '{cfg.path}'" if cfg.path else f"dataset '{cfg.name}'"


def load_data(cfg: DataConfig, tokenizer: Any, examples: Examples | None = None) -> DataBundle:
    """Split and tokenize. `examples`: the table already read and checked (`load_examples`), so a wrong path or
    column is reported before anything model-related is loaded."""
    examples = examples if examples is not None else load_examples(cfg, data_source(cfg))
    train_idx, val_idx, test_idx = split_indices(examples.labels, cfg.split, cfg.split_seed, cfg.limit)
    kept = np.concatenate([train_idx, val_idx, test_idx])
    t0 = time.perf_counter()
    ids, offsets, from_cache = tokenize([examples.texts[i] for i in kept], tokenizer, cfg.max_length)
    whole = TokenizedSplit(ids=ids, offsets=offsets, labels=examples.labels[kept], rows=kept)
    n_tr, n_va = len(train_idx), len(val_idx)
    positions = np.arange(len(kept))
    splits = [whole.subset(positions[:n_tr]), whole.subset(positions[n_tr:n_tr + n_va]),
              whole.subset(positions[n_tr + n_va:])]
    for name, s in zip(("train", "val", "test"), splits):
        if len(s) == 0:
            raise UserError(f"the {name} split is empty ({len(kept)} examples kept); raise data.limit")
    val_counts = np.bincount(splits[1].labels, minlength=len(examples.label_names))
    return DataBundle(train=splits[0], val=splits[1], test=splits[2], label_names=examples.label_names,
                      majority_rate=float(val_counts.max() / val_counts.sum()),
                      dropped_empty=examples.dropped_empty, tokenize_s=time.perf_counter() - t0,
                      from_cache=from_cache,
                      class_counts=np.bincount(whole.labels, minlength=len(examples.label_names)).tolist(),
                      warnings=list(examples.warnings))


# ----------------------------------------------------------------------------------------------------------
# Order, windows, micro-batches


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def length_grouped(order: np.ndarray, lengths: np.ndarray, effective_batch: int, seed: int,
                   epoch: int) -> np.ndarray:
    """Sort chunks of 64 windows by length, then shuffle the windows: each window holds similar lengths."""
    chunk = 64 * effective_batch
    parts = [o[np.argsort(-lengths[o], kind="stable")] for o in np.array_split(order, max(1, math.ceil(
        len(order) / chunk)))]
    grouped = np.concatenate(parts)
    windows = [grouped[i:i + effective_batch] for i in range(0, len(grouped), effective_batch)]
    rng = np.random.default_rng([seed, epoch, 1])
    full = [w for w in windows if len(w) == effective_batch]
    short = [w for w in windows if len(w) < effective_batch]
    full = [full[i] for i in rng.permutation(len(full))]
    return np.concatenate(full + short) if windows else order


def windows(order: np.ndarray, effective_batch: int) -> list[np.ndarray]:
    return [order[i:i + effective_batch] for i in range(0, len(order), effective_batch)]


@dataclass
class MicroBatch:
    indices: np.ndarray
    counts: bool = True  # False: a stand-in so every process runs the same number of micro-steps


def shard_window(window: np.ndarray, micro: int, world_size: int, rank: int) -> list[MicroBatch]:
    """This process's micro-batches of one window. Every process gets the same count, so gradient sync lines up;
    a full window gives accum_steps micro-batches of exactly `micro` examples each."""
    n_micro = math.ceil(len(window) / (micro * world_size))
    share = window[rank::world_size]
    out = []
    for part in np.array_split(share, n_micro):
        out.append(MicroBatch(part) if len(part) else MicroBatch(window[:1], counts=False))
    return out


def collate(split: TokenizedSplit, idx: np.ndarray, pad_id: int, model_inputs: tuple[str, ...]) -> dict:
    import torch

    lengths = split.lengths[idx]
    width = int(lengths.max())
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    for row, (i, n) in enumerate(zip(idx, lengths)):
        start = split.offsets[i]
        ids[row, :n] = split.ids[start:start + n]
        mask[row, :n] = 1
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if "token_type_ids" in model_inputs:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return batch
