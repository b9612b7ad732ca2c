"""The Slurm executor of `ebslab sweep` and `ebslab tune`: each run is a Slurm job, submitted through submitit.

A sweep is one job array (`--parallel N` caps how many of its tasks run at once); a study submits each trial as
its own job. A job runs `ebslab train` as a child process with its output appended to the run's log, exactly
as the local executor does, on the shared `--out` folder.

What happens when Slurm stops a job:
- time limit: Slurm sends USR2 `--signal-delay` seconds before it (sbatch `--signal=USR2@S`); submitit calls
  `TrainJob.checkpoint`, which stops the run through its SIGTERM path (it finishes its step and saves
  checkpoints/last) and requeues the job (at most `--max-requeues` times);
- preemption, `scontrol requeue`, `scancel`: Slurm sends SIGTERM; the run checkpoints the same way and the job
  exits; Slurm requeues it (preemption with requeue, `scontrol requeue`) or ends it (`scancel`: CANCELLED).
A requeued job starts `ebslab train --resume` on its run folder, so its result equals an uninterrupted run's.
A job that ends without a result (cancelled, failed, node lost, out of memory) is a failed run whose message is
Slurm's state and the last line of its log; it never stops the others.

`EBSLAB_SLURM_CLUSTER=local` runs the same jobs through submitit's local executor (no Slurm; used by the fast
tests), `debug` in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ebslab.core.errors import UserError

try:  # the job's callable must be a Checkpointable for submitit to checkpoint and requeue it
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # the module still imports (and --executor slurm says what to install)
    Checkpointable = object  # type: ignore[assignment,misc]
    DelayedSubmission = None  # type: ignore[assignment,misc]

INSTALL_HINT = "--executor slurm needs submitit: pip install 'ebslab[slurm]' (or use --executor local)"
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
          "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED", "RESV_DEL_HOLD", "PREEMPTED"}
"""Slurm job states in which the job is queued, runs, or will run again (a preempted job may be requeued)."""
POLL_S = 2.0
STOP_WAIT_S = 180.0
"""After Ctrl-C: how long the sweep waits for its cancelled jobs to checkpoint and end."""


# ----------------------------------------------------------------------------------------------------------
# Options.


@dataclasses.dataclass
class SlurmOptions:
    parallel: int = 1
    gpus_per_run: int = 0
    cpus_per_run: int = 1
    procs_per_run: int = 1
    """Processes of one run (torchrun --nproc-per-node); one per GPU when gpus_per_run > 1."""
    mem: str | None = None
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    sbatch: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Other sbatch flags, passed through: {"qos": "high", "exclusive": True}."""
    max_requeues: int = 3
    signal_delay_s: int = 120
    leave_jobs: bool = False
    cluster: str = "slurm"

    def describe(self) -> str:
        parts = [f"{self.cpus_per_run} cpu", f"{self.gpus_per_run} gpu"]
        if self.procs_per_run > 1:
            parts.append(f"{self.procs_per_run} processes")
        parts.append(f"{self.time_min} min")
        if self.partition:
            parts.append(f"partition {self.partition}")
        return f"slurm ({', '.join(parts)} per run; {self.parallel} at once)"


