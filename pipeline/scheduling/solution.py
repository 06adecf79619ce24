"""What every method returns: an assignment and the start time of each helper task."""
from __future__ import annotations

from dataclasses import dataclass
from protocols.errors import SplitringError

FORWARD, BACKWARD = 0, 1


class Infeasible(SplitringError, ValueError):
    """No assignment fits the helpers' memory (for the method that raised it)."""


@dataclass(frozen=True)
class Schedule:
    assignment: tuple[int, ...]              # helper of each client
    starts: tuple[tuple[float, float], ...]  # (part-2 forward start, part-2 backward start) of each client, ms
