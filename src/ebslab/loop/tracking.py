"""Where metrics go: metrics.jsonl always, TensorBoard and W&B on request, behind one `Tracker` interface.

Every record is a flat dict with an `event` ("step", "eval", "warning") and a `step`; the scalar names are the
same everywhere (`train/loss`, `val/acc`, ...), so a TensorBoard or W&B chart and the run folder agree.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from ebslab.core.errors import UserError
from ebslab.core.runfolder import read_jsonl


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; "nan" keeps the line parseable and the fact visible
    return value


class JsonlTracker:
    """Appends one line per record and flushes it, so a killed run keeps every line it wrote."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: one line and the way back (a torn last line is skipped on resume)
            from ebslab.core.files import storage_error

            raise storage_error(self.path, e, self.path.parent) from None

    def close(self) -> None:
        self.file.close()


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume: drop lines logged after the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    from ebslab.core.files import atomic_write_text

    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= after_step]
    # durable: a power cut right after the resume must not leave an empty or half-written log
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class Trackers:
    """Fan-out to several trackers; a broken optional tracker never stops training."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, record: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log(record)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


class NullTracker:
    """For processes other than the main one: they log nothing."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any]) -> Trackers:
    trackers: list[Tracker] = [JsonlTracker(run_dir / "metrics.jsonl")]
    for name in names:
        if name != "jsonl":
            trackers.append(OPTIONAL_TRACKERS[name](run_dir, config))
    return Trackers(trackers)


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    """The record's scalars (`train/loss`, `val/acc`, `lr`, ...): numbers only, without `step` and `event`."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Scalars under run_dir/tensorboard, named as in metrics.jsonl, at global step = the optimizer step."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an optional dependency
            raise UserError("track: tensorboard needs the tensorboard package: "
                              "pip install 'ebslab[track]'") from e
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), flush_secs=30)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for name, value in _numeric(record).items():
            self.writer.add_scalar(name, value, global_step=step)
        if record.get("event") != "step":
            self.writer.flush()  # evaluations are rare and matter: on disk now

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in run_dir/wandb; offline unless WANDB_MODE says otherwise. A sweep sets project, group, name."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError as e:  # wandb is an optional dependency
            raise UserError("track: wandb needs the wandb package: pip install 'ebslab[track]'") from e
        from ebslab.core.files import atomic_write_text

        run_dir = Path(run_dir)
        # the run folder remembers its W&B run: `--resume` continues that run instead of starting a second one
        # (steps re-done after the checkpoint log the same values again: the run is deterministic)
        id_file = run_dir / "wandb" / "ebslab-run-id"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B run ids are short [a-z0-9] strings
            id_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(id_file, run_id)
        self.run = wandb.init(
            dir=str(run_dir), config=config, id=run_id, resume="allow",
            project=os.environ.get("WANDB_PROJECT", "ebslab"),
            group=os.environ.get("WANDB_RUN_GROUP"),
            name=os.environ.get("WANDB_NAME", run_dir.name),
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="finish_previous",
        )

    def log(self, record: dict[str, Any]) -> None:
        values = _numeric(record)
        if values:
            self.run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


# name -> factory(run_dir, config) for `track: [tensorboard, wandb]`
OPTIONAL_TRACKERS: dict[str, Any] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def check_trackers(names: list[str]) -> None:
    """Refuse a tracker whose package is missing before the run folder exists (not halfway into it)."""
    import importlib.util

    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in names and importlib.util.find_spec(module) is None:
            raise UserError(f"track: {name} needs the {module} package: pip install 'ebslab[track]', "
                            f"or drop {name} from track")
