"""Plain single-process PyTorch training over the samples a ring visits, in the same order: the
reference every exact scheme is tested against."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from pipeline.config import JobConfig
from pipeline.data import Dataset, batch_sizes, pass_order
from pipeline.models import build_model


def sample_order(cfg: JobConfig, heads: list[Dataset]) -> list[tuple[Dataset, torch.Tensor]]:
    """(dataset, batch indices) for every step: epochs, then passes in ring order, then batches."""
    steps = []
    for epoch in range(cfg.epochs):
        for ds in heads:
            order = pass_order(len(ds), cfg.seed, epoch, cfg.shuffle)
            start = 0
            for size in batch_sizes(len(ds), cfg.batch_size):
                steps.append((ds, order[start:start + size]))
                start += size
    return steps


def train(cfg: JobConfig, heads: list[Dataset]) -> torch.nn.Sequential:
    model = build_model(cfg.model, cfg.seed)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for ds, idx in sample_order(cfg, heads):
        opt.zero_grad()
        F.cross_entropy(model(ds.x[idx]), ds.y[idx]).backward()
        opt.step()
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())
