"""Fast N-split against the strongest baselines, in one run, on the same compute-heavy model and samples.

Model: MLP with 8 hidden layers of width 1024 (9 layers), batch 256, 8 microbatches (--microbatches), SGD.
  single_1thread_sps    plain PyTorch, one process, 1 thread (on one core)
  single_2thread_sps    plain PyTorch, one process, 2 threads on both cores: what a sceptic runs instead
  nsplit_sps            splitring sequential N-split, 2 agents (processes), 1 thread each
  fast_sps              splitring Fast N-split (--pipeline eager), 2 agents, 1 thread each
  fast_1f1b_sps         the same with the default schedule, 1F1B
  fast_async_sps        splitring Fast N-split, asynchronous (--max-staleness 1), 2 agents, 1 thread each
  torch_pipelining_sps  torch.distributed.pipelining Schedule1F1B on its even split, 2 gloo ranks, 1 thread each
  torch_pipelining_schedules  every schedule torch.distributed.pipelining offers, on the split splitring's
                        planner chose for fast_sps (rank 0 holds as many layers as splitring's head): 1F1B and
                        GPipe with one stage per rank, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble (two
                        stages per rank, looped) and ZBVZeroBubble, DualPipeV (two per rank, V-shaped); the layers
                        of each stage are in `torch_pipelining_split`. `torch_pipelining_best_sps` is the best
                        of them, `torch_pipelining_best_schedule` its name.
Each agent and each gloo rank runs on a core of its own (`splitring agent --cpus`), as it would on its own
device, and the 1-thread process on one core; the agents busy-poll (`--busy-poll`: compute on the event loop's
thread, which polls instead of sleeping between messages). `fast_unpinned_sps` is the same Fast N-split with agents
as started by default (left to the OS scheduler, no busy polling), `torch_pipelining_unpinned_sps` the gloo
ranks left to the OS scheduler. Every process runs with the allocator setting agents use (keep_freed_memory).
Also measured in the same run, in one process on 1 thread: what each stage of the 2-way split Fast
N-split used costs per step when computed alone (`fast_stage_ms`: 8 forwards, 8 backwards, the step).
The busiest stage bounds any 2-stage pipeline of these microbatches: `fast_ceiling_sps`.
Every throughput leaves the first step out (warm-up: allocators, caches, for splitring also the pipeline's
fill and the pass's start), timing the rest, as the baselines are timed; `fast_whole_pass_sps` is Fast
N-split's over the whole pass, first step included.
Headline: paired ratios. Each of --repeats R repeats measures everything back to back, and
`fast_vs_single_2thread_paired`, `fast_vs_torch_best_paired` (against the best schedule of that repeat),
`fast_vs_single_paired`, `fast_vs_torch_pipelining_paired` and `fast_async_vs_single_2thread_paired` are
the medians of the ratios within a repeat, each with `_min` and `_max`. The plain figures are each the
best of the R runs.
--trace instead runs Fast N-split once and shows where a step goes: the job's per-action timeline of one step
of each stage (the summary's `timeline`: busy, wait and send spans in ms), each stage's busy/wait/send ms in
that step live, the same stages' compute alone (`fast_stage_ms`) and the single process on 1 and 2 threads.
Usage: python scripts/bench_pipeline.py [--json] [--steps N] [--repeats R] [--microbatches M] [--trace]
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
from peer.trace import stage_times  # noqa: E402
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


def single(steps: int, cpus: set[int] | None = None, threads: int = 1) -> float:
    """Plain PyTorch on `threads` threads (on the CPUs `cpus` if given)."""
    mask = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    try:
        torch.set_num_threads(threads)
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
        torch.set_num_threads(1)


def stage_ms(plan_ranges: dict, steps: int) -> list[float]:
    """Milliseconds per step of each stage's own compute under Fast N-split, one thread, no I/O, for a
    plan's `ranges` ({peer: [a, b]}, in stage order)."""
    ranges = [tuple(r) for r in plan_ranges.values()]
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


# torch.distributed.pipelining's schedules: one stage per rank, or two (loop: rank r holds stages r and r+2;
# V: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2)
SCHEDULES = {"1F1B": ("Schedule1F1B", None), "GPipe": ("ScheduleGPipe", None),
             "Interleaved1F1B": ("ScheduleInterleaved1F1B", "loop"), "LoopedBFS": ("ScheduleLoopedBFS", "loop"),
             "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", "loop"),
             "ZBVZeroBubble": ("ScheduleZBVZeroBubble", "v"), "DualPipeV": ("ScheduleDualPipeV", "v")}


