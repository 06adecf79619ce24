"""The planner's data model and cost model: what a layer costs, what a device offers, what a plan is.

Cost model, per microbatch, for a chain of stages cut into contiguous layer ranges:
- a stage computes forward + backward of its layers on its own device;
- every used stage except the last (the tail, which computes the loss) sends its output activation
  forward and receives the gradient of the same size back over its outgoing link: 2 * (latency +
  bytes / bandwidth). A position that owns no layers is skipped, and so is its link: the stage
  before it sends over its own link straight to the next used stage.

Schemes (`step_s` of a plan):
- "nsplit": microbatches go through the chain one after another: step = M * one microbatch's time.
- "fast" (Fast N-split, a flow shop of identical jobs): step = one microbatch's time + (M - 1) *
  bottleneck, the bottleneck being the busiest stage (forward + backward) or link direction
  (bytes / bandwidth; links are full duplex, latency delays a tensor but does not occupy the link).
  With M = 1 both schemes agree.
- "fast-async": timed as "fast" (it also saves the flush between steps, which the model ignores).

Memory model, per stage [a, b): parameters + gradients (same bytes) + optimizer state of its layers,
plus the activations it keeps for backward, per microbatch in flight: its input (layer a-1's output;
the head's raw input is its data, not counted) and every layer's output. Microbatches in flight:
1 for "nsplit", M for the pipelined schemes (all forwards before the first backward, the worst case).
"fast-async" also keeps copies of a stage's parameters for its stale forwards: with a lag of at most
L = min(max_staleness, ceil((stages-1-j) / M)) steps at chain position j (assuming batches of at least
M samples), L + 1 copies, and none where L = 0.
A stage whose backward runs on another peer (fast-async's remote backward) moves its backward time and
most of its memory to that peer: `remote_backward_costs`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from protocols.errors import SplitringError

SCHEMES = ("nsplit", "fast", "fast-async")
DEFAULT_BANDWIDTH = 100e6 / 8   # bytes/s: a 100 Mbit/s LAN or a good Wi-Fi link
DEFAULT_LATENCY = 1e-3          # seconds, one way


class PlanInfeasible(SplitringError, ValueError):
    """The memory budgets cannot hold the model. `layers`: the layers [a, b) left over when every peer,
    in chain order, takes all it can hold; `peers`: the peers concerned, in chain order; `short_bytes`:
    the extra budget the last of them (the tail, or the head if layer 0 alone does not fit it) needs."""

    def __init__(self, message: str, short_bytes: int, layers: tuple[int, int], peers: tuple[str, ...]):
        super().__init__(message)
        self.short_bytes, self.layers, self.peers = short_bytes, layers, peers


@dataclass(frozen=True)
class LayerCost:
    """One layer, per microbatch. Times are on the reference device (see `Device.speed`)."""
    forward_s: float
    backward_s: float
    param_bytes: int
    optim_bytes: int        # optimizer state (SGD with momentum: = param_bytes; Adam: 2x)
    activation_bytes: int   # this layer's output: what crosses the wire if the chain is cut after it


@dataclass(frozen=True)
class Device:
    """One peer as the planner sees it. Its layer times are its own measurements (`forward_s` and
    `backward_s`, one entry per layer) if given, else the reference times divided by `speed`."""
    name: str
    memory_budget: int | None = None          # bytes for its stage; None: no limit
    speed: float = 1.0                        # 2.0: twice as fast as the reference device
    forward_s: tuple[float, ...] | None = None
    backward_s: tuple[float, ...] | None = None
    bandwidth: float = DEFAULT_BANDWIDTH      # bytes/s on the link to its successor in the ring
    latency: float = DEFAULT_LATENCY          # seconds, one way, on that link

    def forward_times(self, layers: list[LayerCost]) -> list[float]:
        """Forward seconds of each layer, for one microbatch on this device."""
        if self.forward_s is None or self.backward_s is None:
            return [l.forward_s / self.speed for l in layers]
        return list(self.forward_s)

    def layer_times(self, layers: list[LayerCost]) -> list[float]:
        """Forward + backward seconds of each layer, for one microbatch on this device."""
        if self.forward_s is None or self.backward_s is None:
            return [(l.forward_s + l.backward_s) / self.speed for l in layers]
        if not len(self.forward_s) == len(self.backward_s) == len(layers):
            raise ValueError(f"device {self.name}: {len(self.forward_s)} forward and {len(self.backward_s)} "
                             f"backward times for {len(layers)} layers")
        return [f + b for f, b in zip(self.forward_s, self.backward_s)]


@dataclass(frozen=True)
class StagePlan:
    """What one chain position does in a step (all M microbatches)."""
    peer: str
    layers: tuple[int, int]     # [a, b); a == b: the position is skipped
    compute_s: float            # forward + backward of its layers
    send_s: float               # its outgoing transfers, both directions (0 for the tail and skipped)
    memory_bytes: int
    memory_budget: int | None

    @property
    def fits(self) -> bool:
        return self.memory_budget is None or self.memory_bytes <= self.memory_budget


@dataclass(frozen=True)
class Plan:
    scheme: str
    microbatches: int
    stages: tuple[StagePlan, ...]   # one per chain position, head first
    step_s: float                   # predicted time of one step (see the module docstring)
    bottleneck_s: float             # busiest stage or link direction, per microbatch
    bytes_moved: int = 0            # parameters + optimizer state moved from the previous assignment

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [s.layers for s in self.stages]

    @property
    def assignment(self) -> dict[str, tuple[int, int]]:
        """Peer -> its layer range, in chain order (the form pipeline.swaps uses)."""
        return {s.peer: s.layers for s in self.stages}

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def to_dict(self) -> dict:
        d = asdict(self)
        for s in d["stages"]:
            s["layers"] = list(s["layers"])
        return d


def check(devices: list[Device], layers: list[LayerCost], scheme: str, microbatches: int) -> None:
    """Raise ValueError for inputs the cost model does not cover."""
    names = [d.name for d in devices]
    times = [t for l in layers for t in (l.forward_s, l.backward_s)]
    times += [t for d in devices for t in (*(d.forward_s or ()), *(d.backward_s or ()))]
    problems = [
        (not devices, "no devices"),
        (not layers, "no layers"),
        (len(set(names)) != len(names), f"device names are not unique: {names}"),
        (scheme not in SCHEMES, f"unknown scheme {scheme!r} ({', '.join(SCHEMES)})"),
        (microbatches < 1, "microbatches must be >= 1"),
        (not all(0 <= t < math.inf for t in times), "layer times must be finite and >= 0"),
        (any(min(l.param_bytes, l.optim_bytes, l.activation_bytes) < 0 for l in layers), "byte sizes must be >= 0"),
        (any(d.speed <= 0 or d.bandwidth <= 0 or d.latency < 0 for d in devices),
         "speed and bandwidth must be > 0, latency >= 0"),
        (any(d.memory_budget is not None and d.memory_budget < 0 for d in devices), "memory budgets must be >= 0"),
    ]
    for bad, text in problems:
        if bad:
            raise ValueError(text)


def format_bytes(n: int | None) -> str:
    """1536 -> '1.5 KiB'; None (no budget) -> 'no limit'."""
    if n is None:
        return "no limit"
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.4g} {unit}"


def microbatches_in_flight(scheme: str, microbatches: int) -> int:
    """How many microbatches' activations a stage may hold at once (see the module docstring)."""
    return 1 if scheme == "nsplit" else microbatches


