"""Throughput of the remote backward against fast-async and Fast N-split, in one run, on 3 agents.

Same model and samples as bench_pipeline.py (MLP, 8 hidden layers of width 1024, batch 256, 8
microbatches), split evenly over a fixed-order ring of 3 agents with 1 thread each; the first holds the
data. These machines have 2 cores, so 3 agents share them: compare the configurations with each other
and with the single-process baseline measured in the same run, not with bench_pipeline's 2-agent figures.
  single_1thread_sps         plain PyTorch, one process, 1 thread
  fast_sps                   Fast N-split (1F1B, a flush per step)
  fast_async_sps             fast-async, --max-staleness 1 (weight stashing on each stage's owner)
  remote_backward_sps        fast-async, --max-staleness 1, --backward-at 1:2: the middle stage only
                             forwards; its backward and optimizer run on the tail's peer
With --repeats R every throughput is the best of R runs.
Usage: python scripts/bench_remote_backward.py [--json] [--steps N] [--repeats R]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import BATCH, DEPTH, MICRO, WIDTH, single, splitring  # noqa: E402

CONFIGS = {"fast": ("fast",), "fast_async": ("fast-async",),
           "remote_backward": ("fast-async", "--backward-at", "1:2")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runs = range(args.repeats)
    res = {"single_1thread_sps": max(single(args.steps) for _ in runs)}
    for name, (scheme, *extra) in CONFIGS.items():
        best = max((splitring(args.steps, scheme, 3, "--split", "even", *extra) for _ in runs),
                   key=lambda s: s["samples_per_s"])
        res[f"{name}_sps"] = best["samples_per_s"]
        res[f"{name}_vs_single"] = best["samples_per_s"] / res["single_1thread_sps"]
        if scheme == "fast-async":
            res[f"{name}_max_staleness"] = max(best["staleness"])
    res.update(steps=args.steps, repeats=args.repeats, batch=BATCH, microbatches=MICRO, width=WIDTH, depth=DEPTH,
               agents=3)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:30s} {v:.3f}" if isinstance(v, float) else f"{k:30s} {v}")


if __name__ == "__main__":
    main()
