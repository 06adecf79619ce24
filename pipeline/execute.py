"""Running one stage's program for one step, independent of how messages travel.

`run_step` is a generator: it computes inline and yields I/O requests, `Recv(kind, mb)` (the driver
sends back the received payload) and `Send(kind, mb, payload)`. The agent steps it on its compute
thread and does the I/O on its event loop; `local.py` drives all stages in one process. The same code
trains in both, so a training bug reproduces in a single-process test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator

import torch

from pipeline import schedule as S
from pipeline.stage import Stage


@dataclass(frozen=True)
class Recv:
    kind: str  # "fwd" | "bwd"
    mb: int


@dataclass(frozen=True)
class Send:
    kind: str
    mb: int
    payload: dict


@dataclass
class StepResult:
    loss_sum: float = 0.0   # tail only: summed cross-entropy over the step's samples
    correct: int = 0        # tail only
    samples: int = 0


@dataclass
class StepInput:
    """What the head feeds: per microbatch (x, y). Other stages get None."""
    microbatches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def run_step(stage: Stage, program: list[S.Action], position: int, n_stages: int, batch: int,
             head_input: StepInput | None, train: bool = True) -> Generator[Any, Any, StepResult]:
    head, tail = position == 0, position == n_stages - 1
    result = StepResult()
    inbox: dict[tuple[str, int], dict] = {}
    outbox: dict[tuple[str, int], dict] = {}
    for action in program:
        k, m = action.kind, action.mb
        if k == S.RECV_F:
            inbox["fwd", m] = yield Recv("fwd", m)
        elif k == S.RECV_B:
            inbox["bwd", m] = yield Recv("bwd", m)
        elif k == S.SEND_F:
            yield Send("fwd", m, outbox.pop(("fwd", m)))
        elif k == S.SEND_B:
            yield Send("bwd", m, outbox.pop(("bwd", m)))
        elif k == S.F:
            x, y = head_input.microbatches[m] if head else (inbox["fwd", m]["x"], inbox["fwd", m]["y"])
            inbox.pop(("fwd", m), None)
            if not train:
                out = stage.evaluate(x)
                if tail:
                    result.correct += int((out.argmax(1) == y).sum())
                    result.loss_sum += torch.nn.functional.cross_entropy(out, y, reduction="sum").item()
                    result.samples += len(y)
                else:
                    outbox["fwd", m] = {"x": out, "y": y}
            elif tail:
                loss_sum, correct = stage.forward_loss(m, x, y, batch, needs_input_grad=not head)
                result.loss_sum += loss_sum
                result.correct += correct
                result.samples += len(y)
            else:
                outbox["fwd", m] = {"x": stage.forward(m, x, needs_input_grad=not head), "y": y}
        elif k == S.B:
            grad = None if tail else inbox.pop(("bwd", m))["grad"]
            grad_in = stage.backward(m, grad)
            if not head:
                outbox["bwd", m] = {"grad": grad_in}
        elif k == S.STEP:
            stage.step()
        else:
            raise ValueError(f"unknown action {action}")
    return result
