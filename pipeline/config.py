"""Every knob of a job, with its default, in one place."""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields

from pipeline.schedule import PIPELINES
from protocols.compression import COMPRESSIONS, WIRE_DTYPES
from protocols.errors import SplitringError


NSPLIT_SCHEMES = ("nsplit", "fast", "fast-async")          # one chain that rotates over the peers
LOCAL_LOSS_SCHEMES = ("locsplitfed", "locfedmix")        # clients update from an auxiliary head's loss
PARALLEL_SCHEMES = ("sl", "splitfed-v1", "splitfed-v2", "blind") + LOCAL_LOSS_SCHEMES   # clients and helpers
AUX_HEADS = ("linear", "mlp")
SCHEMES = NSPLIT_SCHEMES + PARALLEL_SCHEMES
ASSIGNS = ("ours", "random", "greedy", "exact")
OPTIMIZERS = ("sgd", "adam")
SPLITS = ("planned", "even", "proportional")


class ConfigError(SplitringError, ValueError):
    pass


# fields checked for type first; upper limits on values live in peer.limits (an agent's own policy)
TYPES = {"seed": int, "epochs": int, "batch_size": int, "eval_batch": int, "microbatches": int, "max_staleness": int,
         "lr": float, "momentum": float, "weight_decay": float, "recv_timeout": float, "shuffle": bool,
         "peer_timeout": float, "rejoin_timeout": float,
         "optimizer": str, "scheme": str, "pipeline": str, "split": str, "wire_dtype": str, "compress": str,
         "rounds": int, "local_steps": int, "assign": str, "resolve_drift": float, "mixup_alpha": float,
         "mix_updates": int, "aux_head": str}


