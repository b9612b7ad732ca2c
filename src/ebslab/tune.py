"""`ebslab tune`: an Optuna search over config keys that ends in a multi-seed verdict.

Optuna is the engine (samplers, pruners, storage, heartbeat); ebslab adds what a study of training choices
needs: every trial is a normal run folder, trials report at equal *examples seen* (never at equal optimizer
steps, which would compare a large-EBS trial after more data than a small-EBS one), a killed study resumes
without losing or duplicating a trial, and the top configurations are re-run on fresh seeds so that a winner
is named only when it beats the runner-up beyond seed noise.

    OUT/NAME/
      study.db                      the Optuna storage (SQLite) unless --storage URL
      study.json                    index: trials, parameters, objective, status; confirmation and verdict
      trial-0003/, trial-0003.log   one run folder (and its process output) per search slot, 0 to trials - 1 (a
                                    retried trial keeps its folder; study.json maps folders to Optuna numbers)
      confirm/trial-0003,seed=11/   the confirmation runs: top_k configurations x confirm.seeds

Workers: each `ebslab tune` process (any machine, same command, same --storage) asks the shared study for
trials until the budget is spent, then for confirmation runs (queued in a second study, NAME/confirm, so that
several workers split them too), then writes the verdict. Trial processes are `ebslab train` runs started as a
sweep starts its runs (`ebslab.sweep`); the trial learns its Optuna trial from the environment
(EBSLAB_TUNE_STORAGE / _STUDY / _TRIAL) and reports through `PruningCallback`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from ebslab import sweep as sw
from ebslab.callbacks import Callback
from ebslab.config import UserError, VALID_KEYS, load_config, read_yaml
from ebslab.locks import FolderLock
from ebslab.metrics import METRICS, higher_is_better

ENV_STORAGE, ENV_STUDY, ENV_TRIAL = "EBSLAB_TUNE_STORAGE", "EBSLAB_TUNE_STUDY", "EBSLAB_TUNE_TRIAL"
TOP_KEYS = ("name", "base", "space", "objective", "trials", "sampler", "pruner", "confirm", "seed", "heartbeat_s")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "asha")
SET_BY_TUNE = ("out.dir", "out.name", "train.seed", "eval.select_by")
CONFIRM_SUFFIX = "/confirm"
POLL_S = 2.0


# ----------------------------------------------------------------------------------------------------------
# The study file: parsed and checked completely before anything is created.


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
    """The base (file and/or mapping) as a sweep holds it: trial commands are built by `ebslab.sweep`."""
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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_param(key: str, spec: Any, where: str) -> Param:
    if key not in VALID_KEYS:
        raise UserError(f"study {where} space: {sw._unknown_key(key)}")
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
    if not (_number(lo) and _number(hi)) or (kind == "int" and not (float(lo).is_integer() and
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
        if not isinstance(spec[k], int) or isinstance(spec[k], bool) or spec[k] < (2 if k == "reduction_factor"
                                                                                   else 0):
            raise UserError(f"study {where}: pruner {k} must be an integer >= "
                            f"{2 if k == 'reduction_factor' else 0}, got {spec[k]!r}")
    return {"name": spec.get("name", "none"), **{k: spec[k] for k in sorted(allowed & set(spec))}}


def parse_study(data: Any, path: Path | None = None) -> Study:
    where = f"file '{path}'" if path else "file"
    if not isinstance(data, dict):
        raise UserError(f"study {where} must hold a mapping (name, base, space, objective, ...)")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"study {where}: unknown top-level key(s) {', '.join(map(repr, unknown))}; a study file "
                        f"has {', '.join(TOP_KEYS)}")
    # name and base are checked exactly as a sweep checks them
    sweep = sw.parse_sweep({"name": data.get("name"), "base": data.get("base")}, path)

    space_data = data.get("space")
    if not isinstance(space_data, dict) or not space_data:
        raise UserError(f"study {where}: 'space' must map dotted keys to {{float|int|choice: ...}}; it is empty")
    space = []
    for key, spec in space_data.items():
        if isinstance(spec, dict) and not (set(spec) & {"float", "int", "choice", "log"}):
            raise UserError(f"study {where} space: write keys dotted ('{key}.{next(iter(spec), '')}'), not nested")
        space.append(parse_param(key, spec, where))

    objective = data.get("objective", "val/acc")
    if not isinstance(objective, str) or "/" not in objective:
        raise UserError(f"study {where}: objective must be val/<metric> (e.g. val/acc), got {objective!r}")
    split, metric = objective.split("/", 1)
    if split == "test":
        raise UserError(f"study {where}: objective '{objective}' is a test metric; nothing is selected on test: "
                        f"use val/{metric}")
    if split != "val" or metric not in METRICS:
        raise UserError(f"study {where}: objective must be val/<metric> with metric one of {', '.join(METRICS)}, "
                        f"got {objective!r}")

    trials = data.get("trials", 20)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise UserError(f"study {where}: trials must be an integer >= 1, got {trials!r}")
    sampler = data.get("sampler", "tpe")
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
    pruner = _pruner_spec(data.get("pruner", "none"), where)
    seed = data.get("seed", 0)
    heartbeat_s = data.get("heartbeat_s", 30)
    for k, v, lo in (("seed", seed, 0), ("heartbeat_s", heartbeat_s, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise UserError(f"study {where}: {k} must be an integer >= {lo}, got {v!r}")

    confirm = data.get("confirm", {"top_k": 2, "seeds": [101, 102, 103]})
    if not isinstance(confirm, dict) or set(confirm) - {"top_k", "seeds"}:
        raise UserError(f"study {where}: confirm must be a mapping with top_k and seeds, got {confirm!r}")
    top_k, seeds = confirm.get("top_k", 2), confirm.get("seeds", [101, 102, 103])
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 2 <= top_k <= trials:
        raise UserError(f"study {where}: confirm.top_k must be an integer in [2, trials={trials}] (a winner is "
                        f"named against the runner-up), got {top_k!r}")
    if not isinstance(seeds, list) or len(seeds) < 2 or any(
            not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**32 for s in seeds) or \
            len(set(seeds)) != len(seeds):
        raise UserError(f"study {where}: confirm.seeds must be at least 2 distinct integer seeds (the seed is the "
                        f"unit of replication), got {seeds!r}")

    # every edge of the space must make a valid config on top of the base (types, ranges, divisibility)
    for p in space:
        for value in p.edge_values():
            reason = sw.check_combination(sweep, {p.key: value})
            if reason:
                raise UserError(f"study {where} space '{p.key}' = {value!r}: {reason}")
    base_cfg = load_config(sweep.base_file, sw.run_overrides(sweep, {}))
    if base_cfg.train.seed in seeds:
        raise UserError(f"study {where}: confirm.seeds include {base_cfg.train.seed}, the seed of the search "
                        f"(train.seed); confirmation needs fresh seeds")
    every = int(getattr(base_cfg.eval, "every_examples", 0) or 0)
    if pruner["name"] != "none" and not every:
        raise UserError(f"study {where}: pruner {pruner['name']} compares trials at equal examples seen: set "
                        f"eval.every_examples in base (e.g. eval.every_examples: 512)")

    # what the user gave (not every default): an ebslab upgrade that adds a key does not block a resume
    base_values = {**(sw._flatten(read_yaml(sweep.base_file)) if sweep.base_file else {}), **sweep.base_values}
    fingerprint = {"base": base_values, "space": {p.key: space_data[p.key] for p in space},
                   "objective": objective, "trials": trials, "sampler": sampler, "pruner": pruner,
                   "confirm": {"top_k": top_k, "seeds": seeds}, "seed": seed}
    fingerprint = json.loads(json.dumps(fingerprint, default=str))
    return Study(name=sweep.name, sweep=sweep, space=space, metric=metric, trials=trials, sampler=sampler,
                 pruner=pruner, top_k=top_k, seeds=list(seeds), seed=seed, heartbeat_s=heartbeat_s,
                 every_examples=every, search_seed=base_cfg.train.seed, fingerprint=fingerprint, path=path)


def load_study_file(path: str | Path) -> Study:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"study file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"study file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_study(data, p.resolve())


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


# ----------------------------------------------------------------------------------------------------------
# Optuna: storage, sampler, pruner.


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # trial processes and workers write the same file
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}}
    return {}


def open_storage(url: str, heartbeat_s: int | None = None):
    """An RDBStorage with Optuna's heartbeat (a trial whose worker stops beating is failed and re-queued)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat arguments are "experimental"
        hb: dict[str, Any] = {}
        if heartbeat_s:
            # a trial is stale 4 beats after its last one. SQLite (and MySQL) store the beat from a clock in whole
            # seconds, so Optuna's "older than grace" test fires up to 1 s late: grace 4 beats - 1 s keeps it
            # within 4 beats on every database
            hb = {"heartbeat_interval": heartbeat_s, "grace_period": 4 * heartbeat_s - 1,
                  "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                      inherit_intermediate_values=True)}
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **hb)
        except Exception as e:  # sqlalchemy errors, a missing driver (ModuleNotFoundError), a malformed URL
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"storage '{mask_url(url)}' cannot be reached: {msg[:200]}") from None


