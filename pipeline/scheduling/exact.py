"""Exact methods: a MILP solved by HiGHS for small instances, set partitioning over exactly ordered client
sets when helpers serve few clients each (any K), and brute force for tiny ones.

Both return semi-active schedules: the optimal task order on each helper, every task as early as
that order allows. For a fixed order no schedule ends sooner, so nothing is lost.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

from pipeline.scheduling import ours
from pipeline.scheduling.bounds import lower_bound, quiet_stdout
from pipeline.scheduling.instance import Instance
from pipeline.scheduling.solution import BACKWARD, FORWARD, Infeasible, Schedule
from pipeline.scheduling.sequencing import Sequence, best_dispatch, exact_order, groups, timing, to_schedule
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
    from scipy.optimize import Bounds, LinearConstraint, milp as scipy_milp   # here: 0.25 s off every agent's start
    from scipy.sparse import lil_matrix

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
    with quiet_stdout():
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


def by_client_sets(inst: Instance, time_limit: float = 300.0, max_columns: int = 200_000,
                   slack: float = 0.0) -> tuple[Schedule, bool]:
    """The optimal schedule when helpers serve few clients each, and whether it is proven optimal.

    Once clients are assigned, helpers are independent. So enumerate, per helper, every client set it can
    serve within memory and finish before ours' makespan, each with its shortest order (branch and bound,
    sequencing.exact_order), growing sets only from sets that qualify (a superset never ends sooner); then the
    least makespan limit under which the sets can cover every client, one per helper (bisection, each step an
    exact-cover MILP). Exact as long as every order and every step is decided and the columns fit
    `max_columns`; otherwise it returns the best found, not proven. `slack` admits
    sets up to that fraction above ours too (tests use it to make the MILP choose)."""
    heuristic = ours.solve(inst)
    upper = simulate(inst, heuristic) * (1 + slack)
    columns: list[tuple[int, tuple[int, ...], float, Sequence]] = []
    for h in range(inst.helpers):
        level: dict[tuple[int, ...], tuple[float, Sequence]] = {(): (0.0, [])}
        while level:
            grown: dict[tuple[int, ...], tuple[float, Sequence]] = {}
            for s in level:
                for j in range((s[-1] + 1) if s else 0, inst.clients):
                    c = s + (j,)
                    if sum(inst.demand[i] for i in c) > inst.capacity[h] or \
                            not all(c[:i] + c[i + 1:] in level for i in range(len(c))):
                        continue
                    value, order, proven = exact_order(inst, h, best_dispatch(inst, h, c)[1], nodes=2_000_000)
                    if not proven:
                        return heuristic, False
                    if value < upper * (1 - 1e-12):
                        grown[c] = (value, order)
            columns += [(h, c, v, order) for c, (v, order) in grown.items()]
            if len(columns) > max_columns:
                return heuristic, False
            level = grown
    if not columns:
        return heuristic, True   # no set ends sooner anywhere: ours is optimal
    # The least limit whose sets (makespan <= limit) cover every client, one set per helper: bisection over the
    # sets' makespans, each step a pure exact-cover MILP, which HiGHS decides fast (a makespan objective over
    # the sets would relax to nothing: T >= makespan x fractional choice).
    limits = sorted({value for _, _, value, _ in columns})
    low, high, chosen, steps = 0, len(limits) - 1, None, max(1, math.ceil(math.log2(len(limits) + 1)) + 1)
    while low <= high:
        mid = (low + high) // 2
        found = _cover(inst, [col for col in columns if col[2] <= limits[mid]], time_limit / steps)
        if found is None:   # HiGHS stopped before deciding
            break
        if found:
            chosen, high = found, mid - 1
        else:
            low = mid + 1
    else:
        if chosen is None:
            return heuristic, True   # no cover ends before ours
        return _schedule_of(inst, chosen, heuristic), True
    return (_schedule_of(inst, chosen, heuristic) if chosen else heuristic), False


def _cover(inst: Instance, columns: list, time_limit: float) -> list | bool | None:
    """One set per helper covering every client from `columns`: the chosen columns, False if none, None if
    HiGHS stopped before deciding."""
    if not columns:
        return False
    from scipy.optimize import Bounds, LinearConstraint, milp as scipy_milp
    from scipy.sparse import lil_matrix

    k, hs, n = inst.clients, inst.helpers, len(columns)
    matrix = lil_matrix((k + hs, n))
    for col, (h, c, _, _) in enumerate(columns):
        for j in c:
            matrix[j, col] = 1.0
        matrix[k + h, col] = 1.0
    with quiet_stdout():
        result = scipy_milp(np.zeros(n), integrality=np.ones(n), bounds=Bounds(0.0, 1.0),
                            constraints=LinearConstraint(matrix.tocsr(), np.r_[np.ones(k), np.zeros(hs)],
                                                         np.r_[np.ones(k), np.ones(hs)]),
                            options={"time_limit": max(time_limit, 1.0)})
    if result.status == 2:
        return False
    if result.x is None:
        return None
    return [col for i, col in enumerate(columns) if result.x[i] > 0.5]


def _schedule_of(inst: Instance, chosen: list, heuristic: Schedule) -> Schedule:
    assignment, sequences = [0] * inst.clients, [[] for _ in range(inst.helpers)]
    for h, c, _, order in chosen:
        for j in c:
            assignment[j] = h
        sequences[h] = order
    return min((to_schedule(inst, assignment, sequences), heuristic), key=lambda s: simulate(inst, s))


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
