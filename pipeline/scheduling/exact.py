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
from pipeline.scheduling.schedule import BACKWARD, FORWARD, Infeasible, Schedule
from pipeline.scheduling.sequencing import Sequence, groups, timing, to_schedule
from pipeline.scheduling.simulator import simulate

# HiGHS works in seconds rather than ms: big-M constraints stay better conditioned.
SCALE = 1e-3


def milp(inst: Instance, time_limit: float = 60.0) -> tuple[Schedule, bool]:
    """The optimal schedule, and whether HiGHS proved it optimal within the time limit (if not,
    the best schedule it found, or ours if that is better).

    Variables: x[j,h] (client j on helper h), the start of each client's forward and backward, the
    makespan T, and o[t,u] (task t before task u) for the tasks of every pair of clients. Disjunctive
    big-M constraints keep two tasks apart only when both clients share a helper."""
    k, hs = inst.clients, inst.helpers
    heuristic = ours.solve(inst)
    upper, lower_t = simulate(inst, heuristic) * SCALE, lower_bound(inst) * SCALE
    if upper <= lower_t * (1 + 1e-9):
        return heuristic, True  # ours meets the lower bound: optimal
    big_m = upper + max(max(r) for r in inst.forward + inst.backward) * SCALE

    x = lambda j, h: j * hs + h
    start = lambda j, kind: k * hs + 2 * j + kind
    t_var = k * hs + 2 * k
    tasks = [(j, kind) for j in range(k) for kind in (FORWARD, BACKWARD)]
    pairs = [(t, u) for t, u in itertools.combinations(tasks, 2) if t[0] != u[0]]
    o = lambda p: t_var + 1 + p
    n = t_var + 1 + len(pairs)
    time = lambda table, j, h: table[j][h] * SCALE

    rows: list[tuple[dict[int, float], float, float]] = []  # (coefficients, lower, upper)
    for j in range(k):
        rows.append(({x(j, h): 1.0 for h in range(hs)}, 1.0, 1.0))
        rows.append(({start(j, FORWARD): 1.0, **{x(j, h): -time(inst.release, j, h) for h in range(hs)}}, 0.0, np.inf))
        rows.append(({start(j, BACKWARD): 1.0, start(j, FORWARD): -1.0,
                      **{x(j, h): -(time(inst.forward, j, h) + time(inst.delay, j, h)) for h in range(hs)}},
                     0.0, np.inf))
        rows.append(({t_var: 1.0, start(j, BACKWARD): -1.0,
                      **{x(j, h): -(time(inst.backward, j, h) + time(inst.tail, j, h)) for h in range(hs)}},
                     0.0, np.inf))
    for h in range(hs):
        rows.append(({x(j, h): inst.demand[j] for j in range(k)}, -np.inf, inst.capacity[h]))
    duration = lambda task, h: time(inst.forward if task[1] == FORWARD else inst.backward, task[0], h)
    for p, (t, u) in enumerate(pairs):
        for h in range(hs):
            both = {x(t[0], h): -big_m, x(u[0], h): -big_m}
            # o = 1: t first; o = 0: u first. Relaxed unless both clients are on h.
            rows.append(({start(*u): 1.0, start(*t): -1.0, o(p): -big_m, **both},
                         duration(t, h) - 3 * big_m, np.inf))
            rows.append(({start(*t): 1.0, start(*u): -1.0, o(p): big_m, **both},
                         duration(u, h) - 2 * big_m, np.inf))

    matrix = lil_matrix((len(rows), n))
    for i, (coefficients, _, _) in enumerate(rows):
        for col, value in coefficients.items():
            matrix[i, col] = value
    cost = np.zeros(n)
    cost[t_var] = 1.0
    integrality = np.zeros(n)
    integrality[:k * hs] = 1
    integrality[t_var + 1:] = 1
    lower, upper_bounds = np.zeros(n), np.full(n, np.inf)
    upper_bounds[:k * hs] = 1
    upper_bounds[t_var + 1:] = 1
    lower[t_var], upper_bounds[t_var] = lower_t * (1 - 1e-6), upper * (1 + 1e-6)
    result = scipy_milp(cost, integrality=integrality, bounds=Bounds(lower, upper_bounds),
                        constraints=LinearConstraint(matrix.tocsr(), [r[1] for r in rows], [r[2] for r in rows]),
                        options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
    if result.x is None:
        return heuristic, False  # nothing better than ours was found in time
    assignment = [max(range(hs), key=lambda h: result.x[x(j, h)]) for j in range(k)]
    sequences = [sorted(((j, kind) for j in g for kind in (FORWARD, BACKWARD)),
                        key=lambda task: (result.x[start(*task)], task[1]))
                 for g in groups(inst, assignment)]
    found = to_schedule(inst, assignment, sequences)
    best = min((found, heuristic), key=lambda s: simulate(inst, s))
    return best, result.status == 0


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
            kind = FORWARD if j in waiting else BACKWARD
            seq.append((j, kind))
            extend(seq, waiting - {j}, running | {j} if kind == FORWARD else running - {j})
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
