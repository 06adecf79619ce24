"""Layer assignments and the moves a swap makes (pure)."""
from __future__ import annotations


def even_split(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges, sizes differing by at most one, larger ones first (so the head is never
    empty while there are layers)."""
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for j in range(n_stages):
        size = base + (1 if j < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


def owners(assignment: dict[str, tuple[int, int]]) -> dict[int, str]:
    return {i: peer for peer, (a, b) in assignment.items() for i in range(a, b)}


def swap_moves(old: dict[str, tuple[int, int]] | dict[int, str], new: dict[str, tuple[int, int]]) -> list[tuple[int, str, str]]:
    """(layer, from, to) for every layer whose owner changes, in layer order. `old` is an assignment (peer ->
    range) or who holds each layer (layer -> peer)."""
    before, after = (old if all(isinstance(k, int) for k in old) else owners(old)), owners(new)
    return [(i, before[i], after[i]) for i in sorted(after) if before.get(i) != after[i]]
