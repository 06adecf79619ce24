"""One chain's split as a job uses it: the planner's split or an even one, with remote backwards
(fast-async `--backward-at`) given or placed. Shared by the coordinator and `splitring plan`."""
from __future__ import annotations

from dataclasses import replace

from pipeline.planner.baselines import proportional_split
from pipeline.planner.model import Device, LayerCost, Plan, PlanInfeasible, evaluate, format_bytes, place_backward
from pipeline.planner.solve import plan
from pipeline.swaps import even_split


def plan_chain(devices: list[Device], layers: list[LayerCost], scheme: str, microbatches: int,
               max_staleness: int = 0, split: str = "planned", backward_at: dict[int, int] | str | None = None,
               previous: dict[str, tuple[int, int]] | None = None) -> tuple[Plan, dict[int, int]]:
    """(plan, {stage: host} remote backwards). split "planned": the planner's split (fewest bytes moved
    from `previous` among the fastest); "even": equal layer counts; "proportional": compute shares
    proportional to speed (baselines.proportional_split). backward_at "auto": each middle stage
    that does not fit goes to the peer with most room (place_backward), over the planner's split or, if
    the solver finds none that fits (it counts every stage with its own backward), an even one. The
    plan's memory counts the remote roles; check `plan.fits`. Raises PlanInfeasible when no split fits."""
    auto = backward_at == "auto"
    remote = {} if auto else dict(backward_at or {})
    even = even_split(len(layers), len(devices))
    if split in ("even", "proportional"):
        ranges = even if split == "even" else proportional_split(devices, layers)
        p = evaluate(devices, layers, ranges, scheme, microbatches, max_staleness)
    else:
        try:
            p = plan(devices, layers, scheme, microbatches, previous, max_staleness)
        except PlanInfeasible:
            if not auto:
                raise
            p = evaluate(devices, layers, even, scheme, microbatches, max_staleness)
    if auto:
        remote = place_backward(devices, layers, p.ranges, scheme, microbatches, max_staleness)
    if remote:
        p = replace(evaluate(devices, layers, p.ranges, scheme, microbatches, max_staleness, remote),
                    bytes_moved=p.bytes_moved)
    return p, remote


def over_budget(p: Plan) -> str:
    """The stages of a plan that do not fit, as an error message names them."""
    return "; ".join(f"{s.peer} needs {format_bytes(s.memory_bytes)} of {format_bytes(s.memory_budget)} "
                     f"({s.memory_bytes - s.memory_budget} bytes short)" for s in p.stages if not s.fits)


def too_big(param_bytes: list[int], optim_ratio: float, budgets: dict[str, int | None],
            activation_bytes: list[int] | None = None) -> str | None:
    """Why no split of layers with these parameter bytes (and, per layer, the bytes of one microbatch's
    input and output activations) can fit peers with these memory budgets (None: no limit); None if one
    may. A necessary condition only: the planner checks every stage. Pure: runs before any peer builds a
    layer."""
    acts = activation_bytes or [0] * len(param_bytes)
    need = [int(b * (2 + optim_ratio)) + a for b, a in zip(param_bytes, acts)]
    if not need or any(b is None for b in budgets.values()):
        return None
    total, largest = sum(budgets.values()), max(budgets.values())
    biggest = max(range(len(need)), key=need.__getitem__)
    if need[biggest] > largest:
        return (f"layer {biggest} alone needs {format_bytes(need[biggest])} (parameters, gradients, optimizer state, "
                f"a microbatch's activations), and "
                f"the largest memory budget of the ring's peers is {format_bytes(largest)}: "
                f"{format_bytes(need[biggest] - largest)} short")
    if sum(need) > total:
        return (f"its parameters, gradients and optimizer state need {format_bytes(sum(need))}, and the "
                f"{len(budgets)} peers' memory budgets together are {format_bytes(total)}: "
                f"{format_bytes(sum(need) - total)} short")
    return None

