"""The independent checker: every method's schedule goes through `simulate`.

It shares no code with the solvers: it only reads the instance and the start times it is given,
checks every rule and recomputes the makespan from scratch.
"""
from __future__ import annotations

from pipeline.scheduling.instance import Instance
from pipeline.scheduling.solution import Schedule
from protocols.errors import SplitringError

# Slack for float rounding when comparing times (ms) and memory (KiB).
TOLERANCE = 1e-6


class InvalidSchedule(SplitringError, ValueError):
    """The schedule breaks a rule of the instance; the message says which and where."""


def _check_shape(inst: Instance, s: Schedule) -> None:
    if len(s.assignment) != inst.clients or len(s.starts) != inst.clients:
        raise InvalidSchedule(f"schedule covers {len(s.assignment)} assignments and {len(s.starts)} "
                              f"start pairs, the instance has {inst.clients} clients")
    for j, h in enumerate(s.assignment):
        if not (isinstance(h, int) and 0 <= h < inst.helpers):
            raise InvalidSchedule(f"client {j} is assigned to helper {h!r}, which does not exist")


def _check_memory(inst: Instance, s: Schedule) -> None:
    for h in range(inst.helpers):
        used = sum(inst.demand[j] for j, hj in enumerate(s.assignment) if hj == h)
        if used > inst.capacity[h] + TOLERANCE:
            raise InvalidSchedule(f"memory: helper {h} holds {used:.1f} KiB of part 2, "
                                  f"its capacity is {inst.capacity[h]:.1f} KiB")


def _check_precedence(inst: Instance, s: Schedule) -> None:
    for j, (h, (fwd, bwd)) in enumerate(zip(s.assignment, s.starts)):
        if fwd < inst.release[j][h] - TOLERANCE:
            raise InvalidSchedule(f"precedence: client {j}'s forward starts at {fwd:.3f} ms on helper {h}, "
                                  f"before its activations arrive at {inst.release[j][h]:.3f} ms")
        ready = fwd + inst.forward[j][h] + inst.delay[j][h]
        if bwd < ready - TOLERANCE:
            raise InvalidSchedule(f"precedence: client {j}'s backward starts at {bwd:.3f} ms on helper {h}, "
                                  f"before its gradient arrives at {ready:.3f} ms")


def _check_one_at_a_time(inst: Instance, s: Schedule) -> None:
    for h in range(inst.helpers):
        tasks = sorted((start, start + dur, j, kind)
                       for j, hj in enumerate(s.assignment) if hj == h
                       for kind, start, dur in (("forward", s.starts[j][0], inst.forward[j][h]),
                                                ("backward", s.starts[j][1], inst.backward[j][h])))
        for (_, end, j, kind), (start, _, k, kind2) in zip(tasks, tasks[1:]):
            if start < end - TOLERANCE:
                raise InvalidSchedule(f"one task at a time: on helper {h}, client {k}'s {kind2} starts at "
                                      f"{start:.3f} ms while client {j}'s {kind} runs until {end:.3f} ms")


def simulate(inst: Instance, s: Schedule) -> float:
    """Check the schedule and return its makespan (ms): when the last client ends its step."""
    _check_shape(inst, s)
    _check_memory(inst, s)
    _check_precedence(inst, s)
    _check_one_at_a_time(inst, s)
    return max((bwd + inst.backward[j][h] + inst.tail[j][h]
                for j, (h, (_, bwd)) in enumerate(zip(s.assignment, s.starts))), default=0.0)
