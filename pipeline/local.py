"""N-split training in one process: every stage's generator driven round-robin with in-memory
mailboxes. Same schedules, same stage code as the agents; used by tests and as a readable spec of
what a ring computes."""
from __future__ import annotations

from pipeline import schedule as S
from pipeline.config import JobConfig
from pipeline.data import Dataset, batch_sizes, microbatch_sizes, pass_order
from pipeline.execute import (Recv, Send, StepDone, StepInput, StepResult, run_backward_role, run_forward_role,
                              run_program)
from pipeline.stage import Stage, peer_memory
from protocols.errors import SplitringError


class Deadlock(SplitringError, RuntimeError):
    pass


def drive(gens: list, roles: S.Roles | None = None, idle=None) -> list[list[StepResult]]:
    """Run the generators of one chain's programs to completion; `roles` says who receives a message
    (default a plain chain: fwd to i+1, bwd to i-1); idle(i), if given, is called when generator i
    waits for a message that is not there yet (agents work ahead only in a step's drain; tests
    call it at every wait, the most there can be). Returns, per generator,
    its results in the order its steps finished."""
    roles = roles or S.Roles(len(gens))
    mail: dict[tuple[int, str, int, int], dict] = {}
    waiting: list[Recv | None] = [None] * len(gens)
    started = [False] * len(gens)
    done = [False] * len(gens)
    results: list[list[StepResult]] = [[] for _ in gens]
    while not all(done):
        progressed = False
        for i, g in enumerate(gens):
            if done[i]:
                continue
            value = None
            if waiting[i] is not None:
                key = (i, waiting[i].kind, waiting[i].step, waiting[i].mb)
                if key not in mail:
                    if idle:
                        idle(i)
                    continue
                value = mail.pop(key)
            try:
                req = g.send(value) if started[i] else next(g)
                started[i] = True
                while isinstance(req, (Send, StepDone)):
                    if isinstance(req, StepDone):
                        results[i].append(req.result)
                    else:
                        mail[roles.to(i, req.kind), req.kind, req.step, req.mb] = req.payload
                    req = g.send(None)
                waiting[i] = req
            except StopIteration:
                done[i] = True
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


def watch_memory(peaks: list[int], stages: list[Stage], hosted: list[Stage], roles: S.Roles) -> None:
    """Account memory as the agents do (peer.worker): after every change of a stage (Stage.on_change),
    peaks[j] becomes at least what the peer at chain position j holds, its own stage (without gradients
    where its backward runs elsewhere) and the backward roles it hosts together."""
    n = len(stages)

    def account(j: int):
        mine = [hosted[p - n] for p in range(n, roles.programs) if roles.host(p) == j]

        def update():
            peaks[j] = max(peaks[j], peer_memory(stages[j], mine, j in roles.remote))
        return update

    for j, st in enumerate(stages):
        st.on_change = account(j)
        st.on_change()
    for p, st in zip(range(n, roles.programs), hosted):
        st.on_change = account(roles.host(p))


def train(cfg: JobConfig, shards: list[Dataset], ranges: list[tuple[int, int]],
          on_step=None, work_ahead: bool = False, peaks: list[int] | None = None) -> dict:
    """Train like a ring of len(shards) peers with the given per-chain-position layer ranges
    (the same for every rotation). on_step(results), if given, gets each step's results, one per
    stage. work_ahead: stages do deferred work whenever they wait (Stage.work_ahead), which must not
    change the result. peaks, a list of one int per chain position: the most memory each held at once
    (watch_memory). Returns the final full state dict (as build_model's)."""
    n = len(shards)
    stages = [Stage.build(cfg, a, b) for a, b in ranges]
    roles = S.Roles(n, cfg.remote_backward())
    for epoch in range(cfg.epochs):
        for p in range(n):
            head = shards[p]
            order = pass_order(len(head), cfg.seed, epoch, cfg.shuffle)
            sizes = batch_sizes(len(head), cfg.batch_size)
            starts = [sum(sizes[:s]) for s in range(len(sizes))]
            inputs = (make_step_input(head, order[a:a + b], cfg.microbatches) for a, b in zip(starts, sizes))
            mbs = [len(microbatch_sizes(b, cfg.microbatches)) for b in sizes]
            if roles.remote:
                progs = roles.pass_programs(mbs, cfg.max_staleness)
                gens = [run_forward_role(stages[j], progs[j], cfg.max_staleness) if j in roles.remote else
                        run_program(stages[j], progs[j], j, n, sizes, inputs if j == 0 else None) for j in range(n)]
                hosted = [Stage(cfg, {}) for _ in progs[n:]]
                gens += [run_backward_role(st, p, cfg.max_staleness) for st, p in zip(hosted, progs[n:])]
            else:
                gens = [run_program(st, S.pass_program(cfg.scheme, cfg.pipeline, j, n, mbs, cfg.max_staleness), j, n,
                                    sizes, inputs if j == 0 else None) for j, st in enumerate(stages)]
                hosted = []
            owner = stages + hosted   # the Stage each generator runs on
            if peaks is not None:
                watch_memory(peaks, stages, hosted, roles)
            per_stage = drive(gens, roles, (lambda i: owner[i].work_ahead()) if work_ahead else None)
            if on_step:
                for step_results in zip(*per_stage):
                    on_step(list(step_results))
    state = {}
    for st in stages:
        for i, m in st.layers.items():
            state.update({f"{i}.{k}": v for k, v in m.state_dict().items()})
    return state
