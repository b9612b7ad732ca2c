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
sweep starts its runs (`ebslab.experiments.sweep`); the trial learns its Optuna trial from the environment
(EBSLAB_TUNE_STORAGE / _STUDY / _TRIAL) and reports through `PruningCallback`.

Modules: `studyfile` (the study file and its space), `search` (Optuna: storage, samplers, pruners, the trial's
callback), `workers` (the Tuner, its runner, stale trials, study.json), `verdict` (the confirmation verdict and
`ebslab report STUDY_DIR`), `command` (the CLI). Everything a user or test imports is here, as `ebslab.experiments.tune.X`.
"""

from ebslab.experiments.tune.command import add_arguments, prepare, run
from ebslab.experiments.tune.search import (ENV_STORAGE, ENV_STUDY, ENV_TRIAL, PruningCallback, make_pruner, make_sampler,
                                mask_url, open_storage, per_trial_seed, trial_callbacks_from_env)
from ebslab.experiments.tune.studyfile import Param, Study, fingerprint_changes, load_study_file, parse_param, parse_study
from ebslab.experiments.tune.verdict import confirmation_verdict, report_study
from ebslab.experiments.tune.workers import Heartbeat, Runner, Task, Tuner, build_index, fail_stale, is_retry

__all__ = ["ENV_STORAGE", "ENV_STUDY", "ENV_TRIAL", "Heartbeat", "Param", "PruningCallback", "Runner", "Study",
           "Task", "Tuner", "add_arguments", "build_index", "confirmation_verdict", "fail_stale", "fingerprint_changes",
           "is_retry", "load_study_file", "make_pruner", "make_sampler", "mask_url", "open_storage", "parse_param",
           "parse_study", "per_trial_seed", "prepare", "report_study", "run", "trial_callbacks_from_env"]