def mask_url(url: str) -> str:
    """The URL without its password (study.json and messages are shared)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def make_sampler(study: Study):
    import optuna

    if study.sampler == "grid":
        class AskTellGrid(optuna.samplers.GridSampler):
            def after_trial(self, *args: Any) -> None:
                pass  # GridSampler stops optimize() when the grid is used up; here the budget (<= grid) does

        # one instance, seeded once: its seed orders the grid, and it picks unvisited points from the storage
        return AskTellGrid({p.key: p.choices for p in study.space}, seed=study.seed)
    if study.sampler == "random":
        return per_trial_seed(lambda seed: optuna.samplers.RandomSampler(seed=seed), study.seed)
    return per_trial_seed(lambda seed: optuna.samplers.TPESampler(seed=seed), study.seed)


def per_trial_seed(make: Callable[[int], Any], seed: int):
    """The study's sampler, made for each trial by `make` with the seed (study seed, trial number).

    One sampler seeded once per process replays the same random stream in every process: a resumed study (or a
    second worker) drew trial 0's parameters again. Seeding by trial number keeps a study reproducible (a trial's
    draw depends on the seed, its number and the trials before it) without any worker repeating another's."""
    import numpy as np
    import optuna

    class PerTrialSeed(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self.lock, self.samplers = threading.Lock(), {}

        def _for(self, trial):
            with self.lock:
                if trial.number not in self.samplers:
                    state = np.random.SeedSequence([seed, trial.number]).generate_state(1)[0]
                    self.samplers[trial.number] = make(int(state))
                return self.samplers[trial.number]

        def infer_relative_search_space(self, study, trial):
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial) -> None:
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values) -> None:
            self._for(trial).after_trial(study, trial, state, values)
            with self.lock:
                self.samplers.pop(trial.number, None)

    return PerTrialSeed()


