"""Run every method on one instance, check each schedule with the simulator, and time the solvers."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pipeline.scheduling import baselines, exact, ours
from pipeline.scheduling.bounds import lower_bound
from pipeline.scheduling.instance import Instance
from pipeline.scheduling.solution import Schedule
from pipeline.scheduling.simulator import simulate

# The MILP is only attempted up to this size: beyond it HiGHS rarely proves optimality in time.
EXACT_MAX_CLIENTS, EXACT_MAX_HELPERS = 8, 3

T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    makespan: float  # ms, as the simulator measured it
    seconds: float   # wall-clock solve time


@dataclass(frozen=True)
class Comparison:
    random: Result
    balanced_greedy: Result
    ours: Result
    lower_bound: float          # ms: no schedule ends sooner
    exact: Result | None        # None when the instance is too large
    exact_optimal: bool | None  # whether HiGHS proved the exact result optimal


def small_enough(inst: Instance) -> bool:
    return inst.clients <= EXACT_MAX_CLIENTS and inst.helpers <= EXACT_MAX_HELPERS


def _timed(solve: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    value = solve()
    return value, time.perf_counter() - start


def _checked(inst: Instance, solve: Callable[[], Schedule]) -> Result:
    schedule, seconds = _timed(solve)
    return Result(simulate(inst, schedule), seconds)


def compare(inst: Instance, seed: int, with_exact: bool | None = None, exact_time_limit: float = 60.0,
            drawn: list[int] | None = None) -> Comparison:
    """All methods on `inst`; `seed` drives the random baseline (or it takes the assignment `drawn`, such as the
    paper's source draws). The exact MILP runs when `with_exact` is True, or when it is None and the
    instance is small enough."""
    exact_result, optimal = None, None
    if small_enough(inst) if with_exact is None else with_exact:
        (schedule, optimal), seconds = _timed(lambda: exact.milp(inst, exact_time_limit))
        exact_result = Result(simulate(inst, schedule), seconds)
    if drawn is None:
        drawn = baselines.random_assignment(inst, seed)
    return Comparison(random=_checked(inst, lambda: baselines.fcfs_schedule(inst, drawn)),
                      balanced_greedy=_checked(inst, lambda: baselines.balanced_greedy_fcfs(inst)),
                      ours=_checked(inst, lambda: ours.solve(inst)),
                      lower_bound=lower_bound(inst), exact=exact_result, exact_optimal=optimal)
