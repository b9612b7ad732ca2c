"""Atomic files and checkpoints: safetensors for tensors, JSON for the rest, never pickle.

A checkpoint folder is written beside its target, fsynced, then swapped in by rename; the previous one is
kept until the new one is complete, so a kill at any moment leaves one good checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ebslab.core.config import default_flat, flatten
from ebslab.core.errors import UserError
from ebslab.core.files import StorageError, fsync_dir, storage_error
from ebslab.core.runfolder import read_trainer_state

LAST_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json")
# config keys that may change between a checkpoint and its resume: they move or relabel a run, never its numbers
RESUME_SAFE_KEYS = {"out.dir", "out.name", "track", "eval.batch_size", "checkpoint.every_steps",
                    "train.log_every_steps", "train.gns", "train.device", "train.backend", "train.compile",
                    "batch.auto_cap", "batch.auto_cpu_tokens"}


def _contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): store a private copy of each
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        key = v.untyped_storage().data_ptr() if v.numel() else id(v)
        out[k] = v.detach().to("cpu").clone().contiguous() if key in seen else v.detach().to("cpu").contiguous()
        seen.add(key)
    return out


def io_error(exc: BaseException) -> OSError | None:
    """The OSError behind an exception: itself, or the one safetensors (Rust) reports only in its message
    ("I/O error: No space left on device (os error 28)"). None for any other error."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, SafetensorError):
        found = re.search(r"os error (\d+)", str(exc))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        if "I/O error" in str(exc):
            return OSError(errno.EIO, str(exc).split("I/O error:", 1)[-1].strip())
    return None


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as the OSError they are."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as e:
        err = io_error(e)
        if err is None:
            raise
        raise err from None


