"""The job plan as data: from a job's config and the facts the coordinator gathered (the ring in order,
each peer's measured device, the layers' costs, the samples each peer holds), every pass of the job:
its chain, the split, remote backwards, the swap before it, its steps, whether an evaluation follows.
Pure: the coordinator carries a plan out, the workers and tests read the same rules from here.

Passes are planned one after another (each split depends on the one before, to move few bytes), lazily:
a job of many epochs keeps nothing per pass.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

from pipeline import schedule as S
from pipeline.config import JobConfig
from pipeline.data import num_steps
from pipeline.planner import Device, LayerCost, Plan, PlanInfeasible, over_budget, plan_chain
from pipeline.swaps import moves_from, owners
from protocols.errors import SplitringError


class PlanError(SplitringError, ValueError):
    """The job cannot run on this ring as asked; the message says why."""


@dataclass(frozen=True)
class Facts:
    """What the coordinator learned of the ring before planning."""
    ring: tuple[str, ...]              # peer ids, in ring order
    devices: dict[str, Device]         # each peer's measured layer times, memory budget and link
    layers: list[LayerCost]            # per layer: times (reference), parameter, optimizer and activation bytes
    samples: dict[str, int]            # training samples per peer
    test_samples: dict[str, int] = field(default_factory=dict)   # held-out samples per peer


def facts_to_dict(f: Facts) -> dict:
    """Facts as plain JSON values (floats round-trip exactly), for the job's journal."""
    return {"ring": list(f.ring), "devices": {p: asdict(d) for p, d in f.devices.items()},
            "layers": [asdict(c) for c in f.layers], "samples": dict(f.samples), "test_samples": dict(f.test_samples)}


def facts_from_dict(d: dict) -> Facts:
    """The Facts a journal recorded: the same plan follows from them as from the facts first gathered."""
    def device(v: dict) -> Device:
        return Device(**{k: (tuple(x) if isinstance(x, list) else x) for k, x in v.items()})
    return Facts(tuple(d["ring"]), {p: device(v) for p, v in d["devices"].items()},
                 [LayerCost(**c) for c in d["layers"]], dict(d["samples"]), dict(d["test_samples"]))


def successor(ring, peer: str, lost=()) -> str:
    """The next peer after `peer` in ring order that is not lost: where `peer` replicates its checkpoints."""
    ring = list(ring)
    k = ring.index(peer)
    return next(ring[(k + j) % len(ring)] for j in range(1, len(ring) + 1) if ring[(k + j) % len(ring)] not in lost)


def holders(ranges: dict[str, list], ring, lost=()) -> dict[int, str]:
    """Who holds each layer once a job has rolled back to a commit with these `ranges`: its owner then, or,
    for a lost owner, its successor, which keeps the replica of its checkpoint."""
    held = {}
    for peer, (a, b) in ranges.items():
        held.update(dict.fromkeys(range(a, b), successor(ring, peer, lost) if peer in lost else peer))
    return held


@dataclass(frozen=True)
class PassPlan:
    """One training pass: rotation `rotation` of epoch `epoch` (pass `index` of the job)."""
    index: int
    epoch: int
    rotation: int
    chain: tuple[str, ...]               # every peer, head first
    ranges: dict[str, tuple[int, int]]   # peer -> layers [a, b)
    backward_at: dict[int, int]          # stage -> host (chain positions) of remote backwards
    moves: tuple[tuple[int, str, str], ...]   # the swap before the pass: (layer, from, to)
    bytes_moved: int
    split: Plan                          # the planner's view of the chain: stages, memory, predicted times
    steps: int                           # optimizer steps of the pass
    ends_epoch: bool                     # the epoch's last pass: its held-out accuracy is reported after it
    evaluate: bool                       # ends_epoch, and its head holds held-out data to evaluate on

    @property
    def head(self) -> str:
        return self.chain[0]

    @property
    def active(self) -> list[str]:
        """The chain's peers that hold layers, in chain order (the stages of the pass)."""
        return [p for p in self.chain if self.ranges[p][1] > self.ranges[p][0]]

    def to_dict(self) -> dict:
        """As the job's `plan` event and summary give it."""
        return {"rotation": self.rotation, "ranges": {p: list(r) for p, r in self.ranges.items()},
                "predicted_step_s": self.split.step_s, "bytes_moved": self.bytes_moved,
                "backward_at": [[j, h] for j, h in self.backward_at.items()]}


def reporting_programs(cfg: JobConfig, roles: S.Roles) -> int:
    """How many of a pass's programs report each training step to the coordinator: the tail (its loss)
    and, under fast-async, every program (its staleness), remote backward roles included."""
    return roles.programs if cfg.scheme == "fast-async" else 1


def reports_step(cfg: JobConfig, mode: str, stage: int, n_stages: int) -> bool:
    """Whether the program working on `stage` reports its steps (see reporting_programs)."""
    return stage == n_stages - 1 or (mode == "train" and cfg.scheme == "fast-async")


def split(cfg: JobConfig, chain: list[str], devices: dict[str, Device], layers: list[LayerCost],
          previous: dict[str, tuple[int, int]] | None) -> tuple[Plan, dict[int, int]]:
    """One chain's split and remote backwards: the planner's (fewest bytes moved among the fastest) or an
    even one, checked against the budgets. A link between two peers is taken as the slower of their links
    to the coordinator (a star LAN)."""
    rooms = {p: max(kept_room(layers, len(chain), devices[p].pending_messages)) for p in chain}
    chained = [replace(devices[p], bandwidth=min(devices[p].bandwidth, devices[q].bandwidth),
                       memory_budget=None if devices[p].memory_budget is None else
                       max(0, devices[p].memory_budget - rooms[p]))
               for p, q in zip(chain, chain[1:] + chain[:1])]
    try:
        p, remote = plan_chain(chained, layers, cfg.scheme, cfg.microbatches, cfg.max_staleness, cfg.split,
                               "auto" if cfg.backward_at == "auto" else cfg.remote_backward(), previous)
    except PlanInfeasible as e:
        raise PlanError(f"the ring cannot hold the model: {e}{why_room(rooms)}") from None
    if not p.fits:
        raise PlanError(f"the {cfg.split} split does not fit the memory budgets"
                        f"{' with --backward-at' if cfg.backward_at else ''}: {over_budget(p)}{why_room(rooms)}")
    return p, remote


