"""The client-to-helper scheduling instance, and the paper's scenario generator.

Each client j keeps part 1 (layers [0, a)) and part 3 (layers [b, L), with the loss); the helper h
it is assigned to runs part 2 (layers [a, b)). One training step of client j on helper h is:

    part-1 forward, upload cut-a activations            -> release[j][h]   (client side)
    part-2 forward on the helper                        -> forward[j][h]   (helper task)
    download cut-b activations, part-3 forward and
    backward, upload the cut-b gradient                 -> delay[j][h]     (client side)
    part-2 backward and update on the helper            -> backward[j][h]  (helper task)
    download the cut-a gradient, part-1 backward+update -> tail[j][h]      (client side)

Only the helper tasks compete for a resource: a helper runs one task at a time, without preemption.
Client-side steps run in parallel across clients. The makespan is the time the last client ends.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields

from pipeline.device_profiles import ComputeProfile, load_compute, load_memory

HELPER_DEVICES = ("VM", "laptop")
CLIENT_DEVICES = ("d1", "d2", "jetson-cpu", "jetson-gpu")

# Link classes (Mbit/s range, share of client-helper pairs) from the paper's source. The shares add up
# to 112%; as in the source, the 11-15 class only receives what rounding leaves over.
BANDWIDTH_CLASSES = ((1, 4, 0.30), (5, 10, 0.42), (11, 15, None), (16, 20, 0.28))
KIB_TO_MBIT = 8 * 1024 / 1e6        # 0.008192: physically correct, the default
PAPER_KIB_TO_MBIT = 0.0008          # the paper's source: every transfer 10.24x too short


@dataclass(frozen=True)
class Instance:
    """Times in ms, indexed [client][helper]; memory in KiB."""
    release: tuple[tuple[float, ...], ...]
    forward: tuple[tuple[float, ...], ...]
    delay: tuple[tuple[float, ...], ...]
    backward: tuple[tuple[float, ...], ...]
    tail: tuple[tuple[float, ...], ...]
    demand: tuple[float, ...]    # part-2 memory of each client on its helper
    capacity: tuple[float, ...]  # memory of each helper

    def __post_init__(self):
        k, h = len(self.demand), len(self.capacity)
        for f in ("release", "forward", "delay", "backward", "tail"):
            rows = getattr(self, f)
            if len(rows) != k or any(len(r) != h for r in rows):
                raise ValueError(f"{f} must be {k} clients x {h} helpers")
            if any(v < 0 or not math.isfinite(v) for r in rows for v in r):
                raise ValueError(f"{f} holds a negative or non-finite time")
        if any(v < 0 or not math.isfinite(v) for v in self.demand + self.capacity):
            raise ValueError("memory demands and capacities must be finite and not negative")

    @property
    def clients(self) -> int:
        return len(self.demand)

    @property
    def helpers(self) -> int:
        return len(self.capacity)


@dataclass(frozen=True)
class PartTimes:
    """One device's ms for each part of the model (backward includes the weight update)."""
    part1_forward: float
    part2_forward: float
    part3_forward: float
    part1_backward: float
    part2_backward: float
    part3_backward: float


CLIENT_PARTS = ("part1_forward", "part3_forward", "part1_backward", "part3_backward")
HELPER_PARTS = ("part2_forward", "part2_backward")


def part_times(profile: ComputeProfile, cuts: tuple[int, int]) -> PartTimes:
    a, b = cuts
    n = len(profile.forward_ms)
    fwd = lambda lo, hi: sum(profile.forward_ms[lo:hi])
    bwd = lambda lo, hi: sum(profile.backward_ms[lo:hi]) + sum(profile.update_ms[lo:hi])
    return PartTimes(fwd(0, a), fwd(a, b), fwd(b, n), bwd(0, a), bwd(a, b), bwd(b, n))


def transfer_ms(kb: float, mbps: float, kib_to_mbit: float = KIB_TO_MBIT) -> float:
    """KiB over Mbit/s, in ms (kib_to_mbit=PAPER_KIB_TO_MBIT: the paper's source's formula)."""
    return kb * kib_to_mbit / mbps * 1000


def build(clients: list[PartTimes], helpers: list[PartTimes], bandwidth_mbps: list[list[float]],
          cut_kb: tuple[float, float], demand: list[float], capacity: list[float],
          kib_to_mbit: float = KIB_TO_MBIT) -> Instance:
    """An instance from each device's part times, the per-pair bandwidths and the sizes (KiB) of
    what crosses cut a and cut b (activations forward, gradients of the same size backward)."""
    a_kb, b_kb = cut_kb
    net = lambda kb, bw: transfer_ms(kb, bw, kib_to_mbit)

    def grid(f):
        return tuple(tuple(f(c, h, bandwidth_mbps[j][i]) for i, h in enumerate(helpers))
                     for j, c in enumerate(clients))

    return Instance(
        release=grid(lambda c, h, bw: c.part1_forward + net(a_kb, bw)),
        forward=grid(lambda c, h, bw: h.part2_forward),
        delay=grid(lambda c, h, bw: 2 * net(b_kb, bw) + c.part3_forward + c.part3_backward),
        backward=grid(lambda c, h, bw: h.part2_backward),
        tail=grid(lambda c, h, bw: net(a_kb, bw) + c.part1_backward),
        demand=tuple(demand), capacity=tuple(capacity))


