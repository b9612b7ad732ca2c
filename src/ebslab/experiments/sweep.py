"""A grid of runs: expand the sweep file, check every combination, run each in its own process, resume.

The sweep only reads and writes run folders: each run is `python -m ebslab train ...` in a subprocess (local
executor) or in a Ray task (ray executor), so a crash or an out-of-memory in one run never takes the others
down. The same sweep file runs on a laptop (`--executor local --parallel 2`) or a cluster (`--executor ray`,
with the output folder on a filesystem every node sees).

    OUT/NAME/                      (OUT/NAME-smoke/ with --smoke)
      sweep.json                   index: each run's overrides, folder, status (rewritten atomically)
      <folder>.log                 stdout + stderr of the run's process (appended on resume / retry)
      <folder>/                    the run folder (docs/run-folder.md), named after the keys that vary
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml
from tabulate import tabulate

from ebslab.core.config import VALID_KEYS, flatten, load_config, read_yaml, read_yaml_file, unknown_key
from ebslab.core.errors import UserError
from ebslab.core.files import atomic_write_text
from ebslab.core.locks import LOCK_NAME, read_holder
from ebslab.core.runfolder import read_summary

DONE = ("completed", "collapsed", "diverged", "pruned")
"""Statuses of a run that finished: skipped by --resume. `pruned`: a search stopped it early on purpose."""

SMOKE_OVERRIDES: dict[str, Any] = {"train.epochs": 1, "train.max_steps": 0, "data.limit": 64}
"""What --smoke changes in every combination: one short epoch on 64 examples."""

SET_BY_SWEEP = ("out.dir", "out.name")
MAX_NAME = 200  # run folder names stay below the 255-byte limit of most filesystems
MAX_GROUP = 128  # W&B's limit on group and project names
_BAD_PROJECT_CHARS = set("/\\#?%:")


@dataclasses.dataclass
class Sweep:
    name: str
    grid: dict[str, list[Any]]
    """Dotted key -> values; every combination is one run (ordered as in the file, last key fastest)."""
    base_file: Path | None = None
    """The base config file (absolute), passed to every `ebslab train`; or None."""
    base_values: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Dotted key -> value from a `base:` mapping, passed as overrides before the grid's."""
    path: Path | None = None

    def runs(self) -> list[dict[str, Any]]:
        return expand_grid(self)


# ----------------------------------------------------------------------------------------------------------
# Pure functions: load, expand, name.


def _grid_of(sweep: Sweep | dict) -> dict[str, list[Any]]:
    grid = sweep.grid if isinstance(sweep, Sweep) else sweep.get("grid")
    if grid is None:
        return {}
    if not isinstance(grid, dict):
        raise UserError(f"sweep 'grid' must be a mapping of key: [values], not {type(grid).__name__}")
    out: dict[str, list[Any]] = {}
    for key, values in flatten(grid).items():
        if not isinstance(values, (list, tuple)):
            # a scalar is a base value written in the wrong place (`batch.effective: 16` once trained every run
            # on the defaults of what the user meant to set): refuse it rather than guess
            raise UserError(f"sweep grid key '{key}' must be a list of values, got {format_value(values)}; "
                            f"write '{key}: [{format_value(values)}]', or move it under base:")
        if len(values) == 0:
            raise UserError(f"sweep grid key '{key}' has an empty list of values; give at least one")
        out[key] = list(values)
    return out


def expand_grid(sweep: Sweep | dict) -> list[dict[str, Any]]:
    """The overrides of each run: the product of the grid's lists, in file order (the last key varies fastest)."""
    grid = _grid_of(sweep)
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def varying_keys(grid: dict[str, list[Any]]) -> list[str]:
    """Keys with more than one value; when none varies, every grid key (so a name still says what ran)."""
    keys = [k for k, v in grid.items() if len(v) > 1]
    return keys or list(grid)


