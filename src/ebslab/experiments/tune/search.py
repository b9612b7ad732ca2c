"""Optuna for `ebslab tune`: storage (with its heartbeat), samplers, pruners, and the callback through which a
trial's `ebslab train` process reports at equal examples seen."""

from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Any, Callable

from ebslab.loop.callbacks import Callback
from ebslab.core.errors import UserError
from ebslab.experiments.tune.studyfile import Study, is_number

ENV_STORAGE, ENV_STUDY, ENV_TRIAL = "EBSLAB_TUNE_STORAGE", "EBSLAB_TUNE_STUDY", "EBSLAB_TUNE_TRIAL"
SCHEMA_RACE_TRIES = 5


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
        from sqlalchemy.exc import IntegrityError, ProgrammingError

        for attempt in range(SCHEMA_RACE_TRIES):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **hb)
            except (IntegrityError, ProgrammingError):
                # workers started together on an empty database both create Optuna's tables; the loser's
                # CREATE hits the winner's rows (PostgreSQL: pg_type_typname_nsp_index, or DuplicateTable
                # alembic_version). The tables exist
                # once the winner commits: open again
                if attempt == SCHEMA_RACE_TRIES - 1:
                    raise UserError(f"storage '{mask_url(url)}': Optuna's tables could not be created (another "
                                    f"process kept creating them); start the workers again") from None
                time.sleep(0.5 * (attempt + 1))
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
        if k <= self.reported_k or not is_number(value):
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
