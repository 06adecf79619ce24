"""The agent's state directory: its stable peer id, a lock against two agents sharing it, and
atomic checkpoints."""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import time
from pathlib import Path

import torch
from protocols.errors import SplitringError


JOB_ID = re.compile(r"[0-9a-f]{12}")
PEER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class StateDirInUse(SplitringError, RuntimeError):
    pass


class CorruptFile(SplitringError, RuntimeError):
    """A checkpoint, replica or journal that is missing or does not match its recorded checksum."""


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

    # --- a job's durable state: versioned checkpoints, replicas, the journal ---------------------------
    # jobs/JOB/stage-R.pt: this peer's stage as committed for rotation R; replica-PEER-R.pt: another peer's,
    # byte for byte; journal.json: the job's last commit as the coordinator recorded it. A version is deleted
    # only once a journal naming a later commit is here: that journal exists only after every peer of the
    # job wrote its checkpoint (and replica) of that later commit, so the ring always holds one whole version.
    def job_dir(self, job: str) -> Path:
        if not JOB_ID.fullmatch(job):
            raise ValueError(f"not a job id: {job!r}")
        return self.root / "jobs" / job

    def checkpoint_path(self, job: str, rotation: int, owner: str | None = None) -> Path:
        """This peer's checkpoint of a rotation, or with `owner` the replica of that peer's."""
        if owner is None:
            return self.job_dir(job) / f"stage-{int(rotation)}.pt"
        if not PEER_ID.fullmatch(owner):
            raise ValueError(f"not a peer id: {owner!r}")
        return self.job_dir(job) / f"replica-{owner}-{int(rotation)}.pt"

    def save_checkpoint(self, job: str, rotation: int, payload: dict) -> tuple[Path, str]:
        """(path, sha256 of the file) of this peer's checkpoint, written atomically."""
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        path = self.checkpoint_path(job, rotation)
        write_atomic(path, data)
        return path, hashlib.sha256(data).hexdigest()

    def save_replica(self, job: str, owner: str, rotation: int, data: bytes, digest: str) -> Path:
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptFile(f"the replica of peer {owner}'s checkpoint of rotation {rotation} does not match "
                              f"its checksum")
        path = self.checkpoint_path(job, rotation, owner)
        write_atomic(path, data)
        return path

    def load_checkpoint(self, job: str, rotation: int, digest: str, owner: str | None = None) -> dict:
        """A checkpoint (or replica), refused unless its bytes match the sha256 the journal recorded."""
        path = self.checkpoint_path(job, rotation, owner)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptFile(f"{path} is missing") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptFile(f"{path} does not match the checksum its journal recorded")
        return torch.load(io.BytesIO(data), weights_only=True)

    def save_journal(self, job: str, record: dict) -> None:
        """Write the job's journal atomically, then delete the versions older than its commit."""
        write_atomic(self.job_dir(job) / "journal.json", json.dumps(record).encode())
        if record.get("rotation") is not None:
            self.drop_versions(job, before=record["rotation"])

    def drop_versions(self, job: str, before: int) -> None:
        """Delete this job's checkpoints and replicas of rotations before `before`."""
        for f in self.job_dir(job).glob("*.pt"):
            version = f.stem.rsplit("-", 1)[-1]
            if version.isdigit() and int(version) < before:
                f.unlink(missing_ok=True)

    def journal(self, job: str) -> dict | None:
        try:
            return json.loads((self.job_dir(job) / "journal.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def journals(self) -> list[dict]:
        """Every job journal in this state dir, newest first."""
        files = sorted((self.root / "jobs").glob("*/journal.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        out = []
        for f in files:
            try:
                out.append(json.loads(f.read_text()))
            except ValueError:
                continue
        return out

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