def format_value(value: Any) -> str:
    """A value as a command-line override reads it back (YAML flow style): `[jsonl, wandb]`, `5.0e-05`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")].rstrip()
    return text


def _name_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_name_value(v) for v in value)
    if isinstance(value, str):
        text = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(value)
    else:
        text = format_value(value)  # true / false / null
    text = text.replace("/", "_").replace("\\", "_")
    return "".join(c if c.isprintable() else "_" for c in text)


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return f"{text[: limit - 11]}~{digest}"


def run_folder_name(overrides: dict[str, Any], varying_keys: list[str]) -> str:
    """`model.name=minilm,batch.effective=256,train.seed=1`: the varying keys in grid order, filesystem-safe."""
    parts = [f"{k}={_name_value(overrides[k])}" for k in varying_keys if k in overrides]
    name = ",".join(parts) or "run"
    if name in (".", ".."):
        name = f"run{name}"
    return _shorten(name, MAX_NAME)


def run_group(overrides: dict[str, Any], sweep_name: str) -> str:
    """The W&B group: the run's overrides without the seed, so the seeds of one setting chart together."""
    parts = [f"{k}={_name_value(v) if isinstance(v, (list, tuple)) else v}"
             for k, v in overrides.items() if k != "train.seed"]
    return _shorten(",".join(parts) or sweep_name, MAX_GROUP)


def _check_key(key: str, where: str) -> None:
    if key not in VALID_KEYS:
        raise UserError(f"sweep {where}: {unknown_key(key)}")
    if key in SET_BY_SWEEP:
        raise UserError(f"sweep {where}: '{key}' is set by the sweep (use --out DIR; folders are named after "
                        f"the grid); remove it")


def parse_sweep(data: dict, path: Path | None = None) -> Sweep:
    """A sweep mapping (as read from YAML) -> Sweep; `base` paths are relative to the file's folder or the cwd."""
    if not isinstance(data, dict):
        raise UserError(f"sweep file must hold a mapping (name, base, grid), not {type(data).__name__}")
    where = f"file '{path}'" if path else "file"
    unknown = sorted(set(data) - {"name", "base", "grid"})
    if unknown:
        raise UserError(f"sweep {where}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                        f"a sweep file has name, base and grid")
    name = data.get("name")
    if name is None and path is not None:
        name = path.stem
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"sweep {where}: 'name' must be a non-empty string (the sweep's folder)")
    bad = sorted(c for c in set(name) if c in _BAD_PROJECT_CHARS or not c.isprintable())
    if bad or name.startswith(".") or len(name) > MAX_GROUP:
        raise UserError(f"sweep {where}: name {name!r} must be a folder name (no {''.join(sorted(_BAD_PROJECT_CHARS))}"
                        f", not starting with '.', at most {MAX_GROUP} characters)")

    base = data.get("base")
    base_file: Path | None = None
    base_values: dict[str, Any] = {}
    if isinstance(base, dict):
        base_values = flatten(base)
        for key in base_values:
            if key not in VALID_KEYS:
                raise UserError(f"sweep {where} base: {unknown_key(key)}")
    elif isinstance(base, str):
        candidates = [Path(base)] if Path(base).is_absolute() else (
            ([path.parent / base] if path else []) + [Path.cwd() / base])
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            tried = " or ".join(f"'{c}'" for c in candidates)
            raise UserError(f"sweep {where}: base config '{base}' not found (looked for {tried})")
        base_file = found.resolve()
        read_yaml(base_file)  # a broken base fails here, with its own message
    elif base is not None:
        raise UserError(f"sweep {where}: 'base' must be a config file path or a mapping of keys, "
                        f"not {type(base).__name__}")

    grid = _grid_of(data)
    for key in grid:
        _check_key(key, f"{where} grid")
    return Sweep(name=name.strip(), grid=grid, base_file=base_file, base_values=base_values, path=path)


def load_sweep(path: str | Path) -> Sweep:
    return parse_sweep(*read_yaml_file(path, "sweep"))


# ----------------------------------------------------------------------------------------------------------
# Planning: one job per combination, checked before anything runs.


