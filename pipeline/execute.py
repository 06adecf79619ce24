"""Running one stage's program for a pass, independent of how messages travel.

`run_program` is a generator: it computes inline and yields requests, `Recv(kind, step, mb)` (the
driver sends back the received payload), `Send(kind, step, mb, payload)` and `StepDone(step, result)`
once the stage is done with a step. The agent steps it on its compute thread and does the I/O on its
event loop; `local.py` drives all stages in one process. The same code trains in both, so a training
bug reproduces in a single-process test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator, Iterator

import torch

from pipeline import schedule as S
from pipeline.loss import summed as summed_loss
from pipeline.stage import Stage


@dataclass(frozen=True)
class Recv:
    kind: str  # "fwd" | "bwd"
    step: int
    mb: int
    slack: bool = False   # waiting here holds up no forward (schedule.slack): the stage may work ahead


@dataclass(frozen=True)
class Send:
    kind: str
    step: int
    mb: int
    payload: dict


@dataclass
class StepResult:
    loss_sum: float = 0.0   # tail only: summed cross-entropy over the step's samples
    correct: int = 0        # tail only
    samples: int = 0        # tail only
    staleness: int = 0      # steps behind the weights of this stage's forwards were, at worst


@dataclass(frozen=True)
class StepDone:
    step: int
    result: StepResult


@dataclass
class StepInput:
    """What the head feeds for one step: per microbatch (x, y)."""
    microbatches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def run_program(stage: Stage, program: list[S.Action], position: int, n_stages: int, batches: list[int],
                head_inputs: Iterator[StepInput] | None, train: bool = True) -> Generator[Any, Any, None]:
    """Run a pass's program; batches[s] is step s's batch size (it scales the loss). The head reads
    head_inputs, one StepInput per step, in step order."""
    head, tail = position == 0, position == n_stages - 1
    results: dict[int, StepResult] = {}
    lags = S.lags(program)   # > 0: an optimizer step comes between the forward and the backward
    fed: dict[int, StepInput] = {}
    inbox: dict[tuple, dict] = {}
    outbox: dict[tuple, dict] = {}
    slack = S.slack(program) if train else set()
    if train:
        stage.sum_weight_gradients_by_step(not slack)
    for i, action in enumerate(program):
        k, s, m = action.kind, action.step, action.mb
        result = results.setdefault(s, StepResult()) if k in (S.F, S.B) else None
        if k == S.RECV_F:
            inbox["fwd", s, m] = yield Recv("fwd", s, m, i in slack)
        elif k == S.RECV_B:
            inbox["bwd", s, m] = yield Recv("bwd", s, m, i in slack)
        elif k in (S.SEND_F, S.SEND_B):
            kind = "fwd" if k == S.SEND_F else "bwd"
            yield Send(kind, s, m, outbox.pop((kind, s, m)))
        elif k == S.F:
            if head:
                if s not in fed:
                    fed[s] = next(head_inputs)
                x, y = fed[s].microbatches[m]
            else:
                msg = inbox.pop(("fwd", s, m))
                x, y = msg["x"], msg["y"]
            if not train:   # one microbatch per evaluation step
                out = stage.evaluate(x)
                if tail:
                    loss_sum, correct = summed_loss(out, y)
                    result.correct += correct
                    result.loss_sum += loss_sum.item()
                    result.samples += len(y)
                else:
                    outbox["fwd", s, m] = {"x": out, "y": y}
                fed.pop(s, None)
                yield StepDone(s, results.pop(s))
            elif tail:
                loss_sum, correct = stage.forward_loss((s, m), x, y, batches[s], not head, lags[s, m] > 0)
                result.loss_sum += loss_sum
                result.correct += correct
                result.samples += len(y)
            else:
                outbox["fwd", s, m] = {"x": stage.forward((s, m), x, not head, lags[s, m] > 0), "y": y}
        elif k == S.B:
            grad = None if tail else inbox.pop(("bwd", s, m))["grad"]
            result.staleness = max(result.staleness, stage.lag((s, m)))
            grad_in = stage.backward((s, m), grad)
            if not head:
                outbox["bwd", s, m] = {"grad": grad_in}
        elif k == S.STEP:
            stage.step()
            fed.pop(s, None)
            yield StepDone(s, results.pop(s))
        else:
            raise ValueError(f"unknown action {action}")


def run_forward_role(stage: Stage, program: list[S.Action], max_staleness: int) -> Generator[Any, Any, None]:
    """Remote backward, the forward role (on the stage's owner): lends the layers' state to the backward
    role, then forwards without keeping anything (no graph, no buffer) on the weights the backward role
    sends, passing each input on to it; takes the state back at the end of the pass."""
    last = {a.step: a.mb for a in program if a.kind == S.F}   # each step's last microbatch
    inbox: dict[tuple, dict] = {}
    outbox: dict[tuple, dict] = {}
    for action in program:
        k, s, m = action.kind, action.step, action.mb
        if k == S.SEND_L:
            yield Send("lend", s, 0, {"layers": stage.export()})
            stage.drop_optimizer_state()   # the backward role keeps it until the state comes back
        elif k == S.RECV_W:
            stage.load((yield Recv("weights", s, 0))["weights"])
        elif k == S.RECV_R:
            stage.install((yield Recv("return", s, 0))["layers"])
        elif k == S.RECV_F:
            inbox[s, m] = yield Recv("fwd", s, m)
        elif k == S.F:
            msg = inbox.pop((s, m))
            outbox["fwd", s, m] = {"x": stage.forward_only(msg["x"]), "y": msg["y"]}
            outbox["input", s, m] = {"x": msg["x"]}
        elif k in (S.SEND_F, S.SEND_I):
            kind = S.MESSAGE[k]
            yield Send(kind, s, m, outbox.pop((kind, s, m)))
            if k == S.SEND_I and m == last[s]:
                yield StepDone(s, StepResult(staleness=s - S.forward_version(s, max_staleness)))
        else:
            raise ValueError(f"unknown action {action} for a forward role")


def run_backward_role(stage: Stage, program: list[S.Action], max_staleness: int) -> Generator[Any, Any, None]:
    """Remote backward, the backward role (on another peer; `stage` starts empty): takes the lent layers,
    and per microbatch recomputes the forward on the weights the forward role used (kept here by
    version), backpropagates, steps the optimizer after each step and sends the new weights to the
    forward role, predicted max_staleness steps ahead along SGD's momentum (`Stage.snapshot`); returns
    the layers' state at the end of the pass."""
    versions = stage.versions   # weights after v steps of this pass (counted in stage.memory_bytes)
    versions.clear()
    inbox: dict[tuple, dict] = {}
    outbox: dict[tuple, dict] = {}
    results: dict[int, StepResult] = {}
    for action in program:
        k, s, m = action.kind, action.step, action.mb
        if k == S.RECV_L:
            stage.install((yield Recv("lend", s, 0))["layers"])
            versions[0] = stage.snapshot()
            stage.notify()
        elif k in (S.RECV_I, S.RECV_B):
            kind = S.MESSAGE[k]
            inbox[kind, s, m] = yield Recv(kind, s, m)
        elif k == S.B:
            v = S.forward_version(s, max_staleness)
            stage.forward((s, m), inbox.pop(("input", s, m))["x"], True, weights=versions[v])
            outbox["bwd", s, m] = {"grad": stage.backward((s, m), inbox.pop(("bwd", s, m))["grad"])}
            results.setdefault(s, StepResult()).staleness = s - v
        elif k == S.SEND_B:
            yield Send("bwd", s, m, outbox.pop(("bwd", s, m)))
        elif k == S.STEP:
            stage.step()
            # forwards of step s + 1 + K use it and their gradients land on version s + 1 + K: predict K steps
            versions[s + 1] = stage.snapshot(ahead=max_staleness)
            for old in [v for v in versions if v < S.forward_version(s + 1, max_staleness)]:
                del versions[old]
            stage.notify()
            yield StepDone(s, results.pop(s, StepResult()))
        elif k == S.SEND_W:
            yield Send("weights", s, 0, {"weights": versions[s + 1]})
        elif k == S.SEND_R:
            yield Send("return", s, 0, {"layers": stage.export()})
            versions.clear()
        else:
            raise ValueError(f"unknown action {action} for a backward role")
