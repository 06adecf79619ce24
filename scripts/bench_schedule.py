"""Benchmark the client-to-helper schedulers at the paper's scales.

--grid fig7: the paper's Fig. 7 grid on its own instances (pipeline/scheduling/paper.py): both profiles
(ResNet-101 and VGG-19 on CIFAR-10) x scenarios 1, 2 x K in {20, 30, 50, 70} x H in {5, 10} x two modes,
`paper` (the source's transfer formula) and `physical` (0.008192 Mbit per KiB); seeds 0..N-1 per cell, plus
seed 42 (the paper's one instance). The baseline is the source's random assignment with a correct FCFS
(every helper counted). One JSON line per cell: model, scenario, clients, helpers, mode,
mean_reduction_vs_random, max_reduction_vs_random, seed42_reduction_vs_random, ours_over_bound_mean,
ours_over_bound_max, ours_seconds_max, and beside them reduction_vs_greedy_mean,
bound_reduction_vs_random_mean (the most any method could cut), paper_reduction (the figure's own, from
its plotted makespans; paper mode), seed42_makespans_s, integral_bounds (seeds whose bound is the integral
one). The bound is the LP's, or where ours ends over 3% above it the integral bound (bounds.py).

--exact-cell MODEL,SCENARIO,K,H [--mode paper|physical]: per seed of that cell, ours against the exact optimum
(exact.by_client_sets, minutes per instance) and both bounds.

For each setting (K=50 with H in {5, 10}; K=100 with H in {1, 2, 5, 10, 20, 25}), both scenarios and
seeds 0..N-1: generate the instance, run random+FCFS, balanced-greedy+FCFS and ours, check each
schedule with the simulator, and report the mean fractional makespan reduction of ours.

    .venv/bin/python scripts/bench_schedule.py [--json] [--seeds 10] [--profile resnet101_cifar]
    .venv/bin/python scripts/bench_schedule.py --grid fig7 --json [--seeds 30]

--json prints one object per setting and scenario with keys clients, helpers, scenario,
reduction_vs_random, reduction_vs_greedy, ours_seconds_max, plus reduction_bound_vs_random: the mean of
1 - lower_bound/random, which no method can exceed (it shows how much there was to gain).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from pipeline.scheduling import compare, generate, lower_bound, paper, simulate, solve
from pipeline.scheduling.baselines import balanced_greedy_fcfs, fcfs_schedule
from pipeline.scheduling.bounds import integral_bound
from pipeline.scheduling.exact import by_client_sets
from pipeline.scheduling.instance import KIB_TO_MBIT, PAPER_KIB_TO_MBIT

MODES = {"paper": PAPER_KIB_TO_MBIT, "physical": KIB_TO_MBIT}
# The bound is the LP's (bounds.lower_bound); where ours ends more than 3% above it, the tighter integral
# bound (bounds.integral_bound, HiGHS stopped after 10 s with its proven bound) replaces it.
INTEGRAL_ABOVE, INTEGRAL_SECONDS = 0.03, 10.0
# Fig. 7's plotted makespans in s (the paper's method, baseline) per (model, scenario, K, H): the source's
# plots/heur2.py (commit 48ab7c5^), where the figure's data lives.
FIG7 = {
    ("resnet101", 1): {(20, 5): (43.97, 52.7), (20, 10): (40.85, 47.0), (30, 5): (48.64, 54.2), (30, 10): (42.41, 52.3),
                       (50, 5): (56.75, 61.7), (50, 10): (45.53, 55.8), (70, 5): (91.06, 113.6), (70, 10): (53.63, 61.4)},
    ("vgg19", 1): {(20, 5): (24.66, 36.1), (20, 10): (17.6, 30.2), (30, 5): (33.8, 39.6), (30, 10): (28.1, 48.0),
                   (50, 5): (52.1, 66.2), (50, 10): (36.4, 41.3), (70, 5): (72.9, 82.6), (70, 10): (44.3, 49.7)},
    ("resnet101", 2): {(20, 5): (86.61, 141.4), (20, 10): (60.93, 85.74), (30, 5): (148.8, 186.7),
                       (30, 10): (108.8, 140.5), (50, 5): (275.07, 333.39), (50, 10): (224.14, 312.06),
                       (70, 5): (401.29, 459.61), (70, 10): (349.06, 436.98)},
    ("vgg19", 2): {(20, 5): (98.5, 167.179), (20, 10): (56.4, 118.56), (30, 5): (175.2, 216.6), (30, 10): (108.5, 149.6),
                   (50, 5): (367.0, 483.9), (50, 10): (243.8, 398.0), (70, 5): (558.7, 675.7), (70, 10): (417.0, 608.4)},
}

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


def paper_cell(model: str, scenario: int, clients: int, helpers: int, mode: str, seeds: int) -> dict:
    """One cell of Fig. 7 on the source's instances: ours against its random baseline (correct FCFS)."""
    def run(seed: int) -> dict:
        p = paper.generate(f"{model}_cifar", clients, helpers, scenario, seed, kib_to_mbit=MODES[mode])
        inst = p.instance
        t0 = time.perf_counter()
        ours = simulate(inst, solve(inst))
        seconds = time.perf_counter() - t0
        rand = simulate(inst, fcfs_schedule(inst, paper.random_assignment(clients, helpers, seed)))
        greedy = simulate(inst, balanced_greedy_fcfs(inst))
        bound = lower_bound(inst)
        tighter = ours > bound * (1 + INTEGRAL_ABOVE)   # worth the MILP's seconds
        if tighter:
            bound = integral_bound(inst, INTEGRAL_SECONDS, cap=bound)
        return {"ours": ours, "random": rand, "greedy": greedy, "bound": bound, "seconds": seconds,
                "integral": tighter}
    runs = [run(seed) for seed in range(seeds)]
    s42 = run(42)
    figure = FIG7[model, scenario][clients, helpers]
    reductions = [1 - r["ours"] / r["random"] for r in runs]
    return {"model": model, "scenario": scenario, "clients": clients, "helpers": helpers, "mode": mode,
            "mean_reduction_vs_random": statistics.mean(reductions), "max_reduction_vs_random": max(reductions),
            "seed42_reduction_vs_random": 1 - s42["ours"] / s42["random"],
            "ours_over_bound_mean": statistics.mean(r["ours"] / r["bound"] for r in runs),
            "ours_over_bound_max": max(r["ours"] / r["bound"] for r in runs),
            "ours_seconds_max": max(r["seconds"] for r in runs + [s42]),
            "reduction_vs_greedy_mean": statistics.mean(1 - r["ours"] / r["greedy"] for r in runs),
            "bound_reduction_vs_random_mean": statistics.mean(1 - r["bound"] / r["random"] for r in runs),
            "paper_reduction": 1 - figure[0] / figure[1] if mode == "paper" else None,
            "seed42_makespans_s": {k: s42[k] / 1000 for k in ("ours", "random", "bound")}, "seeds": seeds,
            "integral_bounds": sum(r["integral"] for r in runs)}