@dataclasses.dataclass
class Job:
    index: int
    folder: str
    overrides: dict[str, Any]
    """The grid's values for this run (what names it)."""
    run_dir: Path
    log: Path
    group: str
    action: str = "new"
    """new | resume | retry | skip."""
    status: str = "pending"
    returncode: int | None = None
    duration_s: float | None = None
    started: float | None = None
    message: str | None = None

    def record(self) -> dict[str, Any]:
        return {"folder": self.folder, "overrides": self.overrides, "status": self.status,
                "action": self.action, "returncode": self.returncode, "duration_s": self.duration_s,
                "log": self.log.name, "group": self.group, "message": self.message}


def run_overrides(sweep: Sweep, overrides: dict[str, Any], smoke: bool = False) -> dict[str, Any]:
    """Everything given to one run on top of the base file: base mapping, grid values, smoke settings."""
    values = dict(sweep.base_values)
    values.update(overrides)
    if smoke:
        values.update(SMOKE_OVERRIDES)
    return values


def check_combination(sweep: Sweep, overrides: dict[str, Any], smoke: bool = False) -> str | None:
    """None if the run's config loads, else the reason (the same check `ebslab train` does first)."""
    try:
        cfg = load_config(sweep.base_file, run_overrides(sweep, overrides, smoke))
    except UserError as e:
        return str(e)
    micro = cfg.batch.micro
    if isinstance(micro, int) and cfg.batch.effective % micro:
        return (f"batch.effective={cfg.batch.effective} is not divisible by batch.micro={micro}; choose "
                f"batch.effective as a multiple of {micro}")
    return None


def validate_sweep(sweep: Sweep, smoke: bool = False) -> list[dict[str, Any]]:
    """The runs' overrides, or a UserError listing EVERY invalid combination (and clashing folder names)."""
    runs = expand_grid(sweep)
    keys = varying_keys(sweep.grid)
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, overrides in enumerate(runs):
        folder = run_folder_name(overrides, keys)
        reason = check_combination(sweep, overrides, smoke)
        if reason:
            problems.append(f"  {folder}: {reason}")
        if folder in seen:
            problems.append(f"  {folder}: same folder name as run {seen[folder] + 1} (repeated or clashing "
                            f"values in the grid)")
        seen.setdefault(folder, i)
    if problems:
        raise UserError(f"sweep '{sweep.name}': {len(problems)} problem(s) in {len(runs)} combination(s), "
                        f"nothing was run; fix the grid or base:\n" + "\n".join(problems))
    return runs


