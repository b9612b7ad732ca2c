"""Atomic files and checkpoints: safetensors for tensors, JSON for the rest, never pickle.

A checkpoint folder is written beside its target, fsynced, then swapped in by rename; the previous one is
kept until the new one is complete, so a kill at any moment leaves one good checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): store a private copy of each
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        key = v.untyped_storage().data_ptr() if v.numel() else id(v)
        out[k] = v.detach().to("cpu").clone().contiguous() if key in seen else v.detach().to("cpu").contiguous()
        seen.add(key)
    return out


class AtomicDir:
    """`with AtomicDir(target) as tmp:` write into tmp; on success tmp replaces target, else target is untouched."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.tmp = self.target.with_name(f".{self.target.name}.tmp")
        self.old = self.target.with_name(f".{self.target.name}.old")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for f in self.tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(self.tmp)
        shutil.rmtree(self.old, ignore_errors=True)
        if self.target.exists():
            os.replace(self.target, self.old)
        os.replace(self.tmp, self.target)
        _fsync_dir(self.target.parent)
        shutil.rmtree(self.old, ignore_errors=True)


def resolve_checkpoint(target: Path) -> Path | None:
    """The complete checkpoint at `target`, or the previous one if a kill fell between the two renames."""
    target = Path(target)
    for candidate in (target, target.with_name(f".{target.name}.old")):
        if (candidate / "model.safetensors").exists():
            return candidate
    return None


def save_weights(model: nn.Module, folder: Path) -> None:
    save_file(_contiguous_state(model), str(folder / "model.safetensors"))


def load_weights(model: nn.Module, folder: Path) -> None:
    state = load_file(str(Path(folder) / "model.safetensors"))
    model.load_state_dict(state)


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
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(checkpoints: Path, model: nn.Module, optimizer: Any, scheduler: Any,
              trainer_state: dict[str, Any]) -> None:
    with AtomicDir(checkpoints / "last") as tmp:
        save_weights(model, tmp)
        tensors: dict[str, torch.Tensor] = {}
        structure = {
            "optimizer": _split_state(optimizer.state_dict(), "optimizer", tensors),
            "scheduler": _split_state(scheduler.state_dict(), "scheduler", tensors),
            "rng": _split_state(rng_state(), "rng", tensors),
        }
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(structure))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))


def load_last(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG in place; return the trainer state."""
    load_weights(model, folder)
    tensors = load_file(str(folder / "optimizer.safetensors"))
    structure = json.loads((folder / "optimizer.json").read_text())
    optimizer.load_state_dict(_join_state(structure["optimizer"], tensors))
    scheduler.load_state_dict(_join_state(structure["scheduler"], tensors))
    set_rng_state(_join_state(structure["rng"], tensors))
    return json.loads((folder / "trainer_state.json").read_text())