def add_arguments(parser: argparse.ArgumentParser, resources: bool = True) -> None:
    """The options of `--executor slurm`, read like sbatch's. `resources=False`: the command already has
    --gpus-per-run / --cpus-per-run (the sweep's, shared with Ray)."""
    group = parser.add_argument_group("--executor slurm (each run one Slurm job; sbatch's meanings)")
    if resources:
        group.add_argument("--gpus-per-run", type=float, default=0, help="GPUs per run (default 0)")
        group.add_argument("--cpus-per-run", type=float, default=1, help="CPUs per run (default 1)")
    group.add_argument("--procs-per-run", type=int, default=None,
                       help="processes per run, started by torchrun inside the job (default: one per GPU, else 1)")
    group.add_argument("--mem", default=None, help="memory per run, as sbatch --mem reads it (16G, 4000M)")
    group.add_argument("--time", default="60",
                       help="time limit per job, as sbatch --time reads it (minutes, HH:MM:SS, D-HH:MM; default 60); "
                            "a run that reaches it checkpoints and is requeued")
    group.add_argument("--partition", default=None, help="Slurm partition")
    group.add_argument("--account", default=None, help="Slurm account")
    group.add_argument("--sbatch", action="append", default=[], metavar="FLAG",
                       help="any other sbatch flag, repeatable: --sbatch=--qos=high --sbatch=--constraint=a100")
    group.add_argument("--max-requeues", type=int, default=3,
                       help="requeues of one job after a time limit or preemption before it fails (default 3)")
    group.add_argument("--leave-jobs", action="store_true",
                       help="on Ctrl-C, leave the Slurm jobs queued and running (default: cancel them, each run "
                            "checkpoints); `ebslab sweep --resume` watches those still running again, `ebslab tune "
                            "--resume` is for once they ended")


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(text: str) -> int:
    """sbatch --time forms -> whole minutes (rounded up): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise UserError(f"--time {text!r} is not a Slurm time (minutes, HH:MM:SS, D-HH:MM); e.g. --time 4:00:00")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        seconds = int(a) * 60 + int(b)
    else:
        seconds = int(a) * 60
    if seconds <= 0:
        raise UserError(f"--time {text!r} must be more than 0")
    return math.ceil(seconds / 60)


def parse_sbatch_flags(flags: list[str]) -> dict[str, Any]:
    """["--qos=high", "--exclusive", "constraint=a100"] -> {"qos": "high", "exclusive": True, "constraint": "a100"}."""
    out: dict[str, Any] = {}
    for flag in flags:
        for part in shlex.split(flag):
            key, eq, value = part.lstrip("-").partition("=")
            if not key or not part.startswith("--") and not eq:
                raise UserError(f"--sbatch {part!r}: give a long sbatch flag, e.g. --sbatch=--qos=high")
            out[key.replace("_", "-")] = value if eq else True
    return out


def options_from_args(args: argparse.Namespace) -> SlurmOptions:
    """The Slurm options of a command line, checked (a UserError names the option) before anything is submitted."""
    gpus, cpus = args.gpus_per_run, args.cpus_per_run
    if gpus != int(gpus) or cpus != int(cpus) or cpus < 1:
        raise UserError("--executor slurm: --gpus-per-run and --cpus-per-run must be whole numbers (cpus >= 1)")
    procs = args.procs_per_run if args.procs_per_run is not None else max(1, int(gpus))
    if procs < 1:
        raise UserError(f"--procs-per-run must be >= 1, got {procs}")
    if args.max_requeues < 0:
        raise UserError(f"--max-requeues must be >= 0, got {args.max_requeues}")
    cluster = os.environ.get("EBSLAB_SLURM_CLUSTER", "slurm")
    if cluster not in ("slurm", "local", "debug"):
        raise UserError(f"EBSLAB_SLURM_CLUSTER={cluster!r}: slurm (default), local or debug")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    CLUSTERS[cluster].check_available()
    time_min = parse_time(args.time)
    return SlurmOptions(parallel=args.parallel, gpus_per_run=int(gpus), cpus_per_run=int(cpus), procs_per_run=procs,
                        mem=args.mem, time_min=time_min, partition=args.partition, account=args.account,
                        sbatch=parse_sbatch_flags(args.sbatch), max_requeues=args.max_requeues,
                        signal_delay_s=min(120, max(10, time_min * 60 // 4)), leave_jobs=args.leave_jobs,
                        cluster=cluster)


# ----------------------------------------------------------------------------------------------------------
# On the node: the job's callable.


@dataclasses.dataclass
class RunSpec:
    """One run as a job: its `ebslab train` command (cmd[0] is replaced by the node's Python), environment, log."""
    cmd: list[str]
    env: dict[str, str]
    log: str
    cwd: str | None
    resume_cmd: list[str] | None = None
    """What a requeued job runs once the folder holds a checkpoint (default `ebslab train --resume RUN`)."""

    @property
    def run_dir(self) -> Path:
        log = Path(self.log)
        return log.parent / log.name[: -len(".log")]


def node_command(spec: RunSpec, procs: int, env: dict[str, str]) -> list[str]:
    """The command this attempt runs: `train --resume` if the run folder holds a checkpoint (a requeued job),
    `--overwrite` if an earlier attempt left a folder without one; under torchrun for several processes."""
    from ebslab.experiments import sweep as sw

    cmd = [sys.executable] + list(spec.cmd[1:])
    action = sw.resume_action(spec.run_dir)
    if action == "resume" and "--resume" not in cmd:
        cmd = [sys.executable] + (spec.resume_cmd[1:] if spec.resume_cmd else
                                  ["-m", "ebslab", "train", "--resume", str(spec.run_dir)])
    elif action == "retry" and "--overwrite" not in cmd and "--resume" not in cmd:
        cmd.append("--overwrite")
    elif action == "retry" and "--resume" in cmd:  # the checkpoint it was to resume from is gone
        return []
    if procs > 1 or int(env.get("EBSLAB_SLURM_NNODES", "1")) > 1:
        nnodes = int(env.get("EBSLAB_SLURM_NNODES", "1"))
        head = env.get("EBSLAB_SLURM_HEAD", "127.0.0.1")
        port = 29500 + int(os.environ.get("SLURM_JOB_ID", "0").split("_")[0] or 0) % 1000
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(procs),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{head}:{port}",
               "--rdzv-id", os.environ.get("SLURM_JOB_ID", "ebslab")] + cmd[1:]
    return cmd


