"""The workflow paper's own instances, draw for draw (`--paper-compatible`).

Tirana et al., "Workflow Optimization for Parallel Split Learning" (INFOCOM 2024), public source
jtirana98/SFL-workflow-optimization, release v1.0.1 (tag Latest-algo2): `util_files/utils.py`
`create_scenario` and `util_files/random_benchmark.py`. Field by field (docs/scheduling.md):

- one Python `random.Random(seed)` (the source: `random.seed(42)`), draws in the source's order: the links
  class by class (a pair drawn by rejection among the unused ones, then its Mbit/s), H helper types, K client
  types, then scenario 2's samples;
- link classes 1-4, 5-10, 11-15, 16-20 Mbit/s at 30/42/12/28% of the pairs, floored; the 11-15 class then
  takes K*H minus the other three counts, which is 0 in every cell of the paper's grid (the shares add up
  to 112%);
- helpers among {VM, laptop}; scenario 1's clients among {d1, d2} only; a part's time is the sum of its
  layers' ms in layer order (backward: backward + update of each layer);
- scenario 2: K values per client quantity drawn between the int-truncated extremes over the four client
  types, each list sorted, and each client one rank drawn with replacement for all of them (so a client's
  times are perfectly rank-correlated); helpers alike. Two quirks of the source, kept unless `fix_sampler`:
  the part-1 backward is always 0 (it reads an all-zero array) and part 3's ranges take jetson-cpu's
  part-1 times;
- transfers `kib * 0.0008 / mbps * 1000` ms (`kib_to_mbit=PAPER_KIB_TO_MBIT`; 1 KiB is 0.008192 Mbit:
  `instance.KIB_TO_MBIT` for physically correct transfers), the same size both ways, the cut's last layer's output;
- every helper has room for all K clients;
- integer slots: every time x becomes ceil(x * 100 / m), m the largest client-side value rounded to an integer
  (release dates, part-3 work with the uplink, part-3 forward, part-1 backward, downlinks; not the helpers'
  part 2), and helper tasks take at least one slot. One slot lasts m / 100 ms.
- memory in MB as the source counts it (only relative sizes matter: every helper has room for everyone).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from pipeline.device_profiles import ComputeProfile, load_compute, load_memory
from pipeline.scheduling.instance import PAPER_KIB_TO_MBIT, Instance, transfer_ms

SLOTS = 100                         # the source's max_slot
LINK_CLASSES = ((1, 4, 30), (5, 10, 42), (11, 15, 12), (16, 20, 28))   # Mbit/s range, percent of pairs


@dataclass(frozen=True)
class PaperInstance:
    instance: Instance   # times in ms, each a whole number of slots
    slot_ms: float       # how long one slot lasts
    bandwidth: tuple[tuple[int, ...], ...]   # Mbit/s of each client-helper pair


def source_cuts(profile: str) -> tuple[int, int]:
    """The source's cuts: (3, 33) for ResNet-101; VGG-19 (25 layers) needs (3, 23), as its tester passes."""
    return (3, 23) if profile.startswith("vgg19") else (3, 33)


def _part(p: ComputeProfile, lo: int, hi: int) -> tuple[float, float]:
    """(forward, backward with update) ms of layers [lo, hi), summed in layer order as the source does."""
    fwd = bwd = 0.0
    for i in range(lo, hi):
        fwd += p.forward_ms[i]
        bwd += p.backward_ms[i] + p.update_ms[i]
    return fwd, bwd