def make_pruner(spec: dict[str, Any]):
    """Steps of the pruner are examples seen: `warmup_examples`, `min_examples` are in examples too."""
    import optuna

    if spec["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.get("startup_trials", 2),
                                           n_warmup_steps=spec.get("warmup_examples", 0))
    if spec["name"] == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.get("min_examples", "auto"),
                                                      reduction_factor=spec.get("reduction_factor", 3))
    return optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------------------------------------
# Inside a trial's `ebslab train` process.


class PruningCallback(Callback):
    """Reports the objective to the trial at each nominal data point k x every_examples and stops the run when
    the pruner says so.

    The evaluation happens at the first optimizer step that reaches k x every_examples (a step holds EBS
    examples), but the value is reported at k x every_examples itself: trials of every EBS meet the pruner at
    the same data points, so a small-EBS trial is never judged against a large-EBS one that has seen more."""

    def __init__(self, trial, metric: str, every_examples: int, pruner_name: str = "pruner",
                 reported_examples: int = 0):
        self.trial, self.metric, self.every, self.pruner_name = trial, metric, int(every_examples), pruner_name
        # a resumed trial (or its retry, which inherits the reports) does not report a data point twice
        self.reported_k = int(reported_examples) // self.every

    def on_eval(self, trainer, record: dict) -> None:
        k = int(trainer.state.samples) // self.every
        value = record.get(f"val/{self.metric}")
        if k <= self.reported_k or not _number(value):
            return  # an epoch-end or final evaluation between two data points: not a comparable one
        self.reported_k = k
        examples = k * self.every
        self.trial.report(float(value), step=examples)
        record["tune/examples"] = examples
        if self.trial.should_prune():
            trainer.request_stop("pruned", f"pruned by the {self.pruner_name} pruner at {examples} examples "
                                           f"(val/{self.metric} {value:.4f})")


def trial_callbacks_from_env(environ: dict[str, str] | None = None) -> list[Callback]:
    """The callbacks of a run started by `ebslab tune` (none for any other run)."""
    env = os.environ if environ is None else environ
    if not env.get(ENV_STUDY):
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(env[ENV_STORAGE])
    study_id = storage.get_study_id_from_name(env[ENV_STUDY])
    spec = storage.get_study_user_attrs(study_id)["ebslab"]
    if spec["pruner"]["name"] == "none":
        return []
    study = optuna.load_study(study_name=env[ENV_STUDY], storage=storage, pruner=make_pruner(spec["pruner"]))
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(env[ENV_TRIAL]))
    reported = storage.get_trial(trial_id).intermediate_values
    return [PruningCallback(optuna.trial.Trial(study, trial_id), spec["metric"], spec["every_examples"],
                            spec["pruner"]["name"], max(reported, default=0))]


# ----------------------------------------------------------------------------------------------------------
# Workers: ask a trial, run it as `ebslab train`, tell its result.


# Tuners running in this process. A worker id carries a token besides host:pid because a pid is not a run:
# `ebslab tune` called twice in one process (a notebook, the tests) would otherwise take the first call's
# interrupted trials for live ones and wait for them forever.
_LIVE_WORKERS: set[str] = set()