class TrainJob(Checkpointable):  # type: ignore[misc,valid-type]
    """The callable a job runs: `ebslab train` as a child process, stopped through its SIGTERM path."""

    def __init__(self, procs: int = 1, max_requeues: int = 3):
        self.procs, self.max_requeues = procs, max_requeues
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._signal: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"procs": self.procs, "max_requeues": self.max_requeues}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __call__(self, spec: RunSpec) -> dict[str, Any]:
        from ebslab.experiments import sweep as sw

        started = time.time()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts > self.max_requeues:  # a failed job (its error is the message); the run keeps its checkpoint
            raise RuntimeError(f"requeued {restarts} times, more than --max-requeues {self.max_requeues}; "
                               f"--resume continues the run from its checkpoint")
        if sw.resume_action(spec.run_dir) == "skip":  # finished in an earlier attempt
            # no start of its own: the run's summary.json is the earlier attempt's, older than this start, and the
            # sweep reads a summary as this job's only when written after the job began (its submission time)
            return {"returncode": 0, "started": None, "ended": time.time(), "host": socket.gethostname()}
        env = dict(spec.env)
        env.update(_distributed_env())
        cmd = node_command(spec, self.procs, env)
        if not cmd:
            return self._note(spec, started, 1, f"checkpoint to resume from is gone in {spec.run_dir}")
        # SIGTERM (preemption, scontrol requeue, scancel) goes to the run: it finishes its step and checkpoints
        signal.signal(signal.SIGTERM, self._on_sigterm)
        result: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run_child, args=(cmd, env, spec, result), daemon=True)
        self._thread.start()
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except BaseException:  # the job is being torn down (a local cancel's SIGINT): the run checkpoints
            self._stop_child()
            raise
        if self._signal is not None:
            # stopped by Slurm: no result file, so the sweep reads Slurm's state (REQUEUED runs again; CANCELLED)
            sys.exit(128 + self._signal)
        return {"returncode": result.get("rc", -1), "started": started, "ended": time.time(),
                "host": socket.gethostname()}

    def _run_child(self, cmd: list[str], env: dict[str, str], spec: RunSpec, result: dict) -> None:
        from ebslab.experiments import sweep as sw

        # the child starts with USR2 blocked: Slurm sends the time-limit signal to every process of the job,
        # and only this process acts on it (its handler stops the run through SIGTERM)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})

        def on_start(proc: subprocess.Popen) -> None:
            self._proc = proc
            if self._signal is not None:
                proc.send_signal(signal.SIGTERM)

        result["rc"] = sw.run_process(cmd, env, spec.log, spec.cwd, on_start=on_start)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._signal = signum
        self._stop_child()

    def _stop_child(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # a repeated SIGTERM is harmless: the run keeps finishing its step

    def checkpoint(self, spec: RunSpec) -> Any:
        """Time limit (USR2): stop the run through its SIGTERM path, wait for its checkpoint, requeue this job."""
        self._signal = signal.SIGTERM
        self._stop_child()
        if self._thread is not None:
            self._thread.join()
        with open(spec.log, "a", encoding="utf-8") as f:
            f.write(f"=== slurm: time limit near, checkpointed; requeueing job {os.environ.get('SLURM_JOB_ID')}\n")
        return DelayedSubmission(self, spec)

    @staticmethod
    def _note(spec: RunSpec, started: float, rc: int, text: str) -> dict[str, Any]:
        with open(spec.log, "a", encoding="utf-8") as f:
            f.write(f"{text}\n")
        return {"returncode": rc, "started": started, "ended": time.time(), "host": socket.gethostname()}


def _distributed_env() -> dict[str, str]:
    """The job's node count and first node, for torchrun's rendezvous (one torchrun per node)."""
    nodes = os.environ.get("SLURM_JOB_NODELIST")
    if not nodes:
        return {}
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        hosts = []
    return {"EBSLAB_SLURM_NNODES": os.environ.get("SLURM_JOB_NUM_NODES", "1"),
            "EBSLAB_SLURM_HEAD": hosts[0] if hosts else socket.gethostname()}


# ----------------------------------------------------------------------------------------------------------
# The driver: submit, watch, cancel.


@dataclasses.dataclass
class Outcome:
    returncode: int
    started: float | None
    ended: float | None
    state: str
    message: str | None = None
    """Set when the job ended without a result: Slurm's state and the log's last line."""


class SlurmCluster:
    """The real Slurm: sbatch's parameters, squeue/sacct for the states, scancel."""

    poll_s = POLL_S  # one squeue per look
    # ended without a result: a shared filesystem shows the result file late, and squeue lists a job it has just
    # accepted late, before it is called failed
    grace_s = 30.0
    reattaches = True  # a job id in jobs.json is a job squeue still knows: `--leave-jobs` then `--resume`

    @staticmethod
    def check_available() -> None:
        from shutil import which

        if which("sbatch") is None or which("squeue") is None:
            raise UserError("--executor slurm: sbatch/squeue not found on PATH; run on a Slurm login node")

    @staticmethod
    def parameters(options: SlurmOptions, params: dict[str, Any]) -> dict[str, Any]:
        extra = {"requeue": True, **options.sbatch}
        if options.gpus_per_run:
            params["slurm_gpus_per_node"] = options.gpus_per_run
        if options.mem:
            params["slurm_mem"] = options.mem
        if options.partition:
            params["slurm_partition"] = options.partition
        if options.account:
            params["slurm_account"] = options.account
        params["slurm_additional_parameters"] = extra
        return params

    @staticmethod
    def states(jobs: list[Any]) -> dict[str, str]:
        """job id -> state as squeue, else sacct, tells it (a job neither knows is left out)."""
        ids = {j.job_id for j in jobs}
        found: dict[str, str] = {}
        try:
            out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T"], capture_output=True,
                                 text=True, timeout=60).stdout
            for line in out.splitlines():
                jid, _, state = line.strip().partition("|")
                if jid in ids:
                    found[jid] = state.upper()
        except (OSError, subprocess.TimeoutExpired):
            pass
        missing = ids - set(found)
        if missing:  # gone from the controller's memory: accounting knows how they ended
            try:
                out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(sorted(missing))],
                                     capture_output=True, text=True, timeout=60).stdout
                for line in out.splitlines():
                    jid, _, state = line.strip().partition("|")
                    if jid in missing:
                        found[jid] = state.split()[0].upper() if state else "UNKNOWN"
            except (OSError, subprocess.TimeoutExpired):
                pass
        return found

    @staticmethod
    def cancel(jobs: list[Any]) -> None:
        subprocess.run(["scancel", *[j.job_id for j in jobs]], capture_output=True, timeout=60)


