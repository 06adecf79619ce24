"""Message admission: whether a stage message (fwd, bwd, and the remote backward's input, weights, lend,
return) is one this peer expects in the current rotation (from that sender, for that step and
microbatch, with those dtypes and shapes) and the key it waits under for its receiver.

Pure: plain facts in, a key and the payload out, or a ProtocolError; the job runtime delivers it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from pipeline.data import microbatch_sizes, num_steps
from pipeline.schedule import Roles
from protocols import ProtocolError


class MessageKey(NamedTuple):
    """Where a stage message waits for its receiver. Each key is delivered at most once."""
    rotation: int
    mode: str    # "train" or "eval"
    step: int
    box: str     # the message type and the stage (chain position) it is for: box_of(kind, stage)
    mb: int      # microbatch; 0 for the per-step messages (weights, lend, return)


def box_of(kind: str, stage: int) -> str:
    return f"{kind}@{stage}"


class Mode(NamedTuple):
    """One kind of pass: who runs what, and how the head cuts its samples into steps and microbatches."""
    roles: Roles
    samples: int         # the head's: its shard (train) or its test set (eval)
    batch_size: int
    microbatches: int

    @property
    def steps(self) -> int:
        return num_steps(self.samples, self.batch_size)

    def microbatch_size(self, step: int, mb: int) -> int:
        """The samples in microbatch mb of step `step` (unexpected if the pass has no such one)."""
        if not 0 <= step < self.steps:
            raise ProtocolError("unexpected", f"step {step} out of range ({self.steps} steps in this pass)")
        mbs = microbatch_sizes(min(self.batch_size, self.samples - step * self.batch_size), self.microbatches)
        if not 0 <= mb < len(mbs):
            raise ProtocolError("unexpected", f"microbatch {mb} out of range ({len(mbs)})")
        return mbs[mb]


# (layer, with optimizer state) -> {name: (shape, dtype)} of its parameters, or with state of its state dict
LayerShapes = Callable[[int, bool], dict[str, tuple[tuple, torch.dtype]]]


@dataclass(frozen=True)
class Admission:
    """What a peer expects in one rotation."""
    me: str
    rotation: int
    attempt: int                         # the job's resumptions so far: an earlier attempt's messages are stale
    chain: list[str]
    ranges: dict[str, tuple[int, int]]   # peer -> its layers [a, b)
    modes: dict[str, Mode]               # "train", "eval"
    shapes: list[tuple]                  # shapes[i]: one sample's input of layer i (the last: the model's output)
    layer_shapes: LayerShapes

    @property
    def position(self) -> int:
        return self.chain.index(self.me) if self.me in self.chain else -1

    def admit(self, sender: str, msg: dict) -> tuple[MessageKey, dict]:
        """The key and payload of a stage message (validated by protocols.validate) that `sender` sent
        this peer, or a ProtocolError saying why it is not expected."""
        rot, kind, stage, pos = msg["rotation"], msg["type"], msg.get("stage", self.position), self.position
        if rot != self.rotation or pos < 0:
            raise ProtocolError("stale", f"message for rotation {rot}; this stage is at {self.rotation}")
        if msg.get("attempt", 0) != self.attempt:
            raise ProtocolError("stale", f"message of attempt {msg.get('attempt', 0)} of the job; this stage runs "
                                         f"attempt {self.attempt} (the job was resumed)")
        mode = msg.get("mode", "train")
        if mode not in self.modes:
            raise ProtocolError("malformed", f"unknown mode {mode!r}")
        m = self.modes[mode]
        routed = 0 <= stage < len(self.chain) and (mode == "train" or kind == "fwd")   # evaluation: forward only
        receiver = m.roles.receiver(stage, kind) if routed else None
        source = None if receiver is None else m.roles.sender(receiver, kind)
        if source is None or m.roles.host(receiver) != pos or sender != self.chain[m.roles.host(source)]:
            raise ProtocolError("unexpected", f"{kind} for stage {stage} from {sender} is not expected by "
                                              f"{self.me} (stage {pos})")
        a, b = self.ranges[self.chain[stage]]
        if kind in ("fwd", "bwd", "input"):
            size = m.microbatch_size(msg["step"], msg["mb"])
            if kind == "bwd":
                payload = {"grad": check(msg["grad"], (size, *self.shapes[b]), torch.float32, "gradient")}
            else:
                payload = {"x": check(msg["x"], (size, *self.shapes[a]), torch.float32, "activation")}
                if kind == "fwd":
                    payload["y"] = check(msg["y"], (size, *self.shapes[-1][:-1]), torch.int64, "labels")
            mb = msg["mb"]
        else:
            # lend before the first step, weights after one, return after the last
            want = {"lend": [0], "return": [m.steps]}.get(kind, range(m.steps))
            if msg["step"] not in want:
                raise ProtocolError("unexpected", f"{kind} for step {msg['step']} (this pass has {m.steps} steps)")
            field = "weights" if kind == "weights" else "layers"
            payload = {field: self.check_layers(msg[field], a, b, with_optimizer=field == "layers")}
            mb = 0
        return MessageKey(rot, mode, msg["step"], box_of(kind, stage), mb), payload

    def check_layers(self, layers: dict, a: int, b: int, with_optimizer: bool) -> dict:
        """Layers [a, b) as a remote backward sends them: weights (name -> tensor) or exported state
        ({"params", "optim"}), every tensor of the expected shape."""
        if not isinstance(layers, dict) or sorted(map(str, layers)) != sorted(map(str, range(a, b))) or \
                not all(type(i) is int for i in layers):
            raise ProtocolError("bad_shape", f"expected the state of layers [{a},{b})")
        for i, entry in layers.items():
            want = self.layer_shapes(i, with_optimizer)
            named = entry.get("params") if with_optimizer and isinstance(entry, dict) else entry
            if not isinstance(named, dict) or set(named) != set(want) or \
                    (with_optimizer and not isinstance(entry.get("optim"), dict)):
                raise ProtocolError("bad_shape", f"layer {i}: expected tensors {sorted(want)}")
            for name, (shape, dtype) in want.items():
                check(named[name], shape, dtype, f"layer {i} {name}")
        return layers


def check(t: torch.Tensor, shape: tuple, dtype: torch.dtype, what: str) -> torch.Tensor:
    """t itself if it is a tensor of that dtype and shape."""
    if not isinstance(t, torch.Tensor):
        raise ProtocolError("bad_shape", f"{what}: expected {dtype} {list(shape)}, got {type(t).__name__}")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ProtocolError("bad_shape", f"{what}: expected {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    return t