def resume_action(run_dir: Path) -> str:
    """What `--resume` does with a run folder: skip | resume | retry | new.

    - skip: summary.json says completed / collapsed / diverged / pruned (its files are left untouched);
    - resume: interrupted (no summary.json, or status interrupted) with a complete checkpoints/last:
      `train --resume`;
    - retry: failed, or nothing to resume from: `train ... --overwrite`;
    - new: no run folder yet.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return "new"
    summary = read_summary(run_dir)
    status = summary.get("status") if summary else None
    if status in DONE:
        return "skip"
    if status != "failed" and has_last_checkpoint(run_dir):
        return "resume"
    return "retry"


def has_last_checkpoint(run_dir: Path) -> bool:
    """checkpoints/last is complete (or its previous copy, if a kill fell between AtomicDir's two renames):
    the same test `ebslab train --resume` makes."""
    from ebslab.loop.checkpoint import resolve_checkpoint

    return resolve_checkpoint(Path(run_dir) / "checkpoints" / "last") is not None


def sweep_dir(out: str | Path, sweep: Sweep, smoke: bool = False) -> Path:
    return Path(out) / (f"{sweep.name}-smoke" if smoke else sweep.name)


def plan(sweep: Sweep, out: str | Path, resume: bool = False, smoke: bool = False) -> list[Job]:
    runs = validate_sweep(sweep, smoke)
    root = sweep_dir(out, sweep, smoke).resolve()
    keys = varying_keys(sweep.grid)
    jobs = []
    for i, overrides in enumerate(runs):
        folder = run_folder_name(overrides, keys)
        jobs.append(Job(index=i, folder=folder, overrides=overrides, run_dir=root / folder,
                        log=root / f"{folder}.log", group=run_group(overrides, sweep.name)))
    if not resume and root.exists():
        existing = [j.folder for j in jobs if j.run_dir.exists()]
        if existing or (root / "sweep.json").exists():
            raise UserError(f"sweep folder '{root}' already holds runs ({len(existing)} of {len(jobs)}); "
                            f"add --resume to continue it (completed runs are skipped), or choose another --out")
    for job in jobs:
        job.action = resume_action(job.run_dir) if resume else "new"
        if job.action == "skip":
            summary = read_summary(job.run_dir) or {}
            job.status = summary.get("status", "completed")
            job.duration_s = summary.get("duration_s")
    return jobs


def train_command(sweep: Sweep, job: Job, smoke: bool = False, python: str | None = None) -> list[str]:
    """The `ebslab train` command line of a job (its action decides --resume / --overwrite)."""
    cmd = [python or sys.executable, "-m", "ebslab", "train"]
    if job.action == "resume":
        return cmd + ["--resume", str(job.run_dir)]
    if sweep.base_file is not None:
        cmd.append(str(sweep.base_file))
    values = run_overrides(sweep, job.overrides, smoke)
    values.update({"out.dir": str(job.run_dir.parent), "out.name": job.folder})
    cmd += [f"{k}={format_value(v)}" for k, v in values.items()]
    if job.action == "retry":
        cmd.append("--overwrite")
    return cmd


# passed explicitly so a Ray worker (whose environment is the raylet's) sees them too; secrets are not
_PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE",
               "WANDB_DIR", "WANDB_ENTITY", "WANDB_SILENT", "TOKENIZERS_PARALLELISM", "EBSLAB_CACHE")


def job_env(sweep: Sweep, job: Job) -> dict[str, str]:
    """Variables set for the run's process on top of its inherited environment."""
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.update({"WANDB_PROJECT": sweep.name, "WANDB_RUN_GROUP": job.group, "WANDB_NAME": job.folder})
    # the child imports the same ebslab as this process (a source checkout run with PYTHONPATH=src included)
    pkg_root = str(Path(__file__).resolve().parents[2])
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not {"site-packages", "dist-packages"} & set(Path(pkg_root).parts):
        parts = [pkg_root] + [p for p in parts if Path(p).resolve() != Path(pkg_root)]
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


# ----------------------------------------------------------------------------------------------------------
# Running one job: a subprocess with its output in a log (used by both executors).


_PROGRESS = re.compile(r"\d+%\|")  # tqdm's "train:  40%|####      | 4/10 [...]"


def last_line(log: Path) -> str | None:
    """The last line the run printed (its error, usually), without the sweep's own `===` lines."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    # a progress bar redraws its line with \r: its fragments are not what the run said
    lines = [part.strip() for ln in lines for part in ln.split("\r")]
    lines = [ln for ln in lines if ln and not ln.startswith("=== ") and not _PROGRESS.search(ln)]
    return lines[-1][:300] if lines else None


def final_status(run_dir: Path, returncode: int, started: float, log: Path | None = None) -> tuple[str, str | None]:
    """The run's status from the summary.json this attempt wrote; failed if it wrote none."""
    summary = read_summary(run_dir)
    fresh = summary is not None and (run_dir / "summary.json").stat().st_mtime >= started - 1
    if fresh:
        return str(summary.get("status", "failed")), summary.get("message")
    last = last_line(log) if log is not None else None
    if returncode == 0:
        return "failed", "the run exited 0 but wrote no summary.json"
    return "failed", f"exit code {returncode}" + (f": {last}" if last else "")


def run_process(cmd: list[str], env_add: dict[str, str], log: str, cwd: str | None,
                on_start: Callable[[subprocess.Popen], None] | None = None) -> int:
    """Run `cmd` with stdout+stderr appended to `log`; return its exit code. Also the body of a Ray task."""
    env = dict(os.environ)
    env.update(env_add)
    if cwd is not None and not os.path.isdir(cwd):
        cwd = None
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"=== ebslab sweep {time.strftime('%Y-%m-%d %H:%M:%S')}\n$ {shlex.join(cmd)}\n")
        f.flush()
        try:
            # its own session: a Ctrl-C reaches the sweep only, which forwards exactly one SIGINT; and a SIGTERM
            # when the sweep dies however it dies (kill -9 included), so no run outlives it unnoticed
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, start_new_session=on_start is not None,
                                    preexec_fn=_die_with_parent())
        except OSError as e:
            f.write(f"could not start: {e}\n")
            return 127
        if on_start is not None:
            on_start(proc)
        try:
            rc = proc.wait()
        except BaseException:  # a cancelled Ray task, a Ctrl-C: the run checkpoints and stops, never orphaned
            stop_process(proc)
            raise
        f.write(f"=== exit code {rc}\n")
    return rc


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: a `preexec_fn` that asks the kernel to send the child SIGTERM when the thread that started it dies
    (a sweep or tuner killed with -9: `ebslab train` then finishes its step, checkpoints, writes status
    interrupted). Elsewhere None: `--resume` still finds a run left going and waits for it (`wait_for_live_runs`)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between the fork and the prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def live_run(run_dir: Path) -> dict[str, Any] | None:
    """The holder (pid, command) of a run folder's lock while a process still holds it, else None. A run that a
    killed sweep or tuner left going holds its lock until it ends (the kernel drops it then, however it ends)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(fd) or {"pid": None}
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def wait_for_live_runs(run_dirs: list[Path], stopping: Callable[[], bool] = lambda: False,
                       poll_s: float = 0.5) -> list[Path]:
    """`--resume` after the sweep (or tuner) was killed: wait for each run that is still going, so that it is
    never started a second time beside itself nor recorded as failed. Returns the folders waited for; their
    action is then decided from what they left (resumed, or skipped if they finished)."""
    waited = []
    for run_dir in run_dirs:
        holder = live_run(run_dir)
        if holder is None:
            continue
        waited.append(Path(run_dir))
        print(f"{Path(run_dir).name}: still running as pid {holder.get('pid', '?')} (left by a sweep or tuner "
              "that was killed); waiting for it to end", flush=True)
        while live_run(run_dir) is not None and not stopping():
            time.sleep(poll_s)
    return waited


def stop_process(proc: subprocess.Popen, grace_s: float = 60.0, send: bool = True) -> None:
    """SIGINT once (ebslab train finishes its step, checkpoints, writes status interrupted), then SIGKILL.

    Once only: a second SIGINT makes `ebslab train` abort without its checkpoint."""
    if send and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """Every live one gets its SIGINT first (they checkpoint in parallel), then each is waited for as above."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        stop_process(proc, send=False)


