"""`splitring schedule`: compare client-to-helper schedules on one generated scenario."""
from __future__ import annotations

import argparse
import json
import sys

from pipeline.device_profiles import available
from pipeline.scheduling import compare, generate, paper
from pipeline.scheduling.compare import EXACT_MAX_CLIENTS, EXACT_MAX_HELPERS
from pipeline.scheduling.instance import KIB_TO_MBIT, PAPER_KIB_TO_MBIT

DESCRIPTION = """\
Generate one parallel-split-learning scenario from real device profiles (the paper's model: weak
clients keep the first and last layers, strong helpers run the middle) and compare how long one
training step takes for everyone (the makespan) under each method:

  random           each client to a random helper with room; helpers serve first-come-first-served
  balanced_greedy  clients spread evenly over helpers; first-come-first-served
  ours             earliest-finish assignment, task orders by dispatch rules, local search
  exact            MILP (HiGHS), only up to {k} clients and {h} helpers
  lower bound      LP relaxation: no schedule ends sooner

Every schedule is checked by an independent simulator (precedence, one task at a time per helper,
memory). Helpers never preempt a task.

--paper-compatible builds the workflow paper's own instance (its source's generator draw for draw: client
sets, room for all, cuts, integer slots, its transfer formula) and its random baseline (with a correct
FCFS); see docs/scheduling.md. Otherwise transfers are physical (1 KiB = 0.008192 Mbit).""".format(
    k=EXACT_MAX_CLIENTS, h=EXACT_MAX_HELPERS)

EPILOG = """\
examples:
  splitring schedule --profile resnet101_cifar --clients 50 --helpers 5 --scenario 1 --seed 0
  splitring schedule --clients 8 --helpers 2 --scenario 2 --json
  splitring schedule --paper-compatible --profile vgg19_cifar --scenario 2 -K 20 -H 10 --seed 42"""


