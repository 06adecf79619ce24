"""Client/helper schemes (sl, splitfed-v1, splitfed-v2), as pure decisions: who is a client and who a
helper, which layers each holds, which samples a client trains on in a round, the order of each helper's
tasks, the scheduling instance built from measured costs and its prediction, FedAvg, and which data-plane
messages a peer expects. The agents carry these out (peer/parallel.py, peer/parallel_coordinator.py);
pipeline/reference.py trains the same thing in one process. See docs/parallel-sl.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import hashlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.admission import MessageKey, check
from pipeline.models import layer_seed
from pipeline.config import LOCAL_LOSS_SCHEMES, JobConfig
from pipeline.data import num_steps, pass_order
from pipeline.scheduling import Instance, Schedule, balanced_greedy_fcfs, brute_force, milp, random_fcfs, solve
from pipeline.scheduling.compare import small_enough
from pipeline.scheduling.sequencing import timing
from pipeline.scheduling.solution import BACKWARD, FORWARD
from protocols import ProtocolError
from protocols.errors import SplitringError

EVAL_BATCH = 256


class ParallelError(SplitringError, ValueError):
    """A client/helper job that cannot run as asked; the message names the problem."""


# --- roles and parts ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parts:
    """Layers of an L-layer model: clients hold [0, a) and, U-shaped, [b, L) with the loss; helpers [a, b)
    (single cut: b = L, the helper computes the loss from labels that travel with the activations)."""
    layers: int
    a: int
    b: int

    @property
    def u_shaped(self) -> bool:
        return self.b < self.layers

    @property
    def helper(self) -> tuple[int, int]:
        return self.a, self.b

    @property
    def client(self) -> list[tuple[int, int]]:
        return [(0, self.a)] + ([(self.b, self.layers)] if self.u_shaped else [])

    def labels(self) -> str:
        return "stay on the clients (U-shaped)" if self.u_shaped else "travel to the helpers with the activations"


def parts(cfg: JobConfig, n_layers: int) -> Parts:
    cut = cfg.cut or ([1, n_layers - 1] if n_layers >= 3 and cfg.scheme not in LOCAL_LOSS_SCHEMES else [1])
    a, b = (cut[0], cut[1]) if len(cut) == 2 else (cut[0], n_layers)
    if not 0 < a < n_layers or not a < b <= n_layers or (len(cut) == 2 and b == n_layers):
        raise ParallelError(f"cut {','.join(map(str, cut))} is outside the model: {cfg.model['name']} has "
                            f"{n_layers} layers, so a cut A needs 0 < A < {n_layers}, and A,B needs "
                            f"0 < A < B < {n_layers}")
    return Parts(n_layers, a, b)


def split_roles(cfg: JobConfig, peers: list[dict]) -> tuple[list[str], list[str]]:
    """(clients, helpers) in ring order, from each peer's role ({"peer", "role": "client"|"helper", "samples"})
    overridden by the job's lists: a peer named in one takes that role; with one list given, every other peer
    takes the other role; with both, peers named in neither are left out of the job."""
    ids = [p["peer"] for p in peers]
    unknown = [p for p in cfg.clients + cfg.helpers if p not in ids]
    if unknown:
        raise ParallelError(f"peer(s) {', '.join(unknown)} named in --clients/--helpers are not in the ring "
                            f"({', '.join(ids)})")
    role = {p["peer"]: p.get("role") or ("client" if p.get("samples") else "helper") for p in peers}
    if cfg.clients or cfg.helpers:
        other = None if cfg.clients and cfg.helpers else "helper" if cfg.clients else "client"
        role = {p: "client" if p in cfg.clients else "helper" if p in cfg.helpers else other for p in ids}
    clients = [p for p in ids if role[p] == "client"]
    helpers = [p for p in ids if role[p] == "helper"]
    samples = {p["peer"]: p.get("samples", 0) for p in peers}
    if not helpers:
        raise ParallelError(f"scheme {cfg.scheme} needs at least one helper and the ring has none: start an agent "
                            f"with --role helper, or name one with --helpers")
    if not clients:
        raise ParallelError(f"scheme {cfg.scheme} needs at least one client and the ring has none: clients are "
                            f"agents with --data (or --role client)")
    empty = [p for p in clients if not samples[p]]
    if empty:
        raise ParallelError(f"client(s) {', '.join(empty)} hold no training data (start them with --data)")
    return clients, helpers


# --- samples ----------------------------------------------------------------------------------------
def round_steps(n: int, cfg: JobConfig, rnd: int) -> list[tuple[int, int]]:
    """(epoch, batch index in that epoch) of each batch a client with n samples trains on in round `rnd`.
    With local_steps 0 a round is one local epoch (epoch rnd); else the client walks its epochs' batches
    local_steps at a time, across rounds."""
    per_epoch = num_steps(n, cfg.batch_size)
    if cfg.local_steps == 0:
        return [(rnd, i) for i in range(per_epoch)]
    return [divmod(t, per_epoch) for t in range(rnd * cfg.local_steps, (rnd + 1) * cfg.local_steps)]


def round_batches(n: int, cfg: JobConfig, rnd: int) -> list[torch.Tensor]:
    """The indices of each batch of round_steps, each epoch in its seeded order."""
    steps = round_steps(n, cfg, rnd)
    orders = {e: pass_order(n, cfg.seed, e, cfg.shuffle) for e in {e for e, _ in steps}}
    return [orders[e][i * cfg.batch_size:(i + 1) * cfg.batch_size] for e, i in steps]


def round_sizes(n: int, cfg: JobConfig, rnd: int) -> list[int]:
    """The rows of each batch of round_steps, without drawing the orders."""
    return [min(cfg.batch_size, n - i * cfg.batch_size) for _, i in round_steps(n, cfg, rnd)]


# --- helpers' queues ---------------------------------------------------------------------------------
class Task(NamedTuple):
    client: str
    step: int
    kind: str   # "F" (part-2 forward) or "B" (part-2 backward and update)


ALL = "*"   # a helper task for all of its clients at once (blind's backward, locfedmix's mixed updates)


def helper_queues(cfg: JobConfig, assignment: dict[str, str], orders: dict[str, list[list]],
                  steps: dict[str, int]) -> dict[str, list[Task]]:
    """Each helper's tasks of a round, in the order it runs them. splitfed: the schedule's order of one
    step's tasks (orders[helper]: [client, "F"|"B"]), repeated for each local step over the clients that have
    that step. sl: clients in turn (their order in `assignment`), each step's F then B. blind: each step's
    forwards in the schedule's order, then one backward for all ("B" of client ALL). locsplitfed: an update
    ("U": forward, loss, backward, step) per client in the schedule's forward order; locfedmix: then
    mix_updates updates on mixed smashed data ("M" of client ALL, numbered by their step field's order)."""
    if cfg.scheme == "sl":
        return {h: [Task(j, s, k) for j, hj in assignment.items() if hj == h for s in range(steps[j])
                    for k in "FB"] for h in set(assignment.values())}
    out = {}
    for h, order in orders.items():
        queue = []
        for s in range(max([steps[j] for j, _ in order], default=0)):
            if cfg.scheme in ("splitfed-v1", "splitfed-v2"):
                queue += [Task(j, s, k) for j, k in order if s < steps[j]]
                continue
            first = [j for j, k in order if k == "F" and s < steps[j]]
            if cfg.scheme == "blind":
                queue += [Task(j, s, "F") for j in first] + [Task(ALL, s, "B")]
            else:
                queue += [Task(j, s, "U") for j in first]
                queue += [Task(ALL, s, "M")] * (cfg.mix_updates if cfg.scheme == "locfedmix" else 0)
        out[h] = queue
    return out


def aux_head(cfg: JobConfig, features: int, classes: int) -> nn.Module:
    """A client's auxiliary head on its smashed data (local-loss schemes), its weights from the job seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed(cfg.seed, -1))
        if cfg.aux_head == "mlp":
            return nn.Sequential(nn.Flatten(), nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, classes))
        return nn.Sequential(nn.Flatten(), nn.Linear(features, classes))


class Mix(NamedTuple):
    """One mixed batch of a helper's step: row r mixes sample a[r] of client ca[r] with sample b[r] of
    client cb[r] (indices into the step's clients, in the schedule's order), weight lam[r] on the first."""
    ca: list[int]
    a: list[int]
    cb: list[int]
    b: list[int]
    lam: list[float]


def mixes(cfg: JobConfig, rnd: int, step: int, helper: str, rows: list[int]) -> list[Mix]:
    """locfedmix: the mix_updates mixed batches of a helper's step, whose clients sent rows[k] samples each.
    Each has min(batch_size, all rows) rows: a first sample uniform over the step's samples, a second uniform
    over the other clients' (the same client's when it is alone), weight Beta(alpha, alpha). Drawn with numpy
    from (job seed, round, step, helper): deterministic on every peer and in the reference."""
    digest = hashlib.sha256(f"splitring-mix:{cfg.seed}:{rnd}:{step}:{helper}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    pool = [(k, i) for k, n in enumerate(rows) for i in range(n)]
    others = {k: [p for p in pool if p[0] != k] if len(rows) > 1 else pool for k in range(len(rows))}
    size = min(cfg.batch_size, len(pool))
    out = []
    for _ in range(cfg.mix_updates):
        first = [pool[i] for i in rng.integers(0, len(pool), size)]
        second = [others[k][int(rng.integers(0, len(others[k])))] for k, _ in first]
        lam = rng.beta(cfg.mixup_alpha, cfg.mixup_alpha, size)
        out.append(Mix([k for k, _ in first], [i for _, i in first], [k for k, _ in second], [i for _, i in second],
                       [float(v) for v in lam]))
    return out


def mixed_loss(mix: Mix, xs: list[torch.Tensor], ys: list[torch.Tensor]):
    """(mixed inputs, loss_fn) of a Mix over the clients' smashed data xs and labels ys: mixup's loss,
    lam * CE(out, y_a) + (1 - lam) * CE(out, y_b), averaged over the rows."""
    lam = torch.tensor(mix.lam, dtype=torch.float32)
    xa = torch.stack([xs[k][i] for k, i in zip(mix.ca, mix.a)])
    xb = torch.stack([xs[k][i] for k, i in zip(mix.cb, mix.b)])
    ya = torch.stack([ys[k][i] for k, i in zip(mix.ca, mix.a)])
    yb = torch.stack([ys[k][i] for k, i in zip(mix.cb, mix.b)])
    x = lam.view(-1, *[1] * (xa.dim() - 1)) * xa + (1 - lam).view(-1, *[1] * (xa.dim() - 1)) * xb

    def loss(out):
        return (lam * F.cross_entropy(out, ya, reduction="none")
                + (1 - lam) * F.cross_entropy(out, yb, reduction="none")).mean()
    return x, loss


# --- scheduling from measured costs ---------------------------------------------------------------------
@dataclass(frozen=True)
class Costs:
    """One peer's measured per-layer seconds (for a batch of the job's batch size) and its link."""
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    bandwidth: float     # bytes/s
    latency: float       # one-way seconds
    memory_budget: int | None = None


def transfer_s(nbytes: float, a: Costs, b: Costs) -> float:
    """A message between two peers: each one's latency, at the slower of their bandwidths (a star LAN)."""
    return a.latency + b.latency + nbytes / min(a.bandwidth, b.bandwidth)


