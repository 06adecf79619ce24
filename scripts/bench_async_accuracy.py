"""Held-out accuracy of fast-async against synchronous Fast N-split on digits, over several seeds.

The same code as the agents (pipeline.local drives the stage programs in one process): a ring of 3
peers with one digits shard each, the default MLP split evenly, SGD with momentum, 4 microbatches.
Prints per-seed accuracies on the 360 held-out digits and the gaps, in points. With --backward-at 1:2,
fast-async runs with the middle stage's backward on the tail's peer (remote backward) instead.
Usage: python scripts/bench_async_accuracy.py [--seeds N] [--max-staleness K] [--backward-at S:H] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peer.cli.options import backward_at  # noqa: E402
from pipeline import data, local, reference  # noqa: E402
from pipeline.config import JobConfig  # noqa: E402
from pipeline.models import build_model, num_layers  # noqa: E402
from pipeline.swaps import even_split  # noqa: E402


def held_out_accuracy(cfg: JobConfig, shards: list[data.Dataset], held_out: data.Dataset) -> float:
    model = build_model(cfg.model, cfg.seed)
    model.load_state_dict(local.train(cfg, shards, even_split(num_layers(cfg.model), len(shards))))
    return 100 * reference.accuracy(model, held_out.x_test, held_out.y_test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--max-staleness", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--backward-at", type=backward_at, default=[])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shards = [data.load("digits", f"{k}/3") for k in range(3)]
    held_out = data.load("digits")
    runs = []
    for seed in range(args.seeds):
        base = JobConfig(model={"name": "mlp"}, seed=seed, epochs=args.epochs, batch_size=32, microbatches=4,
                         lr=args.lr, momentum=0.9, scheme="fast")
        sync = held_out_accuracy(base, shards, held_out)
        asyn = held_out_accuracy(JobConfig(**{**base.to_dict(), "scheme": "fast-async",
                                              "max_staleness": args.max_staleness,
                                              "backward_at": args.backward_at}), shards, held_out)
        runs.append({"seed": seed, "fast": sync, "fast_async": asyn, "gap": asyn - sync})
    gaps = [r["gap"] for r in runs]
    res = {"max_staleness": args.max_staleness, "backward_at": args.backward_at, "runs": runs,
           "mean_gap_points": sum(gaps) / len(gaps),
           "worst_gap_points": min(gaps), "within_1_point": sum(abs(g) <= 1 for g in gaps)}
    if args.json:
        print(json.dumps(res))
    else:
        for r in runs:
            print(f"seed {r['seed']}: fast {r['fast']:.2f}%  fast-async {r['fast_async']:.2f}%  gap {r['gap']:+.2f}")
        print(f"mean gap {res['mean_gap_points']:+.2f} points, worst {res['worst_gap_points']:+.2f}, "
              f"{res['within_1_point']}/{len(runs)} within 1 point")


if __name__ == "__main__":
    main()
