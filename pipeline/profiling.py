"""Measuring a model's per-layer costs on this machine: a short timed probe, one layer at a time
(a peer never holds the whole model), for the planner."""
from __future__ import annotations

import math
import time

import torch

from pipeline.config import JobConfig
from pipeline.models import activation_shapes, build_layer, input_shape, layer_factories

PROBE_REPEATS = 3


def optimizer_state_ratio(cfg: JobConfig) -> float:
    """Optimizer state bytes per parameter byte."""
    if cfg.optimizer == "adam":
        return 2.0
    return 1.0 if cfg.momentum > 0 else 0.0


def microbatch_rows(cfg: JobConfig) -> int:
    return max(1, math.ceil(cfg.batch_size / cfg.microbatches))


def measure(cfg: JobConfig, repeats: int = PROBE_REPEATS) -> dict:
    """Per layer, for one microbatch: forward and backward seconds (best of `repeats`), parameter,
    optimizer-state and output-activation bytes."""
    rows = microbatch_rows(cfg)
    shapes = [input_shape(cfg.model)] + activation_shapes(cfg.model)
    factories = layer_factories(cfg.model)
    ratio = optimizer_state_ratio(cfg)
    out = {"forward_s": [], "backward_s": [], "param_bytes": [], "optim_bytes": [], "activation_bytes": [],
           "rows": rows}
    gen = torch.Generator().manual_seed(0)
    for i in range(len(factories)):
        layer = build_layer(cfg.model, cfg.seed, i, factories)
        x = torch.randn((rows, *shapes[i]), generator=gen).requires_grad_(i > 0)
        fwd, bwd = math.inf, math.inf
        for _ in range(repeats + 1):  # the first round warms up
            t0 = time.perf_counter()
            y = layer(x)
            t1 = time.perf_counter()
            y.backward(torch.ones_like(y))
            t2 = time.perf_counter()
            fwd, bwd = min(fwd, t1 - t0), min(bwd, t2 - t1)
        params = sum(p.numel() * p.element_size() for p in layer.parameters())
        out["forward_s"].append(fwd)
        out["backward_s"].append(bwd)
        out["param_bytes"].append(params)
        out["optim_bytes"].append(int(params * ratio))
        out["activation_bytes"].append(rows * math.prod(shapes[i + 1]) * 4)
    return out