RAY_AUTH_HINT = ("if the cluster uses token authentication (on by default since Ray 2.52), give this process "
                 "its token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<`ray get-auth-token` on the head> (or copy the "
                 "head's ~/.ray/auth_token here); or start the cluster with RAY_AUTH_MODE=disabled on every node")


def connect_ray(ray: Any, address: str | None) -> None:
    """`ray.init` on RAY_ADDRESS (none: a local cluster). An unreachable or refusing cluster is one line naming
    the address and the fix, not a traceback after minutes of retries."""
    if address and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e}); give the head's "
                            "<ip>:<port> as `ray start --head` printed it (and open that port), RAY_ADDRESS=auto "
                            "on a cluster node, or unset RAY_ADDRESS for a local cluster") from None
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, ray.exceptions.AuthenticationError, ray.exceptions.RaySystemError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"could not connect to the Ray cluster at RAY_ADDRESS={address} ({first}); "
                        f"{RAY_AUTH_HINT}") from None


def ray_task(cmd: list[str], env_add: dict[str, str], log: str, cwd: str | None) -> tuple[int, float, float]:
    """(exit code, start, end): the time the run ran, not the time it waited for a free CPU/GPU."""
    started = time.time()
    # the worker's own interpreter: on a cluster the driver's path may not exist on the node
    cmd = [sys.executable] + list(cmd[1:])
    return run_process(cmd, env_add, log, cwd), started, time.time()


# ----------------------------------------------------------------------------------------------------------
# The sweep: plan, index, executors, table.


