"""Durable files: write a temporary sibling, fsync it, rename it over the target, fsync the folder.

A kill or a power cut at any moment leaves either the old file or the new one, never half of one. No torch here:
the sweep (which never imports torch) writes its index with these too.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Callable

from ebslab.core.errors import StorageError, UserError


def storage_error(what: Path, e: OSError, run_dir: Path | None = None) -> StorageError:
    name = errno.errorcode.get(e.errno or 0, "")
    reason = f"{e.strerror or e}" + (f" [{name}]" if name else "")
    hint = (f"the previous checkpoint is intact: free space, then continue with `ebslab train --resume {run_dir}`"
            if run_dir is not None else "free space (or fix the folder's permissions) and run again")
    return StorageError(f"could not write '{what}' ({reason}); {hint}")


def check_folder_target(path: str | Path, what: str) -> None:
    """A folder can be made (or is) at `path`: it and every existing folder above it are folders, not files.
    Checked before any work: `mkdir` would fail later with NotADirectoryError / FileExistsError."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == path else f": '{p}' is a file"
                raise UserError(f"{what} '{path}' is not a folder{where}; choose a folder for {what}")
            return


def fsync_dir(path: Path) -> None:
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


def atomic_write_with(path: Path, write: Callable[[Path], None], run_dir: Path | None = None) -> None:
    """`write(tmp)` fills a temporary sibling (any writer: text, parquet, numpy), which then replaces `path`.
    `run_dir`: the run the file belongs to, so that a full disk's error names the way to resume it."""
    path = Path(path)
    # the suffix is kept (pandas and numpy pick a format or append one from it)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, e, run_dir) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