class SubmititLocalCluster:
    """submitit's `local` and `debug` clusters, the fast tests' stand-in for Slurm: subprocesses of this machine,
    no sbatch parameters, states from submitit itself."""

    poll_s = 0.5
    grace_s = 2.0
    reattaches = False  # a local job ends with the process that started it

    @staticmethod
    def check_available() -> None:
        pass

    @staticmethod
    def parameters(options: SlurmOptions, params: dict[str, Any]) -> dict[str, Any]:
        params = {k: v for k, v in params.items() if not k.startswith("slurm_") and k != "nodes"}
        params.pop("name", None)
        return params

    @staticmethod
    def states(jobs: list[Any]) -> dict[str, str]:
        local = {"RUNNING": "RUNNING", "FINISHED": "COMPLETED", "INTERRUPTED": "CANCELLED"}
        return {j.job_id: local.get(str(j.state).upper(), "FAILED") for j in jobs}

    @staticmethod
    def cancel(jobs: list[Any]) -> None:
        for j in jobs:
            j.cancel(check=False)


# EBSLAB_SLURM_CLUSTER -> where the jobs run; the only place that reads the name
CLUSTERS = {"slurm": SlurmCluster, "local": SubmititLocalCluster, "debug": SubmititLocalCluster}


class SlurmJobs:
    """Submits runs as Slurm jobs through submitit and tells when each ended, and how."""

    def __init__(self, options: SlurmOptions, folder: Path, name: str):
        import submitit

        self.options, self.folder = options, Path(folder)
        self.cluster = CLUSTERS[options.cluster]
        # max_num_timeout: the requeues after a time limit that submitit allows (SLURM_RESTART_COUNT the rest)
        self.executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=options.cluster,
                                              **{f"{options.cluster}_max_num_timeout": options.max_requeues})
        params: dict[str, Any] = {"timeout_min": options.time_min, "name": name[:64],
                                  "slurm_array_parallelism": options.parallel,
                                  "slurm_signal_delay_s": options.signal_delay_s,
                                  "cpus_per_task": options.cpus_per_run, "tasks_per_node": 1, "nodes": 1}
        self.executor.update_parameters(**self.cluster.parameters(options, params))
        self.task = TrainJob(procs=options.procs_per_run, max_requeues=options.max_requeues)
        self.last_state: dict[str, str] = {}
        self.ended_since: dict[str, float] = {}

    def submit(self, specs: list[RunSpec]) -> list[Any]:
        """One job array (Slurm), or one job per run (local)."""
        if not specs:
            return []
        try:
            return list(self.executor.map_array(self.task, specs))
        except Exception as e:  # sbatch refused (partition, account, resources): one line, nothing ran
            first = (str(e).strip().splitlines() or [type(e).__name__])
            line = next((ln for ln in first if "error" in ln.lower()), first[-1])[:300]
            raise UserError(f"sbatch refused the jobs: {line}") from None

    # -- states -------------------------------------------------------------------------------------------
    def states(self, jobs: list[Any]) -> dict[str, str]:
        """job id -> Slurm state (upper case); the last one seen, or UNKNOWN, when the cluster does not say."""
        ids = {j.job_id for j in jobs}
        found = self.cluster.states(jobs)
        for jid in ids:
            state = found.get(jid) or self.last_state.get(jid, "UNKNOWN")
            found[jid] = state
            self.last_state[jid] = state
        return found

    def outcome(self, job: Any, state: str, log: Path) -> Outcome | None:
        """None while the job is queued or running (or requeued); else how it ended."""
        from submitit.core.utils import pickle_load

        result_file = job.paths.result_pickle
        if result_file.exists():
            try:
                kind, value = pickle_load(result_file)
            except Exception:  # being written: the next poll reads it
                return None
            if kind == "success" and isinstance(value, dict):
                return Outcome(int(value.get("returncode", -1)), value.get("started"), value.get("ended"), state)
            last = (str(value).strip().splitlines() or ["error"])[-1][:300]
            return Outcome(-1, None, None, state, f"Slurm job {job.job_id} raised: {last}")
        if state in ACTIVE:
            return None
        first = self.ended_since.setdefault(job.job_id, time.time())
        if time.time() - first < self.cluster.grace_s:
            return None
        return Outcome(-1, None, None, state, f"Slurm job {job.job_id} {state}: {self.last_line(job, log)}")

    @staticmethod
    def last_line(job: Any, log: Path) -> str:
        """The run log's last line, or submitit's stderr's (the job failed before the run started)."""
        from ebslab.experiments import sweep as sw

        line = sw.last_line(log)
        if line is None:
            for path in (job.paths.stderr, job.paths.stdout):
                line = sw.last_line(path) if path.exists() else None
                if line:
                    break
        return line or "no output"

    @property
    def poll_s(self) -> float:
        """Seconds between two looks at the jobs."""
        return self.cluster.poll_s

    def cancel(self, jobs: list[Any]) -> None:
        """scancel: Slurm sends SIGTERM, each run checkpoints (status interrupted) and its job ends CANCELLED."""
        if not jobs:
            return
        self.cluster.cancel(jobs)

    def wait_ended(self, jobs: list[Any], timeout_s: float = STOP_WAIT_S) -> None:
        deadline = time.time() + timeout_s
        while jobs and time.time() < deadline:
            states = self.states(jobs)
            jobs = [j for j in jobs if states[j.job_id] in ACTIVE]
            if jobs:
                time.sleep(POLL_S)