class AtomicDir:
    """`with AtomicDir(target) as tmp:` write into tmp; on success tmp replaces target, else target is untouched.

    Commit: target -> .old, tmp -> target, drop .old. A kill between the two renames leaves .old complete
    (resolve_checkpoint finds it), and the next commit keeps that .old until its own tmp is in place.
    A full disk (any OSError) removes tmp and raises StorageError; the previous checkpoint stays."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.tmp = self.target.with_name(f".{self.target.name}.tmp")
        self.old = self.target.with_name(f".{self.target.name}.old")

    def __enter__(self) -> Path:
        try:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
        except OSError as e:
            raise self._error(e) from None
        return self.tmp

    def _error(self, e: OSError) -> StorageError:
        run_dir = self.target.parent.parent if self.target.parent.name == "checkpoints" else None
        return storage_error(self.target, e, run_dir if run_dir and resolve_checkpoint(self.target) else None)

    def __exit__(self, exc_type: Any, exc: Any, _tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            err = io_error(exc)
            if err is not None:
                raise self._error(err) from None
            return
        try:
            for f in self.tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(self.tmp)
            if self.target.exists():
                shutil.rmtree(self.old, ignore_errors=True)
                os.replace(self.target, self.old)
            # else: a kill fell between the renames last time; .old is the only good copy until tmp is in place
            os.replace(self.tmp, self.target)
            fsync_dir(self.target.parent)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise self._error(e) from None
        except BaseException:  # a second Ctrl-C during the fsyncs: the previous checkpoint (or .old) stays the good one
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.old, ignore_errors=True)


def resolve_checkpoint(target: Path) -> Path | None:
    """The complete checkpoint at `target`, or the previous one if a kill fell between the two renames."""
    target = Path(target)
    files = LAST_FILES if target.name == "last" else ("model.safetensors",)
    for candidate in (target, target.with_name(f".{target.name}.old")):
        if all((candidate / f).is_file() for f in files):
            return candidate
    return None


def save_weights(model: nn.Module, folder: Path) -> None:
    _save_file(_contiguous_state(model), folder / "model.safetensors")


def load_weights(model: nn.Module, folder: Path) -> None:
    folder = resolve_checkpoint(folder) or Path(folder)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))


def _link_weights(source: Path, folder: Path) -> bool:
    """Hard-link source's complete weights file into folder; False (write it instead) where that can't be done:
    no complete source, or a filesystem without hard links."""
    source = resolve_checkpoint(source)
    if source is None:
        return False
    try:
        os.link(source / "model.safetensors", folder / "model.safetensors")
        return True
    except OSError:
        return False


def save_best(model: nn.Module, checkpoints: Path) -> None:
    with AtomicDir(checkpoints / "best") as tmp:
        save_weights(model, tmp)


# ----------------------------------------------------------------------------------------------------------
# Optimizer and RNG state without pickle


def _split_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference into `tensors`."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {"__dict__": [[k, _split_state(v, f"{prefix}.{k}", tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        return [_split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
    return state


def _join_state(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, dict) and "__tensor__" in state:
        return tensors[state["__tensor__"]]
    if isinstance(state, dict) and "__dict__" in state:
        return {k: _join_state(v, tensors) for k, v in state["__dict__"]}
    if isinstance(state, list):
        return [_join_state(v, tensors) for v in state]
    return state


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # this process's device only: a resume may see fewer GPUs than the run that saved (every visible device's
        # state would not fit), and each rank keeps its own in rng_per_rank anyway
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints that saved every visible device's state
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)


def save_last(checkpoints: Path, model: nn.Module, optimizer: Any, scheduler: Any,
              trainer_state: dict[str, Any], config: dict[str, Any] | None = None,
              rng_per_rank: list[dict[str, Any]] | None = None, weights_from: Path | None = None) -> None:
    """Weights, optimizer, scheduler, every RNG state, counters; `config` (the resolved config, without derived
    values) lets a resume refuse a config.yaml edited since. `weights_from`: a checkpoint folder that holds these
    same weights (best/, written at this step); its file is hard-linked, not written again. Safe because no
    checkpoint file is ever modified in place: a later best/ or last/ is a new folder swapped in by rename."""
    with AtomicDir(checkpoints / "last") as tmp:
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if not (weights_from is not None and _link_weights(weights_from, tmp)):
            save_weights(model, tmp)
        tensors: dict[str, torch.Tensor] = {}
        structure = {
            "optimizer": _split_state(optimizer.state_dict(), "optimizer", tensors),
            "scheduler": _split_state(scheduler.state_dict(), "scheduler", tensors),
            # one entry per process: each rank's dropout stream (and its GPU's) continues where it stopped
            "rng": _split_state(rng_per_rank or [rng_state()], "rng", tensors),
        }
        _save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(structure))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))


def check_config(folder: Path, config: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume when config.yaml changed (beyond RESUME_SAFE_KEYS) since the checkpoint was written."""
    path = Path(folder) / "config.json"
    if not path.is_file():  # a checkpoint written before configs were stored in it
        return
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError):
        raise UserError(f"cannot resume '{run_dir}': its checkpoint is damaged ({path.name} unreadable); "
                        "start the run again with --overwrite") from None
    saved, now = flatten(saved), flatten(config)  # without `derived`: it follows from the config and the data
    # a key added to ebslab after the checkpoint was written is no change while it keeps its default (the
    # behaviour the run had); set to anything else, it is
    defaults = default_flat()
    changed = [k for k in sorted(set(saved) | set(now)) if k not in RESUME_SAFE_KEYS and saved.get(k) != now.get(k)
               and not (k not in saved and k in defaults and now.get(k) == defaults[k])]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        raise UserError(f"cannot resume '{run_dir}': config.yaml changed since its checkpoint ({diffs}); undo "
                        "the edit, or start a new run with the new config")


def load_last(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, rank: int = 0) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG in place; return the trainer state.

    A checkpoint that does not fit (another model or optimizer) or is damaged is a UserError, not a traceback."""
    folder = Path(folder)
    run_dir = folder.parent.parent
    try:
        tensors = load_file(str(folder / "optimizer.safetensors"))
        structure = json.loads((folder / "optimizer.json").read_text())
        trainer_state = read_trainer_state(folder)
        weights = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot resume '{run_dir}': its checkpoint {folder.name}/ is damaged ({first}); start "
                        "the run again with --overwrite") from None
    try:
        model.load_state_dict(weights)
        optimizer.load_state_dict(_join_state(structure["optimizer"], tensors))
        scheduler.load_state_dict(_join_state(structure["scheduler"], tensors))
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"cannot resume '{run_dir}': its checkpoint does not fit the model/optimizer of "
                        f"config.yaml ({first[:200]}); undo the config change or start a new run") from None
    rngs = _join_state(structure["rng"], tensors)
    rngs = rngs if isinstance(rngs, list) else [rngs]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return trainer_state
