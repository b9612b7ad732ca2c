"""The workers of `ebslab tune`: ask a trial, run it as `ebslab train`, tell its result; stale trials of dead
workers, the budget across workers, and study.json."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

from ebslab.experiments import sweep as sw
from ebslab.core.errors import UserError
from ebslab.core.runfolder import read_summary
from ebslab.experiments.tune.search import ENV_STORAGE, ENV_STUDY, ENV_TRIAL, make_pruner, make_sampler, mask_url
from ebslab.experiments.tune.studyfile import Study, is_number, space_size
from ebslab.experiments.tune.verdict import confirmation_verdict, nothing_to_rank

CONFIRM_SUFFIX = "/confirm"
POLL_S = 2.0


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


def fail_stale(study, storage) -> list[int]:
    """RUNNING trials of a dead worker -> FAIL, re-queued with the same parameters (and folder). `storage` is the
    one the study was loaded from (`open_storage`).

    Optuna's heartbeat finds those of any machine once their grace period passes; a worker on this host whose
    process is gone is found at once (a resume right after a kill does not wait for the grace period)."""
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    fail_stale_trials(study)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _alive(t.user_attrs.get("worker")):
            continue
        stale_id = trial_id(storage, study, t.number)
        try:
            if storage.set_trial_state_values(stale_id, state=TrialState.FAIL):
                failed.append(t.number)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "experimental"
                    optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(
                        study, storage.get_trial(stale_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    return failed


def is_retry(t) -> bool:
    return "failed_trial" in t.system_attrs


def frozen_trial(study, number: int):
    """The study's record (FrozenTrial) of its trial `number`, through Optuna's public API."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def trial_id(storage, study, number: int) -> int:
    """The storage's id of the study's trial `number` (Optuna's Trial has no public id)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


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


class TrialExecutor(Protocol):
    """Where a tuner's runs go (`--executor NAME`, picked in tune.command): local subprocesses and Ray tasks here,
    Slurm jobs in experiments.slurm (TuneJobs)."""

    def start(self) -> None:
        """Before the first run."""

    def run(self, cmd: list[str], env: dict[str, str], log: Path) -> int:
        """One `ebslab train` command to its end: its exit code (-1: it ended without one)."""

    def stop_all(self) -> None:
        """Ctrl-C: every run going gets stopped (it checkpoints and says interrupted), then is waited for."""

    def close(self) -> None:
        """After the last run."""


class LocalTrials:
    """Each run a subprocess of this worker."""

    def __init__(self, parallel: int):
        self.procs: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False
        self.env_extra: dict[str, str] = {}
        if parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
            self.env_extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))

    def start(self) -> None:
        pass

    def run(self, cmd: list[str], env: dict[str, str], log: Path) -> int:
        key = threading.get_ident()

        def on_start(proc: subprocess.Popen) -> None:
            with self.lock:
                self.procs[key] = proc
                if self.stopping:
                    proc.send_signal(signal.SIGINT)

        try:
            return sw.run_process(cmd, {**env, **self.env_extra}, str(log), os.getcwd(), on_start=on_start)
        finally:
            with self.lock:
                self.procs.pop(key, None)

    def stop_all(self) -> None:
        with self.lock:
            self.stopping = True
            procs = list(self.procs.values())
        sw.stop_processes(procs)

    def close(self) -> None:
        pass


class RayTrials:
    """Each run a Ray task (RAY_ADDRESS = an existing cluster, else one started here)."""

    def __init__(self) -> None:
        self.ray_task = None
        self.ray_started = False
        self.ray_refs: set = set()

    def start(self) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs ray: pip install 'ebslab[ray]' (or use --executor local)")
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False)
            self.ray_started = True
        self.ray_task = ray.remote(sw.ray_task).options(num_cpus=1, max_retries=0)

    def run(self, cmd: list[str], env: dict[str, str], log: Path) -> int:
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

    def stop_all(self) -> None:
        if self.ray_refs:
            import ray

            for ref in list(self.ray_refs):
                ray.cancel(ref)

    def close(self) -> None:
        if self.ray_started:
            import ray

            ray.shutdown()


class Runner:
    """The tuner's runs, `parallel` at once, on its executor; `stopping` once Ctrl-C stopped them."""

    def __init__(self, executor: TrialExecutor, parallel: int):
        self.executor, self.parallel = executor, parallel
        self.stopping = False

    def start(self) -> None:
        self.executor.start()

    def close(self) -> None:
        self.executor.close()

    def run(self, cmd: list[str], env: dict[str, str], log: Path) -> int:
        return self.executor.run(cmd, env, log)

    def stop_all(self) -> None:
        self.stopping = True
        self.executor.stop_all()


