"""Exact methods for small instances: a MILP solved by HiGHS, and brute force for tiny ones.

Both return semi-active schedules: the optimal task order on each helper, every task as early as
that order allows. For a fixed order no schedule ends sooner, so nothing is lost.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp as scipy_milp
from scipy.sparse import lil_matrix

from pipeline.scheduling import ours
from pipeline.scheduling.bounds import lower_bound
from pipeline.scheduling.instance import Instance
from pipeline.scheduling.solution import BACKWARD, FORWARD, Infeasible, Schedule
from pipeline.scheduling.sequencing import Sequence, groups, timing, to_schedule
from pipeline.scheduling.simulator import simulate

# HiGHS works in seconds rather than ms: big-M constraints stay better conditioned.
SCALE = 1e-3


Row = tuple[dict[int, float], float, float]  # {column: coefficient}, lower, upper


class _Columns:
    """Column indices: x[j,h] (client j on helper h), each task's start, the makespan T, and
    o[p] for the p-th pair of tasks of different clients (1: the pair's first task runs first)."""

    def __init__(self, inst: Instance):
        self.k, self.h = inst.clients, inst.helpers
        tasks = [(j, kind) for j in range(self.k) for kind in (FORWARD, BACKWARD)]
        self.pairs = [(t, u) for t, u in itertools.combinations(tasks, 2) if t[0] != u[0]]
        self.makespan = self.k * self.h + 2 * self.k
        self.count = self.makespan + 1 + len(self.pairs)

    def x(self, j: int, h: int) -> int:
        return j * self.h + h

    def start(self, j: int, kind: int) -> int:
        return self.k * self.h + 2 * j + kind

    def order(self, p: int) -> int:
        return self.makespan + 1 + p


def _rows(inst: Instance, c: _Columns, big_m: float) -> list[Row]:
    scaled = lambda table, j, h: table[j][h] * SCALE
    helpers = range(inst.helpers)
    rows: list[Row] = []
    for j in range(inst.clients):
        rows.append(({c.x(j, h): 1.0 for h in helpers}, 1.0, 1.0))  # one helper each
        # forward after its activations arrive; backward after its gradient; T after the client ends
        rows.append(({c.start(j, FORWARD): 1.0, **{c.x(j, h): -scaled(inst.release, j, h) for h in helpers}},
                     0.0, np.inf))
        rows.append(({c.start(j, BACKWARD): 1.0, c.start(j, FORWARD): -1.0,
                      **{c.x(j, h): -(scaled(inst.forward, j, h) + scaled(inst.delay, j, h)) for h in helpers}},
                     0.0, np.inf))
        rows.append(({c.makespan: 1.0, c.start(j, BACKWARD): -1.0,
                      **{c.x(j, h): -(scaled(inst.backward, j, h) + scaled(inst.tail, j, h)) for h in helpers}},
                     0.0, np.inf))
    for h in helpers:
        rows.append(({c.x(j, h): inst.demand[j] for j in range(inst.clients)}, -np.inf, inst.capacity[h]))
    duration = lambda task, h: scaled(inst.forward if task[1] == FORWARD else inst.backward, task[0], h)
    for p, (t, u) in enumerate(c.pairs):
        for h in helpers:
            # Binding only when both clients are on h: o = 1 puts t first, o = 0 puts u first.
            both = {c.x(t[0], h): -big_m, c.x(u[0], h): -big_m}
            rows.append(({c.start(*u): 1.0, c.start(*t): -1.0, c.order(p): -big_m, **both},
                         duration(t, h) - 3 * big_m, np.inf))
            rows.append(({c.start(*t): 1.0, c.start(*u): -1.0, c.order(p): big_m, **both},
                         duration(u, h) - 2 * big_m, np.inf))
    return rows


def milp(inst: Instance, time_limit: float = 60.0) -> tuple[Schedule, bool]:
    """The optimal schedule, and whether it is proven optimal (if HiGHS hits the time limit: the
    better of its best schedule and ours).

    Disjunctive big-M formulation: each pair of tasks of different clients gets an order variable
    that only binds when both clients share a helper. Ours gives the upper bound (and big M), the LP
    relaxation of bounds.py the lower bound; when they meet, ours is optimal and no MILP is needed."""
    heuristic = ours.solve(inst)
    upper, lower = simulate(inst, heuristic) * SCALE, lower_bound(inst) * SCALE
    if upper <= lower * (1 + 1e-9):
        return heuristic, True
    c = _Columns(inst)
    rows = _rows(inst, c, big_m=upper + max(max(r) for r in inst.forward + inst.backward) * SCALE)
    matrix = lil_matrix((len(rows), c.count))
    for i, (coefficients, _, _) in enumerate(rows):
        for col, value in coefficients.items():
            matrix[i, col] = value
    cost = np.zeros(c.count)
    cost[c.makespan] = 1.0
    binary = np.ones(c.count)
    binary[c.k * c.h:c.makespan + 1] = 0  # starts and T are continuous
    low, high = np.zeros(c.count), np.where(binary == 1, 1.0, np.inf)
    low[c.makespan], high[c.makespan] = lower * (1 - 1e-6), upper * (1 + 1e-6)
    result = scipy_milp(cost, integrality=binary, bounds=Bounds(low, high),
                        constraints=LinearConstraint(matrix.tocsr(), [r[1] for r in rows], [r[2] for r in rows]),
                        options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
    if result.x is None:
        return heuristic, False  # no better schedule found in time
    assignment = [max(range(c.h), key=lambda h: result.x[c.x(j, h)]) for j in range(c.k)]
    # Keep HiGHS's order on each helper and re-time it exactly (never later than HiGHS's times).
    # A backward never sorts before its own forward, even within the solver's tolerances.
    start = lambda j, kind: max(result.x[c.start(j, FORWARD)], result.x[c.start(j, kind)])
    sequences = [sorted(((j, kind) for j in g for kind in (FORWARD, BACKWARD)), key=lambda t: (start(*t), t[1]))
                 for g in groups(inst, assignment)]
    found = to_schedule(inst, assignment, sequences)
    return min((found, heuristic), key=lambda s: simulate(inst, s)), result.status == 0


def _best_sequence(inst: Instance, h: int, clients: tuple[int, ...]) -> tuple[float, Sequence]:
    """Every order of these clients' tasks on helper h (each forward before its backward)."""
    best: list = [float("inf"), []]

    def extend(seq: Sequence, waiting: set[int], running: set[int]) -> None:
        if not waiting and not running:
            value = timing(inst, h, seq)[1]
            if value < best[0]:
                best[:] = [value, list(seq)]
            return
        for j in sorted(waiting | running):
            if j in waiting:  # its forward next
                seq.append((j, FORWARD))
                extend(seq, waiting - {j}, running | {j})
            else:  # its backward next
                seq.append((j, BACKWARD))
                extend(seq, waiting, running - {j})
            seq.pop()

    extend([], set(clients), set())
    return best[0], best[1]


def brute_force(inst: Instance) -> Schedule:
    """Every memory-feasible assignment and every task order on each helper. Tiny instances only."""
    if inst.clients > 5:
        raise ValueError("brute force is for at most 5 clients")
    best_for = lru_cache(maxsize=None)(lambda h, clients: _best_sequence(inst, h, clients))
    best: tuple[float, list[int], list[Sequence]] | None = None
    for assignment in itertools.product(range(inst.helpers), repeat=inst.clients):
        gs = groups(inst, list(assignment))
        if any(sum(inst.demand[j] for j in g) > inst.capacity[h] for h, g in enumerate(gs)):
            continue
        found = [best_for(h, tuple(g)) for h, g in enumerate(gs)]
        value = max(f[0] for f in found)
        if best is None or value < best[0]:
            best = (value, list(assignment), [f[1] for f in found])
    if best is None:
        raise Infeasible("no assignment fits the helpers' memory")
    return to_schedule(inst, best[1], best[2])