def kept_room(layers: list[LayerCost], chain: int, pending_messages: int) -> tuple[int, int]:
    """(swap, messages): what a peer's budget must hold outside a chain's plan, the larger of which it keeps
    (a swap happens between passes, when no messages come): room for a layer received in a swap beside those
    it holds until the commit (see swaps.swap_peaks), and in a pass for the messages its neighbours sent:
    per kind (fwd from the one before, bwd from the one after) `pending_messages` waiting unread and one
    more read and waiting for room (peer.dataplane.Mailbox), each the size of the largest activation (the
    cut is not chosen yet; evaluation messages are no larger, see JobConfig.eval_batch). Nothing on a chain
    of one."""
    if chain < 2:
        return 0, 0
    return (max(l.param_bytes + l.optim_bytes for l in layers),
            2 * (pending_messages + 1) * max(l.activation_bytes for l in layers))


def why_room(rooms: dict[str, int]) -> str:
    if not any(rooms.values()):
        return ""
    return (" (each budget less its room for a layer received in a swap beside those held until the commit, or "
            "for the messages it lets wait unread (--pending-messages): "
            + ", ".join(f"{p} {n} bytes" for p, n in rooms.items()) + ")")


class JobPlan:
    """Every pass of a job, planned from (config, facts). Raises PlanError for a job that cannot run.
    With `lost` peers (gone for good while the job ran) the chains leave them out and their own passes are
    skipped; rotations keep their numbers (rotation r: epoch r // N, head the r % N-th peer of the ring)."""

    def __init__(self, cfg: JobConfig, facts: Facts, lost=()):
        self.cfg, self.facts, self.lost = cfg, facts, frozenset(lost)
        n = len(facts.ring) - len(self.lost)
        try:
            S.Roles(n, cfg.remote_backward())
        except ValueError as e:
            raise PlanError(f"a chain of {n} stages: {e}") from None
        # the rotations of an epoch that train: those whose head holds data (and is not lost)
        self.heads = [r for r in range(len(facts.ring))
                      if self.head(r) not in self.lost and facts.samples[self.head(r)] > 0]
        self.passes = cfg.epochs * len(self.heads)
        self.total_steps = cfg.epochs * sum(self.steps(self.head(r)) for r in self.heads)

    def head(self, rotation: int) -> str:
        return self.facts.ring[rotation % len(self.facts.ring)]

    def chain(self, rotation: int) -> list[str]:
        return [p for p in S.chain_order(list(self.facts.ring), rotation) if p not in self.lost]

    def steps(self, head: str) -> int:
        return num_steps(self.facts.samples[head], self.cfg.batch_size)

    def schedule(self) -> list[tuple[int, int, bool]]:
        """(epoch, rotation, ends the epoch) of every pass: epochs of one pass per head with data."""
        if not self.heads:
            raise PlanError("no peer of the ring has training data")
        n = len(self.facts.ring)
        return [(e, e * n + r, k == len(self.heads) - 1)
                for e in range(self.cfg.epochs) for k, r in enumerate(self.heads)]

    def __iter__(self) -> Iterator[PassPlan]:
        """The job's passes in order."""
        return self._plan(self.schedule())

    def resume(self, rotation: int, held: dict[int, str]) -> Iterator[PassPlan]:
        """The passes from rotation `rotation` on, for a job resumed from its last commit: `held` (layer ->
        peer) is who holds each layer after restoring it, which the first pass's swap starts from."""
        return self._plan([t for t in self.schedule() if t[1] >= rotation], held)

    def check(self) -> None:
        """Plan every pass of the first epoch (later epochs repeat its chains), so that a pass that cannot run
        (PlanError) fails before the job starts rather than when the job reaches it."""
        for _ in self._plan(self.schedule()[:len(self.heads)]):
            pass

    def one_epoch(self) -> Iterator[PassPlan]:
        """Every rotation of the first epoch, heads without data included: what `splitring plan` shows."""
        n = len(self.facts.ring)
        return self._plan([(0, r, r == n - 1) for r in range(n)])

    def _plan(self, passes, held: dict[int, str] | None = None) -> Iterator[PassPlan]:
        f, previous = self.facts, None
        for k, (epoch, r, ends_epoch) in enumerate(passes):
            chain = self.chain(r)
            p, remote = split(self.cfg, chain, f.devices, f.layers, previous)
            ranges = p.assignment
            empty = sum(b <= a for a, b in ranges.values())
            if remote and empty:
                raise PlanError(f"--backward-at names chain positions, but the plan leaves {empty} peer(s) without "
                                "layers; use --split even")
            before = held if k == 0 and held else owners(previous) if previous else None
            moves = tuple(moves_from(before, ranges)) if before else ()
            yield PassPlan(k, epoch, r, tuple(chain), ranges, remote, moves,
                           sum(f.layers[i].param_bytes + f.layers[i].optim_bytes for i, _, _ in moves), p,
                           self.steps(chain[0]), ends_epoch, ends_epoch and f.test_samples.get(chain[0], 0) > 0)
            previous = ranges
