"""The agent's state directory: its stable peer id, a lock against two agents sharing it, and
atomic checkpoints."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
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


class StaleJournal(SplitringError, RuntimeError):
    """A journal older than the one a peer holds."""


def journal_order(j: dict) -> tuple[int, int]:
    """Which of two journals of a job is newer: the later commit, then the later attempt."""
    return (-1 if j["version"] is None else j["version"], j["attempt"])


REPLICA_PART = 16 << 20   # bytes of a checkpoint per replica_put: neither end holds a whole checkpoint's bytes


def write_atomic(path: Path, data: bytes | None = None, write=None) -> None:
    """Write `data` (or call write(file)) to a temporary file, fsync, rename, fsync the directory: readers
    see old or new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        if write is None:
            f.write(data)
        else:
            write(f)
        f.flush()
        os.fsync(f.fileno())
    rename_durably(tmp, path)


def rename_durably(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read a piece at a time."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    # jobs/JOB/stage-VaA.pt: this peer's stage as of the job's commit number V, made by attempt A of the job;
    # replica-PEER-VaA.pt: another peer's, byte for byte; journal.json: the job's last commit as the
    # coordinator recorded it. A version is deleted only once a journal naming a later commit is here: that
    # journal exists only after every peer of the job wrote its checkpoint (and replica) of that later commit,
    # so the ring always holds one whole version. Each attempt writes files of its own: a resumed job never
    # rewrites a file a journal may name, even when an earlier attempt's peer wakes up and goes on writing.
    def job_dir(self, job: str) -> Path:
        if not JOB_ID.fullmatch(job):
            raise ValueError(f"not a job id: {job!r}")
        return self.root / "jobs" / job

    def checkpoint_path(self, job: str, version: int, attempt: int, owner: str | None = None) -> Path:
        """This peer's checkpoint of a commit, or with `owner` the replica of that peer's."""
        if owner is None:
            return self.job_dir(job) / f"stage-{int(version)}a{int(attempt)}.pt"
        if not PEER_ID.fullmatch(owner):
            raise ValueError(f"not a peer id: {owner!r}")
        return self.job_dir(job) / f"replica-{owner}-{int(version)}a{int(attempt)}.pt"

    def save_checkpoint(self, job: str, version: int, attempt: int, payload: dict) -> tuple[Path, str]:
        """(path, sha256 of the file) of this peer's checkpoint, written atomically (straight to the file: no
        copy of its bytes in memory)."""
        path = self.checkpoint_path(job, version, attempt)
        write_atomic(path, write=lambda f: torch.save(payload, f))
        return path, file_sha256(path)

    def pending_path(self, job: str, rotation: int, attempt: int, layer: int) -> Path:
        return self.job_dir(job) / f"pending-{int(rotation)}a{int(attempt)}-{int(layer)}.pt"

    def save_pending(self, job: str, rotation: int, attempt: int, layer: int, state: dict) -> None:
        """A layer received in a swap, kept on disk until the commit (a stage at its memory budget)."""
        path = self.pending_path(job, rotation, attempt, layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)

    def load_pending(self, job: str, rotation: int, attempt: int, layer: int) -> dict:
        """That layer, once (its file is removed)."""
        path = self.pending_path(job, rotation, attempt, layer)
        state = torch.load(path, weights_only=True)
        path.unlink()
        return state

    def save_replica(self, job: str, owner: str, version: int, attempt: int, offset: int, size: int, data,
                     digest: str) -> tuple[int, str | None]:
        """Keep another peer's checkpoint of `size` bytes, sent a piece at a time (`data`, a bytes-like
        object, from byte `offset`; a transfer starts again at 0). Returns (bytes here, sha256 of the kept
        file once all have come, its sender checks it; else None); refuses it if that is not `digest`."""
        path = self.checkpoint_path(job, version, attempt, owner)
        part = path.with_name(f".{path.name}.part")
        here = part.stat().st_size if offset and part.exists() else 0
        if size < 1 or offset != here or offset + len(data) > size:
            raise ValueError(f"a piece of {len(data)} bytes at byte {offset} of a {size}-byte replica of peer "
                             f"{owner}'s checkpoint, with {here} bytes of it here")
        part.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "ab" if offset else "wb") as f:
            f.write(data)
            f.flush()
            if offset + len(data) == size:
                os.fsync(f.fileno())
        if offset + len(data) < size:
            return offset + len(data), None
        got = file_sha256(part)
        if got != digest:
            part.unlink()
            raise CorruptFile(f"the replica of peer {owner}'s checkpoint of commit {version} does not match "
                              f"its checksum")
        rename_durably(part, path)
        return size, got

    def load_checkpoint(self, job: str, version: int, attempt: int, digest: str, owner: str | None = None) -> dict:
        """A checkpoint (or replica), refused unless its bytes match the sha256 the journal recorded."""
        path = self.checkpoint_path(job, version, attempt, owner)
        try:
            ok = file_sha256(path) == digest
        except FileNotFoundError:
            raise CorruptFile(f"{path} is missing") from None
        if not ok:
            raise CorruptFile(f"{path} does not match the checksum its journal recorded")
        return torch.load(path, weights_only=True)

    def save_journal(self, job: str, record: dict) -> None:
        """Write the job's journal atomically, then delete the versions older than its commit. A journal of
        an older commit than the one here is refused (a coordinator that lost the job to another)."""
        here = self.journal(job)
        if here is not None and journal_order(record) < journal_order(here):
            raise StaleJournal(f"job {job}: this peer's journal is of commit {here['version']} (attempt "
                               f"{here['attempt']}), newer than commit {record['version']} (attempt "
                               f"{record['attempt']})")
        write_atomic(self.job_dir(job) / "journal.json", json.dumps(record).encode())
        if record.get("version") is not None:
            self.drop_versions(job, before=record["version"])

    def prune_jobs(self, keep: int) -> None:
        """Delete the files of all but the newest `keep` finished jobs (done or failed): a job that may still be
        resumed (running, stopped, held) keeps its files."""
        finished = [j for j in self.journals() if j["state"] in ("done", "failed")]
        for j in finished[keep:]:
            shutil.rmtree(self.job_dir(j["job"]), ignore_errors=True)

    def drop_versions(self, job: str, before: int) -> None:
        """Delete this job's checkpoints and replicas of commits before `before`."""
        for f in self.job_dir(job).glob("*.pt"):
            version = f.stem.rsplit("-", 1)[-1].split("a")[0]
            if version.isdigit() and int(version) < before:
                f.unlink(missing_ok=True)

    def journal(self, job: str) -> dict | None:
        """The job's journal here (None if there is none, or it is not one)."""
        try:
            journal = json.loads((self.job_dir(job) / "journal.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return journal if journal_problem(journal) is None else None

    def journals(self) -> list[dict]:
        """Every job journal in this state dir, newest first."""
        files = sorted((self.root / "jobs").glob("*/journal.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        found = (self.journal(f.parent.name) if JOB_ID.fullmatch(f.parent.name) else None for f in files)
        return [j for j in found if j is not None]

    def model_path(self, job: str) -> Path | None:
        """Where a finished job's model lives (None for a job id that is not one: no path from a request)."""
        return self.root / "models" / f"{job}.pt" if JOB_ID.fullmatch(job) else None

    def save_model(self, job: str, state_dict: dict, keep: int, keep_s: float) -> Path:
        """Write a finished model, then delete all but the newest `keep` models and any older than `keep_s`."""
        path = self.model_path(job)
        write_atomic(path, write=lambda f: torch.save(state_dict, f))
        prune(path.parent, "*.pt", keep, keep_s)
        return path

    def close(self) -> None:
        self._lock.close()


JOURNAL_STATES = ("running", "stopped", "failed", "done")


def journal_problem(j) -> str | None:
    """What makes `j` not a job journal as peer.coordinator writes it (None: nothing)."""
    def opt_int(v):
        return v is None or (type(v) is int and v >= 0)
    checks = [
        (isinstance(j, dict), "a journal is a map"),
        (isinstance(j, dict) and isinstance(j.get("job"), str) and JOB_ID.fullmatch(j["job"]) is not None,
         "job must be a job id"),
        (isinstance(j, dict) and j.get("state") in JOURNAL_STATES, f"state must be one of {JOURNAL_STATES}"),
        (isinstance(j, dict) and opt_int(j.get("version", -1)) and opt_int(j.get("rotation", -1))
         and opt_int(j.get("commit_attempt")), "version, rotation and commit_attempt must be integers >= 0 or null"),
        (isinstance(j, dict) and type(j.get("attempt")) is int and isinstance(j.get("coordinator"), str)
         and isinstance(j.get("config"), dict) and isinstance(j.get("ring"), list)
         and isinstance(j.get("checksums"), dict) and isinstance(j.get("updated"), int | float),
         "attempt, coordinator, config, ring, checksums and updated are required"),
    ]
    return next((text for ok, text in checks if not ok), None)


def audit(root: str | os.PathLike, job: str) -> list[str]:
    """What is wrong with a job's files in one agent's state dir (nothing: []): the journal must load; the
    checkpoint of its last commit and every replica of that commit must match the checksum it records; every
    checkpoint file must load."""
    folder = Path(root) / "jobs" / job
    try:
        journal = json.loads((folder / "journal.json").read_text())
    except (OSError, ValueError) as e:
        return [f"{folder}/journal.json: {e}"]
    problems = []
    version, sums = journal.get("version"), journal.get("checksums", {})
    tag = f"{version}a{journal.get('commit_attempt')}"
    me = (Path(root) / "peer_id").read_text().strip()
    for f in sorted(folder.glob("*.pt")):
        try:
            torch.load(f, weights_only=True)
        except Exception as e:   # a file that does not load, whatever torch says about it
            problems.append(f"{f}: does not load ({e})")
            continue
        owner = me if f.name.startswith("stage-") else f.name.removeprefix("replica-").rsplit("-", 1)[0]
        if version is not None and f.stem.endswith(f"-{tag}") and owner in sums and \
                file_sha256(f) != sums[owner]:
            problems.append(f"{f}: does not match the checksum the journal records")
    if version is not None and me in sums and not (folder / f"stage-{tag}.pt").exists():
        problems.append(f"{folder}/stage-{tag}.pt: missing")
    return problems
