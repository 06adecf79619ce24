"""The claims of the Blind Learning and LocFedMix-SL papers, measured on splitring's runtime.

Live rings on loopback: C clients on digits shards (iid, and dirichlet:0.3 non-IID) and H helpers, every
client/helper scheme trained for R rounds of local epochs per seed (job seeds 0..S-1: initial weights,
shuffles, mixing), held-out accuracy after every round. Per run: the accuracy curve, the rounds and
seconds (training rounds with their averaging, evaluation left out) to 90% and 95%, the helpers' compute
per round (the sum of their task times), and for sl and blind the helper's FLOPs per round (counted with
torch's FlopCounterMode on the same batches in one process).

    .venv/bin/python scripts/bench_seed_claims.py --json [--seeds 5] [--clients 8] [--rounds 40] [--plots DIR]

--json prints one object per run, then one "summary" object per scheme and partition (mean, min and max
over seeds of rounds and seconds to each target, of the final accuracy and of helper compute per round)
and the "claims" objects (blind vs sl; locfedmix vs splitfed-v1, splitfed-v2 and locsplitfed). --plots
writes accuracy against rounds and against seconds (seed 0) and helper compute per round, as PNG.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.localring import LocalRing, train_cli  # noqa: E402
from pipeline import data  # noqa: E402
from pipeline.config import JobConfig  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.parallel import parts, round_batches  # noqa: E402

SCHEMES = ("sl", "splitfed-v1", "splitfed-v2", "blind", "locsplitfed", "locfedmix")
TARGETS = (0.90, 0.95)


def first(values: list[float], target: float) -> int | None:
    return next((k for k, v in enumerate(values) if v >= target), None)


def run(ring: LocalRing, scheme: str, seed: int, partition: str, args) -> dict:
    proc = train_cli(ring.urls[0], "--scheme", scheme, "--rounds", str(args.rounds), "--seed", str(seed),
                     "--model-options", args.model_options,
                     "--optimizer", "adam", "--lr", str(args.lr), "--batch-size", str(args.batch_size),
                     timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{scheme} seed {seed} failed: {proc.stderr[-2000:]}")
    history = json.loads(proc.stdout.strip().splitlines()[-1])["history"]["rounds"]
    accuracy = [r["accuracy"] for r in history]
    elapsed = [sum(r["round_s"] for r in history[:k + 1]) for k in range(len(history))]
    out = {"scheme": scheme, "partition": partition, "seed": seed, "clients": args.clients, "helpers": args.helpers,
           "rounds": args.rounds, "accuracy": accuracy, "seconds": elapsed, "final_accuracy": accuracy[-1],
           "helper_compute_s_per_round": statistics.mean(sum(r["helper_compute_s"].values()) for r in history),
           "round_s": statistics.mean(r["round_s"] for r in history)}
    for t in TARGETS:
        k = first(accuracy, t)
        out[f"rounds_to_{int(t * 100)}"] = None if k is None else k + 1
        out[f"seconds_to_{int(t * 100)}"] = None if k is None else elapsed[k]
    return out


def helper_flops(scheme: str, clients: dict[str, data.Dataset], args) -> float:
    """FLOPs of the helper's part in one round (local epochs), counted by torch on the same batches: sl and
    splitfed run a forward and a backward per client batch; blind every client's forward, then one backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models import parse_spec

    cfg = JobConfig(scheme=scheme, batch_size=args.batch_size, model=parse_spec("mlp", args.model_options))
    model = build_model(cfg.model, cfg.seed)
    p = parts(cfg, len(model))
    first_part, helper = model[:p.a], model[p.a:p.b]
    batches = {j: round_batches(len(ds), cfg, 0) for j, ds in clients.items()}
    counter = FlopCounterMode(display=False)
    with counter:
        for s in range(max(len(b) for b in batches.values())):
            outs, grads = [], []
            for j, ds in clients.items():
                if s >= len(batches[j]):
                    continue
                act = first_part(ds.x[batches[j][s]]).detach().requires_grad_(True)
                out = helper(act)
                if scheme == "blind":
                    outs.append(out)
                    grads.append(torch.ones_like(out))
                else:
                    out.backward(torch.ones_like(out))
            if outs:
                torch.autograd.backward(outs, grads)
    return float(counter.get_total_flops())


def spread(values: list) -> dict:
    got = [v for v in values if v is not None]
    return {"mean": statistics.mean(got) if got else None, "min": min(got, default=None), "max": max(got, default=None),
            "reached": f"{len(got)}/{len(values)}"}


def summaries(rows: list[dict]) -> list[dict]:
    out = []
    for scheme in SCHEMES:
        for partition in sorted({r["partition"] for r in rows}):
            mine = [r for r in rows if r["scheme"] == scheme and r["partition"] == partition]
            if not mine:
                continue
            row = {"summary": scheme, "partition": partition, "seeds": len(mine)}
            for key in ("rounds_to_90", "rounds_to_95", "seconds_to_90", "seconds_to_95", "final_accuracy",
                        "helper_compute_s_per_round", "round_s"):
                row[key] = spread([r[key] for r in mine])
            out.append(row)
    return out