def _alive(worker: str | None) -> bool:
    """Whether the worker `host:pid:token` that holds a trial may still run (other hosts: ask the heartbeat)."""
    if not worker or ":" not in worker:
        return True
    host, pid = worker.split(":")[:2]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return worker in _LIVE_WORKERS
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale(study) -> list[int]:
    """RUNNING trials of a dead worker -> FAIL, re-queued with the same parameters (and folder).

    Optuna's heartbeat finds those of any machine once their grace period passes; a worker on this host whose
    process is gone is found at once (a resume right after a kill does not wait for the grace period)."""
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    fail_stale_trials(study)
    storage, failed = study._storage, []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _alive(t.user_attrs.get("worker")):
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed.append(t.number)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "experimental"
                    optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(
                        study, storage.get_trial(t._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    return failed


def is_retry(t) -> bool:
    return "failed_trial" in t.system_attrs


class Heartbeat:
    """Records the trial's heartbeat every interval while its run goes on (Optuna's optimize() does the same)."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id, self.stop = storage, trial_id, threading.Event()
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.thread = None
        if interval:
            self.thread = threading.Thread(target=self._beat, args=(interval,), daemon=True)
            self.thread.start()

    def _beat(self, interval: float) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a database hiccup: the next beat retries
                pass
            if self.stop.wait(interval):
                return

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


@dataclasses.dataclass
class Task:
    """One run to do: a search trial or a confirmation run, with the Optuna trial that records it."""
    trial: Any
    folder: str
    overrides: dict[str, Any]
    study: Any
    kind: str  # search | confirm


class Runner:
    """Runs `ebslab train` commands in subprocesses (local) or Ray tasks, and stops them on Ctrl-C."""

    def __init__(self, executor: str, parallel: int):
        self.executor, self.parallel = executor, parallel
        self.procs: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False
        self.env_extra: dict[str, str] = {}
        if executor == "local" and parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
            self.env_extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
        self.ray_task = None
        self.ray_started = False
        self.ray_refs: set = set()

    def start(self) -> None:
        if self.executor != "ray":
            return
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs ray: pip install 'ebslab[ray]' (or use --executor local)")
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False)
            self.ray_started = True
        self.ray_task = ray.remote(sw._ray_task).options(num_cpus=1, max_retries=0)

    def close(self) -> None:
        if self.ray_started:
            import ray

            ray.shutdown()

    def run(self, cmd: list[str], env: dict[str, str], log: Path) -> int:
        env = {**env, **self.env_extra}
        if self.executor == "ray":
            import ray

            ref = self.ray_task.remote(cmd, env, str(log), os.getcwd())
            self.ray_refs.add(ref)
            try:
                return int(ray.get(ref)[0])
            except Exception as e:  # the task itself died (node lost, cancelled)
                with open(log, "a", encoding="utf-8") as f:
                    f.write(f"=== ray task failed: {e}\n")
                return -1
            finally:
                self.ray_refs.discard(ref)
        key = threading.get_ident()

        def on_start(proc: subprocess.Popen) -> None:
            with self.lock:
                self.procs[key] = proc
                if self.stopping:
                    proc.send_signal(signal.SIGINT)

        try:
            return sw.run_process(cmd, env, str(log), os.getcwd(), on_start=on_start)
        finally:
            with self.lock:
                self.procs.pop(key, None)

    def stop_all(self) -> None:
        """Each run gets one SIGINT (it checkpoints and says interrupted), then is waited for."""
        with self.lock:
            self.stopping = True
            procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            sw.stop_process(proc, send=False)
        if self.ray_refs:
            import ray

            for ref in list(self.ray_refs):
                ray.cancel(ref)


class Tuner:
    def __init__(self, study: Study, root: Path, storage, storage_url: str, runner: Runner):
        import optuna

        self.spec, self.root, self.storage, self.storage_url, self.runner = study, root, storage, storage_url, runner
        self.search = optuna.load_study(study_name=study.name, storage=storage, sampler=make_sampler(study),
                                        pruner=make_pruner(study.pruner))
        self.confirm = optuna.load_study(study_name=study.name + CONFIRM_SUFFIX, storage=storage)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.index_lock = threading.Lock()
        self.distributions = {p.key: p.distribution() for p in study.space}

    # -- what to run next ---------------------------------------------------------------------------------
    def fresh_search_trials(self) -> list:
        return [t for t in self.search.get_trials(deepcopy=False)
                if not is_retry(t) and not t.user_attrs.get("over_budget")]

    def next_search(self) -> Task | None:
        from optuna.trial import TrialState

        fail_stale(self.search)
        waiting = self.search.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting and len(self.fresh_search_trials()) >= self.spec.trials:
            return None
        trial = self.search.ask(self.distributions)
        frozen = self.search._storage.get_trial(trial._trial_id)
        if not is_retry(frozen):
            # trial numbers are given out atomically: the slots are the first `trials` fresh ones
            slot = sum(1 for t in self.search.get_trials(deepcopy=False)
                       if not is_retry(t) and t.number < trial.number)
            if slot >= self.spec.trials:  # another worker took the last slot between the count and the ask
                trial.set_user_attr("over_budget", True)
                self.search.tell(trial, state=TrialState.FAIL)
                return self.next_search() if waiting else None
            # named by slot, not by Optuna number: a retry takes a number too, and the folders stay 0..trials-1
            trial.set_user_attr("folder", f"trial-{slot:04d}")
        trial.set_user_attr("worker", self.worker)
        folder = trial.user_attrs["folder"]  # a retry's is inherited from the trial it retries
        return Task(trial, folder, dict(trial.params), self.search, "search")

    def search_finished(self) -> bool:
        from optuna.trial import TrialState

        fail_stale(self.search)
        busy = self.search.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        return not busy and len(self.fresh_search_trials()) >= self.spec.trials

    def top_configs(self) -> list:
        """The top_k completed search trials by the objective (distinct parameters), best first."""
        from optuna.trial import TrialState

        done = [t for t in self.search.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
        sign = -1.0 if self.spec.direction == "maximize" else 1.0
        done.sort(key=lambda t: (sign * t.value, t.number))
        top, seen = [], set()
        for t in done:
            key = json.dumps(t.params, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                top.append(t)
        return top[: self.spec.top_k]

    def queue_confirmation(self) -> None:
        top = self.top_configs()
        for t in top:
            for seed in self.spec.seeds:
                self.confirm.enqueue_trial({"config": t.user_attrs["folder"], "seed": seed}, skip_if_exists=True)

    def next_confirm(self) -> Task | None:
        import optuna.distributions as od
        from optuna.trial import TrialState

        fail_stale(self.confirm)
        if not self.confirm.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        folders = [t.user_attrs["folder"] for t in self.search.get_trials(deepcopy=False) if "folder" in t.user_attrs]
        trial = self.confirm.ask({"config": od.CategoricalDistribution(sorted(set(folders))),
                                  "seed": od.CategoricalDistribution(self.spec.seeds)})
        params = dict(trial.params)
        frozen = self.confirm._storage.get_trial(trial._trial_id)
        if not is_retry(frozen) and any(t.number < trial.number and t.params == params and not is_retry(t)
                                        and not t.user_attrs.get("duplicate")
                                        for t in self.confirm.get_trials(deepcopy=False)):
            # two workers queued the same runs at once: the lower-numbered copy is the one that runs
            trial.set_user_attr("duplicate", True)
            self.confirm.tell(trial, state=TrialState.FAIL)
            return self.next_confirm()
        trial.set_user_attr("worker", self.worker)
        source = next(t for t in self.search.get_trials(deepcopy=False)
                      if t.user_attrs.get("folder") == params["config"] and t.state == TrialState.COMPLETE)
        overrides = {**source.params, "train.seed": params["seed"]}
        return Task(trial, f"confirm/{params['config']},seed={params['seed']}", overrides, self.confirm, "confirm")

    # -- running one task ---------------------------------------------------------------------------------
    def run_task(self, task: Task) -> None:
        from optuna.trial import TrialState

        run_dir = self.root / task.folder
        job = sw.Job(index=task.trial.number, folder=Path(task.folder).name, overrides=task.overrides,
                     run_dir=run_dir, log=run_dir.parent / f"{run_dir.name}.log",
                     group=sw.run_group(task.overrides, self.spec.name))
        job.action = sw.resume_action(run_dir)
        if job.action == "skip":  # finished before the worker that ran it could tell the study
            status = (sw.read_summary(run_dir) or {}).get("status", "completed")
        else:
            sweep = dataclasses.replace(self.spec.sweep, base_values={**self.spec.sweep.base_values,
                                                                      **self.spec.fixed_overrides()})
            cmd = sw.train_command(sweep, job)
            env = sw.job_env(sweep, job)
            if task.kind == "search":
                env.update({ENV_STORAGE: self.storage_url, ENV_STUDY: self.spec.name,
                            ENV_TRIAL: str(task.trial.number)})
            beat = Heartbeat(self.storage, task.trial._trial_id)
            started = time.time()
            try:
                rc = self.runner.run(cmd, env, job.log)
            finally:
                beat.close()
            status, _ = sw._final_status(run_dir, rc, started, job.log)
            if self.runner.stopping or status == "interrupted":
                return  # left RUNNING: --resume finds its worker gone and continues it from its checkpoint
        summary = sw.read_summary(run_dir) or {}
        value = (summary.get("val_best") or {}).get(self.spec.metric)
        task.trial.set_user_attr("status", status)
        if status == "pruned":
            task.study.tell(task.trial, state=TrialState.PRUNED)
        elif status in ("completed", "collapsed") and _number(value):
            task.study.tell(task.trial, float(value))
        else:
            task.study.tell(task.trial, state=TrialState.FAIL)
        told = task.study._storage.get_trial(task.trial._trial_id)
        print(f"{task.kind} {task.folder}: {status}" + (f", {self.spec.objective} {told.value:.4f}"
                                                         if told.value is not None else ""), flush=True)
        self.write_index()

    def work(self, next_task: Callable[[], Task | None]) -> None:
        while not self.runner.stopping:
            task = next_task()
            if task is None:
                return
            self.run_task(task)

    def run_pool(self, next_task: Callable[[], Task | None]) -> None:
        threads = [threading.Thread(target=self.work, args=(next_task,), daemon=True)
                   for _ in range(self.runner.parallel)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)

    def drain(self, next_task: Callable[[], Task | None], done: Callable[[], bool]) -> None:
        """Run tasks until none is left, then wait for the other workers' ones: a trial of theirs (or of a
        previous run of this study) that goes stale comes back WAITING and is run here, not waited for."""
        while not self.runner.stopping:
            self.run_pool(next_task)
            if self.runner.stopping or done():
                return
            time.sleep(POLL_S)

    def confirm_finished(self) -> bool:
        from optuna.trial import TrialState

        fail_stale(self.confirm)
        return not self.confirm.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))

    def run(self) -> dict[str, Any]:
        _LIVE_WORKERS.add(self.worker)
        try:
            self.drain(self.next_search, self.search_finished)
            if self.runner.stopping:
                return self.write_index()
            self.queue_confirmation()
            self.drain(self.next_confirm, self.confirm_finished)
            return self.write_index()
        finally:
            _LIVE_WORKERS.discard(self.worker)

    # -- the index ----------------------------------------------------------------------------------------
    def write_index(self) -> dict[str, Any]:
        with self.index_lock:
            index = build_index(self.spec, self.search, self.confirm, self.root, self.storage_url)
            from ebslab.checkpoint import atomic_write_json

            atomic_write_json(self.root / "study.json", index)
            return index


def _trial_status(t, run_dir: Path) -> str:
    from optuna.trial import TrialState

    if t.state == TrialState.COMPLETE:
        return t.user_attrs.get("status", "completed")
    if t.state == TrialState.PRUNED:
        return "pruned"
    if t.state == TrialState.FAIL:
        return t.user_attrs.get("status", "failed")
    if t.state == TrialState.RUNNING:
        summary = sw.read_summary(run_dir) or {}
        return "interrupted" if summary.get("status") == "interrupted" or not _alive(t.user_attrs.get("worker")) \
            else "running"
    return "waiting"


def build_index(spec: Study, search, confirm, root: Path, storage_url: str) -> dict[str, Any]:
    """study.json: one entry per search slot (a retried trial keeps its folder), the confirmation, the verdict."""
    from optuna.distributions import distribution_to_json

    by_folder: dict[str, list] = {}
    for t in search.get_trials(deepcopy=False):
        if "folder" in t.user_attrs and not t.user_attrs.get("over_budget"):
            by_folder.setdefault(t.user_attrs["folder"], []).append(t)
    trials = []
    for folder, ts in sorted(by_folder.items()):
        t = max(ts, key=lambda x: x.number)  # the latest attempt holds the outcome
        trials.append({"number": min(x.number for x in ts), "folder": folder, "params": t.params,
                       "value": t.value, "status": _trial_status(t, root / folder),
                       "optuna_numbers": sorted(x.number for x in ts),
                       "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                       "duration_s": (sw.read_summary(root / folder) or {}).get("duration_s")})
    runs = []
    for t in confirm.get_trials(deepcopy=False):
        if t.user_attrs.get("duplicate") or "config" not in t.params:
            continue
        folder = f"confirm/{t.params['config']},seed={t.params['seed']}"
        runs.append({"config": t.params["config"], "seed": t.params["seed"], "folder": folder,
                     "status": _trial_status(t, root / folder), "number": t.number})
    latest: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: r["number"]):
        latest[r["folder"]] = r
    runs = sorted(latest.values(), key=lambda r: (r["config"], r["seed"]))
    configs = sorted({r["config"] for r in runs}, key=lambda c: next(
        (i for i, t in enumerate(_ranked(trials, spec.direction)) if t["folder"] == c), 10**9))
    verdict = confirmation_verdict(root, spec.metric) if runs and \
        all(r["status"] not in ("running", "waiting", "interrupted") for r in runs) else None
    ranked = _ranked(trials, spec.direction)
    return {
        "name": spec.name, "study_file": str(spec.path) if spec.path else None, "storage": mask_url(storage_url),
        "objective": spec.objective, "direction": spec.direction, "trials_asked": spec.trials,
        "sampler": spec.sampler, "pruner": spec.pruner, "every_examples": spec.every_examples,
        "search_seed": spec.search_seed,
        "space": {p.key: distribution_to_json(p.distribution()) for p in spec.space},
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "counts": {s: sum(1 for t in trials if t["status"] == s) for s in sorted({t["status"] for t in trials})},
        "best": ranked[0] if ranked else None,
        "trials": trials,
        "confirm": {"top_k": spec.top_k, "seeds": spec.seeds, "configs": configs, "runs": runs},
        "verdict": verdict,
    }


def _ranked(trials: list[dict], direction: str) -> list[dict]:
    done = [t for t in trials if t["status"] in ("completed", "collapsed") and _number(t["value"])]
    return sorted(done, key=lambda t: ((-1 if direction == "maximize" else 1) * t["value"], t["number"]))


# ----------------------------------------------------------------------------------------------------------
# The verdict: the report's comparison of the winner candidate with the runner-up.


def confirmation_verdict(root: Path, metric: str) -> dict[str, Any]:
    """The verdict that `ebslab report` of the confirmation runs (STUDY/confirm) gives, from the same numbers.

    The candidate is the configuration best on mean validation `metric` over the fresh seeds (the report's
    reference; test never chooses), the runner-up the second best; the candidate is the winner when the
    report's comparison of the two (test `metric` at the best checkpoint, paired by seed, paired t-test over
    seeds, Holm-corrected as the report corrects it) puts it ahead beyond seed noise."""
    from ebslab import report as rp

    try:
        _, _, groups, result = rp.analyse_dirs([root / "confirm"], metric)
    except UserError:  # no confirmation run folder was written
        return {"winner": None, "text": "no confirmation run finished: no verdict", "table": []}
    sign = 1.0 if higher_is_better(metric) else -1.0
    names = [g.runs[0].path.name.split(",seed=")[0] for g in groups]  # confirm/trial-0003,seed=11 -> trial-0003
    summaries = result["groups"]
    ranked = sorted((i for i, g in enumerate(summaries) if _number(g["val_mean"])),
                    key=lambda i: (-sign * summaries[i]["val_mean"], i))
    table = [{"config": names[i], "n": summaries[i]["n_scored"], f"val_{metric}": summaries[i]["val_mean"],
              f"test_{metric}": summaries[i]["test_mean"]} for i in ranked]
    if len(ranked) < 2:
        return {"winner": None, "text": "fewer than two confirmed configurations finished: no verdict",
                "table": table}
    first, second = ranked[0], ranked[1]
    assert first == result["reference_index"]  # the report's reference: the same rule, the same tie-break
    label = rp.pair_label(groups[second], groups[first])[0]
    comp = next(c for c in result["comparisons"] if c["a"] == label)  # runner-up minus candidate
    lo, hi = comp["t_ci"] if comp["ci_note"] is not None else comp["ci"]
    kind = "paired t-interval" if comp["ci_note"] is not None else "two-level bootstrap"
    numbers = (f"{rp._fmt_diff(-comp['estimate'], metric)} on test {metric} (mean of {comp['n_seeds']} per-seed "
               f"differences on fresh seeds, 95% {kind} {rp._fmt_ci(-hi, -lo, metric)}; paired t-test over seeds "
               f"p = {rp._fmt_p(comp['p_holm'])})")
    significant = comp["p_holm"] < rp.ALPHA
    a, b = names[first], names[second]
    if significant and sign * comp["estimate"] < 0:
        text = f"winner: {a}, better than the runner-up {b} by {numbers}"
    elif significant:
        text = (f"no winner: {a} is best on val/{metric} but {b} is better on test by "
                f"{rp._fmt_diff(comp['estimate'], metric)}, beyond seed noise; validation and test disagree")
    else:
        text = f"indistinguishable: {a} and {b} differ by {numbers}: within seed noise, no winner"
    return rp._json_num({"winner": a if significant and sign * comp["estimate"] < 0 else None, "runner_up": b,
                         "metric": f"test/{metric}", "comparison": comp, "text": text, "table": table})


# ----------------------------------------------------------------------------------------------------------
# The report section (read from study.json and the run folders only).


def report_study(study_dir: Path, out_dir: Path) -> Path:
    """`ebslab report STUDY_DIR`: the confirmation runs' report (seed-aware), then the search: verdict, table,
    optimization history and parameter importances (Optuna's own plots, from study.json)."""
    from ebslab.report import build_report

    index = json.loads((study_dir / "study.json").read_text())
    metric = index["objective"].split("/", 1)[1]
    out_dir.mkdir(parents=True, exist_ok=True)
    confirm_dir = study_dir / "confirm"
    # on the study's metric: the verdict in study.json is this report's comparison
    report = build_report([confirm_dir], out_dir, metric=metric) \
        if confirm_dir.is_dir() and any(confirm_dir.iterdir()) else None
    md = [f"# ebslab tune: {index['name']}", "",
          f"Objective {index['objective']} ({index['direction']}), sampler {index['sampler']}, pruner "
          f"{index['pruner']['name']}" + (f" at every {index['every_examples']} examples seen"
                                          if index['pruner']['name'] != 'none' else "")
          + f"; {len(index['trials'])} of {index['trials_asked']} trials: "
          + ", ".join(f"{n} {s}" for s, n in index["counts"].items()) + ".", ""]
    verdict = index.get("verdict")
    md += ["## Verdict", "", (verdict or {}).get("text", "confirmation not finished"), ""]
    if verdict and verdict.get("table"):
        md.append(f"Confirmation on fresh seeds: ranked by the validation objective (mean over seeds); the "
                  f"verdict compares the first two on test {metric} as the seed-aware report below does.")
        md.append("")
        md.append(f"| configuration | params | seeds | val {metric} (mean) | test {metric} (mean) |")
        md.append("|---|---|---:|---:|---:|")
        params = {t["folder"]: t["params"] for t in index["trials"]}
        for row in verdict["table"]:
            val, test = (("-" if v is None else f"{v:.4f}") for v in (row[f"val_{metric}"], row[f"test_{metric}"]))
            md.append(f"| {row['config']} | {_fmt_params(params.get(row['config'], {}))} | {row['n']} | "
                      f"{val} | {test} |")
        md.append("")
    md += ["## Search trials", "", "| trial | status | " + f"{index['objective']} | params |", "|---|---|---:|---|"]
    for t in index["trials"]:
        v = "-" if t["value"] is None else f"{t['value']:.4f}"
        md.append(f"| {t['folder']} | {t['status']} | {v} | {_fmt_params(t['params'])} |")
    md.append("")
    plots = _study_plots(index, out_dir)
    for p in plots:
        md += [f"![{p.stem}]({p.name})", ""]
    text = "\n".join(md)
    if report is not None:
        text += "\n\n" + report.read_text().replace("# ebslab report", "# Confirmation runs (seed-aware report)", 1)
    path = out_dir / "report.md"
    from ebslab.checkpoint import atomic_write_text

    atomic_write_text(path, text)
    return path


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _study_plots(index: dict, out_dir: Path) -> list[Path]:
    """Optuna's matplotlib plots on an in-memory copy of the search rebuilt from study.json."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState

    from ebslab.report import _plt, save_figure

    plt = _plt()  # the Agg backend before Optuna draws: no display needed
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    dists = {k: json_to_distribution(v) for k, v in index["space"].items()}
    study = optuna.create_study(direction=index["direction"])
    for t in index["trials"]:
        state = {"completed": TrialState.COMPLETE, "collapsed": TrialState.COMPLETE,
                 "pruned": TrialState.PRUNED}.get(t["status"], TrialState.FAIL)
        if state == TrialState.COMPLETE and t["value"] is None:
            state = TrialState.FAIL
        if set(t["params"]) != set(dists):
            continue
        study.add_trial(optuna.create_trial(
            state=state, value=t["value"] if state == TrialState.COMPLETE else None, params=t["params"],
            distributions=dists, intermediate_values={int(k): v for k, v in t["intermediate"].items()}))
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is "experimental"
        from optuna.visualization import matplotlib as ovm

        for name, fn in (("search_history", ovm.plot_optimization_history),
                         ("param_importances", ovm.plot_param_importances),
                         ("intermediate_values", ovm.plot_intermediate_values)):
            try:
                ax = fn(study)
            except Exception:  # e.g. importances need two completed trials and a parameter that varies
                continue
            fig = ax.figure if hasattr(ax, "figure") else plt.gcf()
            out.append(save_figure(fig, out_dir / f"{name}.png", dpi=100))
    return out


# ----------------------------------------------------------------------------------------------------------
# The command.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_file", help="the study YAML (name, base, space, objective, trials, ...)")
    sw.add_run_arguments(parser, out_help="the study goes to OUT/NAME/ (default: runs)",
                         resume_help="continue the study: finished trials kept, interrupted ones continued",
                         parallel_help="trials at once in this worker (default 1)")
    parser.add_argument("--storage", default=None,
                        help="an Optuna database URL (postgresql://..., mysql://...) shared by several workers, "
                             "each started with the same command; they share OUT/NAME too, so no folder lock is "
                             "taken (the database hands each trial to one worker). Default: a SQLite file "
                             "OUT/NAME/study.db, and OUT/NAME is locked to this tuner (a second one is refused, "
                             "naming the first; a lock left by a dead process is taken over)")


def prepare(args: argparse.Namespace) -> tuple[Study, Path, Any, str, FolderLock | None]:
    """Everything checked, then the study folder and storage created: a UserError leaves nothing behind.

    With the default SQLite storage the study folder is this tuner's (the FolderLock returned, held until the
    tuner ends): a second tuner would resume the trials the first one is running. With --storage the workers
    share the study, and its folder, on purpose: the database hands each trial to one of them, so no lock."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # ask/tell with Optuna's heartbeat: its "experimental" and "use optimize()" notes say nothing to a user
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    if args.parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {args.parallel}")
    study = load_study_file(args.study_file)
    root = (Path(args.out) / study.name).resolve()
    default_db = root / "study.db"
    url = args.storage or f"sqlite:///{default_db}"
    lock = FolderLock(root, "study") if args.storage is None else None
    if lock is not None and root.is_dir():
        lock.acquire()  # a live tuner of this folder is named first, whatever else this command got wrong
    try:
        return _prepare(args, study, root, default_db, url, lock) + (lock,)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _prepare(args: argparse.Namespace, study: Study, root: Path, default_db: Path, url: str,
             lock: FolderLock | None) -> tuple[Study, Path, Any, str]:
    import optuna

    if args.storage is None:
        if root.exists() and (default_db.exists() or (root / "study.json").exists()) and not args.resume:
            raise UserError(f"study folder '{root}' already holds a study; add --resume to continue it, or "
                            f"choose another --out or name")
        if args.resume and not default_db.exists():
            raise UserError(f"nothing to resume: '{default_db}' does not exist (run without --resume to start)")
    storage = open_storage(url, study.heartbeat_s) if (args.storage or default_db.exists()) else None
    spec_attr = {"fingerprint": study.fingerprint, "metric": study.metric, "pruner": study.pruner,
                 "every_examples": study.every_examples}
    if storage is not None:
        names = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
        if study.name in names:
            old = names[study.name].user_attrs.get("ebslab", {}).get("fingerprint")
            if old is None:
                raise UserError(f"storage '{mask_url(url)}' holds a study '{study.name}' that ebslab tune did not "
                                f"create; choose another name")
            changes = fingerprint_changes(old, study.fingerprint)
            if changes:
                raise UserError(f"study '{study.name}' changed since it started ({'; '.join(changes[:3])}"
                                + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
                                + "): restore the file, or start a new study under another name")
        elif args.resume:
            raise UserError(f"nothing to resume: storage '{mask_url(url)}' has no study '{study.name}'")
    if lock is not None and lock.fd is None:
        lock.acquire()  # creates the folder
    root.mkdir(parents=True, exist_ok=True)
    if storage is None:
        storage = open_storage(url, study.heartbeat_s)
    for name in (study.name, study.name + CONFIRM_SUFFIX):
        s = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction=study.direction)
        if "ebslab" not in s.user_attrs:
            s.set_user_attr("ebslab", spec_attr)
    return study, root, storage, url