def default_cuts(profile: str, layers: int) -> tuple[int, int]:
    """The paper's cuts for ResNet-101 (3, 33); elsewhere the same share: 3 head and 4 tail layers."""
    return (3, 33) if profile.startswith("resnet101") else (3, layers - 4)


def _bandwidths(rng: random.Random, clients: int, helpers: int) -> list[list[float]]:
    n = clients * helpers
    counts = [math.floor(share * n) if share is not None else 0 for _, _, share in BANDWIDTH_CLASSES]
    counts[2] = n - sum(counts)  # the 11-15 class takes what rounding leaves
    draws = [rng.randint(lo, hi) for (lo, hi, _), c in zip(BANDWIDTH_CLASSES, counts) for _ in range(c)]
    rng.shuffle(draws)
    return [draws[j * helpers:(j + 1) * helpers] for j in range(clients)]


def _measured(profiles: dict[str, ComputeProfile], names: tuple[str, ...]) -> list[str]:
    # Some source sheets hold only zeros for a device (e.g. the Jetsons on MNIST): it was not measured.
    return [d for d in names if d in profiles and any(profiles[d].forward_ms + profiles[d].backward_ms)]


def _heterogeneous(rng: random.Random, types: list[PartTimes], parts: tuple[str, ...]) -> PartTimes:
    """Each part's time uniformly between its minimum and maximum over the device types."""
    drawn = {f.name: 0.0 for f in fields(PartTimes)}
    for p in parts:
        values = [getattr(t, p) for t in types]
        drawn[p] = rng.uniform(min(values), max(values))
    return PartTimes(**drawn)


def generate(profile: str, clients: int, helpers: int, scenario: int, seed: int,
             cuts: tuple[int, int] | None = None, memory_slack: float = 1.5,
             kib_to_mbit: float = KIB_TO_MBIT) -> Instance:
    """The paper's scenarios: helpers among {VM, laptop}, clients among {d1, d2, jetson-cpu,
    jetson-gpu}. Scenario 1 (low heterogeneity) uses each drawn device's profiled times; scenario 2
    (high) draws every client's and helper's part times uniformly between the profiled extremes.

    Each helper's memory holds between ceil(K/H) and ceil(memory_slack*K/H) clients' part 2, so every
    instance has a feasible assignment while the fastest helpers cannot take everyone. Transfers are
    physical (kib_to_mbit=KIB_TO_MBIT); the paper's own instances are `paper.generate`'s."""
    if scenario not in (1, 2):
        raise ValueError("scenario must be 1 (low heterogeneity) or 2 (high)")
    if clients < 1 or helpers < 1:
        raise ValueError("need at least one client and one helper")
    if memory_slack < 1:
        raise ValueError("memory_slack must be at least 1, or some clients fit nowhere")
    compute, memory = load_compute(profile), load_memory(profile)
    layers = len(memory.activation_kb)
    a, b = cuts or default_cuts(profile, layers)
    if not 0 < a < b < layers:
        raise ValueError(f"cuts must satisfy 0 < a < b < {layers}, got ({a}, {b})")

    rng = random.Random(seed)
    bandwidth = _bandwidths(rng, clients, helpers)
    helper_types = {d: part_times(compute[d], (a, b)) for d in _measured(compute, HELPER_DEVICES)}
    client_types = {d: part_times(compute[d], (a, b)) for d in _measured(compute, CLIENT_DEVICES)}
    if scenario == 1:
        helper_times = [helper_types[rng.choice(sorted(helper_types))] for _ in range(helpers)]
        client_times = [client_types[rng.choice(sorted(client_types))] for _ in range(clients)]
    else:
        helper_times = [_heterogeneous(rng, list(helper_types.values()), HELPER_PARTS) for _ in range(helpers)]
        client_times = [_heterogeneous(rng, list(client_types.values()), CLIENT_PARTS) for _ in range(clients)]

    demand = sum(memory.activation_kb[a:b]) + sum(memory.weights_kb[a:b])
    fair = math.ceil(clients / helpers)
    capacity = [demand * rng.randint(fair, math.ceil(memory_slack * clients / helpers)) for _ in range(helpers)]
    return build(client_times, helper_times, bandwidth,
                 (memory.activation_kb[a - 1], memory.activation_kb[b - 1]), [demand] * clients, capacity,
                 kib_to_mbit)
