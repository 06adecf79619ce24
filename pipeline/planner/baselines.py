"""Simple splits to compare the planner against (evaluate them with pipeline.planner.evaluate)."""
from __future__ import annotations

import numpy as np

from pipeline.planner.model import Device, LayerCost
from pipeline.swaps import even_split

__all__ = ["even_split", "proportional_split"]


def proportional_split(devices: list[Device], layers: list[LayerCost]) -> list[tuple[int, int]]:
    """Contiguous ranges, head first, each device's share of the reference compute time proportional
    to its speed (reference time of the whole model / its own); cuts at the nearest layer boundary,
    the head keeping at least one layer. Ignores memory and links."""
    own = [sum(d.layer_times(layers)) for d in devices]
    if min(own) <= 0:
        raise ValueError(f"device {devices[own.index(min(own))].name} has no compute time to be proportional to")
    work = np.concatenate([[0.0], np.cumsum([l.forward_s + l.backward_s for l in layers])])
    speeds = 1 / np.array(own)
    targets = np.cumsum(speeds)[:-1] / speeds.sum() * work[-1]
    cuts = np.abs(work[None, :] - targets[:, None]).argmin(axis=1)
    cuts = np.maximum.accumulate(np.maximum(cuts, 1)).tolist() + [len(layers)]
    return list(zip([0] + cuts[:-1], cuts))
