"""Re-planning at every rotation of the ring."""
from __future__ import annotations

from pipeline.planner.model import Device, LayerCost, Plan
from pipeline.planner.solve import plan
from pipeline.schedule import chain_order


def plan_rotations(ring: list[Device], layers: list[LayerCost], scheme: str = "nsplit", microbatches: int = 1,
                   previous: dict[str, tuple[int, int]] | None = None, max_staleness: int = 0) -> list[Plan]:
    """One plan per rotation r = 0..N-1, whose chain is ring[r:] + ring[:r]. Each is optimal for its chain
    and, among equally fast plans, moves the fewest bytes from the plan before it (rotation 0: from
    `previous`, if given); `Plan.bytes_moved` is what that swap moves. The swap from the last rotation
    back to rotation 0 of the next epoch moves `moved_bytes(plans[-1].assignment, plans[0].assignment)`."""
    plans = []
    for r in range(len(ring)):
        plans.append(plan(chain_order(list(ring), r), layers, scheme, microbatches, previous, max_staleness))
        previous = plans[-1].assignment
    return plans
