"""Our scalable method.

1. Two starting assignments: earliest predicted finish (clients with the longest own path first, each
   to the helper whose makespan grows least) and the balanced-greedy baseline's.
2. Each helper's order is the best of a few dispatch policies, first-come-first-served among them,
   so the start from balanced-greedy is never worse than the baseline itself.
3. From the better start, local search on the bottleneck helper: move one of its clients to another
   helper, or swap one with another helper's client, when that lowers the bottleneck's makespan
   without making the other helper as long; failing that, look for a better order of its tasks.
   Only improvements are accepted, and the search stops early once the makespan meets the longest
   client's own path (no schedule ends sooner).
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.scheduling.baselines import balanced_greedy_assignment, packed_assignment
from pipeline.scheduling.instance import Instance
from pipeline.scheduling.solution import Infeasible, Schedule
from pipeline.scheduling.sequencing import (Sequence, best_dispatch, exact_order, groups, longest_path, polish,
                                            to_schedule)

EPS = 1e-9
# While searching, one policy keeps each evaluation cheap: on the helpers we measured it was the
# best of all policies, or within 1%, almost always. The others are tried on the bottleneck's order.
# On helpers with few clients its active variant is added: there a helper may do best to wait for an
# urgent forward (the paper's instances, VGG-19 scenario 1), and its O(n^2) cost is small.
SEARCH_POLICIES = ((longest_path, False),)
ACTIVE_MAX = 10        # clients on a helper up to which the search also tries active longest-path
EXACT_ORDER_MAX = 8    # clients on the bottleneck up to which its order is also searched exactly

Evaluated = tuple[float, Sequence]  # a helper's makespan and task order


@dataclass
class _State:
    """An assignment with each helper's clients, memory use, makespan and task order."""
    inst: Instance
    paths: list[list[float]]  # [client][helper]: the client's step if the helper never made it wait
    groups: list[list[int]]
    used: list[float]
    spans: list[float]
    seqs: list[Sequence]

    @classmethod
    def of(cls, inst: Instance, paths: list[list[float]], assignment: list[int]) -> _State:
        gs = groups(inst, assignment)
        evaluated = [best_dispatch(inst, h, g) for h, g in enumerate(gs)]
        return cls(inst, paths, gs, [sum(inst.demand[j] for j in g) for g in gs],
                   [e[0] for e in evaluated], [e[1] for e in evaluated])

    @property
    def makespan(self) -> float:
        return max(self.spans)

    def fits(self, h: int, extra: float) -> bool:
        return self.used[h] + extra <= self.inst.capacity[h]

    def set(self, h: int, clients: list[int], evaluated: Evaluated) -> None:
        self.groups[h] = clients
        self.used[h] = sum(self.inst.demand[j] for j in clients)
        self.spans[h], self.seqs[h] = evaluated

    def assignment(self) -> list[int]:
        out = [0] * self.inst.clients
        for h, g in enumerate(self.groups):
            for j in g:
                out[j] = h
        return out

    def evaluate(self, h: int, clients: list[int], below: float) -> Evaluated | None:
        """Helper h's makespan and order with these clients, if it ends before `below`."""
        inst = self.inst
        if clients:
            # No order ends before the longest own path, nor before all the helper's work is done.
            bound = max(max(self.paths[j][h] for j in clients),
                        min(inst.release[j][h] for j in clients) + min(inst.tail[j][h] for j in clients)
                        + sum(inst.forward[j][h] + inst.backward[j][h] for j in clients))
            if bound >= below - EPS:
                return None
        policies = SEARCH_POLICIES + (((longest_path, True),) if len(clients) <= ACTIVE_MAX else ())
        found = best_dispatch(inst, h, clients, policies)
        return found if found[0] < below - EPS else None


Change = list[tuple[int, list[int], Evaluated]]  # (helper, its new clients, evaluation)


def _own_paths(inst: Instance) -> list[list[float]]:
    return [[inst.release[j][h] + inst.forward[j][h] + inst.delay[j][h] + inst.backward[j][h] + inst.tail[j][h]
             for h in range(inst.helpers)] for j in range(inst.clients)]


