"""What a job's commits cost: a ring of 3 agents on loopback (digits shards, --split even, so every rotation
swaps), the same job run --repeats times; per run the job's seconds, its training seconds (passes only)
and, where the code reports it, its commit seconds (swaps, checkpoints, replicas, journal); the medians.

Written to be run on two revisions by scripts/compare_revisions.py (it imports only what the older one
has too: give this file's absolute path), which reports the paired ratio of each figure:

    python scripts/compare_revisions.py 1cd3da8 --rounds 3 -- $PWD/scripts/bench_commit.py --width 1024

Usage: python scripts/bench_commit.py [--epochs E] [--width W] [--depth D] [--repeats R] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics

from peer.localring import LocalRing, train_cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    job = ["--epochs", str(args.epochs), "--split", "even", "--momentum", "0.9",
           "--model-options", f"depth={args.depth},width={args.width}"]
    runs = []
    with LocalRing([["--data", "digits", "--shard", f"{k}/3"] for k in range(3)]) as ring:
        for _ in range(args.repeats):
            proc = train_cli(ring.ring_order()[0].url, *job)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-2000:])
            s = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.append({"seconds": s["seconds"], "train_seconds": s["samples"] / s["samples_per_s"],
                         "commit_seconds": s.get("commit_seconds"), "passes": s["passes"]})
    res = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "train_seconds", "passes")}
    if all(r["commit_seconds"] is not None for r in runs):
        res["commit_seconds"] = statistics.median(r["commit_seconds"] for r in runs)
        res["commit_s_per_pass"] = res["commit_seconds"] / res["passes"]
    res.update(width=args.width, depth=args.depth, epochs=args.epochs)
    print(json.dumps(res) if args.json else json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