def knob(default, help: str, **cli) -> field:
    """A field with its help (and `choices`, `metavar`) as metadata, from which the command line makes its
    options (peer/cli/options.py). A list or dict default is copied for each instance."""
    meta = {"help": help, **cli}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class JobConfig:
    model: dict = knob({"name": "mlp"}, "the model: mlp, cnn, or module:function (a spec of pipeline/models.py)")
    seed: int = knob(0, "initial weights: layer i from (seed, i); shuffling: from (seed, epoch)")
    epochs: int = knob(1, "an epoch is N passes, one per peer of the ring")
    batch_size: int = knob(32, "samples per optimizer step")
    eval_batch: int = knob(256, "samples per evaluation message (held-out accuracy or loss); on a ring with memory "
                                "budgets at most a training microbatch's, so that evaluating holds no more than "
                                "training", metavar="N")
    microbatches: int = knob(1, "a step's batch is cut into this many microbatches (gradients accumulate)",
                             metavar="M")
    optimizer: str = knob("sgd", "one optimizer state per layer, moving with the layer", choices=OPTIMIZERS)
    lr: float = knob(0.05, "learning rate")
    momentum: float = knob(0.0, "SGD momentum (sgd only)")
    weight_decay: float = knob(0.0, "L2 penalty added to the gradients")
    shuffle: bool = knob(True, "heads visit their shard in a seeded random order each epoch")
    scheme: str = knob("nsplit", "nsplit: one microbatch in the chain at a time; fast: Fast N-split, microbatches "
                                 "pipelined, a flush every step (exact); fast-async: pipelined across steps, "
                                 "forwards on weights up to max_staleness steps old. Clients and helpers "
                                 "(docs/parallel-sl.md): sl: clients in turn, one helper, the client part relayed; "
                                 "splitfed-v1: clients in parallel, a copy of the helper part per client, averaged "
                                 "each round; splitfed-v2: clients in parallel, one helper part updated client "
                                 "after client; blind: clients' losses weighted by samples and averaged, one "
                                 "helper backward per step; locsplitfed: clients learn from a local loss (an "
                                 "auxiliary head), the helper from their smashed data; locfedmix: locsplitfed "
                                 "with mixup of smashed data across clients at the helper", choices=SCHEMES)
    pipeline: str = knob("1f1b", "schedule of scheme fast, all with a flush every step, so the result is exact: "
                                 "1f1b keeps fewest forward buffers; gpipe runs every forward first; eager runs "
                                 "every forward first on the stages before the last, which then fill their waits "
                                 "with weight-gradient work (fastest when the stages are about equally busy; M "
                                 "buffers upstream). fast-async runs 1f1b", choices=tuple(PIPELINES))
    max_staleness: int = knob(1, "fast-async only: optimizer steps a forward's weights may lag (0 = synchronous "
                                 "1F1B)", metavar="K")
    # as data: [[stage, host], ...] or "auto"
    backward_at: list | str = knob([], "fast-async only: the middle stage at chain position STAGE runs its "
                                       "backward and optimizer on the peer at chain position HOST, which sends the "
                                       "new weights back (remote backward); auto: the coordinator does so, per "
                                       "rotation, for each middle stage that does not fit its peer's memory budget",
                                   metavar="STAGE:HOST,...|auto")
    split: str = knob("planned", "planned: the split planner chooses each peer's layers from measured speed, "
                                 "memory and links; even: equal layer counts; proportional: each peer's share of "
                                 "the compute proportional to its measured speed (both baselines, checked against "
                                 "memory budgets)", choices=SPLITS)
    # clients and helpers (PARALLEL_SCHEMES)
    cut: list = knob([], "client/helper schemes: A: clients hold layers [0,A), helpers the rest with the loss "
                         "(labels travel with the activations); A,B: U-shaped, clients also hold [B,L) with the "
                         "loss, so labels stay on them (default: 1,L-1)", metavar="A[,B]")
    rounds: int = knob(1, "client/helper schemes: a round is every client's local work, then averaging")
    local_steps: int = knob(0, "client/helper schemes: batches each client trains per round; 0: one local epoch "
                               "(its whole shard)", metavar="N")
    assign: str = knob("ours", "client/helper schemes: who serves whom and in what order (pipeline/scheduling): "
                               "ours; random; greedy (balanced, first come first served); exact (MILP, small rings)",
                       choices=ASSIGNS)
    clients: list = knob([], "client/helper schemes: these peers are the clients (default: by each agent's "
                             "--role)", metavar="PEER,...")
    helpers: list = knob([], "client/helper schemes: these peers are the helpers (default: by each agent's "
                             "--role)", metavar="PEER,...")
    resolve_drift: float = knob(0.25, "client/helper schemes: re-solve the schedule from measured times when a "
                                      "round's makespan is this fraction off its prediction", metavar="FRACTION")
    aux_head: str = knob("linear", "locsplitfed, locfedmix: the clients' auxiliary head on their smashed data: linear "
                                   "(one Linear to the classes) or mlp (Linear 128, ReLU, Linear)", choices=AUX_HEADS)
    mixup_alpha: float = knob(1.0, "locfedmix: mixing weights drawn from Beta(ALPHA, ALPHA)", metavar="ALPHA")
    mix_updates: int = knob(1, "locfedmix: extra helper updates per step, each on a batch of smashed data mixed "
                               "across its clients", metavar="N")
    recv_timeout: float = knob(120.0, "seconds a stage waits for a neighbour before the job fails",
                               metavar="SECONDS")
    peer_timeout: float = knob(10.0, "a peer of the job that answers no heartbeat for this long is lost (killed, "
                                      "stopped or cut off): the job rolls back to its last commit; stages whose "
                                      "coordinator is silent this long stop and hold their state", metavar="SECONDS")
    rejoin_timeout: float = knob(60.0, "after losing a peer, how long the coordinator waits for it to come back "
                                       "(restarted with its state dir) before the job goes on without it",
                                 metavar="SECONDS")
    wire_dtype: str = knob("float32", "how activations and gradients travel (layer state moved by swaps is "
                                      "always exact)", choices=WIRE_DTYPES)
    compress: str = knob("none", "int8: activations and gradients 8-bit blockwise absmax (overrides wire_dtype)",
                         choices=COMPRESSIONS)

    def __post_init__(self):
        for f in fields(self):   # a value of the wrong type is refused before it is compared with anything
            v, want = getattr(self, f.name), TYPES.get(f.name)
            if want is int and (type(v) is not int):
                raise ConfigError(f"{f.name} must be an integer, got {v!r}")
            if want is float and (type(v) not in (int, float) or not math.isfinite(v)):
                raise ConfigError(f"{f.name} must be a finite number, got {v!r}")
            if want is bool and type(v) is not bool:
                raise ConfigError(f"{f.name} must be true or false, got {v!r}")
            if want is str and not isinstance(v, str):
                raise ConfigError(f"{f.name} must be a name, got {v!r}")
        checks = [
            (self.seed >= 0, "seed must be >= 0"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1 and self.eval_batch >= 1, "batch_size and eval_batch must be >= 1"),
            (self.microbatches >= 1, "microbatches must be >= 1"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r} (sgd, adam)"),
            (self.lr > 0, "lr must be > 0"),
            (self.momentum >= 0 and self.weight_decay >= 0, "momentum and weight_decay must be >= 0"),
            (self.scheme in SCHEMES, f"unknown scheme {self.scheme!r} ({', '.join(SCHEMES)})"),
            (self.max_staleness >= 0, "max_staleness must be >= 0"),
            (self.recv_timeout > 0, "recv_timeout must be > 0"),
            (self.peer_timeout >= 1 and self.rejoin_timeout >= 0, "peer_timeout must be >= 1 and rejoin_timeout >= 0"),
            (self.scheme != "fast-async" or self.pipeline == "1f1b",
             "fast-async runs 1F1B across steps; pipelines gpipe and eager are for scheme fast"),
            (self.backward_at == "auto" or isinstance(self.backward_at, list) and all(
                isinstance(p, list | tuple) and len(p) == 2 and all(type(v) is int and v >= 0 for v in p)
                for p in self.backward_at) and len({p[0] for p in self.backward_at}) == len(self.backward_at),
             "backward_at must be \"auto\" or a list of [stage, host] chain positions, one per stage"),
            (not self.backward_at or self.scheme == "fast-async",
             "backward_at (a remote backward) needs scheme fast-async"),
            (self.scheme in PARALLEL_SCHEMES or not self.cut, "cut is for the client/helper schemes "
             f"({', '.join(PARALLEL_SCHEMES)}); {self.scheme} splits by the planner"),
            (isinstance(self.cut, list) and len(self.cut) <= 2 and all(type(v) is int and v > 0 for v in self.cut)
             and self.cut == sorted(set(self.cut)), "cut is A or A,B with 0 < A < B (layer indices)"),
            (self.scheme not in PARALLEL_SCHEMES or self.microbatches == 1,
             "client/helper schemes run whole batches: microbatches must be 1"),
            (self.rounds >= 1 and self.local_steps >= 0, "rounds must be >= 1 and local_steps >= 0"),
            (self.scheme not in LOCAL_LOSS_SCHEMES or len(self.cut) < 2, f"{self.scheme} has a single cut (--cut A): "
             "the client learns from its own head, the helper from the labels sent with the smashed data"),
            (self.aux_head in AUX_HEADS, f"unknown aux_head {self.aux_head!r} ({', '.join(AUX_HEADS)})"),
            (self.mixup_alpha > 0 and self.mix_updates >= 0, "mixup_alpha must be > 0 and mix_updates >= 0"),
            (self.assign in ASSIGNS, f"unknown assign method {self.assign!r} ({', '.join(ASSIGNS)})"),
            (all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in (self.clients, self.helpers))
             and not set(self.clients) & set(self.helpers), "clients and helpers are disjoint lists of peer ids"),
            (self.resolve_drift > 0, "resolve_drift must be > 0"),
            (self.split in SPLITS, f"unknown split {self.split!r} ({', '.join(SPLITS)})"),
            (self.pipeline in PIPELINES, f"unknown pipeline schedule {self.pipeline!r} ({', '.join(PIPELINES)})"),
            (isinstance(self.model, dict) and isinstance(self.model.get("name"), str), "model must be a spec map"),
            (self.wire_dtype in WIRE_DTYPES, f"unknown wire dtype {self.wire_dtype!r} ({', '.join(WIRE_DTYPES)})"),
            (self.compress in COMPRESSIONS, f"unknown compression {self.compress!r} ({', '.join(COMPRESSIONS)})"),
        ]
        for ok, text in checks:
            if not ok:
                raise ConfigError(text)

    def remote_backward(self) -> dict[int, int]:
        """{stage position: host position} of the stages whose backward runs on another peer, as given (none
        for "auto": the coordinator places them per rotation)."""
        return {} if self.backward_at == "auto" else {int(j): int(h) for j, h in self.backward_at}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "JobConfig":
        if not isinstance(d, dict):
            raise ConfigError("job config must be a map")
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ConfigError(f"unknown job config field(s): {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(str(e)) from None
