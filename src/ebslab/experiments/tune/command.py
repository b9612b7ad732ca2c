"""`ebslab tune FILE`: its options, the checks before anything is created, the study folder's lock, the run."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

from ebslab.experiments import sweep as sw
from ebslab.core.errors import UserError
from ebslab.core.files import check_folder_target
from ebslab.core.locks import FolderLock
from ebslab.experiments.tune.search import mask_url, open_storage
from ebslab.experiments.tune.studyfile import Study, fingerprint_changes, load_study_file
from ebslab.experiments.tune.verdict import format_params
from ebslab.experiments.tune.workers import CONFIRM_SUFFIX, LocalTrials, RayTrials, Runner, TrialExecutor, Tuner


# ----------------------------------------------------------------------------------------------------------
# The command.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_file", help="the study YAML (name, base, space, objective, trials, ...)")
    sw.add_run_arguments(parser, out_help="the study goes to OUT/NAME/ (default: runs)",
                         resume_help="continue the study: finished trials kept, interrupted ones continued",
                         parallel_help="trials at once in this worker (default 1)")
    parser.add_argument("--storage", default=None,
                        help="an Optuna database URL (postgresql+psycopg2://..., mysql+pymysql://...) shared by several "
                             "workers, each started with the same command; they share OUT/NAME too, so no folder lock is "
                             "taken (the database hands each trial to one worker). Default: a SQLite file "
                             "OUT/NAME/study.db, and OUT/NAME is locked to this tuner (a second one is refused, "
                             "naming the first; a lock left by a dead process is taken over)")
    from ebslab.experiments import slurm

    slurm.add_arguments(parser)


def pick_executor(args: argparse.Namespace) -> Callable[[Path], TrialExecutor]:
    """--executor NAME -> how to make the tuner's executor once the study folder is known: the one place that
    reads the name."""
    if args.executor == "slurm":
        from ebslab.experiments import slurm

        options = slurm.options_from_args(args)
        return lambda root: slurm.TuneJobs(options, root / "slurm", root.name)
    if args.executor == "ray":
        return lambda root: RayTrials()
    parallel = args.parallel
    return lambda root: LocalTrials(parallel)


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
    args.make_executor = pick_executor(args)  # Slurm's options checked before any folder exists
    study = load_study_file(args.study_file)
    root = (Path(args.out) / study.name).resolve()
    check_folder_target(root, "--out")
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
    runner = Runner(args.make_executor(Path(root)), args.parallel)
    runner.start()
    tuner = Tuner(study, root, storage, url, runner)
    space = ", ".join(p.key for p in study.space)
    print(f"tune '{study.name}': {study.trials} trial(s) of {space} by {study.sampler}, pruner "
          f"{study.pruner['name']}, objective {study.objective} ({study.direction}); confirm top {study.top_k} on "
          f"seeds {study.seeds}; storage {mask_url(url)}; into {root}", flush=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, sw.raise_interrupt)
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
        print(f"best trial {best['folder']}: {study.objective} {best['value']:.4f} with {format_params(best['params'])}")
    print((index.get("verdict") or {}).get("text", "no verdict"))
    print(f"index {root / 'study.json'}; report: ebslab report {root}")
    return 0
