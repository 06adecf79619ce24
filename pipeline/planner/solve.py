"""Exact split planning.

Core: a dynamic program over (chain position k, layers [0, b) placed so far) that finds the
lexicographically smallest (time of one microbatch, bytes moved) over all splits whose stages fit their
memory budgets and whose every stage and link is within a cap on the per-microbatch bottleneck:

    best[k][b] = min( best[k-1][b]                                    (position k skipped),
                      min over a in [lo_k(b), b) of best[k-1][a] + cost_k(a, b) )

Memory and the cap are monotone in the range, so the allowed a form a window [lo_k(b), b) with lo_k
nondecreasing; stage times are prefix-sum differences, so the inner minimum is a range minimum, answered
for all b at once with a sparse table: O(N L log L) numpy work for N positions and L layers.

"nsplit" needs one uncapped run. "fast" minimises time + (M - 1) * bottleneck: the smallest feasible
cap is found by bisection (a cheaper reachability run per probe), then a best-first branch and bound
over cap intervals: a run at cap c returns the best plan with bottleneck <= c, which settles every cap
between that plan's bottleneck and c; an interval is dropped once its lower bound (the time known to
its right + (M - 1) * its lowest cap) exceeds the best value found.

Times are rounded to integer ticks of 2**-32 of the largest stage or link time, so sums are exact in
float64 and plans of equal predicted time tie exactly; ties go to the fewest bytes moved.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import numpy as np

from pipeline.planner.model import (Device, LayerCost, Plan, PlanInfeasible, check, evaluate, format_bytes,
                                    in_flight, stage_memory)
from pipeline.swaps import owners, swap_moves

TICKS = 2.0 ** 32   # ticks in the largest stage or link time: the resolution of ties


def plan(devices: list[Device], layers: list[LayerCost], scheme: str = "nsplit", microbatches: int = 1,
         previous: dict[str, tuple[int, int]] | None = None) -> Plan:
    """The fastest split of `layers` over `devices` (chain order, head first) under the cost and memory
    model of pipeline.planner.model. Among plans of equal predicted time it moves the fewest bytes from
    `previous` (peer -> layer range, e.g. the last rotation's `Plan.assignment`); `Plan.bytes_moved`
    counts them. Raises PlanInfeasible if the budgets cannot hold the model, ValueError on bad input."""
    check(devices, layers, scheme, microbatches)
    inst = _Instance(devices, layers, in_flight(scheme, microbatches), previous)
    if not _feasible(inst, None):
        raise _shortfall(inst, devices, layers)
    best = _solve(inst, None) if scheme == "nsplit" else _fast(inst, microbatches)
    result = evaluate(devices, layers, best.ranges, scheme, microbatches)
    return replace(result, bytes_moved=moved_bytes(previous or {}, result.assignment, layers))


def moved_bytes(old: dict[str, tuple[int, int]], new: dict[str, tuple[int, int]], layers: list[LayerCost]) -> int:
    """Parameters + optimizer state of every layer whose owner changes (gradients are not kept across steps)."""
    return sum(layers[i].param_bytes + layers[i].optim_bytes for i, _, _ in swap_moves(old, new))


class _Instance:
    """One planning problem as arrays over (chain position k, layer boundary b = 0..L)."""

    def __init__(self, devices: list[Device], layers: list[LayerCost], kept_microbatches: int,
                 previous: dict[str, tuple[int, int]] | None):
        self.n, self.L = len(devices), len(layers)
        times = np.array([d.layer_times(layers) for d in devices], dtype=float)
        act = np.array([l.activation_bytes for l in layers], dtype=float)
        bandwidth = np.array([[d.bandwidth] for d in devices])
        latency = np.array([[d.latency] for d in devices])
        wire = np.zeros((self.n, self.L + 1))   # a cut at boundary b sends layer b-1's output; none at b = L
        wire[:, 1:self.L] = act[:-1] / bandwidth
        send = np.zeros_like(wire)
        send[:, 1:self.L] = 2 * (latency + wire[:, 1:self.L])
        largest = max(times.sum(axis=1).max(), send.max())
        tick = largest / TICKS if largest > 0 else 1.0
        self.T = _cumsum0(np.round(times / tick))   # T[k, b]: ticks of layers [0, b) on device k
        self.send, self.wire = np.round(send / tick), np.round(wire / tick)

        # Memory of [a, b) = Q[b] - h[a]; h is nondecreasing, so the fitting a are a window [lo, b).
        fixed = np.array([2 * l.param_bytes + l.optim_bytes for l in layers], dtype=np.int64)
        kept = kept_microbatches * act.astype(np.int64)
        self.Q = _cumsum0(fixed + kept)
        self.h = self.Q.copy()
        self.h[1:] -= kept   # the stage's input (layer a-1's output) is kept too
        budgets = [self.Q[-1] if d.memory_budget is None else d.memory_budget for d in devices]
        self.mem_lo = np.stack([np.searchsorted(self.h, self.Q - budget, side="left") for budget in budgets])

        owner = owners(previous or {})
        size = np.array([l.param_bytes + l.optim_bytes for l in layers], dtype=float)
        self.W = _cumsum0(np.array([[s if previous and owner.get(i) != d.name else 0.0 for i, s in enumerate(size)]
                                    for d in devices]))   # W[k, b]: bytes moved if device k took layers [0, b)

    def window(self, k: int, cap: float | None) -> tuple[np.ndarray, np.ndarray]:
        """For every boundary b: the smallest a such that [a, b) fits device k (and is within `cap`), and
        whether a non-empty stage may end at b there (its window is not empty, its link within `cap`)."""
        lo, ok = self.mem_lo[k], np.ones(self.L + 1, dtype=bool)
        if cap is not None:
            lo = np.maximum(lo, np.searchsorted(self.T[k], self.T[k] - cap, side="left"))
            ok = self.wire[k] <= cap
        return lo, ok & (lo < np.arange(self.L + 1))

    def bottleneck(self, ranges: list[tuple[int, int]]) -> float:
        return max(max(self.T[k, b] - self.T[k, a], self.wire[k, b]) if a < b else 0.0
                   for k, (a, b) in enumerate(ranges))


@dataclass(frozen=True)
class _Solution:
    ticks: float        # one microbatch through the chain
    moved: float        # bytes moved from the previous assignment
    bottleneck: float
    ranges: list[tuple[int, int]]


def _solve(inst: _Instance, cap: float | None) -> _Solution | None:
    """The DP of the module docstring; None if no split is within `cap`."""
    every_b = np.arange(inst.L + 1)
    ticks, moved = np.full(inst.L + 1, np.inf), np.full(inst.L + 1, np.inf)
    ticks[0] = moved[0] = 0.0   # before the head: nothing placed, so the head starts at layer 0
    parents = []
    for k in range(inst.n):
        lo, ok = inst.window(k, cap)
        ends = np.flatnonzero(ok)
        starts = _window_argmin(ticks - inst.T[k], moved - inst.W[k], lo[ends], ends - 1)
        new_ticks, new_moved, parent = np.full_like(ticks, np.inf), np.full_like(moved, np.inf), every_b.copy()
        new_ticks[ends] = ticks[starts] - inst.T[k, starts] + inst.T[k, ends] + inst.send[k, ends]
        new_moved[ends] = moved[starts] - inst.W[k, starts] + inst.W[k, ends]
        parent[ends] = starts
        if k > 0:   # every position but the head may be skipped; on a tie, skip it
            skip = (ticks < new_ticks) | ((ticks == new_ticks) & (moved <= new_moved))
            new_ticks, new_moved = np.where(skip, ticks, new_ticks), np.where(skip, moved, new_moved)
            parent = np.where(skip, every_b, parent)
        ticks, moved = new_ticks, new_moved
        parents.append(parent)
    if not np.isfinite(ticks[-1]):
        return None
    ranges, b = [], inst.L
    for parent in reversed(parents):
        ranges.append((int(parent[b]), b))
        b = int(parent[b])
    ranges.reverse()
    return _Solution(ticks[-1], moved[-1], inst.bottleneck(ranges), ranges)


def _window_argmin(primary: np.ndarray, secondary: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For each query j, the index in [lo[j], hi[j]] (lo <= hi) minimising (primary, secondary, index)."""
    order = np.lexsort((secondary, primary))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    levels = [rank]   # levels[j][i]: the smallest rank in [i, i + 2**j)
    while 2 ** len(levels) <= len(rank):
        half = 2 ** (len(levels) - 1)
        levels.append(np.minimum(levels[-1][:-half], levels[-1][half:]))
    table = np.full((len(levels), len(rank)), len(rank))
    for j, level in enumerate(levels):
        table[j, :len(level)] = level
    j = np.frexp(hi - lo + 1)[1] - 1   # floor(log2(window length))
    return order[np.minimum(table[j, lo], table[j, hi - 2 ** j + 1])]


def _feasible(inst: _Instance, cap: float | None) -> bool:
    """Whether some split fits every budget with every stage and link within `cap`."""
    reach = np.zeros(inst.L + 1, dtype=bool)
    reach[0] = True
    for k in range(inst.n):
        lo, ok = inst.window(k, cap)
        count = _cumsum0(reach)   # count[i]: reachable boundaries below i
        ends = ok & (count[1:] > count[lo])
        reach = ends if k == 0 else reach | ends
    return bool(reach[-1])


def _fast(inst: _Instance, microbatches: int) -> _Solution:
    """The split minimising ticks + (M - 1) * bottleneck (the module docstring's branch and bound)."""
    def value(s: _Solution) -> float:
        return s.ticks + (microbatches - 1) * s.bottleneck

    best = _solve(inst, None)
    if microbatches == 1:
        return best
    lo, hi = 0.0, best.bottleneck
    while lo < hi:   # the smallest cap any split meets
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _feasible(inst, mid) else (mid + 1, hi)
    heap = [(best.ticks + (microbatches - 1) * lo, lo, best.bottleneck - 1, best.ticks)]
    while heap and heap[0][0] <= value(best):
        _, lo, hi, ticks_right = heapq.heappop(heap)
        if lo > hi:
            continue
        mid = (lo + hi) // 2
        s = _solve(inst, mid)   # never None: mid is at least the smallest feasible cap
        if (value(s), s.moved) < (value(best), best.moved):
            best = s
        heapq.heappush(heap, (s.ticks + (microbatches - 1) * lo, lo, s.bottleneck - 1, s.ticks))
        heapq.heappush(heap, (ticks_right + (microbatches - 1) * (mid + 1), mid + 1, hi, ticks_right))
    return best


def _shortfall(inst: _Instance, devices: list[Device], layers: list[LayerCost]) -> PlanInfeasible:
    """Explain why the budgets cannot hold the model: fill the peers in chain order, each taking as many
    layers as it can hold (the farthest any split can reach), and name what is left over."""
    head = devices[0]
    first = int(inst.Q[1] - inst.h[0])
    if head.memory_budget is not None and first > head.memory_budget:
        short = first - head.memory_budget
        return PlanInfeasible(
            f"the head peer {head.name} must hold layer 0 (inputs never leave it), which needs "
            f"{format_bytes(first)}; its budget is {format_bytes(head.memory_budget)}: "
            f"{format_bytes(short)} ({short} bytes) short", short, (0, inst.L), (head.name,))
    a, starts, fill = 0, [], []
    for k, d in enumerate(devices):
        b = int(np.searchsorted(inst.mem_lo[k], a, side="right")) - 1   # farthest end with a fitting window
        b = max(a, b)
        starts.append(a)
        used = stage_memory(layers, a, b, 0) + int(inst.Q[b] - inst.h[a]) - stage_memory(layers, a, b, 0) if a < b else 0
        fill.append(f"{d.name}: {_layer_text(a, b)}, {format_bytes(used)} of {format_bytes(d.memory_budget)}")
        a = b
    tail = devices[-1]
    short = int(inst.Q[-1] - inst.h[starts[-1]]) - tail.memory_budget
    need, total = int(inst.Q[-1]), sum(d.memory_budget for d in devices)
    names = tuple(d.name for d in devices)
    return PlanInfeasible(
        f"the model does not fit the peers' memory budgets: {_layer_text(a, inst.L)} of {inst.L} are left over "
        f"after each peer, in chain order, took all it can hold ({'; '.join(fill)}). {tail.name} would need "
        f"{format_bytes(short)} ({short} bytes) more to hold them too; the layers need at least "
        f"{format_bytes(need)} in all, the budgets sum to {format_bytes(total)}", short, (a, inst.L), names)


def _layer_text(a: int, b: int) -> str:
    return "no layers" if a == b else f"layer {a}" if b == a + 1 else f"layers {a}..{b - 1}"


def _cumsum0(x: np.ndarray) -> np.ndarray:
    """Prefix sums along the last axis, starting with 0."""
    return np.concatenate([np.zeros(x.shape[:-1] + (1,), dtype=x.dtype), np.cumsum(x, axis=-1)], axis=-1)
