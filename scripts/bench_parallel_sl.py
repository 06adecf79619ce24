"""Client/helper schemes on a live ring: every scheme, and the client-to-helper assignments side by side.

One ring on loopback: K clients on digits shards (the first two slowed, as weaker devices) and H helpers
(slowed too: steadier than this shared host's cores, so that schedules, not noise, decide), a model whose
part 2 dominates. For each repeat, every scheme runs once per assignment method (sl: its one helper), in
an order that rotates between repeats.

    .venv/bin/python scripts/bench_parallel_sl.py --json [--repeats 3] [--rounds 4]

--json prints one object per line and configuration with keys scheme, clients, helpers, assign,
round_seconds_measured (median over rounds after the first, which runs cold on profile-based predictions),
round_seconds_predicted (the same rounds'), round0_measured, round0_predicted, helper_busy (mean busy
fraction per helper), accuracy (last round's held-out accuracy), bytes_per_round; then one "paired" line per
scheme and method: the median, min and max over repeats of that method's mean round time divided by ours's
in the same repeat (above 1: ours is faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.localring import LocalRing, train_cli  # noqa: E402

SCHEMES = ("sl", "splitfed-v1", "splitfed-v2")


def run(ring: LocalRing, scheme: str, assign: str, args) -> dict:
    proc = train_cli(ring.urls[args.clients], "--scheme", scheme, "--assign", assign, "--rounds", str(args.rounds),
                     "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size),
                     "--model-options", args.model_options, "--cut", args.cut, "--optimizer", "adam", "--lr", "0.003")
    if proc.returncode:
        raise SystemExit(f"{scheme}/{assign} failed: {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    rounds = summary["history"]["rounds"]
    warm = rounds[1:] or rounds
    helpers = sorted({h for r in rounds for h in r["helper_busy"]})
    return {"scheme": scheme, "clients": args.clients, "helpers": args.helpers, "assign": assign,
            "round_seconds_measured": statistics.median(r["makespan_s"] for r in warm),
            "round_seconds_predicted": statistics.median(r["predicted_s"] for r in warm),
            "round0_measured": rounds[0]["makespan_s"], "round0_predicted": rounds[0]["predicted_s"],
            "helper_busy": {h: statistics.mean(r["helper_busy"].get(h, 0.0) for r in rounds) for h in helpers},
            "accuracy": rounds[-1]["accuracy"], "bytes_per_round": summary["bytes_per_round"],
            "labels": summary["labels"], "local_steps": args.local_steps, "rounds": args.rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="JSON lines only")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--helpers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model-options", default="depth=4,width=1024")
    p.add_argument("--cut", default="1,4")
    p.add_argument("--assign", default="ours,random,greedy,exact", help="methods compared (ours first)")
    p.add_argument("--client-slowdown", type=float, default=30.0, help="of the first two clients")
    p.add_argument("--helper-slowdown", type=float, default=10.0)
    args = p.parse_args()
    methods = args.assign.split(",")
    agents = [["--data", "digits", "--shard", f"{k}/{args.clients}"]
              + (["--compute-slowdown", str(args.client_slowdown)] if k < 2 else []) for k in range(args.clients)]
    agents += [["--compute-slowdown", str(args.helper_slowdown)]] * args.helpers
    ids = [f"c{k}" for k in range(args.clients)] + [f"h{k}" for k in range(args.helpers)]
    rows: dict[tuple, list[dict]] = {}
    with LocalRing(agents, peer_ids=ids) as ring:
        for rep in range(args.repeats):
            configs = [(s, m) for s in SCHEMES for m in (["ours"] if s == "sl" else methods)]
            shift = rep % len(configs)
            for scheme, assign in configs[shift:] + configs[:shift]:
                row = run(ring, scheme, assign, args)
                rows.setdefault((scheme, assign), []).append(row)
                print(json.dumps({**row, "repeat": rep}) if args.json else
                      f"{scheme:12} {assign:7} round {row['round_seconds_measured']:.3f} s (predicted "
                      f"{row['round_seconds_predicted']:.3f}; round 0 {row['round0_measured']:.3f} vs "
                      f"{row['round0_predicted']:.3f}) busy {row['helper_busy']} acc {row['accuracy']:.3f} "
                      f"{row['bytes_per_round'] / 1e6:.2f} MB/round", flush=True)
    for scheme in SCHEMES[1:]:
        for m in methods[1:]:
            ratios = [o["round_seconds_measured"] / b["round_seconds_measured"]
                      for o, b in zip(rows[scheme, m], rows[scheme, "ours"])]
            line = {"paired": f"{m}/ours", "scheme": scheme, "median": statistics.median(ratios), "min": min(ratios),
                    "max": max(ratios), "repeats": len(ratios)}
            print(json.dumps(line) if args.json else f"{scheme} {m}/ours round time: median {line['median']:.2f}x "
                  f"(min {line['min']:.2f}, max {line['max']:.2f})", flush=True)


if __name__ == "__main__":
    main()
