"""Plain single-process PyTorch training over the samples a ring visits, in the same order: the
reference every exact scheme is tested against."""
from __future__ import annotations

import torch
from torch.func import functional_call
from torch.nn import functional as F

from pipeline.config import JobConfig
from pipeline.data import Dataset, batch_sizes, microbatch_sizes, pass_order
from pipeline.models import build_model


def passes(cfg: JobConfig, heads: list[Dataset]) -> list[tuple[Dataset, list[torch.Tensor]]]:
    """(head dataset, batch indices of each step) for every pass: epochs, then passes in ring order."""
    out = []
    for epoch in range(cfg.epochs):
        for ds in heads:
            order = pass_order(len(ds), cfg.seed, epoch, cfg.shuffle)
            sizes = batch_sizes(len(ds), cfg.batch_size)
            out.append((ds, [order[sum(sizes[:s]):sum(sizes[:s + 1])] for s in range(len(sizes))]))
    return out


def sample_order(cfg: JobConfig, heads: list[Dataset]) -> list[tuple[Dataset, torch.Tensor]]:
    """(dataset, batch indices) for every step, in training order."""
    return [(ds, idx) for ds, steps in passes(cfg, heads) for idx in steps]


def _optimizer(cfg: JobConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_stale(cfg: JobConfig, heads: list[Dataset], lag, ahead=None) -> torch.nn.Sequential:
    """Training with stale forward weights (PipeDream's weight stashing), in plain PyTorch: microbatch m
    of step s of pass p runs layer i on the weights of lag(p, i, s, m) steps ago, extrapolated
    ahead(p, i, s, m) steps along SGD's momentum buffer of that time (weight prediction; default none);
    its gradient is taken at those weights and applied, summed over the step's microbatches, to the
    current weights."""
    model = build_model(cfg.model, cfg.seed)
    opt = _optimizer(cfg, model)
    history: list[tuple[dict, dict]] = []   # (weights, momentum buffers) before each step so far
    for p, ds, idx, s in [(p, ds, idx, s) for p, (ds, steps) in enumerate(passes(cfg, heads))
                          for s, idx in enumerate(steps)]:
        history.append(({k: v.detach().clone() for k, v in model.named_parameters()},
                        {k: opt.state[v]["momentum_buffer"].clone() for k, v in model.named_parameters()
                         if opt.state.get(v, {}).get("momentum_buffer") is not None}))
        opt.zero_grad()
        start = 0
        for m, size in enumerate(microbatch_sizes(len(idx), cfg.microbatches)):
            part = idx[start:start + size]
            start += size
            weights = {}
            for k in history[-1][0]:
                layer = int(k.split(".")[0])
                w, buf = history[-1 - lag(p, layer, s, m)]
                steps = ahead(p, layer, s, m) if ahead else 0
                t = w[k].detach() - cfg.lr * steps * buf[k] if steps and k in buf else w[k]
                weights[k] = t.requires_grad_(True)
            loss = F.cross_entropy(functional_call(model, weights, (ds.x[part],)), ds.y[part], reduction="sum") / len(idx)
            for param, g in zip(model.parameters(), torch.autograd.grad(loss, list(weights.values()))):
                param.grad = g if param.grad is None else param.grad + g
        opt.step()
    return model


def train(cfg: JobConfig, heads: list[Dataset]) -> torch.nn.Sequential:
    model = build_model(cfg.model, cfg.seed)
    opt = _optimizer(cfg, model)
    for ds, idx in sample_order(cfg, heads):
        opt.zero_grad()
        F.cross_entropy(model(ds.x[idx]), ds.y[idx]).backward()
        opt.step()
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())
