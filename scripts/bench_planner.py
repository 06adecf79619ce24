"""Benchmark the split planner: its speed at scale, and its gain over simple splits on real devices.

    .venv/bin/python scripts/bench_planner.py [--json] [--chains 200] [--seed 0]

plan_seconds_L1000_D64: wall time to plan 1000 synthetic layers over 64 devices (random speeds, budgets
and links, seeded), best of 3 runs, for the slower of "nsplit" (1 microbatch) and "fast" (8 microbatches);
plan_seconds_L1000_D64_nsplit and _fast give each.

speedup_vs_even, speedup_vs_proportional ("nsplit", 1 microbatch) and their _fast twins ("fast", 4
microbatches): over seeded chains of 4 to 8 devices drawn with replacement from one real profile (at
least two device types), the predicted step time of an even split and of a speed-proportional split
divided by the planner's, all under the planner's cost model; mean over chains. A baseline split that
exceeds a device's memory budget cannot run: it is left out of that mean and counted in
even_infeasible, proportional_infeasible (and their _fast twins), out of `chains`. Chains the planner
itself cannot fit are redrawn. Devices without measurements in a profile (the Jetsons on MNIST) are not
drawn.

Assumptions of the chains: memory budgets per device type in BUDGETS (VM 8 GiB, laptop 4 GiB, the
small clients 1 to 1.5 GiB); each link uniform in 50-500 Mbit/s (Wi-Fi to Ethernet), 1 ms latency;
optimizer state = parameters (SGD with momentum).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace

from pipeline.planner import (Device, LayerCost, PlanInfeasible, devices_from_profile, even_split, evaluate,
                              layers_from_profile, plan, proportional_split)
from pipeline.device_profiles import available, load_compute

GiB = 2 ** 30
BUDGETS = {"VM": 8 * GiB, "laptop": 4 * GiB, "d1": 1 * GiB, "d2": 1 * GiB,
           "jetson-cpu": 1.5 * GiB, "jetson-gpu": 1.5 * GiB}
SCHEMES = (("nsplit", 1, ""), ("fast", 4, "_fast"))


def synthetic(seed: int) -> tuple[list[Device], list[LayerCost]]:
    rng = random.Random(seed)
    layers = [LayerCost(rng.uniform(1e-3, 1e-2), rng.uniform(1e-3, 2e-2), rng.randrange(10 ** 6),
                        rng.randrange(10 ** 6), rng.randrange(10 ** 6)) for _ in range(1000)]
    devices = [Device(f"p{k}", rng.randrange(2 * 10 ** 8, 10 ** 9), speed=rng.uniform(0.2, 5),
                      bandwidth=rng.uniform(1e7, 1e9)) for k in range(64)]
    return devices, layers


def time_plan(devices: list[Device], layers: list[LayerCost], scheme: str, microbatches: int) -> float:
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        plan(devices, layers, scheme, microbatches)
        runs.append(time.perf_counter() - start)
    return min(runs)


def measured_devices(profile: str) -> list[str]:
    return [name for name, p in load_compute(profile).items() if sum(p.forward_ms) + sum(p.backward_ms) > 0]


def draw_chain(rng: random.Random) -> tuple[list[Device], list[LayerCost]]:
    profile = rng.choice(available())
    kinds = measured_devices(profile)
    while True:
        names = rng.choices(kinds, k=rng.randint(4, 8))
        if len(set(names)) > 1:
            break
    devices = [replace(d, memory_budget=int(BUDGETS[name]), bandwidth=rng.uniform(50e6, 500e6) / 8)
               for d, name in zip(devices_from_profile(profile, names), names)]
    return devices, layers_from_profile(profile)


def gains(chains: int, seed: int) -> dict:
    rng = random.Random(seed)
    kinds = [(name, scheme, m, suffix) for name in ("even", "proportional") for scheme, m, suffix in SCHEMES]
    ratios = {f"speedup_vs_{name}{suffix}": [] for name, _, _, suffix in kinds}
    infeasible = {f"{name}_infeasible{suffix}": 0 for name, _, _, suffix in kinds}
    done = 0
    while done < chains:
        devices, layers = draw_chain(rng)
        try:
            best = {scheme: plan(devices, layers, scheme, m) for scheme, m, _ in SCHEMES}
        except PlanInfeasible:
            continue
        done += 1
        splits = {"even": even_split(len(layers), len(devices)), "proportional": proportional_split(devices, layers)}
        for name, scheme, m, suffix in kinds:
            baseline = evaluate(devices, layers, splits[name], scheme, m)
            if baseline.fits:
                ratios[f"speedup_vs_{name}{suffix}"].append(baseline.step_s / best[scheme].step_s)
            else:
                infeasible[f"{name}_infeasible{suffix}"] += 1
    return {**{key: statistics.mean(values) for key, values in ratios.items()}, **infeasible,
            "chains": chains, "seed": seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--chains", type=int, default=200, help="real-profile chains (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the chains (default: %(default)s)")
    args = parser.parse_args()
    devices, layers = synthetic(args.seed)
    result = {"plan_seconds_L1000_D64_nsplit": time_plan(devices, layers, "nsplit", 1),
              "plan_seconds_L1000_D64_fast": time_plan(devices, layers, "fast", 8)}
    result = {"plan_seconds_L1000_D64": max(result.values()), **result, **gains(args.chains, args.seed)}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32} {value:.4g}" if isinstance(value, float) else f"{key:32} {value}")


if __name__ == "__main__":
    main()
