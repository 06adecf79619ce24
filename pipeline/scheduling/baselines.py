"""The paper's two comparison methods; both let every helper serve first-come-first-served."""
from __future__ import annotations

import random

from pipeline.scheduling.instance import Instance
from pipeline.scheduling.solution import Infeasible, Schedule
from pipeline.scheduling.sequencing import dispatch, fcfs, groups, to_schedule


def _with_room(inst: Instance, used: list[float], j: int) -> list[int]:
    fits = [h for h in range(inst.helpers) if used[h] + inst.demand[j] <= inst.capacity[h]]
    if not fits:
        raise Infeasible(f"client {j} fits on no helper")
    return fits


def fcfs_schedule(inst: Instance, assignment: list[int]) -> Schedule:
    return to_schedule(inst, assignment, [dispatch(inst, h, g, fcfs) for h, g in enumerate(groups(inst, assignment))])


def random_assignment(inst: Instance, seed: int) -> list[int]:
    """Clients in random order, each to a uniformly random helper that has room."""
    rng = random.Random(seed)
    assignment, used = [0] * inst.clients, [0.0] * inst.helpers
    for j in rng.sample(range(inst.clients), inst.clients):
        h = rng.choice(_with_room(inst, used, j))
        assignment[j], used[h] = h, used[h] + inst.demand[j]
    return assignment


def balanced_greedy_assignment(inst: Instance) -> list[int]:
    """Clients in order, each to the helper with room that serves the fewest clients so far
    (lowest index on ties), keeping the number of clients per helper balanced."""
    assignment, used, count = [0] * inst.clients, [0.0] * inst.helpers, [0] * inst.helpers
    for j in range(inst.clients):
        h = min(_with_room(inst, used, j), key=lambda i: (count[i], i))
        assignment[j], used[h], count[h] = h, used[h] + inst.demand[j], count[h] + 1
    return assignment


def packed_assignment(inst: Instance) -> list[int]:
    """Any assignment that fits the helpers' memory: first-fit decreasing (largest demand first, each to
    the first helper with room), else an exact feasibility MILP (HiGHS). Infeasible only when none fits."""
    assignment, used = [0] * inst.clients, [0.0] * inst.helpers
    try:
        for j in sorted(range(inst.clients), key=lambda j: -inst.demand[j]):
            h = _with_room(inst, used, j)[0]
            assignment[j], used[h] = h, used[h] + inst.demand[j]
        return assignment
    except Infeasible:
        if len(set(inst.demand)) == 1:   # equal demands (as live jobs have): first fit is exact
            raise Infeasible(f"no assignment of the {inst.clients} clients fits the helpers' memory") from None
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    k, n = inst.clients, inst.helpers   # x[j * n + h] = 1: client j on helper h
    once = np.kron(np.eye(k), np.ones(n))
    room = np.kron(np.array(inst.demand, float), np.eye(n))   # row h: the demand placed on helper h
    res = milp(np.zeros(k * n), integrality=np.ones(k * n), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(once, 1, 1), LinearConstraint(room, -np.inf, np.array(inst.capacity))],
               options={"time_limit": 60})
    if res.status == 1:   # time limit, no assignment found yet
        raise Infeasible(f"no assignment of the {k} clients that fits the helpers' memory was found in 60 s")
    if res.x is None:
        raise Infeasible(f"no assignment of the {k} clients fits the helpers' memory")
    return [int(np.argmax(res.x[j * n:(j + 1) * n])) for j in range(k)]


def random_fcfs(inst: Instance, seed: int = 0) -> Schedule:
    return fcfs_schedule(inst, random_assignment(inst, seed))


def balanced_greedy_fcfs(inst: Instance) -> Schedule:
    return fcfs_schedule(inst, balanced_greedy_assignment(inst))
