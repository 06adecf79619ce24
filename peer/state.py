"""The agent's state directory: its stable peer id, a lock against two agents sharing it, and
atomic checkpoints."""
from __future__ import annotations

import fcntl
import io
import os
import secrets
from pathlib import Path

import torch


class StateDirInUse(RuntimeError):
    pass


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, rename, fsync the directory: readers see old or new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / "lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateDirInUse(f"state dir {self.root} is used by another running agent") from None
        self.peer_id = self._peer_id()

    def _peer_id(self) -> str:
        path = self.root / "peer_id"
        if path.exists():
            text = path.read_text().strip()
            if text:
                return text
        pid = secrets.token_hex(6)
        write_atomic(path, pid.encode())
        return pid

    def checkpoint_path(self, job: str) -> Path:
        return self.root / "jobs" / job / "stage.pt"

    def save_checkpoint(self, job: str, payload: dict) -> Path:
        buf = io.BytesIO()
        torch.save(payload, buf)
        path = self.checkpoint_path(job)
        write_atomic(path, buf.getvalue())
        return path

    def close(self) -> None:
        self._lock.close()
