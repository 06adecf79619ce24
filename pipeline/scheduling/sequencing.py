"""One helper's task order: timing a given order, dispatch rules, and small improvements.

A sequence is a list of (client, FORWARD | BACKWARD) in the order the helper runs them; each task
starts as early as the order, its release and the helper allow (no preemption, no idle time that
an earlier start could remove). Helpers are independent once the assignment is fixed.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from pipeline.scheduling.instance import Instance
from pipeline.scheduling.solution import BACKWARD, FORWARD, Schedule

Sequence = list[tuple[int, int]]
# A rule maps (instance, helper, client, kind, release) to a key; the ready task with the smallest key runs next.
Rule = Callable[[Instance, int, int, int, float], tuple]


def span(inst: Instance, h: int, seq: Sequence) -> float:
    """Makespan of helper h's clients when it runs `seq`."""
    return timing(inst, h, seq)[1]


def timing(inst: Instance, h: int, seq: Sequence) -> tuple[dict[int, list[float]], float]:
    """Start times {client: [forward, backward]} and the latest client end for `seq` on helper h."""
    t, end, starts = 0.0, 0.0, {}
    for j, kind in seq:
        if kind == FORWARD:
            start = max(t, inst.release[j][h])
            starts[j] = [start, 0.0]
            t = start + inst.forward[j][h]
        else:
            start = max(t, starts[j][0] + inst.forward[j][h] + inst.delay[j][h])
            starts[j][1] = start
            t = start + inst.backward[j][h]
            end = max(end, t + inst.tail[j][h])
    return starts, end


def _remaining(inst: Instance, h: int, j: int, kind: int) -> float:
    """Length of the client's path from the start of this task to its end, if nothing waits."""
    rest = inst.backward[j][h] + inst.tail[j][h]
    return rest if kind == BACKWARD else rest + inst.forward[j][h] + inst.delay[j][h]


def fcfs(inst, h, j, kind, release):
    """First come, first served: the task whose input arrived first."""
    return (release, kind, j)


def longest_path(inst, h, j, kind, release):
    """Jackson's rule extended to both tasks: the longest remaining path first."""
    return (-_remaining(inst, h, j, kind), j)


def forward_first(inst, h, j, kind, release):
    """Forwards before backwards, so clients' part-3 work overlaps the helper's; longest path within."""
    return (kind, -_remaining(inst, h, j, kind), j)


def backward_first(inst, h, j, kind, release):
    """Backwards before forwards, so clients finish early; longest path within."""
    return (-kind, -_remaining(inst, h, j, kind), j)


# (rule, active) pairs worth trying; an active FCFS equals FCFS, an active backward-first rarely helps.
POLICIES: tuple[tuple[Rule, bool], ...] = ((fcfs, False), (longest_path, False), (longest_path, True),
                                           (forward_first, False), (forward_first, True), (backward_first, False))


def dispatch(inst: Instance, h: int, clients: Iterable[int], rule: Rule, active: bool = False) -> Sequence:
    """List schedule: each time the helper picks a task, it runs the one the rule prefers among
    - non-delay (default): the tasks that have arrived (or, if none has, the next to arrive);
    - active: every task that could start before any task could end, so the helper may wait for
      a more urgent task about to arrive.
    A forward arrives with its activations, a backward with its gradient."""
    return (_active if active else _non_delay)(inst, h, list(clients), rule)


def _non_delay(inst: Instance, h: int, clients: list[int], rule: Rule) -> Sequence:
    arrivals = [(inst.release[j][h], j, FORWARD) for j in clients]  # heap of tasks yet to arrive
    heapq.heapify(arrivals)
    ready: list[tuple[tuple, int, int]] = []  # heap of arrived tasks by the rule's key
    seq, t = [], 0.0
    while arrivals or ready:
        if not ready:
            t = max(t, arrivals[0][0])
        while arrivals and arrivals[0][0] <= t:
            r, j, kind = heapq.heappop(arrivals)
            heapq.heappush(ready, (rule(inst, h, j, kind, r), j, kind))
        _, j, kind = heapq.heappop(ready)
        seq.append((j, kind))
        if kind == FORWARD:
            t += inst.forward[j][h]
            heapq.heappush(arrivals, (t + inst.delay[j][h], j, BACKWARD))
        else:
            t += inst.backward[j][h]
    return seq


