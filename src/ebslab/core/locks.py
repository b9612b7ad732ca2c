"""One writer per folder: a sweep folder, a run folder, a search study folder.

The lock is an advisory `flock` on `FOLDER/.ebslab.lock`, which holds the holder's pid, host and command for
the message a second process prints. The kernel drops a flock when its process dies however it dies (SIGKILL,
OOM, power loss of a client on NFSv4), so a lock file left by a dead process is simply taken over: there is no
pid-liveness guess to get wrong, and no stale file to delete by hand.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ebslab.core.errors import UserError

LOCK_NAME = ".ebslab.lock"


class FolderLock:
    """`with FolderLock(folder, "sweep"):` - exclusive use of `folder` (created if missing) until exit."""

    def __init__(self, folder: Path, what: str):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(read_holder(fd))
            os.close(fd)
            raise UserError(f"{self.what} folder '{self.folder}' is in use by {holder}; wait for it to end or "
                            f"stop it first (a lock left by a process that died is taken over)") from None
        # ours now: the previous holder's text (a dead process's) is replaced by this process's
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                                 "command": " ".join(sys.argv)[:500],
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # the file stays (deleting it would race a waiting acquirer); the text goes
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *_: Any) -> None:
        self.release()


def read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if "pid" not in holder:
        return "another process (it has not written its pid yet)"
    where = f" on {holder['host']}" if holder.get("host") and holder["host"] != socket.gethostname() else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder['pid']}{where}{command}, since {holder.get('since', '?')}"
