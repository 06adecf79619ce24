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

Memory model, per stage [a, b): what `pipeline.stage.Stage.memory_bytes` counts, at the worst point
between two actions of the stage's program (an upper bound, reached by stages of Linear and ReLU layers):
- parameters + gradients (same bytes) + optimizer state of its layers (the state from the first step on);
- per forward buffer (a microbatch between its forward and its backward): its input (layer a-1's output;
  the head's raw input is its data, not counted) and every layer's output: B = in + sum(out);
- per microbatch whose backward is done and whose step is not (the pipelined schemes defer weight
  gradients to the step, pipeline.wgrad): each Linear's (input, output gradient) pair, taken as its
  layer's input and output: P = in + sum(out[a..b-2]) + sum(out[a..b-1]) = B + sum(out) - out[b-1]
  (exact for a layer of one Linear and elementwise ops, as the built-in mlp's; more than a layer without
  a Linear keeps; less than a layer of several Linears keeps);
- per weight copy (fast-async's stale forwards run on a copy of the weights, kept while a microbatch that
  ran on it is in flight, pipeline.stage): the parameters.
How many buffers, pairs and copies a schedule holds at once: `held_microbatches`, the worst case over
the points of its programs (`schedule.held`). "nsplit": 1 buffer, no pairs (no deferred gradients).
"fast" (1F1B, GPipe and eager alike): M pairs, after the step's last backward and before its optimizer
step (P >= B, so no other point holds more). "fast-async" (1F1B across steps): M pairs and the buffers of
the next step's forwards that run before the step (at most stages-1-j at chain position j), and up to
min(max_staleness, ceil((stages-1-j)/M)) + 1 copies.
Not counted, by the model nor by Stage.memory_bytes: messages on their way (the data plane's mailbox, for
which pipeline.jobplan.kept_room keeps room in every budget and peer.worker counts; a received gradient
before its backward, an input gradient before its send; but see remote_backward_costs),
what lives only inside one action (a flush's concatenations, a recomputed forward), what autograd's graph
keeps inside a layer besides its input and output (Linear/ReLU stages run pipeline.direct, whose tape is
counted), and weight padding (wgrad.pad_rows).
A stage whose backward runs on another peer (fast-async's remote backward) moves its backward time and
most of its memory to that peer: `remote_backward_costs`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from pipeline import schedule as S
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
    saved_bytes: int = 0    # what autograd saves for backward inside the layer (beyond its input and output)


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
    pending_messages: int = 0                 # data-plane messages of a kind it lets wait unread (room for them
    #                                           is kept in its budget: pipeline.jobplan.kept_room)

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
        (any(min(l.param_bytes, l.optim_bytes, l.activation_bytes, l.saved_bytes) < 0 for l in layers),
         "byte sizes must be >= 0"),
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


@functools.lru_cache(maxsize=4096)
def held_microbatches(scheme: str, microbatches: int, position: int = 0, stages: int = 1,
                      max_staleness: int = 0) -> tuple[int, int, int]:
    """(forward buffers, microbatches of deferred weight-gradient pairs, weight copies) such that
    buffers * B + pairs * P + copies * parameters bounds what the stage at a chain position holds after
    any action of its program, whatever B <= P (see the module docstring): the worst case of
    `schedule.held` over its programs ("fast": each pipeline; "fast-async": a pass of steps of M
    microbatches long enough to repeat itself, which no shorter last step exceeds)."""
    if scheme == "nsplit":
        programs = [(S.nsplit(position, stages, microbatches), False)]
    elif scheme == "fast":
        programs = [(schedule(position, stages, microbatches), True) for schedule in S.PIPELINES.values()]
    else:
        steps = 2 * (max_staleness + 1) + -(-(stages - 1 - position) // microbatches) + 2
        programs = [(S.asynchronous(position, stages, [microbatches] * steps, max_staleness), True)]
    points = [p for program, deferred in programs for p in S.held(program, deferred)]
    pairs = max(p[1] for p in points)
    # a point (nb, np) holds nb * B + np * P <= (nb + np - pairs) * B + pairs * P when np <= pairs and B <= P
    return max(0, max(p[0] + p[1] for p in points) - pairs), pairs, max(p[2] for p in points)


def microbatch_bytes(layers: list[LayerCost], a: int, b: int) -> tuple[int, int]:
    """(B, P) of a stage owning layers [a, b) (a < b): one forward buffer, and one microbatch's deferred
    weight-gradient pairs (see the module docstring). Both count what autograd saves inside the layers: the
    buffer holds it until the backward; P, which held_microbatches needs to be at least B, overestimates by it."""
    outputs = sum(l.activation_bytes for l in layers[a:b])
    buffer = outputs + (layers[a - 1].activation_bytes if a > 0 else 0) + sum(l.saved_bytes for l in layers[a:b])
    return buffer, buffer + outputs - layers[b - 1].activation_bytes


def stage_memory(layers: list[LayerCost], a: int, b: int, buffers: int, copies: int = 0, pending: int = 0) -> int:
    """Bytes a stage owning layers [a, b) needs with this many forward buffers and microbatches of deferred
    weight-gradient pairs held at once, and `copies` extra copies of its parameters (see the module docstring)."""
    if a == b:
        return 0
    buffer, pairs = microbatch_bytes(layers, a, b)
    return sum((2 + copies) * l.param_bytes + l.optim_bytes for l in layers[a:b]) + buffers * buffer + pending * pairs


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
    m, n = microbatches, len(devices)
    compute = [sum(d.layer_times(layers)[a:b], 0.0) for d, (a, b) in zip(devices, ranges)]
    held = [held_microbatches(scheme, m, j, n, max_staleness) for j in range(n)]
    memory = [stage_memory(layers, a, b, buffers, copies, pairs)
              for (buffers, pairs, copies), (a, b) in zip(held, ranges)]
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
    M microbatches' deferred weight-gradient pairs (kept until the step; its recomputed forward's buffer
    lives only inside the backward action)."""
    a, b = span
    if a == b:
        return 0.0, 0, 0.0, 0
    forward = sum(owner.forward_times(layers)[a:b])
    host_s = sum(host.forward_times(layers)[a:b]) + sum(host.layer_times(layers)[a:b])
    params = sum(l.param_bytes for l in layers[a:b])
    state = params + sum(l.optim_bytes for l in layers[a:b])
    owner = params + max(sum(l.optim_bytes for l in layers[a:b]), (max_staleness + 1) * params)
    inputs = (max_staleness + 1) * microbatches * (layers[a - 1].activation_bytes if a > 0 else 0)
    kept = microbatches * microbatch_bytes(layers, a, b)[1]
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
