"""`ebslab sweep`: a grid of runs from a sweep file on the local, Ray or Slurm executor.

The sweep itself (grid, plan, run folders, the local and Ray executors, sweep.json) is ebslab.experiments.sweep; the Slurm
executor (ebslab.experiments.slurm) builds on it; this command sits above both and picks the executor.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from ebslab.experiments import slurm
from ebslab.experiments import sweep as sw
from ebslab.core.errors import UserError
from ebslab.core.files import check_folder_target
from ebslab.core.locks import FolderLock


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", help="the sweep YAML (name, base, grid)")
    sw.add_run_arguments(parser, out_help="runs go to OUT/NAME/<folder> (default: runs)",
                      resume_help="continue a sweep: skip completed runs, resume interrupted ones, retry failed ones",
                      parallel_help="local executor: runs at once (default 1)")
    parser.add_argument("--smoke", action="store_true",
                        help="every combination with 1 epoch on 64 examples, into OUT/NAME-smoke/")
    parser.add_argument("--gpus-per-run", type=float, default=0, help="ray, slurm executors: GPUs per run (default 0)")
    parser.add_argument("--cpus-per-run", type=float, default=1, help="ray, slurm executors: CPUs per run (default 1)")
    slurm.add_arguments(parser, resources=False)


def run(args: argparse.Namespace) -> int:
    """`ebslab sweep`: 0 if every run finished, 1 if any failed; a UserError (exit 2) before any run starts."""
    if args.parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {args.parallel}")
    if args.gpus_per_run < 0 or args.cpus_per_run < 0:
        raise UserError("--gpus-per-run and --cpus-per-run must be >= 0")
    executor = pick_executor(args)  # Slurm's options checked before any folder exists
    sweep = sw.load_sweep(args.sweep_file)
    sw.validate_sweep(sweep, args.smoke)  # a broken grid fails before the lock creates the sweep's folder
    root = sw.sweep_dir(args.out, sweep, args.smoke).resolve()
    check_folder_target(root, "--out")
    # one sweep per folder: a second one would `train --resume` runs the first is still writing
    with FolderLock(root, "sweep"):
        return _run_locked(args, sweep, root, executor)


def pick_executor(args: argparse.Namespace) -> sw.SweepExecutor:
    """--executor NAME -> the executor: the one place that reads the name."""
    if args.executor == "slurm":
        return slurm.SlurmSweepExecutor(slurm.options_from_args(args))
    if args.executor == "ray":
        return sw.RayExecutor(args.gpus_per_run, args.cpus_per_run)
    return sw.LocalExecutor(args.parallel)


def _run_locked(args: argparse.Namespace, sweep: sw.Sweep, root: Path, executor: sw.SweepExecutor) -> int:
    jobs = sw.plan(sweep, args.out, resume=args.resume, smoke=args.smoke)
    if args.resume and executor.adopt_left_runs([j.run_dir for j in jobs]):
        jobs = sw.plan(sweep, args.out, resume=True, smoke=args.smoke)  # from what the runs left
    runner = sw.SweepRunner(sweep, jobs, root, args.smoke, executor.name)
    actions = {a: sum(1 for j in jobs if j.action == a) for a in ("new", "resume", "retry", "skip")}
    print(f"sweep '{sweep.name}'{' (smoke)' if args.smoke else ''}: {len(jobs)} run(s) into {root} on "
          f"{executor.describe()}; "
          + ", ".join(f"{n} {a}" for a, n in actions.items() if n), flush=True)
    runner.write_index()
    previous = None
    if threading.current_thread() is threading.main_thread():  # `kill` of the sweep = Ctrl-C: runs stop cleanly
        previous = signal.signal(signal.SIGTERM, sw.raise_interrupt)
    try:
        executor.run(runner)
    except KeyboardInterrupt:
        for job in runner.todo:
            if job.returncode is None and job.status in ("running", "queued"):
                job.status = "interrupted"
        runner.write_index()
        print(runner.table())
        print("interrupted: continue with --resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(runner.table())
    return 0 if all(j.status in sw.DONE for j in jobs) else 1
