"""N-split training in one process: every stage's generator driven round-robin with in-memory
mailboxes. Same schedules, same stage code as the agents; used by tests and as a readable spec of
what a ring computes."""
from __future__ import annotations

from pipeline import schedule as S
from pipeline.config import JobConfig
from pipeline.data import Dataset, batch_sizes, microbatch_sizes, pass_order
from pipeline.execute import Recv, Send, StepInput, StepResult, run_step
from pipeline.stage import Stage


class Deadlock(RuntimeError):
    pass


def drive(gens: list) -> list[StepResult]:
    """Run stage generators of one chain to completion. Stage i sends fwd to i+1 and bwd to i-1."""
    mail: dict[tuple[int, str, int], dict] = {}
    waiting: list[Recv | None] = [None] * len(gens)
    started = [False] * len(gens)
    results: list[StepResult | None] = [None] * len(gens)
    while any(r is None for r in results):
        progressed = False
        for i, g in enumerate(gens):
            if results[i] is not None:
                continue
            value = None
            if waiting[i] is not None:
                key = (i, waiting[i].kind, waiting[i].mb)
                if key not in mail:
                    continue
                value = mail.pop(key)
            try:
                req = g.send(value) if started[i] else next(g)
                started[i] = True
                while isinstance(req, Send):
                    dst = i + 1 if req.kind == "fwd" else i - 1
                    mail[dst, req.kind, req.mb] = req.payload
                    req = g.send(None)
                waiting[i] = req
            except StopIteration as stop:
                results[i] = stop.value
            progressed = True
        if not progressed:
            raise Deadlock(f"no stage can progress; waiting on {waiting}")
    return results


def make_step_input(ds: Dataset, idx, microbatches: int) -> StepInput:
    x, y = ds.x[idx], ds.y[idx]
    parts, start = [], 0
    for size in microbatch_sizes(len(idx), microbatches):
        parts.append((x[start:start + size], y[start:start + size]))
        start += size
    return StepInput(parts)


def train(cfg: JobConfig, shards: list[Dataset], ranges: list[tuple[int, int]]) -> dict:
    """Train like a ring of len(shards) peers with the given per-chain-position layer ranges
    (the same for every rotation). Returns the final full state dict (as build_model's)."""
    n = len(shards)
    owners: dict[int, Stage] = {}  # layer index -> the stage object holding it (moves conceptually)
    stages = [Stage.build(cfg, a, b) for a, b in ranges]
    for st in stages:
        owners.update({i: st for i in st.layers})
    for epoch in range(cfg.epochs):
        for p in range(n):
            head = shards[p]
            order = pass_order(len(head), cfg.seed, epoch, cfg.shuffle)
            start = 0
            for size in batch_sizes(len(head), cfg.batch_size):
                idx = order[start:start + size]
                start += size
                n_mb = len(microbatch_sizes(size, cfg.microbatches))
                gens = [run_step(st, S.program(cfg.scheme, cfg.pipeline, j, n, n_mb), j, n, size,
                                 make_step_input(head, idx, cfg.microbatches) if j == 0 else None)
                        for j, st in enumerate(stages)]
                drive(gens)
    state = {}
    for st in stages:
        for i, m in st.layers.items():
            state.update({f"{i}.{k}": v for k, v in m.state_dict().items()})
    return state
