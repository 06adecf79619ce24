"""Plain single-process PyTorch training over the samples a ring visits, in the same order: the
reference every exact scheme is tested against."""
from __future__ import annotations

import functools
import math

import torch
from torch.func import functional_call
from torch.nn import functional as F

from pipeline.config import JobConfig
from pipeline.loss import summed as summed_loss
from pipeline.data import Dataset, batch_sizes, microbatch_sizes, pass_order
from pipeline.models import build_model, footprint


def one_thread(fn):
    """Run fn on one thread, as an agent's compute thread runs: a matmul's last bits depend on the thread
    count, and under Adam with fresh state each round such bits grow to visible differences."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return run


def passes(cfg: JobConfig, heads: list[Dataset], skipped=()) -> list[tuple[Dataset, list[torch.Tensor]]]:
    """(head dataset, batch indices of each step) for every pass: epochs, then passes in ring order, but
    those in `skipped` ((epoch, head index) pairs: the passes of a peer lost for good)."""
    out = []
    for epoch in range(cfg.epochs):
        for k, ds in enumerate(heads):
            if (epoch, k) in skipped:
                continue
            order = pass_order(len(ds), cfg.seed, epoch, cfg.shuffle)
            sizes = batch_sizes(len(ds), cfg.batch_size)
            out.append((ds, [order[sum(sizes[:s]):sum(sizes[:s + 1])] for s in range(len(sizes))]))
    return out


def sample_order(cfg: JobConfig, heads: list[Dataset], skipped=()) -> list[tuple[Dataset, torch.Tensor]]:
    """(dataset, batch indices) for every step, in training order."""
    return [(ds, idx) for ds, steps in passes(cfg, heads, skipped) for idx in steps]


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
            loss = summed_loss(functional_call(model, weights, (ds.x[part],)), ds.y[part])[0] / len(idx)
            for param, g in zip(model.parameters(), torch.autograd.grad(loss, list(weights.values()))):
                param.grad = g if param.grad is None else param.grad + g
        opt.step()
    return model


def train(cfg: JobConfig, heads: list[Dataset], skipped=()) -> torch.nn.Sequential:
    model = build_model(cfg.model, cfg.seed)
    opt = _optimizer(cfg, model)
    for ds, idx in sample_order(cfg, heads, skipped):
        opt.zero_grad()
        (summed_loss(model(ds.x[idx]), ds.y[idx])[0] / len(idx)).backward()
        opt.step()
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Held-out accuracy, in evaluation mode (a language model's: the fraction of tokens predicted right)."""
    was = model.training
    model.eval()
    try:
        return summed_loss(model(x), y)[1] / len(y)
    finally:
        model.train(was)


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The mean held-out loss per sample, in evaluation mode (exp of it: a language model's perplexity)."""
    was = model.training
    model.eval()
    try:
        return summed_loss(model(x), y)[0].item() / len(y)
    finally:
        model.train(was)


@one_thread
def train_parallel(cfg: JobConfig, clients: dict[str, Dataset], schedules: list[tuple[dict, dict]],
                   cut: tuple[int, int]) -> torch.nn.Sequential:
    """Client/helper schemes in plain PyTorch (docs/parallel-sl.md). clients: each client's data, in ring
    order; schedules[r]: round r's (assignment {client: helper}, orders {helper: [[client, "F"|"B"], ...]})
    (the order matters where a helper's model changes between clients: splitfed-v2, locsplitfed, locfedmix;
    sl runs clients in turn on one helper); cut: (a, b), b = L for a single cut. Averaged parts start each
    round with a fresh optimizer; sl's parts keep theirs."""
    from copy import deepcopy

    from pipeline.parallel import ALL, aux_head, helper_queues, mixed_loss, mixes, round_batches

    model = build_model(cfg.model, cfg.seed)
    a, b = cut
    p1, p2, p3 = model[:a], model[a:b], model[b:]
    u_shaped = len(p3) > 0
    local = cfg.scheme in ("locsplitfed", "locfedmix")
    if local:   # the clients' auxiliary head, averaged like their part 1
        sizes = footprint(cfg.model)
        p3 = torch.nn.Sequential(aux_head(cfg, math.prod(sizes[a - 1][0]), sizes[-1][0][0]))
    with_opt = lambda m: (m, _optimizer(cfg, m))
    if cfg.scheme == "sl":
        c1 = with_opt(torch.nn.Sequential(*p1, *p3))   # one client part, relayed with its optimizer state
        shared = with_opt(p2)
    for rnd, (assignment, orders) in enumerate(schedules):
        batches = {j: round_batches(len(ds), cfg, rnd) for j, ds in clients.items()}
        steps = {j: len(v) for j, v in batches.items()}
        if cfg.scheme == "sl":
            mine = lambda j: c1
            helper_model = lambda j, h: shared
        else:
            mine_ = {j: with_opt(torch.nn.Sequential(*deepcopy(p1), *deepcopy(p3))) for j in clients}
            mine = mine_.__getitem__
            per_client = cfg.scheme == "splitfed-v1"
            copies = {(j if per_client else h): with_opt(deepcopy(p2)) for j, h in assignment.items()}
            helper_model = lambda j, h: copies[j if per_client else h]
        pending, pool = {}, {}
        for h, queue in sorted(helper_queues(cfg, assignment, orders, steps).items()):
            for j, s, kind in queue:
                hm, hopt = helper_model(j, h)
                if kind == "U":   # a local-loss client's step, then its helper's update on its smashed data
                    cm, copt = mine(j)
                    x, y = clients[j].x[batches[j][s]], clients[j].y[batches[j][s]]
                    act = cm[:a](x)
                    F.cross_entropy(cm[a:](act), y).backward()
                    copt.step()
                    copt.zero_grad()
                    pool.setdefault((h, s), []).append((act.detach(), y))
                    F.cross_entropy(hm(act.detach()), y).backward()
                    hopt.step()
                    hopt.zero_grad()
                    continue
                if kind == "M":   # locfedmix: an update on smashed data mixed across the step's clients
                    got = pool[h, s]
                    done = pool.setdefault((h, s, "mixed"), [])
                    mix = mixes(cfg, rnd, s, h, [len(y) for _, y in got])[len(done)]
                    done.append(mix)
                    x, loss_fn = mixed_loss(mix, [x for x, _ in got], [y for _, y in got])
                    loss_fn(hm(x)).backward()
                    hopt.step()
                    hopt.zero_grad()
                    continue
                if kind == "F":
                    cm, _ = mine(j)
                    ds, idx = clients[j], batches[j][s]
                    act = cm[:a](ds.x[idx])
                    act_in = act.detach().requires_grad_(True)
                    weights = {k: v.detach().clone().requires_grad_(True) for k, v in hm.named_parameters()}
                    pending[j] = (act, act_in, weights, functional_call(hm, weights, (act_in,)), ds.y[idx])
                    continue
                group = [(c, pending.pop(c)) for c in list(pending) if assignment[c] == h] if j == ALL else \
                    [(j, pending.pop(j))]
                total = sum(len(p[4]) for _, p in group)
                share = {c: len(p[4]) / total if j == ALL else 1.0 for c, p in group}   # blind: by samples
                outs, grads = [], []
                for c, (act, act_in, weights, out, y) in group:
                    if u_shaped:
                        out_in = out.detach().requires_grad_(True)
                        batch_loss(mine(c)[0][a:](out_in), y).backward()
                        outs.append(out)
                        grads.append(share[c] * out_in.grad)
                    else:
                        outs.append(batch_loss(out, y))
                        grads.append(torch.tensor(share[c]))
                torch.autograd.backward(outs, grads)   # blind: once, from the weighted losses of all
                for name, param in hm.named_parameters():
                    param.grad = sum(weights[name].grad for _, (_, _, weights, _, _) in group)
                hopt.step()
                hopt.zero_grad()
                for c, (act, act_in, *_rest) in group:   # each client steps on its own loss's gradient
                    cm, copt = mine(c)
                    act.backward(act_in.grad * (1 / share[c]) if j == ALL else act_in.grad)
                    copt.step()
                    copt.zero_grad()
        if cfg.scheme != "sl":
            n = {j: sum(len(i) for i in batches[j]) for j in clients}
            average(p1, [(mine(j)[0][:a], n[j]) for j in clients])
            average(p3, [(mine(j)[0][a:], n[j]) for j in clients])
            if cfg.scheme == "splitfed-v1":
                average(p2, [(copies[j][0], n[j]) for j in clients])
            else:
                average(p2, [(copies[h][0], sum(n[j] for j, hj in assignment.items() if hj == h))
                             for h in set(assignment.values())])
    return model   # sl trained the model's own layers; the others averaged into them


def batch_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A batch's mean cross-entropy computed as a stage computes it (the sum, then divided): Adam turns the
    last-bit difference of the two roundings into visible ones where a gradient is nearly zero."""
    return F.cross_entropy(logits, y, reduction="sum") / len(y)


@torch.no_grad()
def average(target: torch.nn.Sequential, copies: list[tuple[torch.nn.Sequential, int]]) -> None:
    """Each layer of target := the sample-weighted mean of the copies' same layer (FedAvg), floats only."""
    total = sum(w for _, w in copies)
    for k, layer in enumerate(target):
        for name, t in layer.state_dict().items():
            if t.is_floating_point():
                t.copy_(sum(c[k].state_dict()[name].double() * (w / total) for c, w in copies).to(t.dtype))