def plots(rows: list[dict], flops: dict, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    for partition in sorted({r["partition"] for r in rows}):
        fig, (by_round, by_time) = plt.subplots(1, 2, figsize=(11, 4))
        for r in [r for r in rows if r["partition"] == partition and r["seed"] == 0]:
            by_round.plot(range(1, len(r["accuracy"]) + 1), r["accuracy"], label=r["scheme"])
            by_time.plot(r["seconds"], r["accuracy"], label=r["scheme"])
        for ax, xlabel in ((by_round, "round"), (by_time, "seconds (rounds with averaging)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out accuracy")
            ax.set_ylim(0.5, 1.0)
            ax.grid(alpha=0.3)
        by_round.legend()
        fig.suptitle(f"digits, {partition}, seed 0")
        fig.tight_layout()
        fig.savefig(directory / f"accuracy-{partition.replace(':', '')}.png", dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    mine = [s for s in summaries(rows) if s["partition"] == "iid"]
    ax.bar([s["summary"] for s in mine], [s["helper_compute_s_per_round"]["mean"] for s in mine])
    ax.set_ylabel("helper compute per round (s, all helpers)")
    ax.set_title("digits, iid: helper compute per round (mean over seeds)")
    fig.tight_layout()
    fig.savefig(directory / "helper-compute.png", dpi=100)
    plt.close(fig)


def claims(rows: list[dict], flops: dict) -> list[dict]:
    by = {s["summary"] + "/" + s["partition"]: s for s in summaries(rows)}
    out = []
    sl, blind = by.get("sl/iid"), by.get("blind/iid")
    if sl and blind:
        out.append({"claim": "Blind Learning is 65% more computationally efficient than split learning",
                    "helper_compute_ratio_sl_over_blind": sl["helper_compute_s_per_round"]["mean"]
                    / blind["helper_compute_s_per_round"]["mean"],
                    "helper_flops_ratio_sl_over_blind": flops["sl"] / flops["blind"],
                    "seconds_to_95": {"sl": sl["seconds_to_95"], "blind": blind["seconds_to_95"]},
                    "final_accuracy": {"sl": sl["final_accuracy"], "blind": blind["final_accuracy"]}})
    for partition in ("iid", "dirichlet:0.3"):
        mix = by.get(f"locfedmix/{partition}")
        if not mix:
            continue
        for other in ("splitfed-v1", "splitfed-v2", "locsplitfed"):
            o = by.get(f"{other}/{partition}")
            if o:
                out.append({"claim": f"LocFedMix-SL converges faster than {other}", "partition": partition,
                            **{f"{k}": {"locfedmix": mix[k], other: o[k]} for k in
                               ("rounds_to_90", "rounds_to_95", "seconds_to_90", "seconds_to_95", "final_accuracy")}})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="JSON lines only")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--helpers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--model-options", default="depth=3,width=256", help="of the mlp (default: %(default)s)")
    p.add_argument("--partitions", default="iid,dirichlet:0.3")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots here")
    args = p.parse_args()
    rows = []
    for partition in args.partitions.split(","):
        agents = [["--data", "digits", "--shard", f"{k}/{args.clients}", "--partition", partition]
                  for k in range(args.clients)] + [[] for _ in range(args.helpers)]
        with LocalRing(agents, peer_ids=[f"c{k}" for k in range(args.clients)] +
                       [f"h{k}" for k in range(args.helpers)]) as ring:
            for seed in range(args.seeds):
                for scheme in args.schemes.split(","):
                    row = run(ring, scheme, seed, partition, args)
                    rows.append(row)
                    print(json.dumps(row) if args.json else
                          f"{partition:14} seed {seed} {scheme:12} final {row['final_accuracy']:.3f} rounds to 90/95 "
                          f"{row['rounds_to_90']}/{row['rounds_to_95']} seconds {row['seconds_to_95']} helper compute "
                          f"{row['helper_compute_s_per_round']:.3f} s/round", flush=True)
    digits = data.digits()
    shards = data.partition(digits.y.numpy(), args.clients, "iid", 0)
    clients = {f"c{k}": data.Dataset(f"c{k}", digits.x[i], digits.y[i]) for k, i in enumerate(shards)}
    flops = {s: helper_flops(s, clients, args) for s in ("sl", "blind")}
    for row in summaries(rows) + [{"helper_flops_per_round": flops}] + claims(rows, flops):
        print(json.dumps(row), flush=True)
    if args.plots:
        plots(rows, flops, Path(args.plots))


if __name__ == "__main__":
    main()