def earliest_finish_assignment(inst: Instance) -> list[int]:
    paths = _own_paths(inst)
    gs: list[list[int]] = [[] for _ in range(inst.helpers)]
    spans, used = [0.0] * inst.helpers, [0.0] * inst.helpers
    assignment = [0] * inst.clients
    for j in sorted(range(inst.clients), key=lambda j: -min(paths[j])):
        options = []
        for h in range(inst.helpers):
            if used[h] + inst.demand[j] <= inst.capacity[h]:
                value = best_dispatch(inst, h, gs[h] + [j], SEARCH_POLICIES)[0]
                # Grow the makespan least; among equals, prefer the helper where j itself is fastest.
                options.append((max(value, max(spans)), value, paths[j][h], h))
        if not options:
            raise Infeasible(f"client {j} fits on no helper")
        _, spans[h], _, h = min(options)
        gs[h].append(j)
        used[h] += inst.demand[j]
        assignment[j] = h
    return assignment


def _best_move(st: _State, b: int) -> Change | None:
    """Of the moves of one client off bottleneck helper b, the one that lowers max(b's, the
    receiver's makespan) most below b's makespan, if any."""
    inst, target = st.inst, st.spans[b]
    best: tuple[float, Change] | None = None
    for j in st.groups[b]:
        rest, here = [c for c in st.groups[b] if c != j], None
        for h in range(inst.helpers):
            if h == b or not st.fits(h, inst.demand[j]):
                continue
            limit = target if best is None else best[0]
            there = st.evaluate(h, st.groups[h] + [j], limit)
            if there is None:
                continue
            here = here or st.evaluate(b, rest, target)
            if here is None:
                break  # b is no shorter without j: no move of j helps
            if max(here[0], there[0]) < limit - EPS:
                best = (max(here[0], there[0]), [(b, rest, here), (h, st.groups[h] + [j], there)])
    return best[1] if best else None


def _first_swap(st: _State, b: int) -> Change | None:
    """The first swap of a client j of bottleneck helper b with a client k of another helper that
    leaves both ending before b does now. Only k with a shorter own path on b than j are tried,
    largest difference first."""
    inst, target, paths = st.inst, st.spans[b], st.paths
    pairs = sorted((paths[k][b] - paths[j][b], j, h, k)
                   for j in st.groups[b] for h in range(inst.helpers) if h != b
                   for k in st.groups[h] if paths[k][b] < paths[j][b])
    for _, j, h, k in pairs:
        if not (st.fits(h, inst.demand[j] - inst.demand[k]) and st.fits(b, inst.demand[k] - inst.demand[j])):
            continue
        here_clients = [c for c in st.groups[b] if c != j] + [k]
        there_clients = [c for c in st.groups[h] if c != k] + [j]
        here = st.evaluate(b, here_clients, target)
        there = here and st.evaluate(h, there_clients, target)
        if there:
            return [(b, here_clients, here), (h, there_clients, there)]
    return None


def _reorder(st: _State, h: int) -> Change | None:
    """A shorter task order for helper h: every dispatch policy, then neighbour swaps, then (few clients)
    branch and bound."""
    found = min(best_dispatch(st.inst, h, st.groups[h]), (st.spans[h], st.seqs[h]), key=lambda e: e[0])
    found = polish(st.inst, h, found[1])
    if len(st.groups[h]) <= EXACT_ORDER_MAX:
        found = exact_order(st.inst, h, found[1])[:2]
    return [(h, st.groups[h], found)] if found[0] < st.spans[h] - EPS else None


def solve(inst: Instance) -> Schedule:
    paths = _own_paths(inst)
    starts = []
    for make in (balanced_greedy_assignment, earliest_finish_assignment):
        try:
            starts.append(_State.of(inst, paths, make(inst)))
        except Infeasible:
            pass  # memory too tight for this greedy order; the other may fit
    if not starts:   # memory too tight for both: start from any assignment that fits (or none does)
        starts.append(_State.of(inst, paths, packed_assignment(inst)))
    st = min(starts, key=lambda s: s.makespan)
    floor = max(min(p) for p in paths)  # the longest own path on the client's best helper
    while st.makespan > floor + EPS:
        b = max(range(inst.helpers), key=lambda h: st.spans[h])
        change = _best_move(st, b) or _first_swap(st, b) or _reorder(st, b)
        if change is None:
            break
        for h, clients, evaluated in change:
            st.set(h, clients, evaluated)
    return to_schedule(inst, st.assignment(), st.seqs)
