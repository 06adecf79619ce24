"""Deferred weight gradients for nn.Linear (the B/W split of zero-bubble pipelines).

Backward of a microbatch computes only the input gradient (what the previous stage waits for) and
keeps (input, output gradient); the weight gradients are summed later over groups of microbatches
(see Deferred). Per microbatch that saves a thin GEMM and a full-size gradient accumulation; the
result is the same sum, reassociated (float tolerance). The weights enter autograd detached, so its
native backward does the input gradient with no Python in the way; a hook on the output keeps the
output gradient.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _Tap(torch.autograd.Function):
    """Identity (a copy, so in-place ops after it stay legal) that hands its output's gradient to
    `keep`. `anchor`, a scalar that requires grad, brings it into autograd when nothing else does."""

    @staticmethod
    def forward(ctx, out, anchor, keep):
        ctx.keep = keep
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.keep(grad)
        return None, None, None


_ANCHOR = torch.zeros((), requires_grad=True)   # never changes: _Tap gives it no gradient


ALIAS_BYTES = 2048   # weight rows a multiple of this apart share cache sets when a GEMM reads down a column
PAD_BYTES = 64       # one cache line


def pad_rows(m: nn.Linear) -> None:
    """Give a Linear's weight rows a stride that is not a multiple of ALIAS_BYTES (a view into a slightly wider
    buffer; same values). The input gradient's GEMM reads the weight transposed, down its columns: measured on
    one thread, 12% faster at 1024 wide (0.62 -> 0.54 ms at 32 rows), 45% at 2048. Exports are contiguous.
    Only for Deferred's Linears: nn.Linear's own forward (F.linear) gets slower over such a weight (the
    benchmark MLP in plain PyTorch: -19%)."""
    w = m.weight
    rows, cols = w.shape
    if (cols * w.element_size()) % ALIAS_BYTES or w.stride() != (cols, 1):
        return
    store = torch.empty(rows, cols + PAD_BYTES // w.element_size(), dtype=w.dtype)
    store[:, :cols] = w.detach()
    m.weight = nn.Parameter(store[:, :cols], requires_grad=w.requires_grad)


class Deferred:
    """Patches the Linear modules of a layer so their weight gradients wait for `flush`.

    A step's pending (input, output-gradient) pairs are summed in fixed groups of consecutive
    microbatches, GROUP_ROWS rows or more each, in order. A group can be summed as soon as it is complete
    (`work_ahead`, what a stage does while it waits for a neighbour) or at the flush: the arithmetic is
    the same either way, so the result does not depend on timing. A stage that never waits in a step
    (`whole_step`) sums all its pairs at the flush in one group: one GEMM, no partial sums to add up.
    Its Linears' weights get rows that do not alias in the cache (pad_rows): make it before their optimizer."""

    def __init__(self, module: nn.Module):
        self.linears = [m for m in module.modules() if type(m) is nn.Linear]
        self.pending: dict[nn.Linear, list] = {m: [] for m in self.linears}
        self.sums: dict[nn.Linear, tuple] = {}   # (weight grad, bias grad) of the groups summed so far
        self.whole_step = False
        for m in self.linears:
            pad_rows(m)
            m.forward = self._forward_for(m)

    def _forward_for(self, m: nn.Linear):
        pending = self.pending[m]

        def forward(x):
            if not torch.is_grad_enabled() or not m.weight.requires_grad:
                return F.linear(x, m.weight, m.bias)
            # The weights enter autograd detached, so its (native) backward computes only the input
            # gradient; a hook keeps the output gradient for the weight gradient.
            w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
            rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            # y^T = W x^T: MKL runs this orientation about twice as fast as x W^T when x has few rows
            # (measured: 0.42 against 0.77 ms for 32 x 1024 by 1024 x 1024, one thread). y comes out as a
            # transposed view, so the next Linear's x^T is contiguous; autograd gives the input gradient
            # the same layout, so an elementwise op between them runs its backward over matching memory
            # (ReLU: about 6x faster than over mixed layouts).
            out = w @ rows.t() if b is None else torch.addmm(b[:, None], w, rows.t())

            def keep(g):
                pending.append((rows, g.t()))
            if out.requires_grad:
                # on the node that made `out`, not on a tensor: a tensor hook is lost if an in-place op
                # (ReLU(inplace=True)) modifies the output later
                out.grad_fn.register_prehook(lambda grads: keep(grads[0]))
            else:   # an input without gradient (a stage's first layer): tap the output's gradient
                out = _Tap.apply(out, _ANCHOR, keep)
            return out.t() if x.dim() == 2 else out.t().reshape(*x.shape[:-1], -1)
        return forward

    def work_ahead(self) -> bool:
        """Sum one complete group of one Linear, if there is one; says whether there was."""
        if self.whole_step:
            return False
        for m, pairs in self.pending.items():
            if _group_size(pairs) <= len(pairs):
                self._sum(m, _group_size(pairs))
                return True
        return False

    def flush(self) -> None:
        """Turn the pending pairs into .grad."""
        for m, pairs in self.pending.items():
            while pairs:
                self._sum(m, len(pairs) if self.whole_step else min(_group_size(pairs), len(pairs)))
            if m in self.sums:
                weight, bias = self.sums.pop(m)
                _accumulate(m.weight, weight)
                if bias is not None:
                    _accumulate(m.bias, bias)

    @torch.no_grad()   # the saved inputs require grad; their sums need no graph
    def _sum(self, m: nn.Linear, n: int) -> None:
        pairs = self.pending[m]
        group, pairs[:n] = pairs[:n], []
        # Concatenated as (features, rows): the pairs are mostly transposed views (see forward), so
        # each piece is copied as one contiguous block.
        xt = torch.cat([p[0].t() for p in group], 1)
        gt = torch.cat([p[1].t() for p in group], 1)
        bias = gt.sum(1) if m.bias is not None and m.bias.requires_grad else None   # a frozen bias stays
        if m not in self.sums:
            self.sums[m] = (gt @ xt.t(), bias)
        else:
            weight, total = self.sums[m]
            weight.addmm_(gt, xt.t())
            if bias is not None:
                total.add_(bias)

    # What the pending pairs hold is counted by Stage.memory_bytes (each tensor once: a pair's input is a
    # view of what the forward buffer held); the sums are the parameters' gradients.


GROUP_ROWS = 128   # a weight-gradient GEMM over fewer rows is slower per row (measured: 32 rows, ~12%)


def _group_size(pairs: list) -> int:
    """Microbatches per group: enough for GROUP_ROWS rows, judged by the first pending one."""
    return -(-GROUP_ROWS // max(1, len(pairs[0][0]))) if pairs else 1


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    param.grad = grad if param.grad is None else param.grad + grad
