"""Measuring a model's per-layer costs on this machine: a short timed probe, one layer at a time
(a peer never holds the whole model), for the planner."""
from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from pipeline.config import JobConfig
from pipeline.models import build_layer, footprint, input_shape, layer_factories, sample_input
from pipeline.stage import make_optimizer

PROBE_REPEATS = 3       # timed rounds per layer at least ...
PROBE_BUDGET_S = 0.05   # ... and more, up to PROBE_MAX_REPEATS, while a layer has had less than this
PROBE_MAX_REPEATS = 30


def optimizer_state_ratio(cfg: JobConfig) -> float:
    """Optimizer state bytes per parameter byte."""
    if cfg.optimizer == "adam":
        return 2.0
    return 1.0 if cfg.momentum > 0 else 0.0


def microbatch_rows(cfg: JobConfig) -> int:
    return max(1, math.ceil(cfg.batch_size / cfg.microbatches))


def measure(cfg: JobConfig, repeats: int = PROBE_REPEATS, budget: int | None = None) -> dict:
    """Per layer, for one microbatch: forward, backward and optimizer-step seconds (best of at least `repeats` rounds;
    fast layers get more, so that a busy machine's noise does not decide the split), parameter,
    optimizer-state and output-activation bytes. A layer that would not fit `budget` bytes (its parameters,
    gradients, optimizer state and a microbatch's activations) is not built: its times are estimated from
    the measured layers' seconds per parameter byte (the planner never puts it here anyway), and its index
    listed under "estimated"."""
    rows = microbatch_rows(cfg)
    sizes = footprint(cfg.model)
    shapes = [input_shape(cfg.model)] + [shape for shape, _ in sizes]
    factories = layer_factories(cfg.model)
    ratio = optimizer_state_ratio(cfg)
    out = {"forward_s": [], "backward_s": [], "update_s": [], "param_bytes": [], "optim_bytes": [],
           "activation_bytes": [], "saved_bytes": [], "rows": rows, "estimated": []}
    gen = torch.Generator().manual_seed(0)
    for i in range(len(factories)):
        params = sizes[i][1]
        out["param_bytes"].append(params)
        out["optim_bytes"].append(int(params * ratio))
        out["activation_bytes"].append(rows * math.prod(shapes[i + 1]) * 4)
        if budget is not None and probe_bytes(params, ratio, rows * math.prod(shapes[i]) * 4,
                                              rows * math.prod(shapes[i + 1]) * 4) > budget:
            out["estimated"].append(i)
            out["saved_bytes"].append(0)   # (not built here: the coordinator takes another peer's measure)
            out["forward_s"].append(None)
            out["backward_s"].append(None)
            out["update_s"].append(None)
            continue
        layer = build_layer(cfg.model, cfg.seed, i, factories)
        opt = make_optimizer(replace(cfg, lr=1e-12), layer.parameters())   # its state, its cost; weights ~unchanged
        x = sample_input(cfg.model, rows, gen) if i == 0 else torch.randn((rows, *shapes[i]), generator=gen)
        x.requires_grad_(i > 0)
        out["saved_bytes"].append(saved_bytes(layer, x))
        fwd, bwd, upd, spent, rounds = math.inf, math.inf, math.inf, 0.0, 0
        while rounds <= repeats or (spent < PROBE_BUDGET_S and rounds <= PROBE_MAX_REPEATS):
            t0 = time.perf_counter()
            y = layer(x)
            t1 = time.perf_counter()
            y.backward(torch.ones_like(y))
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if rounds:   # the first round warms up
                fwd, bwd, upd, spent = min(fwd, t1 - t0), min(bwd, t2 - t1), min(upd, t3 - t2), spent + t3 - t0
            rounds += 1
        out["forward_s"].append(fwd)
        out["backward_s"].append(bwd)
        out["update_s"].append(upd)
        del layer, x, y, opt
    _estimate(out)
    return out


def saved_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """What autograd saves during the layer's forward on x for its backward, beyond the layer's input, output
    and parameters: the activations inside a layer of several operations (a residual block's, a transformer
    block's), floating-point storages once each (Stage.memory_bytes counts them the same way)."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dim():
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    known = {t.untyped_storage().data_ptr() for t in (x, y, *layer.parameters())}
    return sum(n for ptr, n in kept.items() if ptr not in known)


def probe_bytes(params: int, ratio: float, in_bytes: int, out_bytes: int) -> int:
    """What timing one layer's forward and backward holds at most: its parameters, gradients and optimizer
    state, its input and the input's gradient, and about four tensors of its output's size (a block's
    intermediate output, its output, the output gradient and the intermediate's gradient)."""
    return int(params * (2 + ratio)) + 2 * in_bytes + 4 * out_bytes


def _estimate(out: dict) -> None:
    """Fill the times of layers that were not measured, at the measured layers' seconds per parameter byte."""
    measured = [i for i in range(len(out["param_bytes"])) if i not in out["estimated"]]
    per_byte = sum(out["param_bytes"][i] for i in measured)
    for key in ("forward_s", "backward_s", "update_s"):
        rate = sum(out[key][i] for i in measured) / per_byte if per_byte else 0.0
        for i in out["estimated"]:
            out[key][i] = out["param_bytes"][i] * rate