def weight_copies(scheme: str, max_staleness: int, position: int, stages: int, microbatches: int) -> int:
    """Extra copies of its parameters the stage at a chain position keeps (see the module docstring)."""
    lag = min(max_staleness, -(-(stages - 1 - position) // microbatches)) if scheme == "fast-async" else 0
    return lag + 1 if lag else 0


def stage_memory(layers: list[LayerCost], a: int, b: int, in_flight: int, copies: int = 0) -> int:
    """Bytes a stage owning layers [a, b) needs (see the module docstring)."""
    if a == b:
        return 0
    kept = sum(l.activation_bytes for l in layers[a:b]) + (layers[a - 1].activation_bytes if a > 0 else 0)
    return sum((2 + copies) * l.param_bytes + l.optim_bytes for l in layers[a:b]) + in_flight * kept


def evaluate(devices: list[Device], layers: list[LayerCost], ranges: list[tuple[int, int]],
             scheme: str = "nsplit", microbatches: int = 1, max_staleness: int = 0,
             remote: dict[int, int] | None = None) -> Plan:
    """The plan for given ranges (one per device, in chain order), with its predicted times and memory.
    Used for the planner's result and for baselines; it does not check budgets (see `Plan.fits`).
    `remote` ({stage: host} chain positions, fast-async): those stages' backward runs on the host
    (`remote_backward_costs`)."""
    check(devices, layers, scheme, microbatches)
    if (len(ranges) != len(devices) or ranges[0][0] != 0 or ranges[-1][1] != len(layers)
            or ranges[0][1] < 1 or any(a > b for a, b in ranges)
            or any(p[1] != q[0] for p, q in zip(ranges, ranges[1:]))):
        raise ValueError(f"not a chain split of {len(layers)} layers over {len(devices)} devices "
                         f"with a non-empty head: {ranges}")
    m, k = microbatches, microbatches_in_flight(scheme, microbatches)
    compute = [sum(d.layer_times(layers)[a:b], 0.0) for d, (a, b) in zip(devices, ranges)]
    memory = [stage_memory(layers, a, b, k, weight_copies(scheme, max_staleness, j, len(devices), m))
              for j, (a, b) in enumerate(ranges)]
    costs = {j: remote_backward_costs(devices[j], devices[h], layers, ranges[j], max_staleness, m)
             for j, h in (remote or {}).items()}
    for j, (own_s, own_bytes, _, _) in costs.items():   # owners first: a stage may be remote and a host
        compute[j], memory[j] = own_s, own_bytes
    for j, (_, _, extra_s, extra_bytes) in costs.items():
        compute[remote[j]] += extra_s
        memory[remote[j]] += extra_bytes
    one_pass, busiest, stages = 0.0, 0.0, []
    for j, (d, (a, b)) in enumerate(zip(devices, ranges)):
        sends = a < b < len(layers)   # a used stage that is not the tail
        wire = layers[b - 1].activation_bytes / d.bandwidth if sends else 0.0
        send = 2 * (d.latency + wire) if sends else 0.0
        one_pass += compute[j] + send
        busiest = max(busiest, compute[j], wire)
        stages.append(StagePlan(d.name, (a, b), m * compute[j], m * send, memory[j], d.memory_budget))
    step = m * one_pass if scheme == "nsplit" else one_pass + (m - 1) * busiest
    return Plan(scheme, m, tuple(stages), step, busiest)


def remote_backward_costs(owner: Device, host: Device, layers: list[LayerCost], span: tuple[int, int],
                          max_staleness: int, microbatches: int) -> tuple[float, int, float, int]:
    """A stage [a, b) whose backward runs on `host` (fast-async): (owner's seconds and bytes, host's extra
    seconds and bytes). Per microbatch the owner only forwards; the host recomputes the forward and
    backpropagates. The owner holds the weights, up to K+1 versions of them sent back and not yet used,
    and between passes the optimizer state. The host holds the weights and optimizer state, gradients,
    K+1 weight versions, the inputs of up to (K+1)M microbatches in flight and, as any pipelined stage,
    M microbatches' activations (what the deferred weight gradients keep until the step)."""
    a, b = span
    if a == b:
        return 0.0, 0, 0.0, 0
    forward = sum(owner.forward_times(layers)[a:b])
    host_s = sum(host.forward_times(layers)[a:b]) + sum(host.layer_times(layers)[a:b])
    params = sum(l.param_bytes for l in layers[a:b])
    state = params + sum(l.optim_bytes for l in layers[a:b])
    owner = params + max(sum(l.optim_bytes for l in layers[a:b]), (max_staleness + 1) * params)
    inputs = (max_staleness + 1) * microbatches * (layers[a - 1].activation_bytes if a > 0 else 0)
    kept = microbatches * sum(l.activation_bytes for l in layers[a - 1 if a > 0 else a:b])
    return forward, owner, host_s, state + (max_staleness + 2) * params + inputs + kept


def place_backward(devices: list[Device], layers: list[LayerCost], ranges: list[tuple[int, int]], scheme: str,
                   microbatches: int, max_staleness: int) -> dict[int, int]:
    """Remote backward placement (fast-async): for each middle stage, in chain order, that does not fit its
    device's budget, the chain position whose peer takes its backward: the one with the most memory to
    spare (no budget counts as unlimited; ties: the nearest) among those where both then fit. A stage no
    peer can relieve stays (the plan will not fit)."""
    remote: dict[int, int] = {}
    if scheme != "fast-async":
        return remote

    def spare(stage: StagePlan) -> float:
        return math.inf if stage.memory_budget is None else stage.memory_budget - stage.memory_bytes

    for j in range(1, len(devices) - 1):
        current = evaluate(devices, layers, ranges, scheme, microbatches, max_staleness, remote)
        if current.stages[j].fits or ranges[j][0] == ranges[j][1]:
            continue
        hosts = sorted((h for h in range(len(devices)) if h != j and h not in remote),
                       key=lambda h: (-spare(current.stages[h]), abs(h - j), h))
        for h in hosts:
            trial = evaluate(devices, layers, ranges, scheme, microbatches, max_staleness, {**remote, j: h})
            if trial.stages[j].fits and trial.stages[h].fits:
                remote[j] = h
                break
    return remote