def _active(inst: Instance, h: int, clients: list[int], rule: Rule) -> Sequence:
    duration = (inst.forward, inst.backward)
    waiting = {(j, FORWARD): (inst.release[j][h], rule(inst, h, j, FORWARD, inst.release[j][h])) for j in clients}
    seq, t = [], 0.0
    while waiting:
        horizon = min(max(t, r) + duration[kind][j][h] for (j, kind), (r, _) in waiting.items())
        _, j, kind = min((key, j, kind) for (j, kind), (r, key) in waiting.items() if max(t, r) <= horizon)
        t = max(t, waiting.pop((j, kind))[0]) + duration[kind][j][h]
        seq.append((j, kind))
        if kind == FORWARD:
            arrival = t + inst.delay[j][h]
            waiting[(j, BACKWARD)] = (arrival, rule(inst, h, j, BACKWARD, arrival))
    return seq


def best_dispatch(inst: Instance, h: int, clients: Iterable[int],
                  policies: tuple[tuple[Rule, bool], ...] = POLICIES) -> tuple[float, Sequence]:
    """The best (makespan, sequence) over the policies; ties go to the earlier one."""
    clients = list(clients)
    return min(((span(inst, h, seq), seq) for seq in (dispatch(inst, h, clients, *p) for p in policies)),
               key=lambda x: x[0])


def polish(inst: Instance, h: int, seq: Sequence, max_passes: int = 3) -> tuple[float, Sequence]:
    """Swap neighbouring tasks of different clients while that shortens the helper's makespan."""
    seq, best = list(seq), span(inst, h, seq)
    for _ in range(max_passes):
        improved = False
        for i in range(len(seq) - 1):
            if seq[i][0] == seq[i + 1][0]:
                continue  # a client's backward never precedes its forward
            seq[i], seq[i + 1] = seq[i + 1], seq[i]
            value = span(inst, h, seq)
            if value < best - 1e-9:
                best, improved = value, True
            else:
                seq[i], seq[i + 1] = seq[i + 1], seq[i]
        if not improved:
            break
    return best, seq


def exact_order(inst: Instance, h: int, seq: Sequence, nodes: int = 20_000) -> tuple[float, Sequence, bool]:
    """The shortest order of helper h's tasks by branch and bound over active schedules, from the incumbent
    `seq`, and whether it is proven shortest; gives up after `nodes` nodes with the best found. A node's
    bound: each client's remaining own path, and the helper's remaining work plus the shortest tail."""
    best: list = [span(inst, h, seq), list(seq)]
    left = [nodes]
    clients = sorted({j for j, _ in seq})
    duration = {(j, kind): (inst.forward if kind == FORWARD else inst.backward)[j][h]
                for j in clients for kind in (FORWARD, BACKWARD)}

    def ready(task, t: float, ends: dict) -> float:
        j, kind = task
        return max(t, inst.release[j][h] if kind == FORWARD else ends[j] + inst.delay[j][h])

    def search(t: float, ends: dict, end: float, todo: list, order: list) -> None:
        left[0] -= 1
        if left[0] < 0:
            return
        if not todo:
            if end < best[0] - 1e-9:
                best[0], best[1] = end, list(order)
            return
        bound = max(end, t + sum(duration[task] + (duration[task[0], BACKWARD] if task[1] == FORWARD else 0)
                                 for task in todo) + min(inst.tail[j][h] for j, _ in todo))
        for task in todo:
            j, kind = task
            bound = max(bound, ready(task, t, ends) + _remaining(inst, h, j, kind))
        if bound >= best[0] - 1e-9:
            return
        starts = sorted((ready(task, t, ends), k) for k, task in enumerate(todo))
        first_end = min(s + duration[todo[k]] for s, k in starts)
        for start, k in starts:
            if start > first_end:
                break   # only active schedules: no task starts after another could have ended
            (j, kind), rest = todo[k], todo[:k] + todo[k + 1:]
            finish = start + duration[j, kind]
            if kind == FORWARD:
                search(finish, {**ends, j: finish}, end, rest + [(j, BACKWARD)], order + [(j, kind)])
            else:
                search(finish, ends, max(end, finish + inst.tail[j][h]), rest, order + [(j, kind)])

    search(0.0, {}, 0.0, [(j, FORWARD) for j in clients], [])
    return best[0], best[1], left[0] >= 0


def to_schedule(inst: Instance, assignment: list[int], sequences: list[Sequence]) -> Schedule:
    """The schedule that runs each helper's sequence as early as possible."""
    starts: dict[int, list[float]] = {}
    for h, seq in enumerate(sequences):
        starts.update(timing(inst, h, seq)[0])
    return Schedule(tuple(assignment), tuple(tuple(starts[j]) for j in range(inst.clients)))


def groups(inst: Instance, assignment: list[int]) -> list[list[int]]:
    """Clients of each helper, in client order."""
    out: list[list[int]] = [[] for _ in range(inst.helpers)]
    for j, h in enumerate(assignment):
        out[h].append(j)
    return out
