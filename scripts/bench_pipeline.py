"""Fast N-split against its baselines, in one run, on the same compute-heavy model and samples.

Model: MLP with 8 hidden layers of width 1024 (9 layers), batch 256, 8 microbatches, SGD.
  single_1thread_sps    plain PyTorch, one process, 1 thread
  nsplit_sps            splitring sequential N-split, 2 agents (processes), 1 thread each
  fast_sps              splitring Fast N-split (--pipeline eager), 2 agents, 1 thread each
  fast_1f1b_sps         the same with the default schedule, 1F1B
  fast_async_sps        splitring Fast N-split, asynchronous (--max-staleness 1), 2 agents, 1 thread each
  torch_pipelining_sps  torch.distributed.pipelining Schedule1F1B, 2 gloo ranks, 1 thread each
Each agent and each gloo rank runs on a core of its own (`splitring agent --cpus`), as it would on its own
device, and the single process on one core; the agents busy-poll (`--busy-poll`: compute on the event loop's
thread, which polls instead of sleeping between messages). `fast_unpinned_sps` is the same Fast N-split with agents
as started by default (left to the OS scheduler, no busy polling), `torch_pipelining_unpinned_sps` the gloo
ranks left to the OS scheduler. Every process runs with the allocator setting agents use (keep_freed_memory).
Also measured in the same run, in one process on 1 thread: what each stage of the 2-way split Fast
N-split used costs per step when computed alone (`fast_stage_ms`: 8 forwards, 8 backwards, the step).
The busiest stage bounds any 2-stage pipeline of these microbatches: `fast_ceiling_sps`.
Every throughput leaves the first step out (warm-up: allocators, caches, for splitring also the pipeline's
fill and the pass's start), timing the rest, as the baselines are timed; `fast_whole_pass_sps` is Fast
N-split's over the whole pass, first step included.
With --repeats R every throughput is the best of R runs (these machines are noisy; the best run is the
one least disturbed); each repeat measures everything back to back, and `fast_vs_single_paired` and
`fast_vs_torch_pipelining_paired` are the medians of the ratios within a repeat.
Usage: python scripts/bench_pipeline.py [--json] [--steps N] [--repeats R]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peer.cli.common import keep_freed_memory, pin_to  # noqa: E402
from peer.localring import LocalRing, train_cli  # noqa: E402
from pipeline.config import JobConfig  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.stage import Stage  # noqa: E402
from pipeline.swaps import even_split  # noqa: E402

WIDTH, DEPTH, BATCH, MICRO = 1024, 8, 256, 8
DEDICATED = ("--busy-poll",)   # agents on cores of their own, as on devices that do nothing else
FAST = ("--pipeline", "eager")   # the stages are about equally busy: the head fills its waits (schedule.eager)
RATE = "steady_samples_per_s"   # after the first step, as the baselines are timed after a warm-up step
SPEC = {"name": "mlp", "in_features": WIDTH, "depth": DEPTH, "width": WIDTH, "classes": 10}


def samples(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(steps * BATCH, WIDTH, generator=g), torch.randint(0, 10, (steps * BATCH,), generator=g)


def single(steps: int, cpu: int | None = None) -> float:
    """Plain PyTorch on 1 thread (on CPU `cpu` if given)."""
    mask = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        torch.set_num_threads(1)
        model = build_model(SPEC, 0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = samples(steps + 1)
        for s in range(steps + 1):
            if s == 1:  # the first step warms up allocators
                t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x[s * BATCH:(s + 1) * BATCH]), y[s * BATCH:(s + 1) * BATCH]).backward()
            opt.step()
        return steps * BATCH / (time.perf_counter() - t0)
    finally:
        os.sched_setaffinity(0, mask)


def stage_ms(ranges: list[tuple[int, int]], steps: int) -> list[float]:
    """Milliseconds per step of each stage's own compute under Fast N-split, one thread, no I/O."""
    torch.set_num_threads(1)
    cfg = JobConfig(model=SPEC, scheme="fast", microbatches=MICRO, batch_size=BATCH, lr=0.01)
    x, y = samples(1)
    rows = BATCH // MICRO
    out = []
    for j, (a, b) in enumerate(ranges):
        stage, tail = Stage.build(cfg, a, b), j == len(ranges) - 1
        stage.sum_weight_gradients_by_step(tail)   # as a pass's program sets it (the last stage has no slack)
        xs = x if j == 0 else torch.randn(BATCH, *stage.layers[a][0].weight.shape[1:])
        grad = torch.randn(rows, WIDTH)
        for s in range(steps + 1):
            if s == 1:
                t0 = time.perf_counter()
            for m in range(MICRO):
                part = slice(m * rows, (m + 1) * rows)
                if tail:
                    stage.forward_loss(m, xs[part], y[part], BATCH, needs_input_grad=j > 0)
                else:
                    stage.forward(m, xs[part], needs_input_grad=j > 0)
            for m in range(MICRO):
                stage.backward(m, None if tail else grad)
            stage.step()
        out.append(1000 * (time.perf_counter() - t0) / steps)
    return out