class SweepRunner:
    def __init__(self, sweep: Sweep, jobs: list[Job], root: Path, smoke: bool, executor: str):
        self.sweep, self.jobs, self.root, self.smoke, self.executor = sweep, jobs, root, smoke, executor
        self.lock = threading.Lock()
        self.procs: dict[int, subprocess.Popen] = {}
        self.stopping = False
        self.proc_lock = threading.Lock()

    # -- the index ----------------------------------------------------------------------------------------
    def write_index(self) -> None:
        with self.lock:
            data = {
                "name": self.sweep.name,
                "sweep_file": str(self.sweep.path) if self.sweep.path else None,
                "base": str(self.sweep.base_file) if self.sweep.base_file else self.sweep.base_values,
                "grid": self.sweep.grid,
                "smoke": self.smoke,
                "executor": self.executor,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "runs": [j.record() for j in self.jobs],
            }
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.root / "sweep.json", json.dumps(data, indent=1, default=str) + "\n")

    def started(self, job: Job) -> None:
        job.status, job.started = "running", time.time()
        job.returncode = job.duration_s = job.message = None
        self.write_index()

    def finished(self, job: Job, returncode: int, ended: float | None = None) -> None:
        job.returncode = returncode
        job.duration_s = round((ended or time.time()) - (job.started or time.time()), 2)
        job.status, job.message = final_status(job.run_dir, returncode, job.started or 0, job.log)
        self.write_index()
        print(f"[{self.done_count()}/{len(self.todo)}] {job.status:<11} {job.folder}"
              + (f"  ({job.message})" if job.status not in DONE and job.message else ""), flush=True)

    def done_count(self) -> int:
        return sum(1 for j in self.todo if j.returncode is not None)

    @property
    def todo(self) -> list[Job]:
        return [j for j in self.jobs if j.action != "skip"]

    # -- executors ----------------------------------------------------------------------------------------
    def run_local(self, parallel: int) -> None:
        env_extra: dict[str, str] = {}
        if parallel > 1 and "OMP_NUM_THREADS" not in os.environ:  # don't oversubscribe the cores
            env_extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))

        def on_start(job: Job, proc: subprocess.Popen) -> None:
            with self.proc_lock:
                self.procs[job.index] = proc
                if self.stopping:  # started while the sweep was being stopped
                    proc.send_signal(signal.SIGINT)

        def one(job: Job) -> None:
            if self.stopping:
                return
            self.started(job)
            cmd = train_command(self.sweep, job, self.smoke)
            env = {**job_env(self.sweep, job), **env_extra}
            rc = run_process(cmd, env, str(job.log), os.getcwd(), on_start=lambda p: on_start(job, p))
            self.procs.pop(job.index, None)
            self.finished(job, rc)

        pool = ThreadPoolExecutor(max_workers=parallel)
        futures = [pool.submit(one, job) for job in self.todo]
        try:
            for fut in futures:
                fut.result()
        except KeyboardInterrupt:
            for fut in futures:
                fut.cancel()
            self.stop_children()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def stop_children(self) -> None:
        """Ctrl-C: each run gets one SIGINT (it checkpoints and writes status interrupted), then is waited for."""
        with self.proc_lock:
            self.stopping = True
            procs = list(self.procs.values())
        stop_processes(procs)

    def run_ray(self, gpus: float, cpus: float) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs ray: pip install 'ebslab[ray]' (or use --executor local)")
        started_here = False
        if not ray.is_initialized():
            connect_ray(ray, os.environ.get("RAY_ADDRESS"))
            started_here = True
        try:
            task = ray.remote(ray_task).options(num_gpus=gpus, num_cpus=cpus, max_retries=0)
            refs = {}
            for job in self.todo:
                cmd = train_command(self.sweep, job, self.smoke)
                ref = task.remote(cmd, job_env(self.sweep, job), str(job.log), os.getcwd())
                refs[ref] = job
                job.status, job.started = "queued", time.time()
            self.write_index()
            pending = list(refs)
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        job = refs[ref]
                        ended = None
                        try:
                            rc, job.started, ended = ray.get(ref)
                        except Exception as e:  # the task itself died (node lost, worker killed)
                            rc = -1
                            with open(job.log, "a", encoding="utf-8") as f:
                                f.write(f"=== ray task failed: {e}\n")
                        self.finished(job, int(rc), ended)
            except KeyboardInterrupt:
                for ref in pending:
                    ray.cancel(ref)
                raise
        finally:
            if started_here:
                ray.shutdown()

    # -- the end ------------------------------------------------------------------------------------------
    def table(self) -> str:
        rows = [("status", "test acc", "time", "run")]
        for j in self.jobs:
            summary = read_summary(j.run_dir) or {}
            test = summary.get("test_best") or summary.get("test_last") or {}
            acc = test.get("acc") if isinstance(test, dict) else None
            status = j.status + (" (skipped)" if j.action == "skip" else "")
            rows.append((status, f"{acc:.4f}" if isinstance(acc, (int, float)) else "-",
                         f"{j.duration_s:.0f}s" if isinstance(j.duration_s, (int, float)) else "-", j.folder))
        # the header goes in as a row: tabulate widens a header's column (min padding), and plain draws no rule
        text = tabulate(rows, tablefmt="plain", colalign=("left", "right", "right", "left"), disable_numparse=True)
        lines = [line.rstrip() for line in text.splitlines()]
        counts: dict[str, int] = {}
        for j in self.jobs:
            counts[j.status] = counts.get(j.status, 0) + 1
        lines.append(f"sweep '{self.sweep.name}': {len(self.jobs)} run(s): "
                     + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                     + f"; index {self.root / 'sweep.json'}")
        return "\n".join(lines)


