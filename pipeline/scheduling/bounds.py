"""A lower bound on the makespan of any schedule, to tell how much any method could still gain.

The linear relaxation of an assignment y[j][h] in [0, 1] (each client's shares sum to 1, memory holds)
under two necessary conditions on the makespan T:
- every client's own path: T >= sum_h y[j][h] * (release + forward + delay + backward + tail)[j][h];
- every helper's work: T >= min release on h + sum_j y[j][h] * (forward + backward)[j][h] + min tail on h.
Both hold for any integral assignment, so the LP optimum is a valid bound.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

from pipeline.scheduling.instance import Instance


def lower_bound(inst: Instance) -> float:
    k, h = inst.clients, inst.helpers
    release, tail = np.array(inst.release), np.array(inst.tail)
    work = np.array(inst.forward) + np.array(inst.backward)
    path = release + work + np.array(inst.delay) + tail
    n = k * h + 1  # y[j][h] row-major, then T
    cost = np.zeros(n)
    cost[-1] = 1.0

    rows, rhs = [], []
    for j in range(k):  # own path
        row = np.zeros(n)
        row[j * h:(j + 1) * h] = path[j]
        row[-1] = -1.0
        rows.append(row)
        rhs.append(0.0)
    for i in range(h):  # helper work and memory
        row = np.zeros(n)
        row[i:k * h:h] = work[:, i]
        row[-1] = -1.0
        rows.append(row)
        rhs.append(-(release[:, i].min() + tail[:, i].min()))
        row = np.zeros(n)
        row[i:k * h:h] = inst.demand
        rows.append(row)
        rhs.append(inst.capacity[i])
    each = np.zeros((k, n))
    for j in range(k):
        each[j, j * h:(j + 1) * h] = 1.0

    result = linprog(cost, A_ub=np.array(rows), b_ub=rhs, A_eq=each, b_eq=np.ones(k),
                     bounds=[(0, 1)] * (k * h) + [(0, None)], method="highs")
    if result.status != 0:
        raise ValueError(f"lower bound LP failed: {result.message}")
    return float(result.fun)
