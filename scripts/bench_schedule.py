"""Benchmark the client-to-helper schedulers at the paper's scales.

For each setting (K=50 with H in {5, 10}; K=100 with H in {1, 2, 5, 10, 20, 25}), both scenarios and
seeds 0..N-1: generate the instance, run random+FCFS, balanced-greedy+FCFS and ours, check each
schedule with the simulator, and report the mean fractional makespan reduction of ours.

    .venv/bin/python scripts/bench_schedule.py [--json] [--seeds 10] [--profile resnet101_cifar]

--json prints one object per setting and scenario with keys clients, helpers, scenario,
reduction_vs_random, reduction_vs_greedy, ours_seconds_max, plus reduction_bound_vs_random: the mean of
1 - lower_bound/random, which no method can exceed (it shows how much there was to gain).
"""
from __future__ import annotations

import argparse
import json
import statistics

from pipeline.scheduling import compare, generate

SETTINGS = [(50, 5), (50, 10), (100, 1), (100, 2), (100, 5), (100, 10), (100, 20), (100, 25)]


def bench(profile: str, clients: int, helpers: int, scenario: int, seeds: int) -> dict:
    runs = [compare(generate(profile, clients, helpers, scenario, seed), seed, with_exact=False)
            for seed in range(seeds)]
    return {"clients": clients, "helpers": helpers, "scenario": scenario,
            "reduction_vs_random": statistics.mean(1 - c.ours.makespan / c.random.makespan for c in runs),
            "reduction_vs_greedy": statistics.mean(1 - c.ours.makespan / c.balanced_greedy.makespan for c in runs),
            "ours_seconds_max": max(c.ours.seconds for c in runs),
            "reduction_bound_vs_random": statistics.mean(1 - c.lower_bound / c.random.makespan for c in runs),
            "seeds": seeds, "profile": profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON object per line per setting")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per setting (default: %(default)s)")
    parser.add_argument("--profile", default="resnet101_cifar", help="device profile (default: %(default)s)")
    args = parser.parse_args()
    if not args.json:
        print(f"{args.profile}, {args.seeds} seeds per setting; mean makespan reduction of ours")
        print(f"{'K':>4}{'H':>4}{'scenario':>10}{'vs random':>11}{'vs greedy':>11}{'bound vs random':>17}"
              f"{'ours max (s)':>14}")
    for scenario in (1, 2):
        for clients, helpers in SETTINGS:
            row = bench(args.profile, clients, helpers, scenario, args.seeds)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{clients:>4}{helpers:>4}{scenario:>10}{row['reduction_vs_random']:>11.1%}"
                      f"{row['reduction_vs_greedy']:>11.1%}{row['reduction_bound_vs_random']:>17.1%}"
                      f"{row['ours_seconds_max']:>14.3f}", flush=True)


if __name__ == "__main__":
    main()
