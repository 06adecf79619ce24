"""`splitring plan`: choose each peer's layers and print the plan.

Offline: `splitring plan --profile resnet101_cifar --devices VM,laptop,d1,jetson-cpu` plans from the
profiled devices (pipeline/profiles). A live mode only has to build `Device`s and `LayerCost`s from the
ring's measurements and call `pipeline.planner.plan` (or `plan_rotations`), then `print_plans`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace

from peer.cli.common import ConnectOptions, call, connect
from peer.cli.options import add_job_options, add_options, job_config
from peer.limits import LIMITS
from pipeline.planner import (Device, Plan, PlanInfeasible, devices_from_profile, format_bytes, layers_from_profile,
                              over_budget, plan, plan_chain, plan_rotations)
from pipeline.device_profiles import available

# the JobConfig fields a plan depends on (`splitring train` takes them all)
JOB_FIELDS = ("model", "batch_size", "microbatches", "optimizer", "momentum", "scheme", "pipeline", "max_staleness",
              "backward_at", "split")

BYTE_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
              "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
RATE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
              "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}   # per second
TIME_UNITS = {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6}


def quantity(text: str, units: dict[str, float], what: str) -> float:
    """'512MiB' -> 536870912 with the byte units, '100Mbit' -> 12500000 with the rate units, ..."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z]*)(?:/s)?\s*", text.lower())
    if not m or m.group(2) not in units:
        raise ValueError(f"bad {what} {text!r} (a number with a unit among: {', '.join(u for u in units if u)})")
    return float(m.group(1)) * units[m.group(2)]


def per_device(text: str | None, names: list[str], parse, what: str) -> list:
    """One value for every device ('1GiB'), one per device in chain order ('1GiB,512MiB,...'), or some
    by name ('d1=256MiB,VM=8GiB'; the others get None). None when not given."""
    if text is None:
        return [None] * len(names)
    items = [s.strip() for s in text.split(",")]
    if all("=" in s for s in items):
        given = dict(s.split("=", 1) for s in items)
        unknown = set(given) - set(names)
        if unknown:
            raise ValueError(f"{what} for unknown device(s) {', '.join(sorted(unknown))} (devices: {', '.join(names)})")
        return [parse(given[n]) if n in given else None for n in names]
    if len(items) == 1:
        return [parse(items[0])] * len(names)
    if len(items) != len(names):
        raise ValueError(f"{len(items)} values of {what} for {len(names)} devices")
    return [parse(s) for s in items]


def offline_devices(args: argparse.Namespace) -> list[Device]:
    devices = devices_from_profile(args.profile, [s.strip() for s in args.devices.split(",")])
    names = [d.name for d in devices]
    budgets = per_device(args.memory_budget, names, lambda s: int(quantity(s, BYTE_UNITS, "memory budget")),
                         "--memory-budget")
    bandwidths = per_device(args.bandwidth, names, lambda s: quantity(s, RATE_UNITS, "bandwidth"), "--bandwidth")
    latencies = per_device(args.latency, names, lambda s: quantity(s, TIME_UNITS, "latency"), "--latency")
    return [replace(d, memory_budget=m, bandwidth=d.bandwidth if b is None else b,
                    latency=d.latency if t is None else t)
            for d, m, b, t in zip(devices, budgets, bandwidths, latencies)]