def splitring(steps: int, scheme: str, agents: int = 2, *extra: str, cpus: list[str] | None = None,
              options: tuple[str, ...] = ()) -> dict:
    """One epoch on a fixed-order ring of `agents` (1 thread each, started with `options`; agent k on CPUs
    cpus[k] if given); the first holds the data."""
    x, y = samples(steps)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.npz"
        np.savez(path, x=x.numpy(), y=y.numpy())
        peers = [["--data", str(path)]] + [[]] * (agents - 1)
        with LocalRing(peers, peer_ids=[f"p{k}" for k in range(agents)], cpus=cpus, extra=list(options)) as ring:
            proc = train_cli(ring.urls[0], "--model", "mlp", "--model-options",
                             f"in_features={WIDTH},depth={DEPTH},width={WIDTH}", "--epochs", "1",
                             "--batch-size", str(BATCH), "--microbatches", str(MICRO), "--lr", "0.01",
                             "--shuffle", "off", "--scheme", scheme, "--max-staleness", "1", *extra)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            return json.loads(proc.stdout.strip().splitlines()[-1])


def _pipelining_rank(rank: int, port: int, steps: int, result, cpus: list[str] | None) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    if cpus:
        pin_to({int(cpus[rank])})
    keep_freed_memory()   # as the agents do
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = build_model(SPEC, 0)
    a, b = even_split(len(model), 2)[rank]
    part = torch.nn.Sequential(*list(model)[a:b])
    stage = PipelineStage(part, rank, 2, torch.device("cpu"))
    sched = Schedule1F1B(stage, MICRO, loss_fn=lambda out, target: F.cross_entropy(out, target))
    opt = torch.optim.SGD(part.parameters(), lr=0.01)
    x, y = samples(steps + 1)
    for s in range(steps + 1):
        if s == 1:
            dist.barrier()
            t0 = time.perf_counter()
        opt.zero_grad()
        xb, yb = x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]
        if rank == 0:
            sched.step(xb)
        else:
            sched.step(target=yb)
        opt.step()
    dist.barrier()
    if rank == 1:
        result.value = steps * BATCH / (time.perf_counter() - t0)
    dist.destroy_process_group()


def torch_pipelining(steps: int, cpus: list[str] | None = None) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_pipelining_rank, args=(r, port, steps, result, cpus)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError("torch.distributed.pipelining rank failed")
    return result.value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be 2 or more: every throughput leaves the first step out")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    keep_freed_memory()   # the allocator setting agents run with, for the in-process baselines too
    # Each agent (and each gloo rank) on a core of its own, as on two devices; the single process on one.
    cores = sorted(os.sched_getaffinity(0))
    cpus = [str(c) for c in cores[:2]] if len(cores) >= 2 else None
    # Every repeat measures everything once, back to back, so each repeat's ratios compare runs made
    # under the same conditions (`*_paired`: their median); the plain figures are each the best run.
    rounds: list[dict] = []
    for _ in range(args.repeats):
        r = {"single": single(args.steps, cores[0])}
        r.update({scheme: splitring(args.steps, scheme, 2, *extra, cpus=cpus, options=DEDICATED)
                  for scheme, extra in (("nsplit", ()), ("fast", FAST), ("fast-async", ()))})
        r["fast_1f1b"] = splitring(args.steps, "fast", 2, cpus=cpus, options=DEDICATED)[RATE]
        r["fast_unpinned"] = splitring(args.steps, "fast", 2, *FAST)[RATE]
        r["torch"] = torch_pipelining(args.steps, cpus)
        r["torch_unpinned"] = torch_pipelining(args.steps)
        rounds.append(r)
    res = {"single_1thread_sps": max(r["single"] for r in rounds)}
    for scheme in ("nsplit", "fast", "fast-async"):
        best = max((r[scheme] for r in rounds), key=lambda summary: summary[RATE])
        key = scheme.replace("-", "_")
        res[f"{key}_sps"] = best[RATE]
        res[f"{key}_ranges"] = best["plans"][0]["ranges"]
    res["fast_whole_pass_sps"] = max(r["fast"]["samples_per_s"] for r in rounds)   # first step included
    res["fast_async_max_staleness"] = max(max(r["fast-async"]["staleness"]) for r in rounds)
    res["fast_1f1b_sps"] = max(r["fast_1f1b"] for r in rounds)
    res["fast_unpinned_sps"] = max(r["fast_unpinned"] for r in rounds)
    res["torch_pipelining_sps"] = max(r["torch"] for r in rounds)
    res["torch_pipelining_unpinned_sps"] = max(r["torch_unpinned"] for r in rounds)
    res["fast_stage_ms"] = stage_ms([tuple(r) for r in res["fast_ranges"].values()], args.steps)
    res["fast_ceiling_sps"] = BATCH / (max(res["fast_stage_ms"]) / 1000)
    res["pinned_cpus"] = cpus
    res["agent_options"], res["fast_options"] = list(DEDICATED), list(FAST)
    res["fast_vs_single"] = res["fast_sps"] / res["single_1thread_sps"]
    res["fast_vs_torch_pipelining"] = res["fast_sps"] / res["torch_pipelining_sps"]
    res["fast_async_vs_single"] = res["fast_async_sps"] / res["single_1thread_sps"]
    res["fast_ceiling_vs_single"] = res["fast_ceiling_sps"] / res["single_1thread_sps"]
    res["fast_vs_single_paired"] = statistics.median(r["fast"][RATE] / r["single"] for r in rounds)
    res["fast_vs_torch_pipelining_paired"] = statistics.median(r["fast"][RATE] / r["torch"]
                                                               for r in rounds)
    res.update(steps=args.steps, repeats=args.repeats, batch=BATCH, microbatches=MICRO, width=WIDTH, depth=DEPTH)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:26s} {v:.3f}" if isinstance(v, float) else f"{k:26s} {v}")


if __name__ == "__main__":
    main()