def build_instance(cfg: JobConfig, p: Parts, clients: list[Costs], helpers: list[Costs], cut_bytes: tuple[int, int],
                   param_bytes: list[int], state_ratio: float, activation_bytes: list[int]) -> Instance:
    """The instance of pipeline.scheduling (ms; memory in KiB) for one step of every client: release = part-1
    forward and upload; forward = part-2 forward (single cut: with the loss); delay = U-shaped: download, part 3
    forward and backward, upload; backward = part-2 backward and update; tail = download and part-1 backward.
    Demand: what a client's part-2 work holds on its helper (splitfed-v1: a copy of part 2 with gradients and
    optimizer state; splitfed-v2: a copy of its weights, kept from forward to backward; sl: nothing more) plus
    its activations (sl: the clients run in turn, so one client's is held at a time);
    capacity: a helper's budget less what it holds once (the shared part 2 of sl and splitfed-v2)."""
    a, b, L = p.a, p.b, p.layers
    ms = lambda t: 1000 * t
    part = lambda c, lo, hi, back: sum(c.forward_s[lo:hi]) + (sum(c.backward_s[lo:hi]) if back else 0)

    def grid(f):
        return tuple(tuple(ms(f(c, h)) for h in helpers) for c in clients)

    up_a = lambda c, h: transfer_s(cut_bytes[0], c, h)
    up_b = lambda c, h: transfer_s(cut_bytes[1], c, h) if p.u_shaped else 0.0
    params2 = sum(param_bytes[a:b])
    acts2 = sum(activation_bytes[a:b])
    per_client = {"splitfed-v1": params2 * (2 + state_ratio), "splitfed-v2": params2}.get(cfg.scheme, 0)
    shared = params2 if cfg.scheme == "splitfed-v1" else params2 * (2 + state_ratio)   # v1: the averaged weights
    demand = [(per_client + acts2) / 1024] * len(clients)
    capacity = tuple((sum(demand) + 1 if h.memory_budget is None else max(0.0, (h.memory_budget - shared) / 1024))
                     for h in helpers)
    return Instance(
        release=grid(lambda c, h: part(c, 0, a, False) + up_a(c, h)),
        forward=grid(lambda c, h: sum(h.forward_s[a:b])),
        delay=grid(lambda c, h: 2 * up_b(c, h) + part(c, b, L, True)),
        backward=grid(lambda c, h: sum(h.backward_s[a:b])),
        tail=grid(lambda c, h: up_a(c, h) + sum(c.backward_s[0:a])),
        demand=tuple(demand), capacity=capacity)