def table(p: Plan) -> str:
    rows = [("peer", "layers", "memory used of budget", "stage time", "link time")]
    for s in p.stages:
        a, b = s.layers
        layers = "-" if a == b else f"{a}..{b - 1}"
        rows.append((s.peer, layers, f"{format_bytes(s.memory_bytes)} of {format_bytes(s.memory_budget)}",
                     f"{s.compute_s:.3f} s", f"{s.send_s:.3f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    mb = f"{p.microbatches} microbatch" + ("es" if p.microbatches > 1 else "")
    lines.append(f"predicted step time: {p.step_s:.3f} s ({p.scheme}, {mb})")
    return "\n".join(lines)


def print_plans(plans: list[Plan], as_json: bool, rotations: bool, remotes: list[dict] | None = None) -> None:
    """Print one plan, or every rotation's with the bytes each swap moves; as a table or as JSON.
    remotes[r]: rotation r's remote backwards ({stage: host} chain positions), if any."""
    remotes = remotes or [{} for _ in plans]
    if as_json:
        dicts = [{**p.to_dict(), **({"backward_at": [[j, h] for j, h in rm.items()]} if rm else {})}
                 for p, rm in zip(plans, remotes)]
        print(json.dumps({"rotations": dicts} if rotations else dicts[0], indent=2))
        return
    for r, (p, rm) in enumerate(zip(plans, remotes)):
        if rotations:
            print(f"rotation {r}" + (f" (swap moves {format_bytes(p.bytes_moved)})" if r else ""))
        for j, h in rm.items():
            print(f"backward of stage {j} ({p.stages[j].peer}) runs on {p.stages[h].peer} (--backward-at {j}:{h})")
        print(table(p) + ("\n" if rotations and r < len(plans) - 1 else ""))


def show_schedule(args: argparse.Namespace, n_stages: int) -> None:
    """Print (and with --schedule-image, draw) the timeline of --steps steps for the chosen scheme."""
    from pipeline import schedule as S

    mbs = [args.microbatches] * args.steps
    progs = [S.pass_program(args.scheme, args.pipeline, j, n_stages, mbs, args.max_staleness) for j in range(n_stages)]
    spans = S.timeline(progs)
    name = {"nsplit": "sequential N-split", "fast": f"Fast N-split ({args.pipeline})",
            "fast-async": f"Fast N-split, asynchronous (max staleness {args.max_staleness})"}[args.scheme]
    print(f"{name}, {n_stages} stages, {args.microbatches} microbatches: {args.steps} step(s) take "
          f"{max(s[3] for s in spans):g} units (forward 1, backward 2)")
    print(S.render(progs))
    print(S.render_timeline(spans))
    if args.schedule_image:
        S.plot_timeline(spans, args.schedule_image, name)
        print(f"timeline drawn to {args.schedule_image}")


def live_plans(args: argparse.Namespace) -> tuple[list[Plan], list[dict]]:
    """Ask a peer of the ring to plan a job on the ring as it is now (measured profiles and links)."""
    import urllib.error

    from peer.security import RingAuthError
    from pipeline.planner import StagePlan

    cfg = job_config(args, JOB_FIELDS)
    url, key = connect(args)
    try:
        reply = call(url, key, "plan_job", timeout=120, config=cfg.to_dict())
    except urllib.error.HTTPError as e:
        raise ValueError(json.loads(e.read() or b"{}").get("message", str(e))) from None
    except RingAuthError as e:
        raise ValueError(f"{e}; check --secret-file") from None
    plans = [Plan(**{**{k: v for k, v in d.items() if k != "backward_at"},
                     "stages": tuple(StagePlan(**{**st, "layers": tuple(st["layers"])}) for st in d["stages"])})
             for d in reply["rotations"]]
    return plans, [{j: h for j, h in d.get("backward_at", [])} for d in reply["rotations"]]


def ring_devices(args: argparse.Namespace) -> list[Device]:
    """The peers of a live ring (the one asked, then those it sees) with their memory budgets and the
    messages they let wait unread."""
    url, key = connect(args)
    me = call(url, key, "status", timeout=10)
    if "private" in me:
        raise ValueError("the ring's peers and budgets are private to the ring: give --secret-file")
    others = [call(p["url"], key, "status", timeout=10) for p in me["peers"]]
    return [Device(s["peer"], s["memory_budget"], pending_messages=s["pending_messages"]) for s in [me, *others]]


def max_model(args: argparse.Namespace) -> int:
    """--max-model: grow one option of the spec while every pass of an epoch fits the devices' budgets."""
    from pipeline.capacity import GROWN, largest

    cfg = job_config(argparse.Namespace(**{**vars(args), "model": args.max_model}), JOB_FIELDS)
    option = args.grow or GROWN.get(args.max_model)
    if option is None:
        raise ValueError(f"--max-model {args.max_model}: say which option to grow with --grow")
    if args.peer or args.ring:   # a live ring: its peers and their budgets, as the peer asked sees them
        devices = ring_devices(args)
    elif args.devices:   # agents as started by default
        names = [s.strip() for s in args.devices.split(",")]
        budgets = per_device(args.memory_budget, names, lambda s: int(quantity(s, BYTE_UNITS, "memory budget")),
                             "--memory-budget")
        devices = [Device(n, b, pending_messages=LIMITS.pending_messages) for n, b in zip(names, budgets)]
    else:
        raise ValueError("--max-model needs --devices (names) and their --memory-budget, or a live ring (--peer)")
    got = largest(cfg, devices, option)
    if args.json:
        print(json.dumps({"model": cfg.model["name"], "option": got.option, "largest": got.largest,
                          "params": got.params, "next_refused": got.next_refused}))
    elif got.largest is None:
        print(f"no {cfg.model['name']} fits, not even {option}=1: {got.next_refused}")
    else:
        print(f"largest {cfg.model['name']} these {len(names)} peers can train: {option}={got.largest} "
              f"({got.params / 1e6:.1f} M parameters)")
        if got.next_refused:
            print(f"{option}={got.largest + 1} does not fit: {got.next_refused}")
    return 0 if got.largest is not None else 1


def run(args: argparse.Namespace) -> int:
    if args.show_schedule:
        show_schedule(args, args.stages or (len(args.devices.split(",")) if args.devices else 3))
        return 0
    try:
        if args.max_model:
            return max_model(args)
        if args.peer or args.ring:
            plans, remotes = live_plans(args)
            print_plans(plans, args.json, True, remotes)
            return 0
        if not (args.profile and args.devices):
            raise ValueError("give --profile and --devices (offline), or --peer/--ring (a live ring)")
        devices = offline_devices(args)
        layers = layers_from_profile(args.profile, optimizer_state=args.optimizer_state)
        remotes = None
        if args.backward_at and (args.rotations or args.scheme != "fast-async"):
            raise ValueError("--backward-at plans one chain of --scheme fast-async (not with --rotations)")
        if args.split == "even" and args.rotations:
            raise ValueError("offline, --split even plans one chain (not with --rotations)")
        if args.backward_at or args.split == "even":
            p, remote = plan_chain(devices, layers, args.scheme, args.microbatches, args.max_staleness, args.split,
                                   backward_at={j: h for j, h in args.backward_at} if args.backward_at != "auto"
                                   else "auto")
            if not p.fits:
                raise ValueError(f"the {args.split} split does not fit the memory budgets"
                                 f"{' with --backward-at' if args.backward_at else ''}: {over_budget(p)}")
            plans, remotes = [p], [remote]
        elif args.rotations:
            plans = plan_rotations(devices, layers, args.scheme, args.microbatches, max_staleness=args.max_staleness)
        else:
            plans = [plan(devices, layers, args.scheme, args.microbatches, max_staleness=args.max_staleness)]
    except (ValueError, FileNotFoundError) as e:   # PlanInfeasible is a ValueError
        print(f"splitring plan: {'cannot plan' if isinstance(e, PlanInfeasible) else 'error'}: {e}", file=sys.stderr)
        return 1
    print_plans(plans, args.json, args.rotations, remotes)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="choose each peer's layers (the split planner)",
        description="Choose each peer's contiguous layers so that a training step is fastest and every peer "
                    "stays within its memory budget; print peer, layers, memory, stage time and predicted step time.")
    p.add_argument("--profile",
                   help=f"profiled model, e.g. resnet101_cifar (known: {', '.join(available()) or 'none found'})")
    p.add_argument("--devices",
                   help="profiled devices in chain order, head first, e.g. VM,laptop,d1,jetson-cpu "
                        "(a name given twice becomes d1, d1#2)")
    p.add_argument("--memory-budget", metavar="BYTES",
                   help="per device: one size for all, a comma list in device order, or NAME=SIZE,... "
                        "(units B, KB, MB, GB, KiB, MiB, GiB); default: no limit")
    p.add_argument("--bandwidth", metavar="RATE",
                   help="of each device's link to the next, same forms as --memory-budget "
                        "(units bit, Kbit, Mbit, Gbit, or bytes: B, KB, MB, MiB, ...); default 100Mbit")
    p.add_argument("--latency", metavar="TIME", help="one way, per link, same forms (s, ms, us); default 1ms")
    p.add_argument("--optimizer-state", type=float, default=1.0, metavar="RATIO",
                   help="optimizer state bytes per parameter byte: 1 SGD with momentum (default), 2 Adam, 0 SGD")
    p.add_argument("--rotations", action="store_true",
                   help="plan every rotation of the ring and show the bytes each swap moves")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--max-model", default=None, metavar="NAME",
                   help="the largest model of this spec (options from --model-options) that --devices (names) with "
                        "their --memory-budget can train, grown along --grow; and which peer runs out first beyond")
    p.add_argument("--grow", default=None, metavar="OPTION",
                   help="the option --max-model grows (default: gpt blocks, mlp depth, cnn channels, resnet width)")
    live = p.add_argument_group("live ring (plans with the peers' measured profiles, budgets and links)")
    add_options(live, ConnectOptions, ring=None)
    job = p.add_argument_group(
        "job", "as `splitring train` takes them. A live ring reads them all; offline plans read --scheme, "
               "--microbatches, --max-staleness, --backward-at and --split; --show-schedule --scheme, --pipeline, "
               "--microbatches and --max-staleness")
    add_job_options(job, JOB_FIELDS)
    sched = p.add_argument_group("schedule timeline")
    sched.add_argument("--show-schedule", action="store_true",
                       help="print the actions per stage of --steps steps and their timeline for --scheme/--pipeline")
    sched.add_argument("--steps", type=int, default=1, help="steps to draw (default 1)")
    sched.add_argument("--stages", type=int, default=None, help="stages to draw (default: --devices count, or 3)")
    sched.add_argument("--schedule-image", default=None, metavar="PNG", help="also draw the timeline (matplotlib)")
    p.set_defaults(func=run)
