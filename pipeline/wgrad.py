"""Deferred weight gradients for nn.Linear (the B/W split of zero-bubble pipelines).

Backward of a microbatch computes only the input gradient (what the previous stage waits for) and
keeps (input, output gradient); at the optimizer step each Linear's weight gradient is one GEMM over
all microbatches of the batch. Per microbatch that saves a thin GEMM and a full-size gradient
accumulation; the result is the same sum, reassociated (float tolerance).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pending):
        ctx.save_for_backward(x, weight)
        ctx.pending = pending
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        ctx.pending.append((x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])))
        return (grad @ weight if ctx.needs_input_grad[0] else None), None, None, None


class Deferred:
    """Patches the Linear modules of a layer so their weight gradients wait for `flush`."""

    def __init__(self, module: nn.Module):
        self.linears = [m for m in module.modules() if type(m) is nn.Linear]
        self.pending: dict[nn.Linear, list] = {m: [] for m in self.linears}
        for m in self.linears:
            m.forward = self._forward_for(m)

    def _forward_for(self, m: nn.Linear):
        def forward(x):
            if not torch.is_grad_enabled() or not m.weight.requires_grad:
                return F.linear(x, m.weight, m.bias)
            return _Linear.apply(x, m.weight, m.bias, self.pending[m])
        return forward

    def flush(self) -> None:
        """Turn pending (input, output-gradient) pairs into .grad, one GEMM per Linear."""
        for m, pairs in self.pending.items():
            if not pairs:
                continue
            x = torch.cat([p[0] for p in pairs]) if len(pairs) > 1 else pairs[0][0]
            g = torch.cat([p[1] for p in pairs]) if len(pairs) > 1 else pairs[0][1]
            _accumulate(m.weight, g.t() @ x)
            if m.bias is not None:
                _accumulate(m.bias, g.sum(0))
            pairs.clear()


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    param.grad = grad if param.grad is None else param.grad + grad
