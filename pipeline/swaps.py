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


def swap_moves(old: dict[str, tuple[int, int]], new: dict[str, tuple[int, int]]) -> list[tuple[int, str, str]]:
    """(layer, from, to) for every layer whose owner changes, in layer order."""
    return moves_from(owners(old), new)


def moves_from(held: dict[int, str], new: dict[str, tuple[int, int]]) -> list[tuple[int, str, str]]:
    """(layer, from, to) for every layer whose holder (layer -> peer) is not its owner in `new`."""
    after = owners(new)
    return [(i, held[i], after[i]) for i in sorted(after) if held.get(i) != after[i]]
