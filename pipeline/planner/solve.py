"""Exact split planning.

Core: a dynamic program over (chain position k, layers [0, b) placed so far) that finds the smallest
(time of one microbatch, bytes moved) over all splits whose stages fit their memory budgets and whose
every stage and link is within a cap on the per-microbatch bottleneck:

    best[k][b] = min( best[k-1][b]                                    (position k skipped),
                      min over a in [lo_k(b), b) of best[k-1][a] + cost_k(a, b) )

Memory and the cap are monotone in the range, so the allowed a form a window [lo_k(b), b) with lo_k
nondecreasing; stage costs are prefix-sum differences, so the inner minimum is a range minimum, answered
for all b at once with a sparse table: O(N L log L) numpy work for N positions and L layers, and the
same numpy calls serve many caps at once.

"nsplit" needs one uncapped run. "fast" minimises time + (M - 1) * bottleneck by branch and bound over
caps: a run at cap c gives S(c), the least time of a split whose bottleneck is <= c, and that split,
whose own bottleneck B settles every cap in [B, c]. What is left are intervals of caps [lo, hi] on which
S is at least the S found at their right end, so their value is at least that + (M - 1) * lo; an
interval is cut back to the caps where this bound does not exceed the best value found. Each round runs
the DP for about BATCH caps, spread over the open intervals in proportion to their widths.

Exactness: times are rounded to integer ticks, about 2**-39 of an upper bound of any split's time, and bytes
moved to units of at most 2**-20 of the model's parameters and optimizer state; a split's (ticks,
bytes) is packed into one int64, so sums are exact, equal times tie exactly, and the smallest key is
the fastest split moving the fewest bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pipeline.planner.model import (Device, LayerCost, Plan, PlanInfeasible, check, evaluate, format_bytes,
                                    held_microbatches)
from pipeline.swaps import owners, swap_moves

TIME_BITS, BYTE_BITS = 39, 21   # key = ticks << BYTE_BITS | byte units; both fields stay below 2**62
INF = 2 ** 62                   # key of "no split"
BATCH = 16                      # caps tried per round by the "fast" search


def plan(devices: list[Device], layers: list[LayerCost], scheme: str = "nsplit", microbatches: int = 1,
         previous: dict[str, tuple[int, int]] | None = None, max_staleness: int = 0) -> Plan:
    """The fastest split of `layers` over `devices` (chain order, head first) under the cost and memory
    model of pipeline.planner.model. Among plans of equal predicted time it moves the fewest bytes from
    `previous` (peer -> layer range, e.g. the last rotation's `Plan.assignment`); `Plan.bytes_moved`
    counts them. Raises PlanInfeasible if the budgets cannot hold the model, ValueError on bad input."""
    check(devices, layers, scheme, microbatches)
    if previous and sorted(owners(previous)) != list(range(len(layers))):
        raise ValueError(f"the previous assignment {previous} does not cover layers 0..{len(layers) - 1}")
    n = len(devices)
    inst = _Instance(devices, layers, [held_microbatches(scheme, microbatches, k, n, max_staleness) for k in range(n)],
                     previous)
    best = _solve(inst, np.array([np.inf]))[0] if scheme == "nsplit" else _fast(inst, microbatches)
    if best is None:
        raise _shortfall(inst, devices)
    result = evaluate(devices, layers, best.ranges, scheme, microbatches, max_staleness)
    return replace(result, bytes_moved=moved_bytes(previous, result.assignment, layers) if previous else 0)


def moved_bytes(old: dict[str, tuple[int, int]], new: dict[str, tuple[int, int]], layers: list[LayerCost]) -> int:
    """Parameters + optimizer state of every layer whose owner changes (gradients are not kept across steps)."""
    return sum(layers[i].param_bytes + layers[i].optim_bytes for i, _, _ in swap_moves(old, new))


class _Instance:
    """One planning problem as integer arrays over (chain position k, layer boundary b = 0..L)."""

    def __init__(self, devices: list[Device], layers: list[LayerCost], held: list[tuple[int, int, int]],
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
        upper = (times.sum(axis=1) + send.max(axis=1)).sum()   # no split takes longer
        # a power of two, so that times that are short binary fractions (tests, round numbers) stay exact
        tick = math.ldexp(1.0, max(math.frexp(upper)[1], -1000) - TIME_BITS)   # (and stays > 0)
        self.T = _cumsum0(np.round(times / tick).astype(np.int64))   # T[k, b]: ticks of layers [0, b) on k
        self.wire = np.round(wire / tick).astype(np.int64)

        size = np.array([l.param_bytes + l.optim_bytes for l in layers], dtype=float)
        unit = max(1.0, np.ceil(size.sum() / 2 ** (BYTE_BITS - 1)))   # rounding adds at most L/2 units
        owner = owners(previous or {})
        moved = [[s if previous and owner.get(i) != d.name else 0.0 for i, s in enumerate(size)] for d in devices]
        units = _cumsum0(np.round(np.array(moved) / unit).astype(np.int64))
        self.key = (self.T << BYTE_BITS) + units   # key[k, b]: device k taking layers [0, b)
        self.send_key = np.round(send / tick).astype(np.int64) << BYTE_BITS

        # Memory of [a, b) on device k = Q[b] - h[a]; h is nondecreasing, so the fitting a are a window [lo, b).
        # With nb forward buffers, np microbatches of weight-gradient pairs and `copies` weight copies held
        # (model.held_microbatches, model.stage_memory):
        # sum over [a, b) of (fixed + copies * params + (nb + 2 np) * act + (nb + np) * saved), + (nb + np) *
        # act[a-1] (the input, kept by both), - np * act[b-1] (the last layer's output is no Linear's input).
        params = np.array([l.param_bytes for l in layers], dtype=np.int64)
        fixed = np.array([2 * l.param_bytes + l.optim_bytes for l in layers], dtype=np.int64)
        act = np.array([l.activation_bytes for l in layers], dtype=np.int64)
        saved = np.array([l.saved_bytes for l in layers], dtype=np.int64)
        self.Q = np.stack([_cumsum0(fixed + copies * params + (nb + 2 * np_) * act + (nb + np_) * saved)
                           for nb, np_, copies in held])
        self.h = self.Q.copy()
        for k, (nb, np_, _) in enumerate(held):
            self.Q[k, 1:] -= np_ * act
            self.h[k, 1:] -= (nb + np_) * act
        self.mem_lo = np.stack([np.searchsorted(h, Q - (Q[-1] if d.memory_budget is None else d.memory_budget),
                                                side="left") for d, Q, h in zip(devices, self.Q, self.h)])

    def window(self, k: int, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per cap and boundary b: the smallest a such that [a, b) fits device k's budget and the cap, and
        whether a non-empty stage may end at b (its window is not empty, its link within the cap)."""
        lo = np.maximum(self.mem_lo[k], np.searchsorted(self.T[k], self.T[k] - caps[:, None], side="left"))
        return lo, (self.wire[k] <= caps[:, None]) & (lo < np.arange(self.L + 1))

    def bottleneck(self, ranges: list[tuple[int, int]]) -> int:
        return max(int(max(self.T[k, b] - self.T[k, a], self.wire[k, b])) if a < b else 0
                   for k, (a, b) in enumerate(ranges))


@dataclass(frozen=True)
class _Solution:
    ticks: int          # one microbatch through the chain
    moved: int          # byte units moved from the previous assignment
    bottleneck: int     # ticks of the busiest stage or link direction
    ranges: list[tuple[int, int]]


def _solve(inst: _Instance, caps: np.ndarray) -> list[_Solution | None]:
    """The DP of the module docstring for each cap (inf: memory only); None where no split meets it."""
    every_b = np.arange(inst.L + 1)
    key = np.full((len(caps), inst.L + 1), INF)
    key[:, 0] = 0   # before the head: nothing placed, so the head starts at layer 0
    keys, windows = [key], []
    for k in range(inst.n):
        lo, ok = inst.window(k, caps)
        hi = np.maximum(every_b - 1, 0)
        stage = _window_min(key - inst.key[k], np.minimum(lo, hi), hi) + inst.key[k] + inst.send_key[k]
        stage = np.minimum(np.maximum(stage, ~ok * INF), INF)   # INF where no stage may end
        key = stage if k == 0 else np.minimum(key, stage)   # every position but the head may be skipped
        keys.append(key)
        windows.append(lo)
    return [_backtrack(inst, keys, windows, row) if keys[-1][row, -1] < INF else None for row in range(len(caps))]


def _backtrack(inst: _Instance, keys: list[np.ndarray], windows: list[np.ndarray], row: int) -> _Solution:
    """The split behind keys[-1][row, L]: walk back through the positions, re-finding each choice."""
    ranges, b = [], inst.L
    for k in reversed(range(inst.n)):
        before = keys[k][row]
        a = b
        if k == 0 or before[b] != keys[k + 1][row, b]:   # position k owns [a, b): the best start in its window
            lo = int(windows[k][row, b])
            a = lo + int(np.argmin(before[lo:b] - inst.key[k, lo:b]))
        ranges.append((a, b))
        b = a
    ranges.reverse()
    final = int(keys[-1][row, -1])
    return _Solution(final >> BYTE_BITS, final & (2 ** BYTE_BITS - 1), inst.bottleneck(ranges), ranges)


def _window_min(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """min(values[r, lo[r, j] : hi[r, j] + 1]) for every r, j (lo <= hi), with a sparse table per row."""
    rows, width = values.shape
    length = hi - lo + 1
    level = np.frexp(length)[1] - 1   # floor(log2(length)): two blocks of 2**level cover the window
    table = np.empty((int(level.max()) + 1, rows, width), dtype=values.dtype)   # [j, r, i]: min of [i, i + 2**j)
    table[0] = values
    for j in range(1, len(table)):
        half, n = 2 ** (j - 1), width - 2 ** j + 1
        np.minimum(table[j - 1, :, :n], table[j - 1, :, half:half + n], out=table[j, :, :n])
    first = level * (rows * width) + np.arange(0, rows * width, width)[:, None] + lo
    flat = table.reshape(-1)
    return np.minimum(flat[first], flat[first + length - (1 << level)])


def _fast(inst: _Instance, microbatches: int) -> _Solution | None:
    """The split minimising ticks + (M - 1) * bottleneck: the module docstring's branch and bound."""
    lam = microbatches - 1
    best = _solve(inst, np.array([np.inf]))[0]
    if best is None or lam == 0:
        return best

    def value(s: _Solution) -> int:
        return s.ticks + lam * s.bottleneck

    intervals = [(0, best.bottleneck - 1, best.ticks)]   # caps lo..hi, on which S(cap) >= ticks_right
    while True:
        # caps above (best - ticks_right) / lam cannot beat best (ties stay: they may move fewer bytes)
        intervals = [(lo, min(hi, (value(best) - right) // lam), right) for lo, hi, right in intervals]
        intervals = [iv for iv in intervals if iv[0] <= iv[1]]
        if not intervals:
            return best
        widths = np.array([hi - lo + 1 for lo, hi, _ in intervals], dtype=float)
        counts = np.maximum(1, BATCH * widths // widths.sum()).astype(int)
        caps = [np.unique(np.floor(np.linspace(lo, hi, n + 1)[1:])) for (lo, hi, _), n in zip(intervals, counts)]
        solutions = iter(_solve(inst, np.concatenate(caps)))
        pieces = []
        for (lo, _, _), interval_caps in zip(intervals, caps):
            for cap in interval_caps.astype(int):   # the split found at cap settles [its bottleneck, cap]
                s = next(solutions)
                if s is not None:
                    pieces.append((lo, s.bottleneck - 1, s.ticks))
                    if (value(s), s.moved) < (value(best), best.moved):
                        best = s
                lo = cap + 1   # below an infeasible cap, every cap is infeasible
        intervals = pieces


def _shortfall(inst: _Instance, devices: list[Device]) -> PlanInfeasible:
    """Explain why the budgets cannot hold the model: fill the peers in chain order, each taking as many
    layers as it can hold (the farthest any split can reach), and name what is left over."""
    head = devices[0]
    first = int(inst.Q[0, 1] - inst.h[0, 0])
    if first > head.memory_budget:
        short = first - head.memory_budget
        return PlanInfeasible(
            f"the head peer {head.name} must hold layer 0 (inputs never leave it), which needs "
            f"{format_bytes(first)}; its budget is {format_bytes(head.memory_budget)}: "
            f"{format_bytes(short)} ({short} bytes) short", short, (0, inst.L), (head.name,))
    a, fill = 0, []
    for k, d in enumerate(devices):   # every budget is set: a peer without one takes all that is left
        start = a
        a = max(a, int(np.searchsorted(inst.mem_lo[k], a, side="right")) - 1)   # farthest end it can hold
        used = int(inst.Q[k, a] - inst.h[k, start]) if start < a else 0
        fill.append(f"{d.name} {_layer_text(start, a)}, {format_bytes(used)} of {format_bytes(d.memory_budget)}")
    tail = devices[-1]
    short = int(inst.Q[-1, -1] - inst.h[-1, start]) - tail.memory_budget
    shown = fill if len(fill) <= 8 else fill[:8] + [f"{len(fill) - 8} more"]
    alone = (inst.Q[:, 1:] - inst.h[:, :-1]).min(axis=0)   # each layer as a stage of its own, where it costs least
    largest = max(d.memory_budget for d in devices)
    too_big = "".join(f" Layer {i} alone needs {format_bytes(int(alone[i]))}, more than any budget."
                      for i in np.flatnonzero(alone > largest)[:3])
    return PlanInfeasible(
        f"the model does not fit the peers' memory budgets: {_layer_text(a, inst.L)} (of {inst.L}) are left "
        f"over: {tail.name} is {format_bytes(short)} ({short} bytes) short of holding them too.{too_big} Each "
        f"peer, in chain order, took all it can hold: {'; '.join(shown)}. All layers need at least "
        f"{format_bytes(int(inst.Q[:, -1].min()))}; the budgets sum to {format_bytes(sum(d.memory_budget for d in devices))}",
        short, (a, inst.L), tuple(d.name for d in devices))


def _layer_text(a: int, b: int) -> str:
    return "no layers" if a == b else f"layer {a}" if b == a + 1 else f"layers {a}..{b - 1}"


def _cumsum0(x: np.ndarray) -> np.ndarray:
    """Prefix sums along the last axis, starting with 0."""
    return np.concatenate([np.zeros(x.shape[:-1] + (1,), dtype=x.dtype), np.cumsum(x, axis=-1)], axis=-1)