def run(args: argparse.Namespace) -> int:
    """`ebslab tune`: 0 when the study and its confirmation finished, 130 when interrupted (--resume goes on)."""
    study, root, storage, url, lock = prepare(args)
    try:
        return _run(args, study, root, storage, url)
    finally:
        if lock is not None:
            lock.release()


def _run(args: argparse.Namespace, study: Study, root: Path, storage, url: str) -> int:
    runner = Runner(args.executor, args.parallel)
    runner.start()
    tuner = Tuner(study, root, storage, url, runner)
    space = ", ".join(p.key for p in study.space)
    print(f"tune '{study.name}': {study.trials} trial(s) of {space} by {study.sampler}, pruner "
          f"{study.pruner['name']}, objective {study.objective} ({study.direction}); confirm top {study.top_k} on "
          f"seeds {study.seeds}; storage {mask_url(url)}; into {root}", flush=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, sw._raise_interrupt)
    try:
        index = tuner.run()
    except KeyboardInterrupt:
        runner.stop_all()
        tuner.write_index()
        print("interrupted: continue with --resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        runner.close()
    best = index.get("best")
    if best:
        print(f"best trial {best['folder']}: {study.objective} {best['value']:.4f} with {_fmt_params(best['params'])}")
    print((index.get("verdict") or {}).get("text", "no verdict"))
    print(f"index {root / 'study.json'}; report: ebslab report {root}")
    return 0