def solve_with(inst: Instance, method: str, seed: int) -> Schedule:
    """A schedule by --assign: ours, random (seeded), greedy (balanced, first come first served) or exact
    (a MILP with HiGHS; refused beyond small instances). Infeasible says which client fits nowhere."""
    if method == "random":
        return random_fcfs(inst, seed)
    if method == "greedy":
        return balanced_greedy_fcfs(inst)
    if method == "exact":
        if not small_enough(inst):
            raise ParallelError(f"--assign exact is for small rings; {inst.clients} clients and {inst.helpers} "
                                f"helpers are too many (use ours)")
        return milp(inst)[0] if inst.clients > 4 else brute_force(inst)
    return solve(inst)


def helper_orders(s: Schedule, helpers: int) -> list[list[tuple[int, int]]]:
    """Each helper's tasks (client, FORWARD|BACKWARD) by start time: the order it must run them in."""
    tasks = [[] for _ in range(helpers)]
    for j, (h, (f, b)) in enumerate(zip(s.assignment, s.starts)):
        tasks[h] += [(f, 0, j, FORWARD), (b, 1, j, BACKWARD)]
    return [[(j, k) for _, _, j, k in sorted(t)] for t in tasks]


def scaled(inst: Instance, factors: list[float]) -> Instance:
    """The instance with each client's times multiplied by its factor (a batch of rows/batch_size: time is
    taken as proportional to the rows, as compute and transfers nearly are)."""
    def grid(name):
        return tuple(tuple(v * f for v in row) for row, f in zip(getattr(inst, name), factors))
    return replace(inst, **{n: grid(n) for n in ("release", "forward", "delay", "backward", "tail")})


