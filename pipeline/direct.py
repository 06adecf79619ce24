"""Stages made of Linear and ReLU layers (MLPs), run without autograd.

At the microbatch sizes pipelines use, building and walking autograd's graph costs a stage of Linear+ReLU
layers about as much as a tenth of its arithmetic (measured on the 1024-wide MLP of bench_pipeline, 32
rows: 4.6 of 59 ms per step on the last stage). Such a stage is a fixed sequence of two ops, so it runs
them directly: forward keeps what backward reads (each Linear's input, each ReLU's output: the tape),
backward computes the input gradients with the same kernels autograd would call (W^T g for a Linear,
threshold_backward for a ReLU) and hands each Linear's (input, output gradient) to wgrad.Deferred, which
sums the weight gradients as it does for the autograd path. The same arithmetic up to the order of a few
sums (the gradient leaving the stage, the loss's): equal to the autograd path to float tolerance.

Layouts follow wgrad: activations travel as (features, rows) blocks (y^T = W x^T runs twice as fast as
x W^T at few rows), and a ReLU after a Linear has its output and its gradient in that layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

RELU = "relu"


@dataclass
class Tape:
    ops: list                   # what ran (ops_of)
    saved: list[torch.Tensor]   # per op: a Linear's input or a ReLU's output, (features, rows)
    input_grad: bool            # whether backward returns the gradient of the stage's input


def ops_of(layers: dict[int, nn.Module], pending: dict[nn.Linear, list]) -> list | None:
    """The stage as a list of ops (a Linear's pending list of wgrad.Deferred, or RELU), or None if a layer
    is anything but Linear and ReLU modules, possibly in nn.Sequential containers (whose order is the order
    they run in), or has a frozen parameter."""
    ops: list = []

    def walk(m: nn.Module) -> bool:
        if type(m) is nn.Sequential:
            return all(walk(c) for c in m)
        if type(m) is nn.Linear and m in pending and all(p.requires_grad for p in m.parameters()):
            ops.append((m, pending[m]))
            return True
        if type(m) is nn.ReLU:
            ops.append(RELU)
            return True
        return False

    return ops if all(walk(m) for m in layers.values()) and ops else None


@torch.no_grad()
def forward(ops: list, x: torch.Tensor, input_grad: bool) -> tuple[torch.Tensor, Tape]:
    """Output (rows, features) of a 2-D input, and the tape backward needs."""
    h, saved = x.t(), []
    for op in ops:
        if op is RELU:
            h = h.relu_() if saved else h.relu()   # in place on what an op made, never on the stage's input
        else:
            saved.append(h)
            m = op[0]
            h = m.weight @ h if m.bias is None else torch.addmm(m.bias[:, None], m.weight, h)
            continue
        saved.append(h)
    return h.t(), Tape(ops, saved, input_grad)


@torch.no_grad()
def backward(tape: Tape, grad: torch.Tensor) -> torch.Tensor | None:
    """The gradient of the stage's input (None if the tape says it is not needed), given the output's;
    each Linear's weight-gradient pair goes to its Deferred list."""
    g = grad.t().contiguous()   # (features, rows), as the saved outputs: elementwise ops over matching memory
    for k in range(len(tape.ops) - 1, -1, -1):
        op, saved = tape.ops[k], tape.saved[k]
        if op is RELU:
            g = torch.ops.aten.threshold_backward(g, saved, 0)
            continue
        m, pending = op
        pending.append((saved.t(), g.t()))
        if k == 0:   # the input gradient leaves the stage: (rows, features), contiguous as sent, no copy
            return g.t() @ m.weight if tape.input_grad else None
        g = m.weight.t() @ g
    return g.t() if tape.input_grad else None


@torch.no_grad()
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[float, int, torch.Tensor]:
    """A microbatch's summed cross-entropy, its correct predictions, and the gradient of sum / batch with
    respect to the logits (softmax minus one-hot, over batch): F.cross_entropy's, without a graph."""
    logp = torch.log_softmax(logits, 1)
    loss = F.nll_loss(logp, labels, reduction="sum").item()
    correct = int((logits.argmax(1) == labels).sum())
    grad = logp.exp_().scatter_add_(1, labels[:, None], logp.new_full((len(labels), 1), -1.0)).div_(batch)
    return loss, correct, grad
