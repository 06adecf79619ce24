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
        if x.dim() != 2:
            return F.linear(x, weight, bias)
        # y^T = W x^T: MKL runs this orientation about twice as fast as x W^T when x has few rows
        # (measured: 0.75 against 1.4 ms for 32 x 1024 by 1024 x 1024, one thread). y comes out as a
        # transposed view, so the next Linear's x^T is contiguous.
        yt = weight @ x.t() if bias is None else torch.addmm(bias[:, None], weight, x.t())
        return yt.t()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        ctx.pending.append((x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])))
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if x.dim() == 2 and x.stride(0) == 1:
            # x is a transposed view (the previous Linear's y^T, through an elementwise op): give its
            # gradient the same layout, so that op's backward runs over matching contiguous memory
            # (about 6x faster for ReLU at 32 x 1024 than over mixed layouts).
            return (weight.t() @ grad.t()).t(), None, None, None
        return grad @ weight, None, None, None


class Deferred:
    """Patches the Linear modules of a layer so their weight gradients wait for `flush`.

    A step's pending (input, output-gradient) pairs are summed in fixed groups of consecutive
    microbatches, GROUP_ROWS rows or more each, in order. A group can be summed as soon as it is complete
    (`work_ahead`, what a stage does while it waits for a neighbour) or at the flush: the arithmetic is
    the same either way, so the result does not depend on timing."""

    def __init__(self, module: nn.Module):
        self.linears = [m for m in module.modules() if type(m) is nn.Linear]
        self.pending: dict[nn.Linear, list] = {m: [] for m in self.linears}
        self.sums: dict[nn.Linear, tuple] = {}   # (weight grad, bias grad) of the groups summed so far
        for m in self.linears:
            m.forward = self._forward_for(m)

    def _forward_for(self, m: nn.Linear):
        def forward(x):
            if not torch.is_grad_enabled() or not m.weight.requires_grad:
                return F.linear(x, m.weight, m.bias)
            return _Linear.apply(x, m.weight, m.bias, self.pending[m])
        return forward

    def work_ahead(self) -> bool:
        """Sum one complete group of one Linear, if there is one; says whether there was."""
        for m, pairs in self.pending.items():
            if _group_size(pairs) <= len(pairs):
                self._sum(m, _group_size(pairs))
                return True
        return False

    def flush(self) -> None:
        """Turn the pending pairs into .grad."""
        for m, pairs in self.pending.items():
            while pairs:
                self._sum(m, min(_group_size(pairs), len(pairs)))
            if m in self.sums:
                weight, bias = self.sums.pop(m)
                _accumulate(m.weight, weight)
                if m.bias is not None:
                    _accumulate(m.bias, bias)

    @torch.no_grad()   # the saved inputs require grad; their sums need no graph
    def _sum(self, m: nn.Linear, n: int) -> None:
        pairs = self.pending[m]
        group, pairs[:n] = pairs[:n], []
        # Concatenated as (features, rows): the pairs are mostly transposed views (see _Linear.forward),
        # so each piece is copied as one contiguous block.
        xt = torch.cat([p[0].t() for p in group], 1)
        gt = torch.cat([p[1].t() for p in group], 1)
        bias = gt.sum(1) if m.bias is not None else None
        if m not in self.sums:
            self.sums[m] = (gt @ xt.t(), bias)
        else:
            weight, total = self.sums[m]
            weight.addmm_(gt, xt.t())
            if bias is not None:
                total.add_(bias)

    def memory_bytes(self) -> int:
        """What the pending pairs hold (the sums are the parameters' gradients)."""
        return sum(t.numel() * t.element_size() for pairs in self.pending.values() for pair in pairs for t in pair)


GROUP_ROWS = 128   # a weight-gradient GEMM over fewer rows is slower per row (measured: 32 rows, ~12%)


def _group_size(pairs: list) -> int:
    """Microbatches per group: enough for GROUP_ROWS rows, judged by the first pending one."""
    return -(-GROUP_ROWS // max(1, len(pairs[0][0]))) if pairs else 1


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    param.grad = grad if param.grad is None else param.grad + grad