def predict_round(inst: Instance, assignment: list[int], orders: list[list[tuple[int, int]]],
                  sizes: list[list[int]], batch_size: int, sequential: bool = False) -> float:
    """Predicted makespan (ms) of a round whose client j trains batches of sizes[j] rows (the instance's times
    are for batch_size rows): each local step's tasks run in the helper's order, over the clients that have
    that step, steps one after another; sequential (sl): clients in turn, each one's whole path."""
    total = 0.0
    for s in range(max(map(len, sizes), default=0)):
        step = scaled(inst, [rows[s] / batch_size if s < len(rows) else 0.0 for rows in sizes])
        if sequential:
            total += sum(step.release[j][h] + step.forward[j][h] + step.delay[j][h] + step.backward[j][h]
                         + step.tail[j][h] for j, h in enumerate(assignment) if s < len(sizes[j]))
        else:
            total += max((timing(step, h, [(j, k) for j, k in order if s < len(sizes[j])])[1]
                          for h, order in enumerate(orders)), default=0.0)
    return total


def measured_instance(inst: Instance, assignment: list[int], seen: dict[int, dict[str, float]]) -> Instance:
    """The instance with what a round measured: for each client j seen (ms of release, forward, delay,
    backward, tail on its helper, for the instance's batch size), its own row; other helpers' forward and
    backward for j scaled by how far those helpers' measured tasks were from the instance (unchanged for a
    helper that ran none)."""
    ratio = {}
    for h in range(inst.helpers):
        mine = [j for j in seen if assignment[j] == h]
        want = sum(inst.forward[j][h] + inst.backward[j][h] for j in mine)
        got = sum(seen[j]["forward"] + seen[j]["backward"] for j in mine)
        ratio[h] = got / want if mine and want > 0 else 1.0

    def grid(name):
        rows = getattr(inst, name)
        out = []
        for j, row in enumerate(rows):
            if j not in seen:
                out.append(row)
            elif name in ("forward", "backward"):
                out.append(tuple(seen[j][name] if h == assignment[j] else v * ratio[h] for h, v in enumerate(row)))
            else:   # client-side and links: the same whichever helper
                out.append(tuple(seen[j][name] for _ in row))
        return tuple(out)
    return replace(inst, **{n: grid(n) for n in ("release", "forward", "delay", "backward", "tail")})


def drifted(predicted: float, measured: float, fraction: float) -> bool:
    return predicted > 0 and abs(measured - predicted) > fraction * predicted


