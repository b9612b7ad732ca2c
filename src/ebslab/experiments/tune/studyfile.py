"""The study file of `ebslab tune`: parsed and checked completely (space, objective, budget, sampler, pruner,
confirmation) before anything is created; its fingerprint refuses a changed file on --resume."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


from ebslab.experiments import sweep as sw
from ebslab.core.errors import UserError
from ebslab.core.config import VALID_KEYS, flatten, load_config, read_yaml, read_yaml_file, unknown_key
from ebslab.core.metrics import METRICS, higher_is_better

TOP_KEYS = ("name", "base", "space", "objective", "trials", "sampler", "pruner", "confirm", "seed", "heartbeat_s")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "asha")
SET_BY_TUNE = ("out.dir", "out.name", "train.seed", "eval.select_by")


@dataclasses.dataclass
class Param:
    key: str
    kind: str  # float | int | choice
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: list[Any] | None = None

    def distribution(self):
        import optuna.distributions as od

        if self.kind == "float":
            return od.FloatDistribution(float(self.low), float(self.high), log=self.log)
        if self.kind == "int":
            return od.IntDistribution(int(self.low), int(self.high), log=self.log)
        return od.CategoricalDistribution(self.choices)

    def edge_values(self) -> list[Any]:
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


@dataclasses.dataclass
class Study:
    name: str
    sweep: sw.Sweep
    """The base (file and/or mapping) as a sweep holds it: trial commands are built by `ebslab.experiments.sweep`."""
    space: list[Param]
    metric: str
    trials: int
    sampler: str
    pruner: dict[str, Any]
    top_k: int
    seeds: list[int]
    seed: int
    heartbeat_s: int
    every_examples: int
    search_seed: int
    fingerprint: dict[str, Any]
    path: Path | None = None

    @property
    def objective(self) -> str:
        return f"val/{self.metric}"

    @property
    def direction(self) -> str:
        return "maximize" if higher_is_better(self.metric) else "minimize"

    def fixed_overrides(self) -> dict[str, Any]:
        """Set in every run of the study: the best checkpoint is the best by the objective."""
        return {"eval.select_by": self.metric} if "eval.select_by" in VALID_KEYS else {}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def space_size(space: list[Param]) -> float:
    """How many distinct configurations the space holds (inf with a float range)."""
    sizes = [len(p.choices) if p.kind == "choice" else int(p.high) - int(p.low) + 1 if p.kind == "int"
             else math.inf for p in space]
    return math.prod(sizes)


def parse_param(key: str, spec: Any, where: str) -> Param:
    if key not in VALID_KEYS:
        raise UserError(f"study {where} space: {unknown_key(key)}")
    if key in SET_BY_TUNE:
        why = ("seeds are the confirmation's: the search runs on the base's train.seed, the top configurations "
               "then on confirm.seeds" if key == "train.seed" else "it is set by ebslab tune")
        raise UserError(f"study {where} space: '{key}' cannot be searched ({why}); remove it")
    if not isinstance(spec, dict) or len(set(spec) & {"float", "int", "choice"}) != 1 or \
            set(spec) - {"float", "int", "choice", "log"}:
        raise UserError(f"study {where} space '{key}': give exactly one of {{float: [lo, hi]}}, "
                        f"{{int: [lo, hi]}} or {{choice: [...]}} (plus log: true for float/int), got {spec!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"study {where} space '{key}': log must be true or false, got {log!r}")
    if "choice" in spec:
        choices = spec["choice"]
        if log:
            raise UserError(f"study {where} space '{key}': log applies to float/int ranges, not choice")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"study {where} space '{key}': choice is an empty list; give at least one value")
        if any(not (c is None or isinstance(c, (bool, int, float, str))) for c in choices):
            raise UserError(f"study {where} space '{key}': choice values must be numbers, strings or booleans")
        if len(set(map(repr, choices))) != len(choices):
            raise UserError(f"study {where} space '{key}': choice lists a value twice")
        return Param(key, "choice", choices=list(choices))
    kind = "float" if "float" in spec else "int"
    bounds = spec[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise UserError(f"study {where} space '{key}': {kind} takes [lo, hi], got {bounds!r}")
    lo, hi = (float(b) if isinstance(b, str) and kind == "float" and _is_float(b) else b for b in bounds)
    if not (is_number(lo) and is_number(hi)) or (kind == "int" and not (float(lo).is_integer() and
                                                                     float(hi).is_integer())):
        raise UserError(f"study {where} space '{key}': {kind} bounds must be {kind}s, got {bounds!r}")
    if lo > hi:
        raise UserError(f"study {where} space '{key}': lo {lo} > hi {hi}; write the range as [lo, hi]")
    if lo == hi:
        raise UserError(f"study {where} space '{key}': the range [{lo}, {hi}] is empty; widen it, or fix the "
                        f"value in base")
    if log and lo <= 0:
        raise UserError(f"study {where} space '{key}': log scale needs lo > 0, got {lo}")
    if kind == "int":
        lo, hi = int(lo), int(hi)
    return Param(key, kind, low=lo, high=hi, log=log)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pruner_spec(value: Any, where: str) -> dict[str, Any]:
    spec = {"name": value} if isinstance(value, str) or value is None else value
    if not isinstance(spec, dict) or spec.get("name", "none") not in PRUNERS:
        raise UserError(f"study {where}: pruner must be one of {', '.join(PRUNERS)} (or a mapping with name:), "
                        f"got {value!r}")
    allowed = {"none": set(), "median": {"startup_trials", "warmup_examples"},
               "asha": {"min_examples", "reduction_factor"}}[spec.get("name", "none")]
    extra = set(spec) - allowed - {"name"}
    if extra:
        raise UserError(f"study {where}: pruner {spec.get('name')} takes {sorted(allowed) or 'no options'}, "
                        f"not {sorted(extra)}")
    for k in allowed & set(spec):
        if not _is_int_at_least(spec[k], 2 if k == "reduction_factor" else 0):
            raise UserError(f"study {where}: pruner {k} must be an integer >= "
                            f"{2 if k == 'reduction_factor' else 0}, got {spec[k]!r}")
    return {"name": spec.get("name", "none"), **{k: spec[k] for k in sorted(allowed & set(spec))}}


def parse_study(data: Any, path: Path | None = None) -> Study:
    """A study file's mapping as a Study, every part checked before anything is created, in the file's order; the
    first problem found is the one-line error."""
    where = f"file '{path}'" if path else "file"
    _check_top_level(data, where)
    # name and base are checked exactly as a sweep checks them
    sweep = sw.parse_sweep({"name": data.get("name"), "base": data.get("base")}, path)
    space = _parse_space(data.get("space"), where)
    objective, metric = _parse_objective(data.get("objective", "val/acc"), where)
    trials = _parse_trials(data.get("trials", 20), where)
    sampler = _parse_sampler(data.get("sampler", "tpe"), space, trials, where)
    pruner = _pruner_spec(data.get("pruner", "none"), where)
    seed, heartbeat_s = _parse_seed_and_heartbeat(data, where)
    top_k, seeds = _parse_confirm(data.get("confirm", {"top_k": 2, "seeds": [101, 102, 103]}), space, trials, where)
    _check_space_edges_on_base(sweep, space, where)
    base_cfg = load_config(sweep.base_file, sw.run_overrides(sweep, {}))
    _check_confirm_seeds_are_fresh(seeds, base_cfg.train.seed, where)
    every = _pruning_interval(base_cfg, pruner, where)
    fingerprint = _fingerprint(sweep, {p.key: data["space"][p.key] for p in space}, objective=objective,
                               trials=trials, sampler=sampler, pruner=pruner,
                               confirm={"top_k": top_k, "seeds": seeds}, seed=seed)
    return Study(name=sweep.name, sweep=sweep, space=space, metric=metric, trials=trials, sampler=sampler,
                 pruner=pruner, top_k=top_k, seeds=list(seeds), seed=seed, heartbeat_s=heartbeat_s,
                 every_examples=every, search_seed=base_cfg.train.seed, fingerprint=fingerprint, path=path)


def _check_top_level(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise UserError(f"study {where} must hold a mapping (name, base, space, objective, ...)")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"study {where}: unknown top-level key(s) {', '.join(map(repr, unknown))}; a study file "
                        f"has {', '.join(TOP_KEYS)}")


def _parse_space(space_data: Any, where: str) -> list[Param]:
    if not isinstance(space_data, dict) or not space_data:
        raise UserError(f"study {where}: 'space' must map dotted keys to {{float|int|choice: ...}}; it is empty")
    space = []
    for key, spec in space_data.items():
        if isinstance(spec, dict) and not (set(spec) & {"float", "int", "choice", "log"}):
            raise UserError(f"study {where} space: write keys dotted ('{key}.{next(iter(spec), '')}'), not nested")
        space.append(parse_param(key, spec, where))
    return space


def _parse_objective(objective: Any, where: str) -> tuple[str, str]:
    """(objective, its metric): a val metric, never a test one."""
    if not isinstance(objective, str) or "/" not in objective:
        raise UserError(f"study {where}: objective must be val/<metric> (e.g. val/acc), got {objective!r}")
    split, metric = objective.split("/", 1)
    if split == "test":
        raise UserError(f"study {where}: objective '{objective}' is a test metric; nothing is selected on test: "
                        f"use val/{metric}")
    if split != "val" or metric not in METRICS:
        raise UserError(f"study {where}: objective must be val/<metric> with metric one of {', '.join(METRICS)}, "
                        f"got {objective!r}")
    return objective, metric


def _is_int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _parse_trials(trials: Any, where: str) -> int:
    if not _is_int_at_least(trials, 1):
        raise UserError(f"study {where}: trials must be an integer >= 1, got {trials!r}")
    return trials


def _parse_sampler(sampler: Any, space: list[Param], trials: int, where: str) -> str:
    """The sampler's name; the grid sampler only over choice lists with at least `trials` points."""
    if sampler not in SAMPLERS:
        raise UserError(f"study {where}: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "grid":
        ranged = [p.key for p in space if p.kind != "choice"]
        if ranged:
            raise UserError(f"study {where}: the grid sampler needs choice lists; {', '.join(ranged)} "
                            f"{'is a range' if len(ranged) == 1 else 'are ranges'}")
        size = math.prod(len(p.choices) for p in space)
        if trials > size:
            raise UserError(f"study {where}: the grid has {size} point(s), fewer than trials={trials}; lower trials")
    return sampler


def _parse_seed_and_heartbeat(data: dict, where: str) -> tuple[int, int]:
    seed = data.get("seed", 0)
    heartbeat_s = data.get("heartbeat_s", 30)
    for k, v, lo in (("seed", seed, 0), ("heartbeat_s", heartbeat_s, 1)):
        if not _is_int_at_least(v, lo):
            raise UserError(f"study {where}: {k} must be an integer >= {lo}, got {v!r}")
    return seed, heartbeat_s


def _parse_confirm(confirm: Any, space: list[Param], trials: int, where: str) -> tuple[int, list[int]]:
    """(top_k, seeds) of the confirmation: at least 2 configurations, each re-run on at least 2 distinct seeds."""
    if not isinstance(confirm, dict) or set(confirm) - {"top_k", "seeds"}:
        raise UserError(f"study {where}: confirm must be a mapping with top_k and seeds, got {confirm!r}")
    top_k, seeds = confirm.get("top_k", 2), confirm.get("seeds", [101, 102, 103])
    if not _is_int_at_least(top_k, 2) or top_k > trials:
        raise UserError(f"study {where}: confirm.top_k must be an integer in [2, trials={trials}] (a winner is "
                        f"named against the runner-up), got {top_k!r}")
    size = space_size(space)
    if size < top_k:
        raise UserError(f"study {where}: the space holds {size} configuration(s), fewer than confirm.top_k={top_k}: "
                        f"nothing to rank; widen it (more choices or a range)")
    if not isinstance(seeds, list) or len(seeds) < 2 or any(
            not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**32 for s in seeds) or \
            len(set(seeds)) != len(seeds):
        raise UserError(f"study {where}: confirm.seeds must be at least 2 distinct integer seeds (the seed is the "
                        f"unit of replication), got {seeds!r}")
    return top_k, seeds


def _check_space_edges_on_base(sweep: sw.Sweep, space: list[Param], where: str) -> None:
    """Every edge of the space must make a valid config on top of the base (types, ranges, divisibility)."""
    for p in space:
        for value in p.edge_values():
            reason = sw.check_combination(sweep, {p.key: value})
            if reason:
                raise UserError(f"study {where} space '{p.key}' = {value!r}: {reason}")


def _check_confirm_seeds_are_fresh(seeds: list[int], search_seed: int, where: str) -> None:
    if search_seed in seeds:
        raise UserError(f"study {where}: confirm.seeds include {search_seed}, the seed of the search "
                        f"(train.seed); confirmation needs fresh seeds")


def _pruning_interval(base_cfg: Any, pruner: dict[str, Any], where: str) -> int:
    """The base's eval.every_examples (0: none), which a pruner needs to compare trials at equal examples seen."""
    every = int(getattr(base_cfg.eval, "every_examples", 0) or 0)
    if pruner["name"] != "none" and not every:
        raise UserError(f"study {where}: pruner {pruner['name']} compares trials at equal examples seen: set "
                        f"eval.every_examples in base (e.g. eval.every_examples: 512)")
    return every


def _fingerprint(sweep: sw.Sweep, space_as_written: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """What the user gave (not every default), as JSON values: an ebslab upgrade that adds a key does not block a
    resume."""
    base_values = {**(flatten(read_yaml(sweep.base_file)) if sweep.base_file else {}), **sweep.base_values}
    fingerprint = {"base": base_values, "space": space_as_written, **settings}
    return json.loads(json.dumps(fingerprint, default=str))


def load_study_file(path: str | Path) -> Study:
    return parse_study(*read_yaml_file(path, "study"))


def fingerprint_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between two study fingerprints, as `key: old -> new` (dotted), for the resume refusal."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes += fingerprint_changes(a, b, name + ".")
        elif a != b:
            changes.append(f"{name}: {json.dumps(a)} -> {json.dumps(b)}")
    return changes