class Tuner:
    def __init__(self, study: Study, root: Path, storage, storage_url: str, runner: Runner):
        import optuna

        self.spec, self.root, self.storage, self.storage_url, self.runner = study, root, storage, storage_url, runner
        self.search = optuna.load_study(study_name=study.name, storage=storage, sampler=make_sampler(study),
                                        pruner=make_pruner(study.pruner))
        self.confirm = optuna.load_study(study_name=study.name + CONFIRM_SUFFIX, storage=storage)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.index_lock = threading.Lock()
        # one ask at a time in this process: two threads asking at once could both pop the same WAITING trial
        # (SQLite has no row lock) and run it twice
        self.ask_lock = threading.Lock()
        self.distributions = {p.key: p.distribution() for p in study.space}

    # -- what to run next ---------------------------------------------------------------------------------
    def fresh_search_trials(self) -> list:
        return [t for t in self.search.get_trials(deepcopy=False)
                if not is_retry(t) and not t.user_attrs.get("over_budget")]

    def next_search(self) -> Task | None:
        from optuna.trial import TrialState

        fail_stale(self.search, self.storage)
        waiting = self.search.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting and len(self.fresh_search_trials()) >= self.spec.trials:
            return None
        trial = self.search.ask(self.distributions)
        frozen = frozen_trial(self.search, trial.number)
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

        fail_stale(self.search, self.storage)
        busy = self.search.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        return not busy and len(self.fresh_search_trials()) >= self.spec.trials

    def top_configs(self) -> list:
        """The top_k completed search trials by the objective (distinct parameters), best first; a collapsed
        trial (at the majority-class rate all along) is never promoted, whatever its rank."""
        from optuna.trial import TrialState

        done = [t for t in self.search.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value) and t.user_attrs.get("status") != "collapsed"]
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

        fail_stale(self.confirm, self.storage)
        if not self.confirm.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        folders = [t.user_attrs["folder"] for t in self.search.get_trials(deepcopy=False) if "folder" in t.user_attrs]
        trial = self.confirm.ask({"config": od.CategoricalDistribution(sorted(set(folders))),
                                  "seed": od.CategoricalDistribution(self.spec.seeds)})
        params = dict(trial.params)
        frozen = frozen_trial(self.confirm, trial.number)
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
        # a trial re-queued from a worker that was killed: its run may still be going (never run it twice at once)
        sw.wait_for_live_runs([run_dir], lambda: self.runner.stopping)
        if self.runner.stopping:
            return
        job.action = sw.resume_action(run_dir)
        if job.action == "skip":  # finished before the worker that ran it could tell the study
            status = (read_summary(run_dir) or {}).get("status", "completed")
        else:
            sweep = dataclasses.replace(self.spec.sweep, base_values={**self.spec.sweep.base_values,
                                                                      **self.spec.fixed_overrides()})
            cmd = sw.train_command(sweep, job)
            env = sw.job_env(sweep, job)
            if task.kind == "search":
                env.update({ENV_STORAGE: self.storage_url, ENV_STUDY: self.spec.name,
                            ENV_TRIAL: str(task.trial.number)})
            beat = Heartbeat(self.storage, trial_id(self.storage, task.study, task.trial.number))
            started = time.time()
            try:
                rc = self.runner.run(cmd, env, job.log)
            finally:
                beat.close()
            status, _ = sw.final_status(run_dir, rc, started, job.log)
            if self.runner.stopping or status == "interrupted":
                return  # left RUNNING: --resume finds its worker gone and continues it from its checkpoint
        summary = read_summary(run_dir) or {}
        value = (summary.get("val_best") or {}).get(self.spec.metric)
        task.trial.set_user_attr("status", status)
        if status == "pruned":
            task.study.tell(task.trial, state=TrialState.PRUNED)
        elif status in ("completed", "collapsed") and is_number(value):
            task.study.tell(task.trial, float(value))
        else:
            task.study.tell(task.trial, state=TrialState.FAIL)
        told = frozen_trial(task.study, task.trial.number)
        print(f"{task.kind} {task.folder}: {status}" + (f", {self.spec.objective} {told.value:.4f}"
                                                         if told.value is not None else ""), flush=True)
        self.write_index()

    def work(self, next_task: Callable[[], Task | None]) -> None:
        while not self.runner.stopping:
            with self.ask_lock:
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

        fail_stale(self.confirm, self.storage)
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
            from ebslab.core.files import atomic_write_json

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
        summary = read_summary(run_dir) or {}
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
                       "duration_s": (read_summary(root / folder) or {}).get("duration_s")})
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
    search_done = len(trials) >= spec.trials and all(t["status"] in ("completed", "collapsed", "pruned", "failed")
                                                     for t in trials)
    note = nothing_to_rank(trials, space_size(spec.space)) if search_done else None
    if note:  # said before any confirmation run, and kept after them
        verdict = {**(verdict or {"table": []}), "winner": None, "text": note}
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
    done = [t for t in trials if t["status"] == "completed" and is_number(t["value"])]  # collapsed: never the best
    return sorted(done, key=lambda t: ((-1 if direction == "maximize" else 1) * t["value"], t["number"]))
