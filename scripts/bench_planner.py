"""Benchmark the split planner: its speed at scale, and its gain over simple splits on real devices.

    .venv/bin/python scripts/bench_planner.py [--json] [--chains 200] [--seed 0] [--repeats 3]

plan_seconds_L1000_D64: wall time to plan 1000 synthetic layers over 64 devices (random speeds, budgets
and links, seeded), best of 3 runs, for the slower of "nsplit" (1 microbatch) and "fast" (8 microbatches);
plan_seconds_L1000_D64_nsplit and _fast give each.

speedup_vs_even, speedup_vs_proportional ("nsplit", 1 microbatch) and their _fast twins ("fast", 4
microbatches): over seeded chains of 4 to 8 devices drawn with replacement from one real profile (at
least two device types), the predicted step time of an even split and of a speed-proportional split
divided by the planner's, all under the planner's cost model; mean over chains, and beside it the median
(`_median`) and geometric mean (`_geomean`), which outliers do not inflate. A baseline split that
exceeds a device's memory budget cannot run: it is left out of that mean and counted in
even_infeasible, proportional_infeasible (and their _fast twins), out of `chains`. Chains the planner
itself cannot fit are redrawn. Devices without measurements in a profile (the Jetsons on MNIST) are not
drawn.

Measured (`measured`, and its ratios at the top level): a live ring of 4 agents on this machine made
unequal with --compute-slowdown (SLOWDOWNS) and --memory-budget (BUDGETS_MIB), one `mlp` job under
--split planned, proportional and even in one run (order rotating per repeat); seconds per step over each
epoch after its first step; `planned_vs_proportional_measured` and `planned_vs_even_measured`: the median
over repeats of the baseline's seconds per step divided by the planner's in the same repeat (the planner's
measured speedup), with _min and _max. A split the budgets refuse is named in `refused`.

Assumptions of the chains: memory budgets per device type in BUDGETS (VM 8 GiB, laptop 4 GiB, the
small clients 1 to 1.5 GiB); each link uniform in 50-500 Mbit/s (Wi-Fi to Ethernet), 1 ms latency;
optimizer state = parameters (SGD with momentum).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peer.localring import LocalRing, train_cli  # noqa: E402

from pipeline.planner import (Device, LayerCost, PlanInfeasible, devices_from_profile, even_split, evaluate,
                              layers_from_profile, plan, proportional_split)  # noqa: E402
from pipeline.device_profiles import available, load_compute  # noqa: E402

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
    out = {}
    for key, values in ratios.items():   # the mean, which outliers inflate, beside the median and geometric mean
        out.update({key: statistics.mean(values), f"{key}_median": statistics.median(values),
                    f"{key}_geomean": statistics.geometric_mean(values)})
    return {**out, **infeasible, "chains": chains, "seed": seed}


# the live ring: agent k computes SLOWDOWNS[k] times slower than this machine and may hold BUDGETS_MIB[k]
SLOWDOWNS = (1, 1, 3, 6)
BUDGETS_MIB = (256, 256, 256, 8)
LIVE_MODEL = ("--model", "mlp", "--model-options", "depth=8,width=512", "--batch-size", "64", "--epochs", "1",
              "--shuffle", "off", "--lr", "0.01")


def live_ring_data(folder: Path) -> list[list[str]]:
    x = torch.randn(4 * 640, 64, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    out = []
    for k in range(4):
        path = folder / f"shard{k}.npz"
        np.savez(path, x=x[k::4].numpy(), y=y[k::4].numpy())
        out.append(["--data", str(path), "--compute-slowdown", str(SLOWDOWNS[k]),
                    "--memory-budget", f"{BUDGETS_MIB[k]}MiB"])
    return out


def measured(repeats: int) -> dict:
    """One live ring of 4 agents made unequal (slowdowns and budgets above), the same job under the planned,
    the speed-proportional and the even split, in an order that rotates per repeat: seconds per step over
    the epoch (steady state, the first step left out), and per repeat the ratio of each baseline's to the
    planner's (the planner's speedup), paired."""
    splits = ["planned", "proportional", "even"]
    seconds: dict[str, list[float]] = {name: [] for name in splits}
    refused: dict[str, str] = {}
    ranges: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp, LocalRing(live_ring_data(Path(tmp)),
                                                          peer_ids=[f"p{k}" for k in range(4)]) as ring:
        for r in range(repeats):
            for name in splits[r % 3:] + splits[:r % 3]:
                proc = train_cli(ring.urls[0], *LIVE_MODEL, "--split", name, timeout=1800)
                if proc.returncode != 0:   # a split that does not fit the budgets: refused before training
                    refused[name] = proc.stderr.strip().splitlines()[-1]
                    continue
                summary = json.loads(proc.stdout.strip().splitlines()[-1])
                seconds[name].append(64 / summary["steady_samples_per_s"])
                ranges[name] = [p["ranges"] for p in summary["plans"]]
    out = {f"{name}_s_per_step": statistics.median(v) for name, v in seconds.items() if v}
    out["ranges"] = ranges   # each split's layers per peer, per pass (the chain rotates)
    for name in ("proportional", "even"):
        if len(seconds[name]) == len(seconds["planned"]) == repeats:
            ratios = [b / p for b, p in zip(seconds[name], seconds["planned"])]
            out.update({f"planned_vs_{name}_measured": statistics.median(ratios),
                        f"planned_vs_{name}_measured_min": min(ratios), f"planned_vs_{name}_measured_max": max(ratios)})
    return {**out, "refused": refused, "repeats": repeats, "slowdowns": list(SLOWDOWNS),
            "budgets_mib": list(BUDGETS_MIB)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--chains", type=int, default=200, help="real-profile chains (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the chains (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the live comparison (0: none)")
    args = parser.parse_args()
    devices, layers = synthetic(args.seed)
    result = {"plan_seconds_L1000_D64_nsplit": time_plan(devices, layers, "nsplit", 1),
              "plan_seconds_L1000_D64_fast": time_plan(devices, layers, "fast", 8)}
    result = {"plan_seconds_L1000_D64": max(result.values()), **result, **gains(args.chains, args.seed)}
    if args.repeats:
        result["measured"] = measured(args.repeats)
        result.update({k: v for k, v in result["measured"].items() if k.startswith("planned_vs_")})
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32} {value:.4g}" if isinstance(value, float) else f"{key:32} {value}")


if __name__ == "__main__":
    main()
