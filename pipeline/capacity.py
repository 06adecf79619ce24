"""The largest model a ring can train: grow one option of a spec (a gpt's blocks, an mlp's depth, ...) while
every pass of an epoch, swaps included, still fits the peers' memory budgets (pipeline.jobplan.JobPlan.check,
as a job would be planned), and say why the next size does not fit."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from pipeline.config import JobConfig
from pipeline.jobplan import Facts, JobPlan, PlanError
from pipeline.models import build_layer, footprint, input_shape, layer_factories, sample_input
from pipeline.planner import Device, LayerCost
from pipeline.profiling import microbatch_rows, optimizer_state_ratio, saved_bytes

GROWN = {"gpt": "blocks", "mlp": "depth", "cnn": "channels", "resnet": "width"}   # the option grown by default


@dataclass(frozen=True)
class Capacity:
    option: str
    largest: int | None      # the largest value that fits (None: not even the smallest)
    params: int              # parameters of the model at that value
    next_refused: str        # why the next value (or the smallest) does not fit ("" if the bound was reached)


def layer_costs(cfg: JobConfig, saved_cache: dict | None = None) -> list[LayerCost]:
    """The planner's view of a spec's layers: sizes on the meta device; what autograd saves inside each
    layer, measured on one microbatch, once per kind of layer (identical blocks are measured once). Times
    proportional to parameters: which split is fastest does not matter here, only whether one fits."""
    rows, ratio = microbatch_rows(cfg), optimizer_state_ratio(cfg)
    sizes = footprint(cfg.model)
    factories = layer_factories(cfg.model)
    shapes = [input_shape(cfg.model)] + [shape for shape, _ in sizes]
    cache = saved_cache if saved_cache is not None else {}
    out = []
    for i, (shape, params) in enumerate(sizes):
        key = (i == 0, i == len(sizes) - 1, shapes[i], shape, params)
        if key not in cache:
            x = sample_input(cfg.model, rows) if i == 0 else torch.randn(rows, *shapes[i], requires_grad=True)
            cache[key] = saved_bytes(build_layer(cfg.model, cfg.seed, i, factories), x)
        t = 1e-9 * (params + 1)
        out.append(LayerCost(t, 2 * t, params, int(params * ratio), rows * math.prod(shape) * 4, cache[key]))
    return out


def fits(cfg: JobConfig, devices: list[Device], cache: dict) -> str | None:
    """Why the job cannot be planned on these devices (each a head with data, in ring order), or None."""
    layers = layer_costs(cfg, cache)
    ring = tuple(d.name for d in devices)
    facts = Facts(ring, {d.name: d for d in devices}, layers, {p: 1 for p in ring}, {p: 0 for p in ring})
    try:
        JobPlan(replace(cfg, epochs=1), facts).check()
    except PlanError as e:
        return str(e)
    return None


def largest(cfg: JobConfig, devices: list[Device], option: str, lo: int = 1, hi: int = 1 << 20) -> Capacity:
    """The largest value of `option` in [lo, hi] for which the job fits (fitting is monotone in it), by
    doubling then bisection."""
    cache: dict = {}

    def at(v: int) -> JobConfig:
        return replace(cfg, model={**cfg.model, option: v})
    why = fits(at(lo), devices, cache)
    if why:
        return Capacity(option, None, 0, why)
    good, bad = lo, None
    while bad is None:
        step = min(hi, good * 2)
        if step == good:
            break
        if fits(at(step), devices, cache):
            bad = step
        else:
            good = step
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        if fits(at(mid), devices, cache):
            bad = mid
        else:
            good = mid
    params = sum(p for _, p in footprint(at(good).model)) // 4
    return Capacity(option, good, params, fits(at(bad), devices, cache) if bad is not None else "")