# --- averaging ----------------------------------------------------------------------------------------
def fedavg(states: list[tuple[dict[int, dict[str, torch.Tensor]], int]]) -> dict[int, dict[str, torch.Tensor]]:
    """The sample-weighted mean of several copies of the same layers ({layer: {name: tensor}}, weight)."""
    total = sum(w for _, w in states)
    if not states or total <= 0:
        raise ParallelError("nothing to average: no samples were trained on")
    out = {}
    for i, named in states[0][0].items():
        out[i] = {}
        for name, t in named.items():
            if t.is_floating_point():
                acc = torch.zeros_like(t, dtype=torch.float64)
                for state, w in states:
                    acc += state[i][name].to(torch.float64) * (w / total)
                out[i][name] = acc.to(t.dtype)
            else:   # counters (e.g. batch norm's): the first copy's
                out[i][name] = t.clone()
    return out


# --- data-plane admission -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundFacts:
    """What one peer expects in a round: its role, the assignment, and each client's batch sizes."""
    me: str
    round: int
    parts: Parts
    assignment: dict[str, str]            # client -> helper
    train_sizes: dict[str, list[int]]     # client -> rows of each batch this round
    eval_sizes: dict[str, list[int]]      # client -> rows of each evaluation batch
    shapes: list[tuple]                   # shapes[i]: one sample's input of layer i (the last: the output)
    blind: bool = False                   # scheme blind: gradients to clients carry their weight


def box(kind: str, cut: int, client: str) -> str:
    return f"{kind}{cut}@{client}"


def admit(f: RoundFacts, sender: str, msg: dict) -> tuple[MessageKey, dict]:
    """The key and payload of an act/grad message (validated by protocols.validate) that `sender` sent this
    peer, or a ProtocolError saying why it is not expected. act cut 1 and grad cut 2 go client -> helper,
    act cut 2 and grad cut 1 helper -> client."""
    kind, cut, j, mode = msg["type"], msg["cut"], msg["client"], msg["mode"]
    if msg["round"] != f.round:
        raise ProtocolError("stale", f"message for round {msg['round']}; this peer is at round {f.round}")
    if mode not in ("train", "eval") or cut not in (1, 2) or j not in f.assignment:
        raise ProtocolError("unexpected", f"{kind} cut {cut} ({mode}) for client {j!r} is not expected")
    to_helper = (kind, cut) in (("act", 1), ("grad", 2))
    want_sender, want_receiver = (j, f.assignment[j]) if to_helper else (f.assignment[j], j)
    u_only = (kind, cut) == ("grad", 2) or ((kind, cut) == ("act", 2) and mode == "train")
    if sender != want_sender or f.me != want_receiver or (u_only and not f.parts.u_shaped) or \
            (mode == "eval" and kind == "grad"):
        raise ProtocolError("unexpected", f"{kind} cut {cut} for client {j} from {sender} is not expected by {f.me}")
    sizes = (f.train_sizes if mode == "train" else f.eval_sizes)[j]
    if not 0 <= msg["step"] < len(sizes):
        raise ProtocolError("unexpected", f"step {msg['step']} out of range ({len(sizes)} for client {j})")
    rows = sizes[msg["step"]]
    at = f.parts.a if cut == 1 else f.parts.b
    if kind == "act":
        payload = {"x": check(msg["x"], (rows, *f.shapes[at]), torch.float32, "activation")}
        if to_helper and mode == "train" and not f.parts.u_shaped:
            y = payload["y"] = check(msg.get("y"), (rows,), torch.int64, "labels")
            classes = f.shapes[-1][0]
            if len(y) and not 0 <= int(y.min()) <= int(y.max()) < classes:
                raise ProtocolError("bad_labels", f"labels must be 0 to {classes - 1} (the model's classes)")
    else:
        payload = {"grad": check(msg["grad"], (rows, *f.shapes[at]), torch.float32, "gradient")}
        if cut == 1 and not f.parts.u_shaped:   # single cut: the helper's loss of this batch comes back with it
            if not all(k in msg for k in ("loss", "correct")):
                raise ProtocolError("malformed", "a single-cut gradient carries the batch's loss and correct count")
            payload.update(loss=msg["loss"], correct=msg["correct"])
        if cut == 1 and f.blind:   # the client's share of the helper's averaged loss
            if not 0 < msg.get("weight", 0) <= 1:
                raise ProtocolError("malformed", "a blind gradient carries its client's weight, in (0, 1]")
            payload["weight"] = msg["weight"]
    return MessageKey(f.round, mode, msg["step"], box(kind, cut, j), 0), payload

