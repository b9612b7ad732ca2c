"""Which runs are replicates of one another, and which can be compared at all: the one rule the report and the
effective-batch-size study share.

- A configuration is what is trained: every config key except those that provably do not change it
  (`NON_TRAINING_KEYS`, `NON_TRAINING_PREFIXES`) and the seed. Runs of one configuration form a group.
- A replicate is one seed of a configuration. Runs of one configuration and one seed that differ only in keys
  that do not change training (`train.backend`, `batch.micro`, `track`, ...) are ONE replicate: they are checked
  for agreement and counted once, never as extra seeds.
- Runs compare only within one data fingerprint (`derived.data_fingerprint`: the data's content, split, limit,
  columns and label set). A run folder written before the fingerprint existed is matched by its data keys
  (`DATA_KEYS`) to the fingerprint that runs with the same data keys carry, when there is exactly one.

Pure functions on resolved configs (config.yaml as a dict).
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable, Sequence

from ebslab.core.config import as_trained

NON_TRAINING_PREFIXES = ("out.", "derived.", "checkpoint.")
NON_TRAINING_KEYS = ("batch.micro", "batch.auto_cap", "batch.auto_cpu_tokens", "train.backend", "track",
                     "eval.batch_size", "train.log_every_steps", "train.device")
SEED_KEY = "train.seed"
# The keys that say which examples a run saw, split and labelled how (not data.max_length: a training choice)
DATA_KEYS = ("data.name", "data.path", "data.text_column", "data.label_column", "data.split", "data.split_seed",
             "data.limit", "data.drop_empty")


def changes_training(key: str) -> bool:
    """Whether a config key can change what is trained (the seed is the replicate, not part of the group)."""
    return key != SEED_KEY and key not in NON_TRAINING_KEYS and not key.startswith(NON_TRAINING_PREFIXES)


def hashable(v: Any) -> Hashable:
    if isinstance(v, list):
        return tuple(hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, hashable(x)) for k, x in v.items()))
    return v


def configuration(config: dict) -> tuple:
    """The configuration a run trained (a sorted tuple of (key, value)): its group."""
    return tuple(sorted((k, hashable(v)) for k, v in as_trained(config).items() if changes_training(k)))


def seed(config: dict) -> Any:
    return as_trained(config).get(SEED_KEY)


def replicate_key(config: dict) -> tuple:
    """(configuration, seed): runs with the same key are one replicate."""
    return configuration(config), hashable(seed(config))


def data_fingerprint(config: dict) -> str | None:
    """The run's recorded data fingerprint, or None for a run folder from before it was recorded."""
    value = (config.get("derived") or {}).get("data_fingerprint")
    return str(value) if value else None


def data_keys(config: dict) -> tuple:
    trained = as_trained(config)
    return tuple((k, hashable(trained.get(k))) for k in DATA_KEYS)


def comparable_sets(configs: Sequence[dict]) -> list[list[int]]:
    """Indices of the configs partitioned into sets that may be compared: one per data fingerprint. A config
    without one joins the fingerprint that configs with its data keys carry when that is a single one, else a
    set of its own data keys. Sets in order of first appearance."""
    known: dict[tuple, set[str]] = {}
    for cfg in configs:
        fp = data_fingerprint(cfg)
        if fp is not None:
            known.setdefault(data_keys(cfg), set()).add(fp)
    sets: dict[Hashable, list[int]] = {}
    for i, cfg in enumerate(configs):
        fp = data_fingerprint(cfg)
        if fp is None:
            candidates = known.get(data_keys(cfg), set())
            fp = next(iter(candidates)) if len(candidates) == 1 else ("unknown", data_keys(cfg))
        sets.setdefault(fp, []).append(i)
    return list(sets.values())


def describe_data(config: dict, keys: Iterable[str] = DATA_KEYS) -> str:
    """The data keys (and fingerprint) of a run, for a note: `data.path=x.csv, data.limit=300 (fingerprint 1a2b..)`."""
    trained = as_trained(config)
    shown = [f"{k}={trained.get(k)}" for k in keys if trained.get(k) is not None]
    fp = data_fingerprint(config)
    return ", ".join(shown) + (f" (fingerprint {fp[:12]})" if fp else " (no fingerprint recorded)")
