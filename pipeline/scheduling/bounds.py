"""A lower bound on the makespan of any schedule, to tell how much any method could still gain.

The linear relaxation of an assignment y[j][h] in [0, 1] (each client's shares sum to 1, memory holds)
under necessary conditions on the makespan T:
- every client's own path: T >= sum_h y[j][h] * (release + forward + delay + backward + tail)[j][h];
- every helper's work, as a single machine with release dates and tails (Jackson's bound): for a set S of
  its tasks, T >= min release over S + the work of S + min tail over S. A forward task arrives at its
  release and leaves delay + backward + tail after it; a backward arrives no sooner than release + forward
  + delay and leaves the tail. S ranges over the tasks arriving at or after each release value, and over
  those leaving at least each tail value.
A helper's constant (min release + min tail) only holds if some task of S is on it; for an empty S it
must not exceed a bound already known (every client's shortest path, then the previous LP's optimum), so
each constant is capped by that, and the LP is solved again with the higher cap until it stops rising.
The per-set constraints matter where backward tasks wait a long part-3 delay (ResNet-101 scenario 1), which
one helper-wide constraint cannot see.
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from pipeline.scheduling.instance import Instance

ROUNDS = 6   # LP solves at most; the cap rarely rises after two


def lower_bound(inst: Instance) -> float:
    cap = float(max(min(p) for p in _paths(inst)))
    for _ in range(ROUNDS):
        value = _solve(inst, cap)
        if value <= cap * (1 + 1e-9):
            return max(value, cap)
        cap = value * (1 - 1e-9)   # HiGHS's own tolerance must not lift the cap over the optimum
    return cap


def _paths(inst: Instance) -> np.ndarray:
    return (np.array(inst.release) + np.array(inst.forward) + np.array(inst.delay) + np.array(inst.backward)
            + np.array(inst.tail))


@contextlib.contextmanager
def quiet_stdout():
    """HiGHS's MIP solver prints debug lines straight to file descriptor 1 (scipy 1.x builds): keep them off
    stdout, where the CLI and the benchmarks print JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def integral_bound(inst: Instance, time_limit: float = 10.0, cap: float | None = None) -> float:
    """A tighter bound: the same conditions with each client wholly on one helper (a MILP over the
    assignment; HiGHS's proven bound when the time limit stops it). The LP spreads a client's work over
    helpers, which on a few clients per helper can hide a whole client's backward (VGG-19 scenario 1)."""
    from scipy.optimize import Bounds, LinearConstraint, milp as scipy_milp   # here: 0.25 s off every agent's start

    cap = lower_bound(inst) if cap is None else cap   # cap: lower_bound(inst), if known
    cost, a_ub, b_ub, a_eq, n = _program(inst, cap)
    k, h = inst.clients, inst.helpers
    integrality = np.zeros(n)
    integrality[:k * h] = 1
    with quiet_stdout():
        result = scipy_milp(cost, constraints=[LinearConstraint(a_ub, -np.inf, b_ub), LinearConstraint(a_eq, 1.0, 1.0)],
                      integrality=integrality, bounds=Bounds(np.zeros(n), np.r_[np.ones(k * h), np.inf]),
                      options={"time_limit": time_limit})
    if result.mip_dual_bound is None or not np.isfinite(result.mip_dual_bound):
        return cap
    return max(cap, float(result.mip_dual_bound))


def _solve(inst: Instance, cap: float) -> float:
    from scipy.optimize import linprog

    cost, a_ub, b_ub, a_eq, n = _program(inst, cap)
    result = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=np.ones(inst.clients),
                     bounds=[(0, 1)] * (n - 1) + [(0, None)], method="highs")
    if result.status != 0:
        raise ValueError(f"lower bound LP failed: {result.message}")
    return float(result.fun)


def _program(inst: Instance, cap: float):
    """The program: cost, A_ub, b_ub, A_eq (each client's shares sum to 1), columns."""
    from scipy.sparse import coo_matrix, csr_matrix

    k, h = inst.clients, inst.helpers
    release, fwd, delay, bwd, tail = (np.array(a) for a in (inst.release, inst.forward, inst.delay,
                                                            inst.backward, inst.tail))
    n = k * h + 1  # y[j][h] row-major, then T
    entries: list[tuple[int, int, float]] = []   # (row, column, coefficient) of A_ub
    rhs: list[float] = []

    def row(coefs: dict[int, float], bound: float) -> None:   # sum coefs * columns <= bound
        entries.extend((len(rhs), col, v) for col, v in coefs.items())
        rhs.append(bound)

    path = _paths(inst)
    for j in range(k):   # T >= the client's own path
        row({**{j * h + i: path[j, i] for i in range(h)}, n - 1: -1.0}, 0.0)
    for i in range(h):
        # (client, arrives, work, leaves after): each client's forward and backward task on helper i
        tasks = [(j, release[j, i], fwd[j, i], delay[j, i] + bwd[j, i] + tail[j, i]) for j in range(k)] + \
                [(j, release[j, i] + fwd[j, i] + delay[j, i], bwd[j, i], tail[j, i]) for j in range(k)]
        for field in (1, 3):
            for threshold in sorted({t[field] for t in tasks}):
                chosen = [t for t in tasks if t[field] >= threshold]
                coefs = {n - 1: -1.0}
                for j, _, work, _ in chosen:
                    coefs[j * h + i] = coefs.get(j * h + i, 0.0) + work
                row(coefs, -min(cap, min(t[1] for t in chosen) + min(t[3] for t in chosen)))
        row({j * h + i: inst.demand[j] for j in range(k)}, inst.capacity[i])
    r, c, v = zip(*entries)
    each = np.zeros((k, n))
    for j in range(k):
        each[j, j * h:(j + 1) * h] = 1.0
    cost = np.zeros(n)
    cost[-1] = 1.0
    return cost, coo_matrix((v, (r, c)), shape=(len(rhs), n)).tocsr(), np.array(rhs), csr_matrix(each), n