def grid(seeds: int) -> None:
    for mode in MODES:
        for model in ("resnet101", "vgg19"):
            for scenario in (1, 2):
                for clients in (20, 30, 50, 70):
                    for helpers in (5, 10):
                        print(json.dumps(paper_cell(model, scenario, clients, helpers, mode, seeds)), flush=True)


def exact_cell(cell: str, seeds: int, mode: str) -> None:
    """Ours against the exact optimum (exact.by_client_sets) on each seed of one Fig. 7 cell, where the
    bounds are too loose to say: one JSON line per seed."""
    model, scenario, clients, helpers = cell.split(",")
    for seed in range(seeds):
        inst = paper.generate(f"{model}_cifar", int(clients), int(helpers), int(scenario), seed,
                              kib_to_mbit=MODES[mode]).instance
        t0 = time.perf_counter()
        schedule, proven = by_client_sets(inst, time_limit=240)
        bound = lower_bound(inst)
        print(json.dumps({"model": model, "scenario": int(scenario), "clients": int(clients), "helpers": int(helpers),
                          "mode": mode, "seed": seed, "ours": simulate(inst, solve(inst)),
                          "exact": simulate(inst, schedule), "proven": proven,
                          "integral_bound": integral_bound(inst, INTEGRAL_SECONDS, cap=bound), "lp_bound": bound,
                          "seconds": time.perf_counter() - t0}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON object per line per setting")
    parser.add_argument("--seeds", type=int, help="seeds per setting (default: 10; the grid: 30)")
    parser.add_argument("--profile", default="resnet101_cifar", help="device profile (default: %(default)s)")
    parser.add_argument("--grid", choices=["fig7"], help="the paper's Fig. 7 grid on its own instances (JSON lines)")
    parser.add_argument("--exact-cell", metavar="MODEL,SCENARIO,K,H",
                        help="ours against the exact optimum on each seed of one Fig. 7 cell (e.g. vgg19,1,30,10)")
    parser.add_argument("--mode", choices=list(MODES), default="paper", help="with --exact-cell (default: paper)")
    args = parser.parse_args()
    if args.exact_cell:
        return exact_cell(args.exact_cell, args.seeds or 30, args.mode)
    if args.grid:
        return grid(args.seeds or 30)
    args.seeds = args.seeds or 10
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
