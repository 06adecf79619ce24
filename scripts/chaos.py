"""Chaos: jobs on a real ring of agents (loopback only), each with one peer SIGKILLed at a seeded random
moment and restarted with its state dir. Every job must finish with the model plain PyTorch gives over the
same samples (to 1e-5), and leave no checkpoint, replica or journal that fails to load or to match its
checksum (peer.state.audit).

A killed worker is recovered by its coordinator (rollback to the last commit, rejoin). A killed
coordinator ends the train command; the job is resumed from another peer with `splitring train --resume`.
Recovery seconds: from the kill to the job's next commit recorded in a survivor's journal (averaged over
the jobs killed before their last commit: `recovered`).

Usage: python scripts/chaos.py [--jobs 10] [--seed 0] [--peers 3] [--scheme nsplit|fast] [--json]
Bounded: each job is given --job-timeout seconds (default 180); loopback only (mDNS on 127.0.0.1).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peer.localring import LocalRing, train_cli  # noqa: E402
from peer.state import audit  # noqa: E402
from pipeline import data, reference  # noqa: E402
from pipeline.config import JobConfig  # noqa: E402

JOB = {"epochs": 4, "batch_size": 24, "lr": 0.05, "momentum": 0.9, "seed": 5, "split": "even", "peer_timeout": 3.0}


def cli_args(cfg: dict) -> list[str]:
    return [a for k, v in cfg.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def committed(root: Path, job: str) -> int:
    try:
        version = json.loads((root / "jobs" / job / "journal.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return -1
    return -1 if version is None else version


def stages(agent) -> list[dict]:
    try:
        return agent.status()["stages"]
    except OSError:
        return []


def one_job(ring: LocalRing, rng: random.Random, args, out: Path) -> dict:
    """Start a job, kill a peer at a random moment, restart it, see the job to its end."""
    order = ring.ring_order()
    coordinator, victim = order[0], rng.choice(order)
    # a moment before the last pass, so that there is something left to recover
    at_rotation, delay = rng.randint(1, JOB["epochs"] * len(order) - 3), rng.uniform(0, 0.2)
    extra = ["--scheme", args.scheme] + (["--microbatches", "3"] if args.scheme == "fast" else [])
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(proc=train_cli(
        coordinator.url, *cli_args(JOB), *extra, "--out", str(out), timeout=args.job_timeout)))
    thread.start()
    deadline, job = time.monotonic() + args.job_timeout, None
    while job is None:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the job did not reach rotation {at_rotation}: {result.get('proc')}")
        job = next((s["job"] for s in stages(victim) if s["rotation"] >= at_rotation), None)
        time.sleep(0.02)
    time.sleep(delay)
    k = ring.agents.index(victim)
    survivor = ring.workdir / f"agent{ring.agents.index(next(a for a in order if a is not victim))}"
    before = committed(survivor, job)
    killed_at = time.monotonic()
    ring.kill(k)
    ring.restart(k)
    resumed = victim is coordinator
    if resumed:   # the train command ends with its coordinator; the job is resumed from another peer
        thread.join(args.job_timeout)
        other = next(a for a in order if a is not victim)
        thread = threading.Thread(target=lambda: result.update(proc=train_cli(
            other.url, "--resume", job, "--out", str(out), timeout=args.job_timeout)))
        thread.start()
    while committed(survivor, job) <= before and thread.is_alive() and time.monotonic() - killed_at < args.job_timeout:
        time.sleep(0.02)
    recovered = committed(survivor, job) > before   # else the kill came after the job's last commit
    recovery_s = time.monotonic() - killed_at if recovered else None
    thread.join(args.job_timeout)
    proc = result.get("proc")
    if proc is None:
        return {"job": job, "victim": victim.peer_id, "coordinator_killed": resumed, "at_rotation": at_rotation,
                "finished": False, "recovery_s": recovery_s, "error": f"no end within {args.job_timeout} s"}
    summary = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    return {"job": job, "victim": victim.peer_id, "coordinator_killed": resumed, "at_rotation": at_rotation,
            "finished": summary is not None, "recovery_s": recovery_s,
            "error": None if summary else proc.stderr[-1000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--scheme", choices=["nsplit", "fast"], default="nsplit")
    ap.add_argument("--job-timeout", type=float, default=180.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    shards = [f"{k}/{args.peers}" for k in range(args.peers)]
    cfg = JobConfig(**JOB, scheme=args.scheme, microbatches=3 if args.scheme == "fast" else 1)
    runs, t0 = [], time.perf_counter()
    with LocalRing([["--data", "digits", "--shard", s] for s in shards]) as ring:
        heads = [data.load("digits", shards[ring.agents.index(a)]) for a in ring.ring_order()]
        want = reference.train(cfg, heads).state_dict()
        out = ring.workdir / "model.pt"
        for _ in range(args.jobs):
            out.unlink(missing_ok=True)
            run = one_job(ring, rng, args, out)
            if run["finished"]:
                got = torch.load(out, weights_only=True)
                run["max_diff"] = max((got[k] - want[k]).abs().max().item() for k in want)
            run["corrupt_files"] = [p for k in range(len(ring.agents))
                                    for p in audit(ring.workdir / f"agent{k}", run["job"])]
            runs.append(run)
            if not args.json:
                print(json.dumps(run), file=sys.stderr)
    exact = [r for r in runs if r.get("max_diff", 1.0) <= 1e-5]
    timed = [r["recovery_s"] for r in runs if r["recovery_s"] is not None]
    res = {"jobs": len(runs), "finished": sum(r["finished"] for r in runs), "exact": len(exact),
           "corrupt_files": sum(len(r["corrupt_files"]) for r in runs),
           "mean_recovery_seconds": sum(timed) / max(len(timed), 1), "recovered": len(timed),
           "coordinators_killed": sum(r["coordinator_killed"] for r in runs), "scheme": args.scheme,
           "peers": args.peers, "seed": args.seed, "seconds": time.perf_counter() - t0, "runs": runs}
    print(json.dumps(res) if args.json else json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