# ----------------------------------------------------------------------------------------------------------
# `ebslab sweep --executor slurm`.


def _jobs_file(root: Path) -> Path:
    return root / "slurm" / "jobs.json"


def _read_jobs(root: Path) -> dict[str, str]:
    try:
        data = json.loads(_jobs_file(root).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_sweep(runner: Any, options: SlurmOptions) -> None:
    """The sweep's runs as one job array; the index and table follow the jobs. Ctrl-C cancels them (each run
    checkpoints) or, with --leave-jobs, leaves them and says how to go on."""
    slurm = SlurmJobs(options, runner.root / "slurm", runner.sweep.name)
    submitted = _submit_or_attach(runner, slurm)
    pending = list(runner.todo)
    try:
        _watch_until_ended(runner, slurm, submitted, pending)
    except KeyboardInterrupt:
        _stop_jobs(slurm, [submitted[j.index] for j in pending])
        raise


def _submit_or_attach(runner: Any, slurm: SlurmJobs) -> dict[int, Any]:
    """Each run of the sweep's todo -> its Slurm job: a job an earlier start left queued or running, else one
    of a new job array. Records them (slurm/jobs.json, the index: queued) and returns them by run index."""
    from ebslab.core.files import atomic_write_text

    root: Path = runner.root
    known = _read_jobs(root)
    todo = list(runner.todo)
    attached = _live_earlier_jobs(slurm, todo, known)
    fresh = [j for j in todo if j.index not in attached]
    submitted = dict(zip([j.index for j in fresh], slurm.submit(_run_specs(runner, fresh))))
    submitted.update(attached)
    known.update({j.folder: submitted[j.index].job_id for j in todo})
    atomic_write_text(_jobs_file(root), json.dumps(known, indent=1) + "\n")
    for job in todo:
        job.status, job.started = "queued", time.time()
        job.message = f"slurm job {submitted[job.index].job_id}"
    runner.write_index()
    return submitted


def _live_earlier_jobs(slurm: SlurmJobs, todo: list[Any], known: dict[str, str]) -> dict[int, Any]:
    """The jobs an earlier `--leave-jobs` left behind that are still queued or running: watched again, not
    submitted twice."""
    from submitit.core.core import Job as SubmititJob

    attached: dict[int, Any] = {}
    if not known or not slurm.cluster.reattaches:
        return attached
    earlier = {j.folder: SubmititJob(slurm.folder / "%j", known[j.folder]) for j in todo if j.folder in known}
    states = slurm.states(list(earlier.values()))
    for job in todo:
        old = earlier.get(job.folder)
        if old is not None and states[old.job_id] in ACTIVE:
            attached[job.index] = old
    if attached:
        print(f"watching {len(attached)} Slurm job(s) of an earlier start, still queued or running", flush=True)
    return attached


def _run_specs(runner: Any, jobs: list[Any]) -> list[RunSpec]:
    """The runs as jobs: their `ebslab train` commands (and the resume command of a requeued job), env and log."""
    from ebslab.experiments import sweep as sw

    specs = [RunSpec(sw.train_command(runner.sweep, j, runner.smoke), sw.job_env(runner.sweep, j), str(j.log),
                     os.getcwd(), sw.train_command(runner.sweep, dataclasses.replace(j, action="resume")))
             for j in jobs]
    for j in jobs:
        j.log.parent.mkdir(parents=True, exist_ok=True)
    return specs


def _watch_until_ended(runner: Any, slurm: SlurmJobs, submitted: dict[int, Any], pending: list[Any]) -> None:
    """Poll the pending runs' jobs until each ended; the index follows queued -> running -> how it ended.
    `pending` shrinks as runs end (on Ctrl-C it holds those still to stop)."""
    while pending:
        states = slurm.states([submitted[j.index] for j in pending])
        changed = False
        for job in list(pending):
            sjob = submitted[job.index]
            state = states[sjob.job_id]
            ended = slurm.outcome(sjob, state, job.log)
            if ended is None:
                status = "running" if state in ("RUNNING", "COMPLETING") else "queued"
                if status != job.status:
                    job.status, changed = status, True
                continue
            pending.remove(job)
            _record_end(runner, job, ended)
        if changed:
            runner.write_index()
        if pending:
            time.sleep(slurm.poll_s)


def _record_end(runner: Any, job: Any, ended: Outcome) -> None:
    if ended.started:
        job.started = ended.started
    if ended.message is None:
        runner.finished(job, ended.returncode, ended.ended)
    else:
        _failed(runner, job, ended)


def _stop_jobs(slurm: SlurmJobs, live: list[Any]) -> None:
    """After Ctrl-C: cancel the live jobs and wait for their runs' checkpoints, or leave them (--leave-jobs)."""
    if slurm.options.leave_jobs:
        print(f"left {len(live)} Slurm job(s) queued or running ({', '.join(j.job_id for j in live)}); "
              f"`ebslab sweep ... --executor slurm --resume` watches them again and continues the rest",
              file=sys.stderr, flush=True)
    else:
        print(f"cancelling {len(live)} Slurm job(s); each run checkpoints", file=sys.stderr, flush=True)
        slurm.cancel(live)
        slurm.wait_ended(live)


@dataclasses.dataclass
class SlurmSweepExecutor:
    """`ebslab sweep --executor slurm` (experiments.sweep.SweepExecutor): the sweep's runs as one job array."""
    options: SlurmOptions
    name = "slurm"

    def describe(self) -> str:
        return self.options.describe()

    def adopt_left_runs(self, run_dirs: list[Path]) -> list[Path]:
        # nothing to wait for here: a run's holder is a job, perhaps on another node, that run_sweep finds in
        # squeue and watches again
        return []

    def run(self, runner: Any) -> None:
        run_sweep(runner, self.options)


def _failed(runner: Any, job: Any, ended: Outcome) -> None:
    job.returncode = ended.returncode
    job.duration_s = round(time.time() - (job.started or time.time()), 2)
    job.status, job.message = "failed", ended.message
    runner.write_index()
    print(f"[{runner.done_count()}/{len(runner.todo)}] {job.status:<11} {job.folder}  ({job.message})", flush=True)


# ----------------------------------------------------------------------------------------------------------
# `ebslab tune --executor slurm`: each trial one job, run by the tuner's worker threads.


class TuneJobs:
    """The tuner's Slurm executor (experiments.tune.workers.TrialExecutor): `run` submits one run, waits for it and
    returns its exit code (-1: ended without a result, with Slurm's state and the log's last line appended to the
    log)."""

    def __init__(self, options: SlurmOptions, folder: Path, name: str):
        self.slurm = SlurmJobs(options, folder, name)
        self.live: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.submit_lock = threading.Lock()

    def run(self, cmd: list[str], env: dict[str, str], log: Path) -> int:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with self.submit_lock:
            (job,) = self.slurm.submit([RunSpec(cmd, env, str(log), os.getcwd())])
        with self.lock:
            self.live[job.job_id] = job
        try:
            while True:
                with self.submit_lock:  # one squeue at a time
                    state = self.slurm.states([job])[job.job_id]
                ended = self.slurm.outcome(job, state, Path(log))
                if ended is not None:
                    break
                time.sleep(self.slurm.poll_s)
        finally:
            with self.lock:
                self.live.pop(job.job_id, None)
        if ended.message:
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{ended.message}\n")
        return ended.returncode

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stop_all(self) -> None:
        with self.lock:
            jobs = list(self.live.values())
        if self.slurm.options.leave_jobs:
            print(f"left {len(jobs)} Slurm job(s) running ({', '.join(sorted(self.live))}); once squeue no longer "
                  f"lists them, `ebslab tune ... --resume` continues the study", file=sys.stderr, flush=True)
            return
        self.slurm.cancel(jobs)
        self.slurm.wait_ended(jobs)
