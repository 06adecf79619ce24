"""Schedules as data: for each stage of a chain, the ordered actions of one optimizer step.

Actions (as in torch.distributed.pipelining): F m / B m compute the forward / backward of microbatch
m, RECV_F / SEND_F move activations (with labels) down the chain, RECV_B / SEND_B move gradients up,
STEP applies the stage's optimizers. The head's F reads its own data; the tail's F computes the loss.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    kind: str
    mb: int | None = None

    def __str__(self) -> str:
        return self.kind if self.mb is None else f"{self.kind}{self.mb}"


F, B, SEND_F, RECV_F, SEND_B, RECV_B, STEP = "F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "STEP"


def _forward(stage: int, n_stages: int, m: int) -> list[Action]:
    acts = [Action(RECV_F, m)] if stage > 0 else []
    acts.append(Action(F, m))
    if stage < n_stages - 1:
        acts.append(Action(SEND_F, m))
    return acts


def _backward(stage: int, n_stages: int, m: int) -> list[Action]:
    acts = [Action(RECV_B, m)] if stage < n_stages - 1 else []
    acts.append(Action(B, m))
    if stage > 0:
        acts.append(Action(SEND_B, m))
    return acts


def nsplit(stage: int, n_stages: int, n_mb: int) -> list[Action]:
    """Sequential N-split: each microbatch goes down and back up before the next one starts."""
    acts: list[Action] = []
    for m in range(n_mb):
        acts += _forward(stage, n_stages, m) + _backward(stage, n_stages, m)
    return acts + [Action(STEP)]


def gpipe(stage: int, n_stages: int, n_mb: int) -> list[Action]:
    """GPipe: every microbatch forward, then every backward, then the step (a flush per step)."""
    acts: list[Action] = []
    for m in range(n_mb):
        acts += _forward(stage, n_stages, m)
    for m in range(n_mb):
        acts += _backward(stage, n_stages, m)
    return acts + [Action(STEP)]


def one_f_one_b(stage: int, n_stages: int, n_mb: int) -> list[Action]:
    """1F1B: warm up with (stages after this one) forwards, then alternate one forward and one
    backward, then drain the backwards. At most n_stages - stage microbatches are buffered here."""
    warmup = min(n_stages - 1 - stage, n_mb)
    acts: list[Action] = []
    for m in range(warmup):
        acts += _forward(stage, n_stages, m)
    for i in range(n_mb - warmup):
        acts += _forward(stage, n_stages, warmup + i) + _backward(stage, n_stages, i)
    for m in range(n_mb - warmup, n_mb):
        acts += _backward(stage, n_stages, m)
    return acts + [Action(STEP)]


def evaluation(stage: int, n_stages: int) -> list[Action]:
    """Forward only (one microbatch per eval batch): no buffers, no backward, no step."""
    return _forward(stage, n_stages, 0)


PIPELINES = {"1f1b": one_f_one_b, "gpipe": gpipe}


def program(scheme: str, pipeline: str, stage: int, n_stages: int, n_mb: int) -> list[Action]:
    """One step's actions for a stage: sequential N-split, or a pipelined schedule (Fast N-split)."""
    if scheme == "nsplit":
        return nsplit(stage, n_stages, n_mb)
    return PIPELINES[pipeline](stage, n_stages, n_mb)


def in_flight(program: list[Action]) -> int:
    """Most microbatches whose forward buffer a stage holds at once under this program."""
    held = peak = 0
    for a in program:
        if a.kind == F:
            held += 1
            peak = max(peak, held)
        elif a.kind == B:
            held -= 1
    return peak


def chain_order(ring: list[str], rotation: int) -> list[str]:
    """The chain of a rotation: ring order starting at peer (rotation mod N)."""
    k = rotation % len(ring)
    return ring[k:] + ring[:k]


def render(programs: list[list[Action]]) -> str:
    """One line per stage: its actions in order."""
    return "\n".join(f"stage {i}: " + " ".join(map(str, p)) for i, p in enumerate(programs))
