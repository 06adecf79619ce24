"""Message schema: every message is a map with `v` (protocol version) and `type`.

`validate` checks the version, the type and each field's type before anything else reads the message.
Tensor fields are checked for being tensors here; their dtype and shape against what a stage expects are
checked by the receiver, which knows what it expects.
"""
from __future__ import annotations

from typing import Any

import torch

from protocols.errors import ProtocolError

PROTOCOL_VERSION = 1

Int, Float, Str, Tensor, Dict, List, Bool, Bytes = int, (int, float), str, torch.Tensor, dict, list, bool, bytes

# type -> required fields and their types. Optional fields: OPTIONAL.
SCHEMAS: dict[str, dict[str, Any]] = {
    # data plane (CBOR frames on the /data stream or /ws WebSocket)
    "hello": {"peer": Str, "ring": Str},  # with a ring secret: nonce, and in the reply a proof (peer.security)
    "auth": {"proof": Bytes},             # the dialling side's proof, after the server's hello
    "fwd": {"job": Str, "rotation": Int, "step": Int, "mb": Int, "mode": Str, "x": Tensor, "y": Tensor},
    "bwd": {"job": Str, "rotation": Int, "step": Int, "mb": Int, "grad": Tensor},
    # remote backward (fast-async): between a middle stage's forward role and its backward role on another peer
    "input": {"job": Str, "rotation": Int, "step": Int, "mb": Int, "stage": Int, "x": Tensor},
    "weights": {"job": Str, "rotation": Int, "step": Int, "stage": Int, "weights": Dict},
    "lend": {"job": Str, "rotation": Int, "step": Int, "stage": Int, "layers": Dict},
    "return": {"job": Str, "rotation": Int, "step": Int, "stage": Int, "layers": Dict},
    # client/helper schemes: a client's smashed data to its helper (cut 1) and the helper's output back (cut 2,
    # U-shaped or evaluation); gradients the other way (pipeline.parallel.admit)
    "act": {"job": Str, "round": Int, "step": Int, "client": Str, "cut": Int, "mode": Str, "x": Tensor},
    "grad": {"job": Str, "round": Int, "step": Int, "client": Str, "cut": Int, "mode": Str, "grad": Tensor},
    "ping": {"seq": Int},       # answered by a pong on the same connection; optional `data` is discarded
    "pong": {"seq": Int},
    "sink": {"data": Tensor},   # discarded unanswered (bandwidth tests)
    "error": {"code": Str, "message": Str},
    # control plane (HTTP, JSON bodies)
    "job_prepare": {"job": Str, "config": Dict, "ring": List, "coordinator": Str, "spec_hash": Str},
    "job_commit": {"job": Str, "rotation": Int, "version": Int, "epoch": Int, "chain": List, "ranges": Dict,
                   "head_samples": Int, "head_test_samples": Int},
    "job_pass": {"job": Str, "rotation": Int, "mode": Str},
    "swap_send": {"job": Str, "rotation": Int, "moves": List},
    "swap_receive": {"job": Str, "rotation": Int, "attempt": Int, "layers": Dict, "checksum": Str},
    "job_end": {"job": Str},
    "job_view": {"after": Dict},   # series -> the "seconds" of the last point the watcher has
    "job_heartbeat": {"job": Str},
    "journal_put": {"job": Str, "journal": Dict},
    "replica_put": {"job": Str, "owner": Str, "version": Int, "attempt": Int, "offset": Int, "size": Int,
                    "data": Tensor, "checksum": Str},
    "job_abort": {"job": Str, "reason": Str},
    "round_plan": {"job": Str, "round": Int, "assignment": Dict, "orders": Dict, "samples": Dict,
                   "test_samples": Dict},
    "run_round": {"job": Str, "round": Int, "mode": Str},
    "part_set": {"job": Str, "round": Int, "layers": Dict, "checksum": Str},
    "job_start": {"config": Dict},
    "job_profile": {"config": Dict},
    "data_probe": {"url": Str, "bytes": Int, "count": Int},  # measure the data plane to another agent (stream
                                                              # of sinks, or with round_trips: pings)
}
OPTIONAL: dict[str, dict[str, Any]] = {"error": {"ref": Dict}, "ping": {"data": Tensor},
                                       "act": {"y": Tensor}, "grad": {"loss": Float, "correct": Int, "weight": Float},
                                       "fwd": {"stage": Int}, "bwd": {"stage": Int},
                                       "job_commit": {"backward_at": List},
                                       "job_prepare": {"attempt": Int, "restore": Dict},
                                       "data_probe": {"round_trips": Bool, "copies": Bool}}

OPTIONAL["hello"] = {"nonce": Bytes, "proof": Bytes}
# an N-split stage message names the attempt it belongs to (a job resumed after a failure is a new attempt)
for _kind in ("fwd", "bwd", "input", "weights", "lend", "return"):
    OPTIONAL.setdefault(_kind, {})["attempt"] = Int


def _flat(expected) -> tuple:
    return sum((_flat(e) for e in expected), ()) if isinstance(expected, tuple) else (expected,)


def _type_ok(value, expected) -> bool:
    """isinstance, except that a bool is not a number (JSON and CBOR tell them apart)."""
    if isinstance(value, bool) and bool not in _flat(expected):
        return False
    return isinstance(value, expected)


def check_fields(msg: dict, schema: dict[str, Any], what: str, code: str = "malformed") -> None:
    """Every field of `schema` present in `msg` with its type (integers >= 0 where Int is required)."""
    for name, expected in schema.items():
        if name not in msg:
            raise ProtocolError(code, f"{what}: missing field {name!r}")
        if not _type_ok(msg[name], expected):
            raise ProtocolError(code, f"{what}: field {name!r} has the wrong type")
        if expected is Int and msg[name] < 0:
            raise ProtocolError(code, f"{what}: field {name!r} must be >= 0")


def validate(msg: Any, expected_types: set[str] | None = None) -> dict:
    """Return msg if it is a well-formed message of a known (and, if given, expected) type."""
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", "a message must be a map")
    v = msg.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:   # (True and 1.0 equal 1, but are no version)
        if isinstance(v, int) and not isinstance(v, bool):
            side = "this agent" if v > PROTOCOL_VERSION else "the sender"
            raise ProtocolError("version", f"protocol version {v} is not supported (this agent speaks "
                                           f"{PROTOCOL_VERSION}); upgrade {side}")
        raise ProtocolError("version", f"missing or malformed protocol version: {v!r}")
    kind = msg.get("type")
    if kind not in SCHEMAS or (expected_types is not None and kind not in expected_types):
        raise ProtocolError("unknown_type", f"unknown or unexpected message type {kind!r}")
    check_fields(msg, SCHEMAS[kind], kind)
    for name, expected in OPTIONAL.get(kind, {}).items():
        if name in msg and not _type_ok(msg[name], expected):
            raise ProtocolError("malformed", f"{kind}: field {name!r} has the wrong type")
    return msg


def message(kind: str, **fields) -> dict:
    return {"v": PROTOCOL_VERSION, "type": kind, **fields}


def error_message(code: str, text: str, ref: dict | None = None) -> dict:
    msg = message("error", code=code, message=text)
    if ref:
        msg["ref"] = ref
    return msg
