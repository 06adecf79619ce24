"""How splitring's cost grows with the ring and the model, against one process doing the same work.

Rings of 2, 4, 8 and 16 agents on loopback train the same model (an MLP of 16 layers of width 256, split
evenly), each agent holding --steps batches of 32 (an epoch: every agent's pass, the chain rotating and
layers moving between passes), with sequential N-split (one stage computes at a time, as one process would),
one thread per agent; `single_samples_per_s` is plain PyTorch in one process on one thread, measured in the
same repeat. A step crosses 2 (N - 1) hops (a forward and a backward per boundary), so
`overhead_ms_per_hop` = (ring step - single step) / (2 (N - 1)). Between passes the chain rotates and
layers move: `swap_ms_per_mb` is the job's commit time (swaps, checkpoints, replicas, journal) per MB moved.
Then the `gpt` spec at 3 sizes (blocks 2, 4, 8 of width 128) on 4 agents, the same figures.
Every throughput leaves each pass's first step out (splitring's steady_samples_per_s; the baseline after a
warm-up step). Headline figures are medians over --repeats of per-repeat values; `vs_single_paired` is the
median of the per-repeat ratios.
Usage: python scripts/bench_scaling.py [--json] [--repeats R] [--steps N] [--plot PNG]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peer.localring import LocalRing, train_cli  # noqa: E402
from pipeline.config import JobConfig  # noqa: E402
from pipeline.data import load  # noqa: E402
from pipeline.loss import summed  # noqa: E402
from pipeline.models import build_model, sample_input  # noqa: E402
from pipeline.stage import make_optimizer  # noqa: E402

BATCH = 32
MLP = {"name": "mlp", "in_features": 256, "depth": 15, "width": 256, "classes": 10}
GPT = {"name": "gpt", "width": 128, "heads": 4, "context": 32}


def data(spec: dict, agents: int, samples: int, folder: Path) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(the agents' --data, the samples of all their shards): made-up vectors for the MLP in an .npz,
    Python's own source text for the gpt (byte-level, `--data text:FILE`)."""
    if spec["name"] == "gpt":
        text = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py")))
        path = folder / "python.txt"
        path.write_bytes(text[:int(samples * spec["context"] / 0.9) + 10 * agents])
        shards = [load(f"text:{path}", f"{k}/{agents}").for_model(spec) for k in range(agents)]
        return f"text:{path}", torch.cat([d.x for d in shards]), torch.cat([d.y for d in shards])
    g = torch.Generator().manual_seed(0)
    x = sample_input(spec, samples, g)
    y = torch.randint(0, spec["classes"], (samples,), generator=g)
    np.savez(folder / "d.npz", x=x.numpy(), y=y.numpy())
    return str(folder / "d.npz"), x, y


def single(spec: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    """Samples per second of plain PyTorch on one thread over the same batches, after one warm-up step."""
    torch.set_num_threads(1)
    model = build_model(spec, 0)
    opt = make_optimizer(JobConfig(model=spec, lr=0.01), model.parameters())
    t0 = None
    for s in range(0, len(x), BATCH):
        if s == BATCH:
            t0 = time.perf_counter()
        opt.zero_grad()
        (summed(model(x[s:s + BATCH]), y[s:s + BATCH])[0] / BATCH).backward()
        opt.step()
    return (len(x) - BATCH) / (time.perf_counter() - t0)


def ring(spec: dict, agents: int, source: str) -> dict:
    options = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    peers = [["--data", source, "--shard", f"{k}/{agents}"] for k in range(agents)]   # every agent a head in turn
    with LocalRing(peers, peer_ids=[f"p{k:02d}" for k in range(agents)]) as r:
        proc = train_cli(r.urls[0], "--model", spec["name"], "--model-options", options, "--epochs", "1",
                         "--batch-size", str(BATCH), "--lr", "0.01", "--shuffle", "off", "--split", "even",
                         timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(spec: dict, agents: int, steps: int, repeats: int) -> dict:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        source, x, y = data(spec, agents, agents * steps * BATCH, Path(tmp))   # each agent's shard: `steps` batches
        for _ in range(repeats):
            summary = ring(spec, agents, source)
            runs.append({"ring": summary["steady_samples_per_s"], "single": single(spec, x, y),
                         "commit_s": summary["commit_seconds"], "moved": summary["bytes_moved"]})
    ring_sps = statistics.median(r["ring"] for r in runs)
    single_sps = statistics.median(r["single"] for r in runs)
    hops = 2 * (agents - 1)
    return {"agents": agents, "model": spec["name"], "blocks": spec.get("blocks"),
            "params": sum(p.numel() for p in build_model(spec, 0).parameters()),
            "samples_per_s": ring_sps, "single_samples_per_s": single_sps,
            "vs_single_paired": statistics.median(r["ring"] / r["single"] for r in runs),
            "overhead_ms_per_step": 1000 * BATCH * (1 / ring_sps - 1 / single_sps),
            "overhead_ms_per_hop": 1000 * BATCH * (1 / ring_sps - 1 / single_sps) / hops,
            "swap_ms_per_mb": statistics.median(1000 * r["commit_s"] / max(r["moved"] / 1e6, 1e-9) for r in runs),
            "bytes_moved": runs[0]["moved"]}


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mlp = [r for r in results if r["model"] == "mlp"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["agents"] for r in mlp], [r["overhead_ms_per_step"] for r in mlp], "o-", label="per step")
    a.plot([r["agents"] for r in mlp], [r["overhead_ms_per_hop"] for r in mlp], "s-", label="per hop")
    a.set_xlabel("agents in the ring")
    a.set_ylabel("ms over one process")
    a.set_xscale("log", base=2)
    a.set_title("MLP 16 x 256, batch 32, sequential N-split")
    a.legend()
    b.plot([r["agents"] for r in mlp], [r["vs_single_paired"] for r in mlp], "o-", label="MLP")
    gpt = [r for r in results if r["model"] == "gpt"]
    b.plot([4] * len(gpt), [r["vs_single_paired"] for r in gpt], "^", label="gpt (3 sizes, 4 agents)")
    b.set_xlabel("agents in the ring")
    b.set_ylabel("samples/s, ring / one process")
    b.set_xscale("log", base=2)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--agents", default="2,4,8,16")
    ap.add_argument("--plot", default=None, metavar="PNG")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = [measure(MLP, n, args.steps, args.repeats) for n in map(int, args.agents.split(","))]
    results += [measure({**GPT, "blocks": b}, 4, args.steps, args.repeats) for b in (2, 4, 8)]
    if args.plot:
        plot(results, args.plot)
    if args.json:
        print(json.dumps({"results": results, "repeats": args.repeats, "steps": args.steps, "batch": BATCH}))
    else:
        for r in results:
            print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