def torch_stages(head_layers: int, n_layers: int, style: str | None) -> list[list[tuple[int, int]]]:
    """Per rank, the layer ranges of its stages, rank 0 holding `head_layers` layers in all as under the
    planner's split: one stage each, or two each, rank 0's halves and rank 1's halves in chain order."""
    if style is None:
        return [[(0, head_layers)], [(head_layers, n_layers)]]
    a1 = -(-head_layers // 2)                      # rank 0's first stage
    b1 = -(-(n_layers - head_layers) // 2)         # rank 1's first stage
    if style == "loop":   # stages 0 (r0) 1 (r1) 2 (r0) 3 (r1)
        cuts = [0, a1, a1 + b1, head_layers + b1, n_layers]
        return [[(cuts[0], cuts[1]), (cuts[2], cuts[3])], [(cuts[1], cuts[2]), (cuts[3], cuts[4])]]
    cuts = [0, a1, a1 + b1, a1 + (n_layers - head_layers), n_layers]   # V: stages 0 (r0) 1 (r1) 2 (r1) 3 (r0)
    return [[(cuts[0], cuts[1]), (cuts[3], cuts[4])], [(cuts[1], cuts[2]), (cuts[2], cuts[3])]]


def _pipelining_rank(rank: int, port: int, steps: int, result, cpus: list[str] | None, schedule: str,
                     head_layers: int, microbatches: int) -> None:
    import torch.distributed as dist
    from torch.distributed import pipelining

    if cpus:
        pin_to({int(cpus[rank])})
    keep_freed_memory()   # as the agents do
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = build_model(SPEC, 0)
    name, style = SCHEDULES[schedule]
    ranges = torch_stages(head_layers, len(model), style)
    order = sorted((r for rk in ranges for r in rk))   # stage index = position in the chain
    mine = [(order.index(r), torch.nn.Sequential(*list(model)[r[0]:r[1]])) for r in ranges[rank]]
    stages = [pipelining.PipelineStage(part, i, len(order), torch.device("cpu")) for i, part in mine]
    loss = lambda out, target: F.cross_entropy(out, target)   # noqa: E731
    cls = getattr(pipelining, name)
    sched = cls(stages[0] if style is None else stages, microbatches, loss_fn=loss)
    opt = torch.optim.SGD([p for _, part in mine for p in part.parameters()], lr=0.01)
    has_first = any(i == 0 for i, _ in mine)
    has_last = any(i == len(order) - 1 for i, _ in mine)
    x, y = samples(steps + 1)
    for s in range(steps + 1):
        if s == 1:
            dist.barrier()
            t0 = time.perf_counter()
        opt.zero_grad()
        xb, yb = x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]
        args = (xb,) if has_first else ()
        sched.step(*args, **({"target": yb} if has_last else {}))
        opt.step()
    dist.barrier()
    if rank == 1:
        result.value = steps * BATCH / (time.perf_counter() - t0)
    dist.destroy_process_group()


def torch_pipelining(steps: int, cpus: list[str] | None = None, schedule: str = "1F1B",
                     head_layers: int | None = None) -> float:
    """Samples/s of torch.distributed.pipelining on 2 gloo ranks (1 thread each), rank 0 holding
    `head_layers` layers (default: torch's even split, as `even_split`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = even_split(DEPTH + 1, 2)[0][1] if head_layers is None else head_layers
    ctx = mp.get_context("spawn")
    result = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_pipelining_rank, args=(r, port, steps, result, cpus, schedule, head, MICRO))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"torch.distributed.pipelining {schedule} rank failed")
    return result.value


def paired(ratios: list[float], key: str) -> dict:
    """The median of per-repeat ratios, with their min and max."""
    return {key: statistics.median(ratios), f"{key}_min": min(ratios), f"{key}_max": max(ratios)}


def trace(steps: int, cpus: list[str] | None, cores: list[int]) -> dict:
    """One Fast N-split run's per-action timeline of a step, beside the compute it would need and the
    single process's step, all in ms."""
    run = splitring(steps, "fast", 2, *FAST, cpus=cpus, options=DEDICATED)
    tl = run["timeline"]
    spans = {peer: [[kind, label, round(1e3 * t0, 2), round(1e3 * t1, 2)] for kind, label, t0, t1 in s]
             for peer, s in tl["spans"].items()}
    live = {peer: {k: round(1e3 * v, 2) for k, v in t.items()} for peer, t in stage_times(tl).items()}
    single_ms = {f"single_{n}thread_ms": 1e3 * BATCH / single(steps, set(cores[:n]), n) for n in (1, 2)}
    return {"fast_sps": run[RATE], "fast_ms": 1e3 * BATCH / run[RATE], "step": tl["step"], "live_ms": live,
            "fast_stage_ms": stage_ms(run["plans"][0]["ranges"], steps),
            **single_ms, "microbatches": MICRO, "spans_ms": spans}


def main() -> None:
    global MICRO
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=MICRO,
                    help=f"microbatches per step of {BATCH} samples (default: %(default)s)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--trace", action="store_true", help="one Fast N-split run: where its step goes")
    args = ap.parse_args()
    MICRO = args.microbatches
    if args.steps < 2:
        ap.error("--steps must be 2 or more: every throughput leaves the first step out")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    keep_freed_memory()   # the allocator setting agents run with, for the in-process baselines too
    # Each agent (and each gloo rank) on a core of its own, as on two devices; the single process on one.
    cores = sorted(os.sched_getaffinity(0))
    cpus = [str(c) for c in cores[:2]] if len(cores) >= 2 else None
    if args.trace:
        print(json.dumps(trace(args.steps, cpus, cores)))
        return
    # Every repeat measures everything once, back to back, so each repeat's ratios compare runs made
    # under the same conditions (`*_paired`: their median); the plain figures are each the best run.
    rounds: list[dict] = []
    for _ in range(args.repeats):
        r = {"single": single(args.steps, {cores[0]}), "single_2thread": single(args.steps, set(cores[:2]), 2)}
        r.update({scheme: splitring(args.steps, scheme, 2, *extra, cpus=cpus, options=DEDICATED)
                  for scheme, extra in (("nsplit", ()), ("fast", FAST), ("fast-async", ()))})
        r["fast_1f1b"] = splitring(args.steps, "fast", 2, cpus=cpus, options=DEDICATED)[RATE]
        r["fast_unpinned"] = splitring(args.steps, "fast", 2, *FAST)[RATE]
        r["torch"] = torch_pipelining(args.steps, cpus)
        r["torch_unpinned"] = torch_pipelining(args.steps)
        head = r["fast"]["plans"][0]["ranges"]["p0"][1]   # the planner's split: the head's layers [0, head)
        for name in SCHEDULES:
            try:
                r[f"torch_{name}"] = torch_pipelining(args.steps, cpus, name, head)
            except RuntimeError as e:   # a schedule that does not fit this model or microbatch count
                print(f"bench_pipeline: {e}", file=sys.stderr)
        rounds.append(r)
    res = {"single_1thread_sps": max(r["single"] for r in rounds),
           "single_2thread_sps": max(r["single_2thread"] for r in rounds)}
    for scheme in ("nsplit", "fast", "fast-async"):
        best = max((r[scheme] for r in rounds), key=lambda summary: summary[RATE])
        key = scheme.replace("-", "_")
        res[f"{key}_sps"] = best[RATE]
        res[f"{key}_ranges"] = best["plans"][0]["ranges"]
    res["fast_whole_pass_sps"] = max(r["fast"]["samples_per_s"] for r in rounds)   # first step included
    # (the summary's staleness is a histogram: steps whose forwards ran on weights 0, 1, ... steps old)
    res["fast_async_max_staleness"] = max(max(i for i, n in enumerate(r["fast-async"]["staleness"]) if n)
                                          for r in rounds)
    res["fast_1f1b_sps"] = max(r["fast_1f1b"] for r in rounds)
    res["fast_unpinned_sps"] = max(r["fast_unpinned"] for r in rounds)
    res["torch_pipelining_sps"] = max(r["torch"] for r in rounds)
    res["torch_pipelining_unpinned_sps"] = max(r["torch_unpinned"] for r in rounds)
    ran = [name for name in SCHEDULES if all(f"torch_{name}" in r for r in rounds)]
    res["torch_pipelining_schedules"] = {name: max(r[f"torch_{name}"] for r in rounds) for name in ran}
    res["torch_pipelining_best_schedule"] = max(ran, key=res["torch_pipelining_schedules"].get)
    res["torch_pipelining_best_sps"] = res["torch_pipelining_schedules"][res["torch_pipelining_best_schedule"]]
    res["torch_pipelining_split"] = {"head_layers": head, "stages": {
        name: torch_stages(head, DEPTH + 1, SCHEDULES[name][1]) for name in ran}}
    res["fast_stage_ms"] = stage_ms(res["fast_ranges"], args.steps)
    res["fast_ceiling_sps"] = BATCH / (max(res["fast_stage_ms"]) / 1000)
    res["pinned_cpus"] = cpus
    res["agent_options"], res["fast_options"] = list(DEDICATED), list(FAST)
    res["fast_vs_single"] = res["fast_sps"] / res["single_1thread_sps"]
    res["fast_vs_torch_pipelining"] = res["fast_sps"] / res["torch_pipelining_sps"]
    res["fast_async_vs_single"] = res["fast_async_sps"] / res["single_1thread_sps"]
    res["fast_ceiling_vs_single"] = res["fast_ceiling_sps"] / res["single_1thread_sps"]
    # headline: paired ratios, the median over repeats of the ratio within one repeat, with min and max
    res.update(paired([r["fast"][RATE] / r["single"] for r in rounds], "fast_vs_single_paired"))
    res.update(paired([r["fast"][RATE] / r["single_2thread"] for r in rounds], "fast_vs_single_2thread_paired"))
    res.update(paired([r["fast"][RATE] / r["torch"] for r in rounds], "fast_vs_torch_pipelining_paired"))
    res.update(paired([r["fast"][RATE] / max(r[f"torch_{name}"] for name in ran) for r in rounds],
                      "fast_vs_torch_best_paired"))
    res.update(paired([r["fast-async"][RATE] / r["single_2thread"] for r in rounds],
                      "fast_async_vs_single_2thread_paired"))
    res.update(steps=args.steps, repeats=args.repeats, batch=BATCH, microbatches=MICRO, width=WIDTH, depth=DEPTH)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:38s} {v:.3f}" if isinstance(v, float) else f"{k:38s} {v}")


if __name__ == "__main__":
    main()
