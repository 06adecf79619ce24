"""The agent's state directory: its stable peer id, a lock against two agents sharing it, and
atomic checkpoints."""
from __future__ import annotations

import fcntl
import io
import os
import re
import secrets
import time
from pathlib import Path

import torch
from protocols.errors import SplitringError


JOB_ID = re.compile(r"[0-9a-f]{12}")


class StateDirInUse(SplitringError, RuntimeError):
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


def prune(folder: Path, pattern: str, keep: int, keep_s: float = float("inf")) -> None:
    """Delete all but the newest `keep` files matching `pattern` in `folder`, and any older than keep_s."""
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    now = time.time()
    for i, old in enumerate(files):
        if i >= keep or now - old.stat().st_mtime > keep_s:
            old.unlink(missing_ok=True)


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

    def model_path(self, job: str) -> Path | None:
        """Where a finished job's model lives (None for a job id that is not one: no path from a request)."""
        return self.root / "models" / f"{job}.pt" if JOB_ID.fullmatch(job) else None

    def save_model(self, job: str, state_dict: dict, keep: int, keep_s: float) -> Path:
        """Write a finished model, then delete all but the newest `keep` models and any older than `keep_s`."""
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        path = self.model_path(job)
        write_atomic(path, buf.getvalue())
        prune(path.parent, "*.pt", keep, keep_s)
        return path

    def close(self) -> None:
        self._lock.close()