def _links(rng: random.Random, k: int, h: int) -> list[list[int]]:
    n = k * h
    counts = [n * pct // 100 for _, _, pct in LINK_CLASSES]
    counts[2] += n - sum(counts)
    mbps, used = [[0] * h for _ in range(k)], set()
    for (lo, hi, _), count in zip(LINK_CLASSES, counts):
        for _ in range(count):
            while (pair := rng.randint(0, n - 1)) in used:
                pass
            used.add(pair)
            mbps[pair // h][pair % h] = rng.randint(lo, hi)
    return mbps


def generate(profile: str, clients: int, helpers: int, scenario: int, seed: int = 42,
             cuts: tuple[int, int] | None = None, kib_to_mbit: float = PAPER_KIB_TO_MBIT,
             fix_sampler: bool = False, slots: int = SLOTS) -> PaperInstance:
    """The source's instance for (profile, K, H, scenario, seed); seed 42 is the paper's."""
    if scenario not in (1, 2):
        raise ValueError("scenario must be 1 (low heterogeneity) or 2 (high)")
    if clients < 1 or helpers < 1:
        raise ValueError("need at least one client and one helper")
    compute, memory = load_compute(profile), load_memory(profile)
    layers = len(memory.activation_kb)
    a, b = cuts or source_cuts(profile)
    if not 0 < a < b < layers:
        raise ValueError(f"cuts must satisfy 0 < a < b < {layers}, got ({a}, {b})")
    helper_part = {d: _part(compute[d], a, b) for d in ("VM", "laptop")}
    first = {d: _part(compute[d], 0, a) for d in ("d1", "d2", "jetson-cpu", "jetson-gpu")}
    last = {d: _part(compute[d], b, layers) for d in first}

    rng = random.Random(seed)
    mbps = _links(rng, clients, helpers)
    helper_types = [("VM", "laptop")[rng.randint(0, 1)] for _ in range(helpers)]
    client_types = [("d1", "d2")[rng.randint(0, 1)] for _ in range(clients)]
    if scenario == 1:   # (p1 forward, p3 backward, p3 forward, p1 backward) per client; (p2 f, p2 b) per helper
        mine = [(first[d][0], last[d][1], last[d][0], first[d][1]) for d in client_types]
        theirs = [helper_part[d] for d in helper_types]
    else:
        p3 = last if fix_sampler else {**last, "jetson-cpu": first["jetson-cpu"]}   # the source's ranges
        span = lambda values: (int(min(values)), int(max(values)))
        ranges = [span([first[d][0] for d in first]), span([p3[d][1] for d in first]),
                  span([p3[d][0] for d in first]), span([first[d][1] for d in first])]
        drawn = [[rng.randint(*r) for r in ranges] for _ in range(clients)]
        columns = [sorted(col) for col in zip(*drawn)]
        ranks = [rng.randint(0, clients - 1) for _ in range(clients)]
        mine = [tuple(float(col[r]) for col in columns) for r in ranks]
        if not fix_sampler:   # the source reads its all-zero output array for the part-1 backward
            mine = [(f1, b3, f3, 0.0) for f1, b3, f3, _ in mine]
        hr = [span([helper_part[d][0] for d in helper_part]), span([helper_part[d][1] for d in helper_part])]
        hdrawn = [[rng.randint(*r) for r in hr] for _ in range(helpers)]
        hcols = [sorted(col) for col in zip(*hdrawn)]
        theirs = [(float(hcols[0][r]), float(hcols[1][r])) for r in (rng.randint(0, helpers - 1)
                                                                      for _ in range(helpers))]

    net = lambda kib, bw: transfer_ms(kib, bw, kib_to_mbit)
    kib_a, kib_b = memory.activation_kb[a - 1], memory.activation_kb[b - 1]
    # per pair: release, part-3 backward with its uplink, downlink at b, downlink at a (ms)
    release = [[net(kib_a, mbps[j][i]) + mine[j][0] for i in range(helpers)] for j in range(clients)]
    back = [[net(kib_b, mbps[j][i]) + mine[j][1] for i in range(helpers)] for j in range(clients)]
    down_b = [[net(kib_b, mbps[j][i]) for i in range(helpers)] for j in range(clients)]
    down_a = [[net(kib_a, mbps[j][i]) for i in range(helpers)] for j in range(clients)]
    client_side = [v for rows in (release, back, down_b, down_a) for r in rows for v in r] + \
        [m[k] for m in mine for k in (2, 3)]
    biggest = max(int(np.rint(v)) for v in client_side)
    slot = lambda x: math.ceil(x * slots / biggest)
    task = lambda x: max(1, slot(x))
    ms = biggest / slots
    grid = lambda f: tuple(tuple(f(j, i) * ms for i in range(helpers)) for j in range(clients))
    demand = math.ceil((sum(memory.activation_kb[a:b]) + sum(memory.weights_kb[a:b])) / 1024)   # MB, as the source
    inst = Instance(
        release=grid(lambda j, i: slot(release[j][i])),
        forward=grid(lambda j, i: task(theirs[i][0])),
        delay=grid(lambda j, i: slot(down_b[j][i]) + slot(mine[j][2]) + slot(back[j][i])),
        backward=grid(lambda j, i: task(theirs[i][1])),
        tail=grid(lambda j, i: slot(down_a[j][i]) + slot(mine[j][3])),
        demand=(float(demand),) * clients, capacity=(float(demand * clients),) * helpers)
    return PaperInstance(inst, ms, tuple(tuple(r) for r in mbps))


def random_assignment(clients: int, helpers: int, seed: int = 42) -> list[int]:
    """The source's random baseline (random_benchmark.py): clients in an order drawn by rejection, each to a
    helper drawn among those with room (all of them: every helper has room for every client)."""
    rng = random.Random(seed)
    done, assignment = set(), [0] * clients
    while len(done) < clients:
        while (j := rng.randint(0, clients - 1)) in done:
            pass
        done.add(j)
        assignment[j] = 0 if helpers == 1 else rng.randint(0, helpers - 1)
    return assignment