def _cuts(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two layer indices A,B such as 3,33, got {text!r}")
    return a, b


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("schedule", help="compare client-to-helper schedules (makespan) on a scenario",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="resnet101_cifar",
                   help="device profile <model>_<dataset> (default: %(default)s; known: "
                        f"{', '.join(available()) or 'none found'})")
    p.add_argument("--clients", "-K", type=_positive, default=50, help="number of clients (default: %(default)s)")
    p.add_argument("--helpers", "-H", type=_positive, default=5, help="number of helpers (default: %(default)s)")
    p.add_argument("--scenario", type=int, choices=(1, 2), default=1,
                   help="1: low heterogeneity (profiled times), 2: high (times drawn between the "
                        "profiled extremes) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the scenario and the random baseline (default: 0; with --paper-compatible 42, the "
                        "paper's)")
    p.add_argument("--cuts", type=_cuts, default=None, metavar="A,B",
                   help="clients keep layers [0,A) and [B,L); helpers run [A,B) "
                        "(default: 3,33 for ResNet-101, 3,L-4 otherwise)")
    p.add_argument("--memory-slack", type=float, default=1.5, metavar="S",
                   help="each helper's memory holds between K/H and S*K/H clients' part 2 (default: %(default)s)")
    p.add_argument("--paper-compatible", action="store_true",
                   help="the paper's source's instance and random baseline (seed 42 is the paper's)")
    p.add_argument("--transfers", choices=("physical", "paper"), default=None,
                   help="KiB to Mbit: physical 0.008192, paper 0.0008 as the source (default: paper with "
                        "--paper-compatible, else physical)")
    p.add_argument("--fix-sampler", action="store_true",
                   help="with --paper-compatible, scenario 2: fix the source's sampler quirks (part-1 backward "
                        "always 0; part-3 ranges from jetson-cpu's part 1)")
    # (--memory-slack is ours alone: the paper's helpers have room for every client)
    p.add_argument("--exact-time-limit", type=float, default=60.0, metavar="SECONDS",
                   help="time limit of the exact MILP (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: makespans in ms (random, balanced_greedy, ours, exact when "
                        "small enough, lower_bound), reduction_vs_random = 1 - ours/random, the ratios "
                        "ours_over_random, ours_over_bound, ours_seconds, and more")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    transfers = args.transfers or ("paper" if args.paper_compatible else "physical")
    if args.seed is None:
        args.seed = 42 if args.paper_compatible else 0
    factor = PAPER_KIB_TO_MBIT if transfers == "paper" else KIB_TO_MBIT
    if args.fix_sampler and not args.paper_compatible:
        print("splitring schedule: --fix-sampler needs --paper-compatible", file=sys.stderr)
        return 2
    try:
        if args.paper_compatible:
            made = paper.generate(args.profile, args.clients, args.helpers, args.scenario, args.seed, cuts=args.cuts,
                                  kib_to_mbit=factor, fix_sampler=args.fix_sampler)
            inst, drawn = made.instance, paper.random_assignment(args.clients, args.helpers, args.seed)
        else:
            inst, drawn = generate(args.profile, args.clients, args.helpers, args.scenario, args.seed, cuts=args.cuts,
                                   memory_slack=args.memory_slack, kib_to_mbit=factor), None
    except (FileNotFoundError, ValueError) as e:
        print(f"splitring schedule: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"splitring schedule: profile {args.profile} has no device {e}", file=sys.stderr)
        return 2
    c = compare(inst, args.seed, exact_time_limit=args.exact_time_limit, drawn=drawn)
    if args.json:
        out = {"profile": args.profile, "clients": args.clients, "helpers": args.helpers,
               "scenario": args.scenario, "seed": args.seed, "paper_compatible": args.paper_compatible,
               "transfers": transfers, "random": c.random.makespan, "balanced_greedy": c.balanced_greedy.makespan,
               "ours": c.ours.makespan, "ours_seconds": c.ours.seconds,
               "reduction_vs_random": 1 - c.ours.makespan / c.random.makespan,
               "reduction_vs_balanced_greedy": 1 - c.ours.makespan / c.balanced_greedy.makespan,
               "ours_over_random": c.ours.makespan / c.random.makespan,
               "ours_over_balanced_greedy": c.ours.makespan / c.balanced_greedy.makespan,
               "lower_bound": c.lower_bound, "ours_over_bound": c.ours.makespan / c.lower_bound}
        if args.paper_compatible:
            out["slot_ms"] = made.slot_ms
        if c.exact is not None:
            out.update(exact=c.exact.makespan, exact_seconds=c.exact.seconds, exact_optimal=c.exact_optimal)
        print(json.dumps(out))
        return 0

    level = {1: "low", 2: "high"}[args.scenario]
    print(f"{args.profile}: {args.clients} clients, {args.helpers} helpers, scenario {args.scenario} "
          f"({level} heterogeneity), seed {args.seed}, {transfers} transfers"
          + (f", the paper's instance (one slot = {made.slot_ms:.2f} ms)" if args.paper_compatible else ""))
    print(f"{'method':<18}{'makespan (ms)':>15}{'/ random':>10}{'/ greedy':>10}{'solve (s)':>11}")
    rows = [("random", c.random), ("balanced_greedy", c.balanced_greedy), ("ours", c.ours)]
    if c.exact is not None:
        rows.append(("exact" if c.exact_optimal else "exact (time limit)", c.exact))
    for name, r in rows:
        print(f"{name:<18}{r.makespan:>15.1f}{r.makespan / c.random.makespan:>10.3f}"
              f"{r.makespan / c.balanced_greedy.makespan:>10.3f}{r.seconds:>11.4f}")
    print(f"{'lower bound':<18}{c.lower_bound:>15.1f}{c.lower_bound / c.random.makespan:>10.3f}"
          f"{c.lower_bound / c.balanced_greedy.makespan:>10.3f}")
    print(f"ours cuts the makespan by {1 - c.ours.makespan / c.random.makespan:.1%} vs random and "
          f"{1 - c.ours.makespan / c.balanced_greedy.makespan:.1%} vs balanced_greedy; "
          f"it is within {c.ours.makespan / c.lower_bound - 1:.1%} of the lower bound")
    return 0
