"""Our scalable method.

1. Two starting assignments: earliest predicted finish (clients with the longest own path first, each
   to the helper whose makespan grows least) and the balanced-greedy baseline's.
2. Each helper's order is the best of a few dispatch rules, first-come-first-served among them, so the
   start from balanced-greedy is never worse than the baseline itself.
3. From the better start, local search on the bottleneck helper: move one of its clients to another
   helper, or swap it with another helper's client, whenever that lowers the bottleneck's makespan
   without creating a new one as long. Only improvements are accepted.
4. Neighbour swaps polish each helper's final order.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.scheduling.baselines import balanced_greedy_assignment
from pipeline.scheduling.instance import Instance
from pipeline.scheduling.schedule import Infeasible, Schedule
from pipeline.scheduling.sequencing import Sequence, best_dispatch, groups, longest_path, polish, to_schedule

EPS = 1e-9
# While searching, one rule: it is the best (or within 0.01% of it) on almost every helper we measured.
SEARCH_RULES = (longest_path,)


@dataclass
class _State:
    """An assignment with each helper's clients, memory use, best order and makespan."""
    inst: Instance
    groups: list[list[int]]
    used: list[float]
    spans: list[float]
    seqs: list[Sequence]

    @classmethod
    def of(cls, inst: Instance, assignment: list[int]) -> _State:
        gs = groups(inst, assignment)
        evaluated = [best_dispatch(inst, h, g) for h, g in enumerate(gs)]
        return cls(inst, gs, [sum(inst.demand[j] for j in g) for g in gs],
                   [e[0] for e in evaluated], [e[1] for e in evaluated])

    @property
    def makespan(self) -> float:
        return max(self.spans)

    def fits(self, h: int, extra: float) -> bool:
        return self.used[h] + extra <= self.inst.capacity[h]

    def set(self, h: int, clients: list[int], evaluated: tuple[float, Sequence]) -> None:
        self.groups[h] = clients
        self.used[h] = sum(self.inst.demand[j] for j in clients)
        self.spans[h], self.seqs[h] = evaluated

    def assignment(self) -> list[int]:
        out = [0] * self.inst.clients
        for h, g in enumerate(self.groups):
            for j in g:
                out[j] = h
        return out


def _own_path(inst: Instance, j: int, h: int) -> float:
    """Client j's step on helper h if the helper never made it wait."""
    return inst.release[j][h] + inst.forward[j][h] + inst.delay[j][h] + inst.backward[j][h] + inst.tail[j][h]


def _helper_bound(inst: Instance, h: int, clients: list[int]) -> float:
    """No order of these clients on helper h ends sooner: the longest own path, or the helper's
    work between the earliest release and the shortest tail."""
    if not clients:
        return 0.0
    return max(max(_own_path(inst, j, h) for j in clients),
               min(inst.release[j][h] for j in clients) + min(inst.tail[j][h] for j in clients)
               + sum(inst.forward[j][h] + inst.backward[j][h] for j in clients))


def _evaluate(inst: Instance, h: int, clients: list[int], below: float) -> tuple[float, Sequence] | None:
    """(makespan, order) of these clients on helper h if it ends before `below`, else None."""
    if _helper_bound(inst, h, clients) >= below - EPS:
        return None
    found = best_dispatch(inst, h, clients, SEARCH_RULES)
    return found if found[0] < below - EPS else None


def earliest_finish_assignment(inst: Instance) -> list[int]:
    gs: list[list[int]] = [[] for _ in range(inst.helpers)]
    spans, used = [0.0] * inst.helpers, [0.0] * inst.helpers
    assignment = [0] * inst.clients
    for j in sorted(range(inst.clients), key=lambda j: -min(_own_path(inst, j, h) for h in range(inst.helpers))):
        options = []
        for h in range(inst.helpers):
            if used[h] + inst.demand[j] <= inst.capacity[h]:
                value = best_dispatch(inst, h, gs[h] + [j], SEARCH_RULES)[0]
                # Grow the makespan least; among equals, prefer the helper where j itself is fastest.
                options.append((max(value, max(spans)), value, _own_path(inst, j, h), h))
        if not options:
            raise Infeasible(f"client {j} fits on no helper")
        _, spans[h], _, h = min(options)
        gs[h].append(j)
        used[h] += inst.demand[j]
        assignment[j] = h
    return assignment


Change = list[tuple[int, list[int], tuple[float, Sequence]]]  # (helper, its new clients, evaluation)


def _best_move(st: _State, b: int) -> Change | None:
    """Moving one client off bottleneck helper b: the move that lowers max(b's, the receiver's
    makespan) most below b's makespan, if any."""
    inst, target = st.inst, st.spans[b]
    best: tuple[float, Change] | None = None
    for j in st.groups[b]:
        here = None
        for h in range(inst.helpers):
            if h == b or not st.fits(h, inst.demand[j]):
                continue
            limit = target if best is None else best[0]
            there = _evaluate(inst, h, st.groups[h] + [j], limit)
            if there is None:
                continue
            here = here or _evaluate(inst, b, [c for c in st.groups[b] if c != j], target)
            if here is None:
                break  # b without j is no shorter: no move of j helps
            value = max(here[0], there[0])
            if value < limit - EPS:
                best = (value, [(b, [c for c in st.groups[b] if c != j], here), (h, st.groups[h] + [j], there)])
    return best[1] if best else None


def _first_swap(st: _State, b: int) -> Change | None:
    """Swapping a client of bottleneck helper b with one whose own path on b is shorter: the first
    swap (most promising pairs first) that leaves both helpers ending before b does now."""
    inst, target = st.inst, st.spans[b]
    pairs = sorted(((_own_path(inst, k, b) - _own_path(inst, j, b), j, h, k)
                    for j in st.groups[b] for h in range(inst.helpers) if h != b for k in st.groups[h]
                    if _own_path(inst, k, b) < _own_path(inst, j, b)))
    for _, j, h, k in pairs:
        if not (st.fits(h, inst.demand[j] - inst.demand[k]) and st.fits(b, inst.demand[k] - inst.demand[j])):
            continue
        here_clients = [c for c in st.groups[b] if c != j] + [k]
        there_clients = [c for c in st.groups[h] if c != k] + [j]
        here = _evaluate(inst, b, here_clients, target)
        there = here and _evaluate(inst, h, there_clients, target)
        if there:
            return [(b, here_clients, here), (h, there_clients, there)]
    return None


def solve(inst: Instance) -> Schedule:
    starts = []
    for make in (balanced_greedy_assignment, earliest_finish_assignment):
        try:
            starts.append(_State.of(inst, make(inst)))
        except Infeasible:
            pass  # memory too tight for this greedy order; try the other
    if not starts:
        raise Infeasible("neither greedy start fits the helpers' memory")
    st = min(starts, key=lambda s: s.makespan)
    # No schedule ends before every client's own path on its best helper.
    floor = max(min(_own_path(inst, j, h) for h in range(inst.helpers)) for j in range(inst.clients))
    while st.makespan > floor + EPS:
        b = max(range(inst.helpers), key=lambda h: st.spans[h])
        change = _best_move(st, b) or _first_swap(st, b)
        if change is None:
            break
        for h, clients, evaluated in change:
            st.set(h, clients, evaluated)
    for h in range(inst.helpers):
        st.spans[h], st.seqs[h] = polish(inst, h, st.seqs[h])
    return to_schedule(inst, st.assignment(), st.seqs)