class SweepExecutor(Protocol):
    """Where a sweep's runs go (`--executor NAME`, picked in sweep_command): local subprocesses and Ray tasks here,
    Slurm jobs in experiments.slurm. The sweep's plan, index, status and table stay the runner's."""

    name: str
    """--executor's value, recorded in sweep.json."""

    def describe(self) -> str:
        """Where the runs go, for the sweep's first line: `local x 2`."""

    def adopt_left_runs(self, run_dirs: list[Path]) -> list[Path]:
        """`--resume`: take over the runs a killed sweep left going, before the runs are planned. Returns the
        folders that ended meanwhile (the plan is made again from what they left)."""

    def run(self, runner: SweepRunner) -> None:
        """Every run of `runner.todo` to its end; Ctrl-C stops them (each checkpoints) and raises again."""


@dataclasses.dataclass
class LocalExecutor:
    parallel: int
    name = "local"

    def describe(self) -> str:
        return f"local x {self.parallel}"

    def adopt_left_runs(self, run_dirs: list[Path]) -> list[Path]:
        return wait_for_live_runs(run_dirs)  # a run left going holds its folder's lock until it ends

    def run(self, runner: SweepRunner) -> None:
        runner.run_local(self.parallel)


@dataclasses.dataclass
class RayExecutor:
    gpus_per_run: float
    cpus_per_run: float
    name = "ray"

    def describe(self) -> str:
        return f"ray ({self.cpus_per_run:g} cpu, {self.gpus_per_run:g} gpu per run)"

    def adopt_left_runs(self, run_dirs: list[Path]) -> list[Path]:
        return wait_for_live_runs(run_dirs)  # the lock of a folder on the shared --out, held by a task of any node

    def run(self, runner: SweepRunner) -> None:
        runner.run_ray(self.gpus_per_run, self.cpus_per_run)


def raise_interrupt(signum, frame):
    """A SIGTERM handler: `kill` of a sweep or a study stops it as Ctrl-C does (its runs stop cleanly)."""
    raise KeyboardInterrupt


def add_run_arguments(parser: argparse.ArgumentParser, out_help: str, resume_help: str, parallel_help: str) -> None:
    """--out, --resume, --executor, --parallel: the options of every command that starts runs as a sweep does
    (`ebslab sweep`, `ebslab tune`), with each command's own words for what they mean there."""
    parser.add_argument("--out", default="runs", help=out_help)
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--executor", choices=["local", "ray", "slurm"], default="local",
                        help="local subprocesses (default), Ray tasks (RAY_ADDRESS = an existing cluster) or Slurm "
                             "jobs (submitit; the options below)")
    parser.add_argument("--parallel", type=int, default=1, help=parallel_help)
